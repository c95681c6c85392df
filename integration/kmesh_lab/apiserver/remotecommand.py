"""``kubectl exec`` over WebSocket: RFC 6455 framing and Kubernetes' remote command protocol.

kubectl 1.29+ (client-go ``remotecommand.NewWebSocketExecutor``) opens
``GET /api/v1/namespaces/NS/pods/NAME/exec?command=..&command=..&container=..&stdin=..``
as a WebSocket upgrade offering the subprotocol ``v5.channel.k8s.io``; on any answer but
``101 Switching Protocols`` it falls back to SPDY (``POST`` with ``Upgrade: SPDY/3.1``),
which this server does not speak: it answers that with a ``Status`` error instead.

The channel protocols ``v4.channel.k8s.io`` and ``v5.channel.k8s.io`` share one framing:
every data message is binary and its first byte is the stream id, :data:`STDIN` 0,
:data:`STDOUT` 1, :data:`STDERR` 2, :data:`ERROR` 3 (the final ``Status`` JSON, as the
kubelet writes it), :data:`RESIZE` 4 (terminal size JSON). v5 adds :data:`CLOSE` 255: the
message ``[255, id]`` half-closes stream ``id`` (kubectl sends ``[255, 0]`` at the end of its
stdin). The session ends, as with the kubelet, with the ``Status`` on channel 3 then a close
frame (1000): client-go's reader ends every stream at a normal closure, and decodes the
``Status`` (``NonZeroExitCode`` -> kubectl exits with that code).

What is here, independent of HTTP routing:

* :class:`ExecRequest` and :data:`ExecRunner`, the contract with whoever starts the process
  (the lab, a test): the runner returns a started ``Popen`` (pipes as requested, in a new
  session so its process group can be killed) or raises :class:`ApiError` before anything
  is upgraded;
* :func:`parse_exec_query` (repeated ``command`` parameters, Go ``ParseBool`` flags);
  a tty (``kubectl exec -it`` from a terminal) is refused before the upgrade (:func:`no_tty`):
  sessions are pipes, with no pty to give it;
* the handshake (:func:`choose_protocol`, :func:`handshake_key`, :func:`handshake_response`);
* framing: :func:`encode_frame`, :func:`apply_mask`, :class:`Decoder` (masking required of
  clients, fragmentation, control frames, size limit; violations are :class:`ProtocolError`
  with the close code to send);
* :class:`ExecSession`: one upgraded connection pumped by one thread with a selector, no
  other threads: process stdout/stderr -> channels 1/2, channel 0 -> process stdin (which
  is closed on ``[255, 0]``), pings answered, output bounded (the process is read only while
  less than :data:`OUT_LIMIT` bytes wait for the client; stdin likewise), plain or TLS
  sockets alike (non-blocking; TLS reads and writes stay in the one thread). When the client
  goes away, breaks the protocol or :meth:`ExecSession.close` is called (server stop), the
  process group is killed and reaped.

A process killed by signal N reports exit code 128+N, as container runtimes do.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from .errors import ApiError

PROTOCOL_V5 = "v5.channel.k8s.io"
PROTOCOL_V4 = "v4.channel.k8s.io"
PROTOCOLS = (PROTOCOL_V5, PROTOCOL_V4)  # the server's preference

STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = (OP_TEXT, OP_BINARY)
CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_MESSAGE = 4 * 1024 * 1024  # a client message (kubectl's stdin writes are <= 32 KiB)
OUT_LIMIT = 1024 * 1024  # bytes queued for the client before the process is read again
STDIN_LIMIT = 1024 * 1024  # bytes queued for the process before the client is read again
READ_SIZE = 64 * 1024
DRAIN_QUIET = 0.5  # after the process exited: stop reading pipes quiet this long
CLOSE_WAIT = 2.0  # after our close frame: wait this long for the client's
POLL_INTERVAL = 0.1  # process exit polling when pidfd_open is unavailable

WEBSOCKET_ONLY = (f"this server speaks exec only over WebSocket ({PROTOCOL_V5} or "
                  f"{PROTOCOL_V4}): SPDY/3.1 and requests without a WebSocket upgrade "
                  f"are not served")


# --- the contract -----------------------------------------------------------------------


@dataclass(frozen=True)
class ExecRequest:
    """One exec as the client asked for it. ``container`` "" means: the pod's first."""

    namespace: str
    pod: str
    container: str
    command: list[str]
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


