"""Programs that run as lab pod processes: ``python -m kmesh_lab.workloads ...``.

``helloworld``
    The istio ``examples-helloworld`` server: ``GET /hello`` answers
    ``Hello version: V, instance: NAME``. Prints ``ready`` once it listens.

``dns``
    A DNS-shaped UDP server (the lab's CoreDNS image): answers a standard query with the same
    id, QR set and, for a TXT question, one TXT record carrying its instance name; anything
    that is not a well-formed query is dropped. Prints ``ready`` once bound.

``client``
    The "curl pod": reads JSON commands on stdin, one per line, and answers each with one JSON
    line on stdout. Every request is a fresh ``connect()``, because the datapath under test
    balances per connection in the cgroup connect hook. Names resolve through a hosts file and a
    search list, as a pod's /etc/hosts and resolv.conf (``ndots:5``) would. The ``dns`` op
    sends DNS queries over UDP, unconnected (``sendto``) or connected as glibc's resolver does,
    and reports the source ``recvfrom`` gave each answer.

All use the standard library only, so they run in any pod without installing anything.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import random
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import urlsplit

__all__ = [
    "DnsQuestion",
    "ResolveError",
    "dns_answer",
    "dns_lookups",
    "dns_query",
    "handle_command",
    "hello_body",
    "http_get",
    "main",
    "parse_dns_answer",
    "parse_dns_query",
    "parse_hello",
    "parse_hosts",
    "probe_connect",
    "resolve",
    "search_candidates",
    "serve_dns",
]

NDOTS = 5  # Kubernetes' resolv.conf default
_HELLO_RE = re.compile(r"^Hello version: (?P<version>[^,]*), instance: (?P<instance>.*?)\s*$")


# --------------------------------------------------------------------------------------------
# helloworld
# --------------------------------------------------------------------------------------------


def hello_body(version: str, instance: str) -> str:
    """The exact body of istio's helloworld sample."""
    return f"Hello version: {version}, instance: {instance}\n"


