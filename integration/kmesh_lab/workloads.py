"""Programs that run as lab pod processes: ``python -m kmesh_lab.workloads ...``.

``helloworld``
    The istio ``examples-helloworld`` server: ``GET /hello`` answers
    ``Hello version: V, instance: NAME``. Prints ``ready`` once it listens.

``client``
    The "curl pod": reads JSON commands on stdin, one per line, and answers each with one JSON
    line on stdout. Every request is a fresh ``connect()``, because the datapath under test
    balances per connection in the cgroup connect hook. Names resolve through a hosts file and a
    search list, as a pod's /etc/hosts and resolv.conf (``ndots:5``) would.

Both use the standard library only, so they run in any pod without installing anything.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "ResolveError",
    "handle_command",
    "hello_body",
    "http_get",
    "main",
    "parse_hello",
    "parse_hosts",
    "probe_connect",
    "resolve",
    "search_candidates",
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
    host, port = sock.getpeername()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    }


def http_get(
    url: str, hosts: dict[str, list[str]], search: Sequence[str], timeout: float,
    family: int | None = None,
) -> dict[str, Any]:
    """One GET on a new TCP connection; never raises, reports failures in the result."""
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
    result = {"ok": False, "errno": None, "error": None, "connect_ms": None, "peer": None}
    kind = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}.get(proto)
    try:
        if kind is None:
            raise ValueError(f"proto must be tcp or udp, not {proto!r}")
        with _timed_open(result, resolve(host, hosts, search), port, kind, timeout) as sock:
            result["peer"] = _format_peer(sock)
            result["ok"] = True
    except (OSError, ValueError, LookupError) as exc:
        result["errno"] = _errno_name(exc)
        result["error"] = str(exc) or type(exc).__name__
    return result


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
    return {"results": [http_get(url, hosts, search, timeout, family)
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


_OPS: dict[str, Callable[[dict[str, Any], dict[str, list[str]], Sequence[str]], Any]] = {
    "get": _op_get,
    "connect": _op_connect,
    "loop": _op_loop,
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program named by the first argument."""
    args = _parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