ExecRunner = Callable[[ExecRequest], subprocess.Popen[bytes]]


def _parse_bool(name: str, values: list[str]) -> bool:
    if not values:
        return False
    value = values[-1]
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("", "0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ApiError(400, f'{name}: Invalid value: "{value}": strconv.ParseBool: parsing '
                        f'"{value}": invalid syntax', "BadRequest")


def parse_exec_query(query: str, namespace: str, pod: str) -> ExecRequest:
    """The raw query string of an exec request (``command`` repeated, in order)."""
    params = parse_qs(query, keep_blank_values=True)
    command = params.get("command", [])
    if not command:
        raise ApiError(400, "you must specify at least 1 command", "BadRequest")
    stdin, stdout, stderr, tty = (_parse_bool(n, params.get(n, []))
                                  for n in ("stdin", "stdout", "stderr", "tty"))
    if not (stdin or stdout or stderr):
        raise ApiError(400, "you must specify at least 1 of stdin, stdout, stderr",
                       "BadRequest")
    if tty:
        stderr = False  # the kubelet drops stderr with a tty: it is the terminal's output
    containers = params.get("container", [])
    return ExecRequest(namespace, pod, containers[-1] if containers else "", command, stdin,
                       stdout, stderr, tty)


def websocket_only() -> ApiError:
    return ApiError(400, WEBSOCKET_ONLY, "BadRequest")


def no_tty() -> ApiError:
    """A tty needs a pty (stdout carrying the merged output, resizes applied); sessions here
    are pipes only, so a tty request is refused rather than served without a terminal and
    with its stderr dropped."""
    return ApiError(400, "tty is not supported by the kmesh lab; run without -t", "BadRequest")


def no_runner() -> ApiError:
    return ApiError(400, "exec is not available: this API server was started without an "
                         "exec runner", "BadRequest")


def exit_status(returncode: int) -> dict[str, Any]:
    """The ``Status`` the kubelet writes on the error channel when the process ended."""
    if returncode == 0:
        return {"metadata": {}, "status": "Success"}
    code = returncode if returncode > 0 else 128 - returncode  # killed by signal -N
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: exit status {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


class RecentRefusals:
    """Runner refusals by request for ``ttl`` seconds. kubectl retries a refused WebSocket
    exec over SPDY at once; answering that retry with the same error (as the real server
    does, whose checks do not depend on the protocol) makes kubectl print the refusal."""

    def __init__(self, ttl: float = 10.0, size: int = 64) -> None:
        self.ttl = ttl
        self.size = size
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, ...], tuple[float, ApiError]] = {}

    def remember(self, key: tuple[str, ...], error: ApiError) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (time.monotonic() + self.ttl, error)
            while len(self._entries) > self.size:
                del self._entries[next(iter(self._entries))]

    def take(self, key: tuple[str, ...]) -> ApiError | None:
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]


def refusal_key(namespace: str, pod: str, query: str) -> tuple[str, ...]:
    return (namespace, pod, *sorted(query.split("&")))


# --- the handshake ----------------------------------------------------------------------


def _tokens(values: Iterable[str]) -> list[str]:
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def is_websocket_upgrade(headers: Any) -> bool:
    """``headers``: an ``email.message.Message`` (``BaseHTTPRequestHandler.headers``)."""
    upgrade = [t.lower() for t in _tokens(headers.get_all("Upgrade") or [])]
    connection = [t.lower() for t in _tokens(headers.get_all("Connection") or [])]
    return "websocket" in upgrade and "upgrade" in connection