def _make_handler(body: bytes, log: bool) -> type[BaseHTTPRequestHandler]:
    class HelloHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "helloworld"

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] == "/hello":
                self._reply(200, body)
            else:
                self._reply(404, b"not found\n")

        def _reply(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            # Quiet by default: an unread stderr pipe would fill up and block the server.
            if log:
                super().log_message(format, *args)

    return HelloHandler


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::", 0))
        return True
    except OSError:
        return False


def _make_server(
    bind: str | None, port: int, handler: type[BaseHTTPRequestHandler]
) -> ThreadingHTTPServer:
    """Listen on ``bind``; by default one dual-stack socket on ``::`` (v4 and v6), else v4."""
    if bind is None:
        bind = "::" if _ipv6_available() else "0.0.0.0"
    family = socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True
        allow_reuse_address = True
        # http.server's default backlog of 5 drops SYNs under a connect loop, and a dropped
        # SYN costs a 1 s retransmit: tests and benchmarks open thousands of connections.
        request_queue_size = 4096

        def server_bind(self) -> None:
            if family == socket.AF_INET6 and ipaddress.ip_address(bind).is_unspecified:
                # IPv4-mapped addresses: one socket serves both families.
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    return Server((bind, port), handler)


class _Terminate(BaseException):
    """Raised from the SIGTERM handler to leave ``serve_forever`` in the main thread.

    A BaseException: the signal can land while the server handles a request, inside
    socketserver's ``except Exception`` (which would print it and keep serving)."""


def _raise_terminate(signum: int, frame: object) -> None:
    raise _Terminate


def run_helloworld(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; print ``ready`` once listening."""
    # Handlers first: a SIGTERM right after "ready" must still end in a clean exit.
    signal.signal(signal.SIGTERM, _raise_terminate)
    signal.signal(signal.SIGINT, _raise_terminate)
    body = hello_body(args.version, args.instance).encode()
    try:
        server = _make_server(args.bind, args.port, _make_handler(body, args.log))
        try:
            print("ready", flush=True)
            server.serve_forever(poll_interval=0.5)
        finally:
            server.server_close()
    except _Terminate:
        pass
    return 0


# --------------------------------------------------------------------------------------------
# dns: a DNS-shaped UDP responder, and the packets it speaks
# --------------------------------------------------------------------------------------------

DNS_HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
DNS_QR = 0x8000
DNS_AA = 0x0400
DNS_RD = 0x0100
DNS_OPCODE = 0x7800
DNS_RCODE = 0x000F
DNS_TYPE_TXT = 16
DNS_TYPE_ANY = 255
DNS_CLASS_IN = 1
DNS_TTL = 5
DNS_MAX_UDP = 512  # the classic limit of a DNS message over UDP without EDNS
WHOAMI = "whoami.kmesh-lab."  # what the client asks by default


class DnsQuestion(NamedTuple):
    """The one question of a query: ``name`` lower-case with a trailing dot, ``raw`` the
    question section as it arrived (an answer repeats it byte for byte)."""

    id: int
    flags: int
    name: str
    qtype: int
    qclass: int
    raw: bytes


def _encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split(".") if name.strip(".") else []:
        data = label.encode("ascii")
        if not 0 < len(data) <= 63:
            raise ValueError(f"DNS label {label!r} must be 1..63 bytes")
        out += bytes([len(data)]) + data
    out += b"\0"
    if len(out) > 255:
        raise ValueError(f"DNS name {name!r} is longer than 255 bytes")
    return out


def dns_query(qid: int, name: str = WHOAMI, qtype: int = DNS_TYPE_TXT) -> bytes:
    """A standard query (RD set) with one question ``name`` of ``qtype``, class IN."""
    if not 0 <= qid <= 0xFFFF:
        raise ValueError(f"a DNS id is 16 bits, not {qid}")
    return (DNS_HEADER.pack(qid, DNS_RD, 1, 0, 0, 0) + _encode_name(name)
            + struct.pack("!HH", qtype, DNS_CLASS_IN))


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    """An uncompressed name at ``offset``: (name with a trailing dot, offset after it)."""
    labels = []
    total = 0
    while True:
        if offset >= len(data):
            raise ValueError("DNS name runs past the end of the message")
        length = data[offset]
        offset += 1
        if length == 0:
            break
        if length > 63:
            raise ValueError("compressed or reserved label in a question")
        if offset + length > len(data):
            raise ValueError("DNS label runs past the end of the message")
        total += length + 1
        if total > 254:
            raise ValueError("DNS name longer than 255 bytes")
        labels.append(data[offset:offset + length].decode("ascii").lower())
        offset += length
    return ".".join(labels) + ".", offset


def parse_dns_query(data: bytes) -> DnsQuestion:
    """The question of a standard query; ValueError for anything else (a response, another
    opcode, not exactly one question, answers in a query, a truncated or garbled message).
    Additional records (an EDNS OPT, as resolvers add) are allowed and ignored."""
    if len(data) < DNS_HEADER.size:
        raise ValueError("shorter than a DNS header")
    qid, flags, qdcount, ancount, nscount, _arcount = DNS_HEADER.unpack_from(data)
    if flags & DNS_QR:
        raise ValueError("a response, not a query")
    if flags & DNS_OPCODE:
        raise ValueError("not a standard query")
    if qdcount != 1 or ancount or nscount:
        raise ValueError("a query needs exactly one question and no answers")
    try:
        name, end = _read_name(data, DNS_HEADER.size)
    except UnicodeDecodeError:
        raise ValueError("DNS name is not ASCII") from None
    if end + 4 > len(data):
        raise ValueError("question runs past the end of the message")
    qtype, qclass = struct.unpack_from("!HH", data, end)
    return DnsQuestion(qid, flags, name, qtype, qclass, data[DNS_HEADER.size:end + 4])


def _txt_rdata(text: str) -> bytes:
    data = text.encode()
    return b"".join(bytes([len(chunk)]) + chunk
                    for chunk in (data[i:i + 255] for i in range(0, max(len(data), 1), 255)))


def dns_answer(question: DnsQuestion, text: str) -> bytes:
    """The reply to ``question``: same id, QR and AA set, RD copied; for a TXT (or ANY)
    question of class IN one TXT answer carrying ``text``, else no answer (NOERROR)."""
    flags = DNS_QR | DNS_AA | (question.flags & DNS_RD)
    answers = b""
    if question.qtype in (DNS_TYPE_TXT, DNS_TYPE_ANY) and question.qclass == DNS_CLASS_IN:
        rdata = _txt_rdata(text)
        # The owner name is a pointer to the question's name, right after the header.
        answers = struct.pack("!HHHIH", 0xC000 | DNS_HEADER.size, DNS_TYPE_TXT, DNS_CLASS_IN,
                              DNS_TTL, len(rdata)) + rdata
    count = 1 if answers else 0
    return DNS_HEADER.pack(question.id, flags, 1, count, 0, 0) + question.raw + answers


def parse_dns_answer(data: bytes, qid: int) -> str | None:
    """The text of the first TXT answer of a response to query ``qid`` (None: no TXT
    answer); ValueError if ``data`` is no such response (wrong id, a query, an error rcode,
    truncated)."""
    if len(data) < DNS_HEADER.size:
        raise ValueError("shorter than a DNS header")
    rid, flags, qdcount, ancount, _ns, _ar = DNS_HEADER.unpack_from(data)
    if rid != qid:
        raise ValueError(f"answer to query {rid}, not {qid}")
    if not flags & DNS_QR:
        raise ValueError("a query, not a response")
    if flags & DNS_RCODE:
        raise ValueError(f"rcode {flags & DNS_RCODE}")
    offset = DNS_HEADER.size
    for _ in range(qdcount):
        offset = _skip_name(data, offset) + 4
    for _ in range(ancount):
        offset = _skip_name(data, offset)
        if offset + 10 > len(data):
            raise ValueError("answer runs past the end of the message")
        rtype, _rclass, _ttl, length = struct.unpack_from("!HHIH", data, offset)
        offset += 10
        rdata = data[offset:offset + length]
        if len(rdata) != length:
            raise ValueError("answer data runs past the end of the message")
        offset += length
        if rtype == DNS_TYPE_TXT:
            return _parse_txt(rdata)
    if offset > len(data):
        raise ValueError("question runs past the end of the message")
    return None


def _skip_name(data: bytes, offset: int) -> int:
    while True:
        if offset >= len(data):
            raise ValueError("DNS name runs past the end of the message")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            return offset + 2  # a compression pointer ends the name
        if length > 63:
            raise ValueError("reserved label type")
        offset += 1 + length
        if length == 0:
            return offset


def _parse_txt(rdata: bytes) -> str:
    out, offset = b"", 0
    while offset < len(rdata):
        length = rdata[offset]
        chunk = rdata[offset + 1:offset + 1 + length]
        if len(chunk) != length:
            raise ValueError("TXT string runs past its record")
        out += chunk
        offset += 1 + length
    return out.decode("utf-8", errors="replace")


def _udp_server(bind: str | None, port: int) -> socket.socket:
    """One UDP socket on ``bind``; by default dual stack on ``::`` (v4 and v6), else v4."""
    if bind is None:
        bind = "::" if _ipv6_available() else "0.0.0.0"
    family = socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and ipaddress.ip_address(bind).is_unspecified:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((bind, port))
    except BaseException:
        sock.close()
        raise
    return sock


def serve_dns(sock: socket.socket, instance: str, stop: Callable[[], bool] | None = None) -> None:
    """Answer every query on ``sock`` with a TXT record naming ``instance``; ignore
    anything that is not a query. Returns when ``stop()`` says so (checked twice a second)."""
    sock.settimeout(0.5)
    while not (stop and stop()):
        try:
            data, sender = sock.recvfrom(65535)
        except TimeoutError:
            continue
        try:
            reply = dns_answer(parse_dns_query(data), instance)
        except ValueError:
            continue  # malformed, or not a query: a DNS server drops it
        with contextlib.suppress(OSError):  # the client may be gone: keep serving
            sock.sendto(reply, sender)


def run_dns(args: argparse.Namespace) -> int:
    """Serve DNS over UDP until SIGTERM/SIGINT; print ``ready`` once bound."""
    signal.signal(signal.SIGTERM, _raise_terminate)
    signal.signal(signal.SIGINT, _raise_terminate)
    try:
        with _udp_server(args.bind, args.port) as sock:
            print("ready", flush=True)
            serve_dns(sock, args.instance)
    except _Terminate:
        pass
    return 0


# --------------------------------------------------------------------------------------------
# Name resolution (hosts file + search list)
# --------------------------------------------------------------------------------------------


class ResolveError(LookupError):
    """A name is neither an IP literal nor in the hosts file under any search candidate."""


def parse_hosts(text: str) -> dict[str, list[str]]:
    """Parse /etc/hosts format into {lower-case name: [addresses in file order]}."""
    table: dict[str, list[str]] = {}
    for raw in text.splitlines():
        fields = raw.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = str(ipaddress.ip_address(fields[0].split("%", 1)[0]))
        except ValueError:
            continue  # a malformed line is skipped, as glibc does
        for name in fields[1:]:
            table.setdefault(name.lower().rstrip("."), []).append(address)
    return table


def search_candidates(name: str, search: Sequence[str], ndots: int = NDOTS) -> list[str]:
    """Names to try, in order, like glibc with ``options ndots:N`` and a ``search`` line.

    A trailing dot means fully qualified: only the name itself. With fewer than ``ndots``
    dots the search domains come first, else the name itself comes first.
    """
    if name.endswith("."):
        return [name.rstrip(".")]
    expanded = [f"{name}.{domain.strip('.')}" for domain in search if domain.strip(".")]
    return [*expanded, name] if name.count(".") < ndots else [name, *expanded]


def resolve(
    name: str, hosts: dict[str, list[str]], search: Sequence[str], family: int | None = None
) -> str:
    """Return the address for ``name``: an IP literal as is, else the first hosts match (of
    IP version ``family`` when given, as getaddrinfo with AF_INET/AF_INET6 would)."""
    literal = name.strip("[]")
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    for candidate in search_candidates(name.lower(), search):
        for address in hosts.get(candidate, ()):
            if family is None or ipaddress.ip_address(address).version == family:
                return address
    raise ResolveError(f"cannot resolve {name!r}" + (f" to IPv{family}" if family else ""))


# --------------------------------------------------------------------------------------------
# client: one request
# --------------------------------------------------------------------------------------------


def _errno_name(exc: BaseException) -> str | None:
    if isinstance(exc, TimeoutError) and not exc.errno:
        return "ETIMEDOUT"  # socket timeouts carry no errno
    if isinstance(exc, ResolveError):
        return "EAI_NONAME"
    code = getattr(exc, "errno", None)
    return errno.errorcode.get(code, str(code)) if isinstance(code, int) else None


def _format_peer(sock: socket.socket) -> str:
    """What ``getpeername()`` says: the Service address a translated socket dialled."""
    host, port = sock.getpeername()[:2]
    return _format_address(host, port)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def kernel_peer(sock: socket.socket) -> str | None:
    """Where the socket really is connected: its remote address in the kernel's socket table
    (/proc/self/net/{tcp,udp}[6], found by the socket's inode), which no BPF hook rewrites.
    ``getpeername()`` shows the ClusterIP of a translated socket; this shows the endpoint."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    kind = "tcp" if sock.type == socket.SOCK_STREAM else "udp"
    table = kind + ("6" if sock.family == socket.AF_INET6 else "")
    with open(f"/proc/self/net/{table}", "rb") as handle:
        text = handle.read()
    # Find the inode with bytes.find (a table of thousands of TIME_WAIT lines is not split
    # line by line), then check that it is that line's inode column.
    needle = f" {inode} ".encode()
    at = text.find(needle)
    while at >= 0:
        start = text.rfind(b"\n", 0, at) + 1
        end = text.find(b"\n", at)
        fields = text[start:end if end >= 0 else len(text)].split()
        if len(fields) > 9 and fields[9] == inode.encode():
            return _proc_address(fields[2].decode())
        at = text.find(needle, at + 1)
    return None


def _proc_address(text: str) -> str:
    """ "0100007F:1F90" (words in host byte order, the port in hex) -> "127.0.0.1:8080"."""
    raw_host, raw_port = text.split(":")
    words = bytes.fromhex(raw_host)
    # Each 32-bit word is printed as a host-order integer: undo that word by word.
    packed = b"".join(int.from_bytes(words[i:i + 4], "big").to_bytes(4, sys.byteorder)
                      for i in range(0, len(words), 4))
    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        host = str(ip)
    else:
        host = f"::ffff:{ip.ipv4_mapped}" if isinstance(ip, ipaddress.IPv6Address) else str(ip)
    return _format_address(host, int(raw_port, 16))


def parse_hello(body: str) -> tuple[str | None, str | None]:
    """Return (version, instance) from a helloworld body, or (None, None)."""
    match = _HELLO_RE.match(body)
    return (match["version"], match["instance"]) if match else (None, None)


def _dechunk(data: bytes) -> bytes:
    """Decode a chunked transfer-encoded body (tolerates a truncated tail)."""
    out, rest = b"", data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return out


def _parse_response(raw: bytes) -> tuple[int, str]:
    """Return (status, body) of an HTTP/1.x response read to EOF."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"incomplete HTTP response ({len(raw)} bytes)")
    lines = head.decode("iso-8859-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return status, body.decode("utf-8", errors="replace")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(errno.ETIMEDOUT, "request deadline exceeded")
    return left


def _open(address: str, port: int, kind: int, timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _timed_open(
    result: dict[str, Any], address: str, port: int, kind: int, timeout: float
) -> socket.socket:
    """:func:`_open`; record in ``result`` how long connect() took, also when it fails."""
    start = time.monotonic()
    try:
        return _open(address, port, kind, timeout)
    finally:
        result["connect_ms"] = (time.monotonic() - start) * 1000


def _empty_result() -> dict[str, Any]:
    return {
        "ok": False,
        "status": None,
        "body": "",
        "version": None,
        "instance": None,
        "errno": None,
        "error": None,
        "connect_ms": None,
        "total_ms": None,
        "peer": None,
        "endpoint": None,
    }


def http_get(
    url: str, hosts: dict[str, list[str]], search: Sequence[str], timeout: float,
    family: int | None = None, endpoint: bool = False,
) -> dict[str, Any]:
    """One GET on a new TCP connection; never raises, reports failures in the result.

    ``endpoint``: also report where the connection really went (``kernel_peer``). Off by
    default: it reads the namespace's whole socket table, which after thousands of requests
    (TIME_WAIT entries) costs more than the request itself."""
    result = _empty_result()
    start = time.monotonic()
    deadline = start + timeout
    try:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"unsupported URL {url!r}")
        port = parts.port or 80
        address = resolve(parts.hostname, hosts, search, family)
        with _timed_open(result, address, port, socket.SOCK_STREAM, timeout) as sock:
            result["peer"] = _format_peer(sock)
            if endpoint:
                result["endpoint"] = kernel_peer(sock)
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            host = parts.netloc.rpartition("@")[2]
            request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            sock.settimeout(_remaining(deadline))
            sock.sendall(request.encode())
            chunks = []
            while True:
                sock.settimeout(_remaining(deadline))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        status, body = _parse_response(b"".join(chunks))
        result.update(status=status, body=body, ok=status == 200)
        result["version"], result["instance"] = parse_hello(body)
    except (OSError, ValueError, LookupError) as exc:
        result["errno"] = _errno_name(exc)
        result["error"] = str(exc) or type(exc).__name__
    result["total_ms"] = (time.monotonic() - start) * 1000
    return result


def probe_connect(
    host: str,
    port: int,
    proto: str,
    hosts: dict[str, list[str]],
    search: Sequence[str],
    timeout: float,
) -> dict[str, Any]:
    """Only ``connect()`` (a UDP connect sends nothing but runs the connect hook); report."""
    result = {"ok": False, "errno": None, "error": None, "connect_ms": None, "peer": None,
              "endpoint": None}
    kind = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}.get(proto)
    try:
        if kind is None:
            raise ValueError(f"proto must be tcp or udp, not {proto!r}")
        with _timed_open(result, resolve(host, hosts, search), port, kind, timeout) as sock:
            result["peer"] = _format_peer(sock)
            result["endpoint"] = kernel_peer(sock)
            result["ok"] = True
    except (OSError, ValueError, LookupError) as exc:
        result["errno"] = _errno_name(exc)
        result["error"] = str(exc) or type(exc).__name__
    return result


def _empty_dns_result() -> dict[str, Any]:
    return {
        "ok": False,
        "errno": None,
        "error": None,
        "instance": None,
        "source": None,
        "peer": None,
        "endpoint": None,
        "ignored": 0,
        "rtt_ms": None,
    }


def _dns_exchange(
    result: dict[str, Any], sock: socket.socket, address: str, port: int, connected: bool,
    name: str, deadline: float,
) -> None:
    """Send one query on ``sock`` (``send`` if connected, else ``sendto``) and wait for its
    answer (the same id); fill in ``result``. A datagram that is no answer to this query is
    counted in ``ignored`` and the wait goes on, as a resolver does."""
    qid = random.getrandbits(16)
    query = dns_query(qid, name)
    sock.settimeout(_remaining(deadline))
    if connected:
        sock.send(query)
    else:
        sock.sendto(query, (address, port))
    while True:
        sock.settimeout(_remaining(deadline))
        # recvfrom also on a connected socket: glibc's resolver does, and checks the source.
        data, source = sock.recvfrom(65535)
        try:
            text = parse_dns_answer(data, qid)
        except ValueError:
            result["ignored"] += 1
            continue
        result["source"] = _format_address(*source[:2])
        result["instance"] = text
        result["ok"] = text is not None
        if text is None:
            result["error"] = "the answer has no TXT record"
        return


def dns_lookups(
    host: str, port: int, hosts: dict[str, list[str]], search: Sequence[str], *,
    count: int = 1, timeout: float = 2.0, connected: bool = False, reuse: bool = False,
    family: int | None = None, name: str = WHOAMI,
) -> list[dict[str, Any]]:
    """``count`` DNS queries (TXT ``name``) over UDP to ``host``:``port``; never raises.

    Unconnected (``sendto``/``recvfrom``), or ``connected`` as glibc's resolver does
    (``connect``, ``send``, ``recvfrom``). A new socket per query, or one for all of them
    with ``reuse``. Per query: ``source`` is the address ``recvfrom`` reported for the
    answer, ``instance`` the answer's TXT text; for a connected socket ``peer`` is what
    ``getpeername()`` says and ``endpoint`` the kernel's remote address (:func:`kernel_peer`).
    """
    results = []
    shared: socket.socket | None = None
    try:
        for _ in range(count):
            result = _empty_dns_result()
            start = time.monotonic()
            sock = shared
            try:
                address = resolve(host, hosts, search, family)
                if sock is None:
                    version = ipaddress.ip_address(address).version
                    sock = socket.socket(socket.AF_INET6 if version == 6 else socket.AF_INET,
                                         socket.SOCK_DGRAM)
                    sock.settimeout(timeout)
                    if connected:
                        sock.connect((address, port))
                    if reuse:
                        shared = sock
                if connected:
                    result["peer"] = _format_peer(sock)
                    result["endpoint"] = kernel_peer(sock)
                _dns_exchange(result, sock, address, port, connected, name, start + timeout)
            except (OSError, ValueError, LookupError) as exc:
                result["errno"] = _errno_name(exc)
                result["error"] = str(exc) or type(exc).__name__
            finally:
                if sock is not None and sock is not shared:
                    sock.close()
            result["rtt_ms"] = (time.monotonic() - start) * 1000
            results.append(result)
    finally:
        if shared is not None:
            shared.close()
    return results


# --------------------------------------------------------------------------------------------
# client: command loop
# --------------------------------------------------------------------------------------------


def _load_hosts(path: str | None) -> dict[str, list[str]]:
    if not path:
        return {}
    with open(path) as handle:  # re-read per command: the lab rewrites it as services change
        return parse_hosts(handle.read())


def _count(command: dict[str, Any]) -> int:
    count = int(command.get("count", 1))
    if not 0 < count <= 100_000:
        raise ValueError(f"count must be 1..100000, not {count}")
    return count


def _op_get(command: dict[str, Any], hosts: dict[str, list[str]], search: Sequence[str]) -> Any:
    url, timeout = str(command["url"]), float(command.get("timeout", 2.0))
    family = command.get("family")
    if family not in (None, 4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    endpoint = command.get("endpoint", False)
    if type(endpoint) is not bool:
        raise ValueError(f"endpoint must be true or false, not {endpoint!r}")
    return {"results": [http_get(url, hosts, search, timeout, family, endpoint)
                        for _ in range(_count(command))]}


def _op_connect(command: dict[str, Any], hosts: dict[str, list[str]], search: Sequence[str]) -> Any:
    host, port = str(command["host"]), int(command["port"])
    proto, timeout = str(command.get("proto", "tcp")), float(command.get("timeout", 2.0))
    results = [
        probe_connect(host, port, proto, hosts, search, timeout) for _ in range(_count(command))
    ]
    return {"results": results}


def _op_loop(command: dict[str, Any], hosts: dict[str, list[str]], search: Sequence[str]) -> Any:
    """GETs round-robin over ``urls`` until ``seconds`` passed or ``max`` were made: each a
    new connection, with its start time (time.monotonic(), the host's clock: a test compares
    it with when a change was applied) and what answered."""
    urls = [str(u) for u in command["urls"]]
    seconds, timeout = float(command["seconds"]), float(command.get("timeout", 2.0))
    limit = int(command.get("max", 100_000))
    if not urls or not 0 < seconds <= 600 or not 0 < limit <= 1_000_000:
        raise ValueError("loop needs urls, 0 < seconds <= 600 and 0 < max <= 1000000")
    results = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(results) < limit:
        index = len(results) % len(urls)
        started = time.monotonic()
        r = http_get(urls[index], hosts, search, timeout)
        failure = None if r["ok"] else (r["errno"] or r["error"] or f"HTTP {r['status']}")
        results.append({"t": started, "done": time.monotonic(), "url": index,
                        "version": r["version"], "errno": failure})
    return {"results": results}


def _op_dns(command: dict[str, Any], hosts: dict[str, list[str]], search: Sequence[str]) -> Any:
    family = command.get("family")
    if family not in (None, 4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    port = int(command.get("port", 53))
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1..65535, not {port}")
    results = dns_lookups(
        str(command["host"]), port, hosts, search, count=_count(command),
        timeout=float(command.get("timeout", 2.0)), connected=bool(command.get("connected")),
        reuse=bool(command.get("reuse")), family=family, name=str(command.get("name", WHOAMI)),
    )
    return {"results": results}


_OPS: dict[str, Callable[[dict[str, Any], dict[str, list[str]], Sequence[str]], Any]] = {
    "get": _op_get,
    "connect": _op_connect,
    "loop": _op_loop,
    "dns": _op_dns,
}


def handle_command(line: str, hosts_path: str | None, search: Sequence[str]) -> dict[str, Any]:
    """Execute one JSON command line; any problem becomes ``{"error": ...}``, never a crash."""
    command: Any = None
    try:
        command = json.loads(line)
        if not isinstance(command, dict):
            raise ValueError("a command must be a JSON object")
        op = command.get("op")
        if op == "quit":
            reply: dict[str, Any] = {"ok": True, "quit": True}
        elif op in _OPS:
            reply = _OPS[op](command, _load_hosts(hosts_path), search)
        else:
            raise ValueError(f"unknown op {op!r}")
    except Exception as exc:  # robustness is the point: report, keep serving
        reply = {"error": f"{type(exc).__name__}: {exc}"}
    if isinstance(command, dict) and "id" in command:
        reply["id"] = command["id"]
    return reply


def run_client(args: argparse.Namespace) -> int:
    """Serve commands from stdin until ``quit`` or EOF."""
    search = args.search.replace(",", " ").split()
    print("ready", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        reply = handle_command(line, args.hosts, search)
        print(json.dumps(reply), flush=True)
        if reply.get("quit") is True:
            break
    return 0


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kmesh_lab.workloads")
    sub = parser.add_subparsers(dest="program", required=True)
    hello = sub.add_parser("helloworld", help="istio helloworld HTTP server")
    hello.add_argument("--port", type=int, default=5000)
    hello.add_argument("--version", required=True)
    hello.add_argument("--instance", required=True)
    hello.add_argument("--bind", default=None, help="address; default :: (dual stack) or 0.0.0.0")
    hello.add_argument("--log", action="store_true", help="log requests to stderr")
    hello.set_defaults(run=run_helloworld)
    client = sub.add_parser("client", help="JSON-lines HTTP/connect client (the curl pod)")
    client.add_argument("--hosts", default=None, help="hosts file, /etc/hosts format")
    client.add_argument("--search", default="", help="search domains, space or comma separated")
    client.set_defaults(run=run_client)
    dns = sub.add_parser("dns", help="DNS-shaped UDP server: a TXT answer naming the instance")
    dns.add_argument("--port", type=int, default=53)
    dns.add_argument("--instance", required=True)
    dns.add_argument("--bind", default=None, help="address; default :: (dual stack) or 0.0.0.0")
    dns.set_defaults(run=run_dns)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program named by the first argument."""
    args = _parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