def choose_protocol(headers: Any) -> str | None:
    offered = _tokens(headers.get_all("Sec-WebSocket-Protocol") or [])
    return next((p for p in PROTOCOLS if p in offered), None)


def handshake_key(headers: Any) -> str:
    """The client's Sec-WebSocket-Key, checked (400 otherwise)."""
    if (headers.get("Sec-WebSocket-Version") or "").strip() != "13":
        raise ApiError(400, "unsupported WebSocket version: this server speaks version 13",
                       "BadRequest")
    key = (headers.get("Sec-WebSocket-Key") or "").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise ApiError(400, "invalid Sec-WebSocket-Key", "BadRequest")
    return key


def accept_key(key: str) -> str:
    digest = hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def handshake_response(key: str, protocol: str) -> bytes:
    return ("HTTP/1.1 101 Switching Protocols\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
            f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n").encode("latin-1")


# --- framing (RFC 6455 section 5) -------------------------------------------------------


class ProtocolError(Exception):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte masking key (masking and unmasking are the same)."""
    n = len(data)
    if n == 0:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes = b"", *, fin: bool = True,
                 mask: bytes | None = None) -> bytes:
    """One frame; ``mask`` (4 bytes) for a client's frames, None for a server's."""
    n = len(payload)
    head = bytearray([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head.append(bit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(bit | 127)
        head += n.to_bytes(8, "big")
    if mask is not None:
        if len(mask) != 4:
            raise ValueError("a masking key is 4 bytes")
        head += mask
        payload = apply_mask(payload, mask)
    return bytes(head) + payload


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()[:123]


def parse_close(payload: bytes) -> tuple[int, str]:
    """A close frame's (code, reason); 1005 when it carries none."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a close frame payload of one byte")
    code = int.from_bytes(payload[:2], "big")
    if code < 1000 or code in (1004, 1005, 1006, 1015) or 1016 <= code < 3000 or code >= 5000:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


class Decoder:
    """One direction of a connection, bytes in, ``(opcode, payload)`` out: data messages
    reassembled from their fragments (opcode text or binary), control frames (close,
    ping, pong) as they come, also between fragments. ``expect_masked``: a server reads
    masked client frames (True), a client unmasked server frames (False)."""

    def __init__(self, *, expect_masked: bool = True, max_message: int = MAX_MESSAGE) -> None:
        self.expect_masked = expect_masked
        self.max_message = max_message
        self._buf = bytearray()
        self._fragments: list[bytes] = []
        self._fragment_opcode: int | None = None
        self._fragment_size = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        while True:
            frame = self._next_frame()
            if frame is None:
                return out
            message = self._assemble(*frame)
            if message is not None:
                out.append(message)

    def _next_frame(self) -> tuple[bool, int, bytes] | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        fin, opcode = bool(b0 & 0x80), b0 & 0x0F
        if b0 & 0x70:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension)")
        if opcode not in (OP_CONTINUATION, *DATA_OPCODES, *CONTROL_OPCODES):
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        masked = bool(b1 & 0x80)
        if masked != self.expect_masked:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR,
                                "client frames must be masked" if self.expect_masked
                                else "server frames must not be masked")
        length, pos = b1 & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            length, pos = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length, pos = int.from_bytes(buf[2:10], "big"), 10
            if length >> 63:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "payload length has its top bit set")
        if opcode in CONTROL_OPCODES and (not fin or length > 125):
            raise ProtocolError(CLOSE_PROTOCOL_ERROR,
                                "control frames must be final and at most 125 bytes")
        if length > self.max_message:
            raise ProtocolError(CLOSE_TOO_BIG, f"message larger than {self.max_message} bytes")
        end = pos + (4 if masked else 0) + length
        if len(buf) < end:
            return None
        if masked:
            payload = apply_mask(bytes(buf[pos + 4:end]), bytes(buf[pos:pos + 4]))
        else:
            payload = bytes(buf[pos:end])
        del buf[:end]
        return fin, opcode, payload

    def _assemble(self, fin: bool, opcode: int, payload: bytes) -> tuple[int, bytes] | None:
        if opcode in CONTROL_OPCODES:
            return opcode, payload
        if opcode == OP_CONTINUATION:
            if self._fragment_opcode is None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation frame without a start")
        elif self._fragment_opcode is not None:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message before the last one ended")
        elif fin:
            return opcode, payload
        else:
            self._fragment_opcode = opcode
        self._fragment_size += len(payload)
        if self._fragment_size > self.max_message:
            raise ProtocolError(CLOSE_TOO_BIG, f"message larger than {self.max_message} bytes")
        self._fragments.append(payload)
        if not fin:
            return None
        message = (self._fragment_opcode, b"".join(self._fragments))
        self._fragments, self._fragment_opcode, self._fragment_size = [], None, 0
        return message


# --- one session ------------------------------------------------------------------------


_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def kill_process_group(proc: subprocess.Popen[bytes], group: bool = True) -> None:
    """SIGKILL ``proc`` (and its process group when it leads one), then reap it."""
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


class ExecSession:
    """One upgraded exec connection (after the 101 was sent), run by :meth:`run` in the
    connection's thread. ``early``: bytes of the client already read past the HTTP head.

    :attr:`outcome` says how it ended: ``exited`` (the process ended, its status sent),
    ``client-gone`` (EOF, a connection error, or a close frame before the end),
    ``protocol-error``, ``stopped`` (:meth:`close`)."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes],
                 request: ExecRequest, protocol: str, early: bytes = b"") -> None:
        self.sock = sock
        self.proc = proc
        self.request = request
        self.protocol = protocol
        self.early = early
        self.outcome = ""
        self.returncode: int | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._decoder = Decoder(expect_masked=True)
        self._out: deque[memoryview] = deque()
        self._out_bytes = 0
        self._stdin_buf = bytearray()
        self._stdin_closing = not request.stdin
        self._close_sent = False
        self._peer_closed = False  # the client's close frame arrived
        self._peer_gone = False  # EOF or an error on the socket
        # A runner starts the process in a new session: its pid is its process group.
        try:
            self._group = os.getpgid(proc.pid) == proc.pid
        except ProcessLookupError:
            self._group = False
        self._cleaned = False

    # -- control from other threads --

    def close(self) -> None:
        """End the session soon (server stop): the process group is killed."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- output --

    def _queue(self, data: bytes) -> None:
        if data:
            self._out.append(memoryview(data))
            self._out_bytes += len(data)

    def _queue_frame(self, opcode: int, payload: bytes) -> None:
        self._queue(encode_frame(opcode, payload))

    def _queue_close(self, code: int, reason: str = "") -> None:
        if not self._close_sent:
            self._close_sent = True
            self._queue_frame(OP_CLOSE, close_payload(code, reason))

    def _write_socket(self) -> None:
        while self._out:
            chunk = self._out[0]
            try:
                sent = self.sock.send(chunk)
            except _WOULD_BLOCK:
                return
            except OSError:
                self._peer_gone = True
                self._out.clear()
                self._out_bytes = 0
                return
            self._out_bytes -= sent
            if sent == len(chunk):
                self._out.popleft()
            else:
                self._out[0] = chunk[sent:]

    # -- input --

    def _read_socket(self) -> None:
        for _ in range(16):  # then let the other fds have a turn
            if len(self._stdin_buf) >= STDIN_LIMIT:
                return
            try:
                data = self.sock.recv(READ_SIZE)
            except _WOULD_BLOCK:
                return
            except OSError:
                data = b""
            if not data:
                self._peer_gone = True
                return
            self._receive(data)
            if self._peer_closed:
                return

    def _receive(self, data: bytes) -> None:
        for opcode, payload in self._decoder.feed(data):
            if opcode == OP_CLOSE:
                self._peer_closed = True
                code, _ = parse_close(payload)
                self._queue_close(CLOSE_NORMAL if code == CLOSE_NO_STATUS else code)
                return
            if opcode == OP_PING:
                self._queue_frame(OP_PONG, payload)
            elif opcode in DATA_OPCODES and payload:
                self._channel_message(payload[0], payload[1:])

    def _channel_message(self, channel: int, data: bytes) -> None:
        if channel == STDIN:
            if not self._stdin_closing and self.proc.stdin is not None:
                self._stdin_buf += data
        elif channel == CLOSE and data[:1] == bytes([STDIN]):
            self._stdin_closing = True
        # RESIZE (terminal size) and unknown channels: nothing to do without a terminal

    def _write_stdin(self) -> None:
        stdin = self.proc.stdin
        if stdin is None:
            self._stdin_buf.clear()
            return
        if self._stdin_buf:
            try:
                written = os.write(stdin.fileno(), self._stdin_buf[:READ_SIZE])
            except _WOULD_BLOCK:
                return
            except OSError:  # the process closed its stdin (EPIPE)
                self._stdin_buf.clear()
                self._stdin_closing = True
                written = 0
            del self._stdin_buf[:written]
        if self._stdin_closing and not self._stdin_buf:
            with contextlib.suppress(OSError):
                stdin.close()

    # -- the loop --

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.cleanup()

    def _run(self) -> None:
        proc = self.proc
        pipes: dict[int, int] = {}  # fd -> channel
        for stream, channel, wanted in ((proc.stdout, STDOUT, self.request.stdout),
                                        (proc.stderr, STDERR, self.request.stderr)):
            if stream is not None:
                if wanted:
                    pipes[stream.fileno()] = channel
                else:
                    stream.close()
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)
        self.sock.setblocking(False)
        pidfd = -1
        with contextlib.suppress(OSError, AttributeError):
            pidfd = os.pidfd_open(proc.pid)
        selector = selectors.DefaultSelector()
        interest: dict[int, int] = {}

        def want(fd: int, events: int) -> None:
            current = interest.get(fd, 0)
            if events == current:
                return
            if not events:
                selector.unregister(fd)
                del interest[fd]
            elif not current:
                selector.register(fd, events)
                interest[fd] = events
            else:
                selector.modify(fd, events)
                interest[fd] = events

        sock_fd = self.sock.fileno()
        stdin_fd = proc.stdin.fileno() if proc.stdin is not None else -1
        want(self._wake_r.fileno(), selectors.EVENT_READ)
        last_output = 0.0
        deadline = 0.0  # once the close frame is queued
        try:
            if self.early:
                self._receive(self.early)
            while True:
                now = time.monotonic()
                if self._stop.is_set():
                    self.outcome = self.outcome or "stopped"
                    self._queue_close(CLOSE_GOING_AWAY, "server stopping")
                    self._write_socket()
                    return
                if self._peer_gone:
                    self.outcome = self.outcome or "client-gone"
                    return
                if self._peer_closed and not self.outcome:
                    self.outcome = "client-gone"
                    deadline = now + CLOSE_WAIT
                if self.returncode is None:
                    self.returncode = proc.poll()
                    if self.returncode is not None:
                        last_output = now
                if (not self.outcome and self.returncode is not None
                        and (not pipes or now - last_output > DRAIN_QUIET)):
                    # The process ended and its output is out: the kubelet's last words.
                    self.outcome = "exited"
                    status = json.dumps(exit_status(self.returncode), separators=(",", ":"))
                    self._queue_frame(OP_BINARY, bytes([ERROR]) + status.encode())
                    self._queue_close(CLOSE_NORMAL)
                    deadline = now + CLOSE_WAIT
                if self.outcome:
                    if not self._out and (self._peer_closed or now >= deadline):
                        return
                    if now >= deadline:
                        return
                # What to wait for.
                reading_stdin_ok = len(self._stdin_buf) < STDIN_LIMIT
                events = selectors.EVENT_READ if reading_stdin_ok and not self._peer_closed \
                    else 0
                if self._out:
                    events |= selectors.EVENT_WRITE
                want(sock_fd, events)
                out_ok = self._out_bytes < OUT_LIMIT and not self.outcome
                for fd in list(pipes):
                    want(fd, selectors.EVENT_READ if out_ok else 0)
                if not out_ok:
                    last_output = now  # held back, not quiet
                if stdin_fd >= 0:
                    pending = bool(self._stdin_buf) and proc.stdin is not None \
                        and not proc.stdin.closed
                    want(stdin_fd, selectors.EVENT_WRITE if pending else 0)
                    if proc.stdin is not None and proc.stdin.closed:
                        stdin_fd = -1
                if pidfd >= 0:
                    want(pidfd, selectors.EVENT_READ if self.returncode is None else 0)
                timeout = 1.0
                if self.returncode is None and pidfd < 0:
                    timeout = POLL_INTERVAL
                if self.returncode is not None and pipes and not self.outcome:
                    timeout = max(0.0, DRAIN_QUIET - (now - last_output)) + 0.01
                if self.outcome:
                    timeout = max(0.0, min(timeout, deadline - now))
                ssl_pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
                if ssl_pending and events & selectors.EVENT_READ:
                    timeout = 0.0
                ready = {key.fd: mask for key, mask in selector.select(timeout)}
                if ready.get(sock_fd, 0) & selectors.EVENT_WRITE:
                    self._write_socket()
                if (ready.get(sock_fd, 0) & selectors.EVENT_READ
                        or (ssl_pending and events & selectors.EVENT_READ)):
                    self._read_socket()
                for fd, channel in list(pipes.items()):
                    if not ready.get(fd, 0) & selectors.EVENT_READ:
                        continue
                    try:
                        data = os.read(fd, READ_SIZE)
                    except _WOULD_BLOCK:
                        continue
                    except OSError:  # EIO from a terminal whose process is gone
                        data = b""
                    if data:
                        self._queue_frame(OP_BINARY, bytes([channel]) + data)
                        last_output = time.monotonic()
                    else:
                        want(fd, 0)
                        del pipes[fd]
                if stdin_fd >= 0 and (ready.get(stdin_fd, 0) & selectors.EVENT_WRITE
                                      or (self._stdin_closing and not self._stdin_buf)):
                    self._write_stdin()
                if self._out:
                    self._write_socket()  # most writes succeed at once
                if ready.get(self._wake_r.fileno()):
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(64)
        except ProtocolError as e:
            self.outcome = "protocol-error"
            self._out.clear()
            self._queue_close(e.code, e.reason)
            self._flush(CLOSE_WAIT)
        finally:
            selector.close()
            if pidfd >= 0:
                os.close(pidfd)

    def _flush(self, timeout: float) -> None:
        """Send what is queued, waiting at most ``timeout`` (the connection ends after)."""
        end = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock.fileno(), selectors.EVENT_WRITE)
            while self._out and not self._peer_gone and time.monotonic() < end:
                selector.select(max(0.0, end - time.monotonic()))
                self._write_socket()

    def cleanup(self) -> None:
        """Kill (unless it exited) and reap the process, close the pipes; idempotent."""
        if self._cleaned:
            return
        self._cleaned = True
        proc = self.proc
        if self.outcome != "exited":
            kill_process_group(proc, self._group)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self.returncode is None:
            self.returncode = proc.returncode
        self._wake_r.close()
        self._wake_w.close()
        with contextlib.suppress(OSError):
            self.sock.setblocking(True)


def buffered_bytes(rfile: Any) -> bytes:
    """Bytes a ``BufferedReader`` over a non-blocking socket holds already (the client's
    first frames when it did not wait for the 101), without blocking."""
    try:
        data = rfile.peek(1)
    except (*_WOULD_BLOCK, OSError, ValueError):
        return b""
    if not data:
        return b""
    return bytes(rfile.read(len(data)))
