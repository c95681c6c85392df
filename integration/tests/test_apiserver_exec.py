"""``kubectl exec`` against the lab's API server (kmesh_lab.apiserver, remotecommand): the
real kubectl 1.31 over WebSocket v5.channel.k8s.io and https with a token, plus a raw
WebSocket client for what kubectl does not do (v4, pings, fragments, protocol errors).

The runner here starts the command as a local process (``start_new_session``), checking the
pod and container the way a lab runner does. Every kubectl call and socket read has a
timeout; every server is stopped at the end and leaves no thread and no process behind.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_apiserver import KUBECTL_TIMEOUT, Kubectl, make_kubectl, stop_cleanly

from conftest import missing
from kmesh_lab.apiserver import ApiError, ApiServer
from kmesh_lab.apiserver.remotecommand import (
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    PROTOCOL_V4,
    PROTOCOL_V5,
    Decoder,
    ExecRequest,
    accept_key,
    encode_frame,
    parse_close,
)

TIMEOUT = 10.0
TOKEN = "exec-s3cret"
NS = "demo"


class Runner:
    """An ExecRunner: the pod must exist and name the container; the command runs here,
    with KMESH_POD and KMESH_CONTAINER in its environment."""

    def __init__(self, server: ApiServer) -> None:
        self.server = server
        self.started: list[subprocess.Popen[bytes]] = []
        self.requests: list[ExecRequest] = []

    def __call__(self, request: ExecRequest) -> subprocess.Popen[bytes]:
        self.requests.append(request)
        pod = self.server.get("pods", request.namespace, request.pod)  # ApiError 404
        names = [c["name"] for c in pod["spec"]["containers"]]
        container = request.container or names[0]
        if container not in names:
            raise ApiError(400, f"container {container} is not valid for pod {request.pod}",
                           "BadRequest")
        pipe, null = subprocess.PIPE, subprocess.DEVNULL
        proc = subprocess.Popen(
            request.command, stdin=pipe if request.stdin else null,
            stdout=pipe if request.stdout else null, stderr=pipe if request.stderr else null,
            start_new_session=True,
            env={**os.environ, "KMESH_POD": request.pod, "KMESH_CONTAINER": container})
        self.started.append(proc)
        return proc

    def reap_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def pod(name: str, *containers: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
            "spec": {"containers": [{"name": c, "image": "busybox"} for c in containers]}}


def seed(server: ApiServer) -> None:
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    server.create(pod("web", "app", "sidecar"))


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def group_gone(pgid: int) -> bool:
    """No live process in the group (zombies wait for init to reap them)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return False
    return True


def serve_with_runner(**kwargs: Any) -> Iterator[tuple[ApiServer, Runner]]:
    """A started server whose exec runs real processes; stopped and reaped at the end."""
    server = ApiServer(**kwargs)
    runner = Runner(server)
    server.exec_runner = runner
    seed(server)
    server.start()
    try:
        yield server, runner
    finally:
        try:
            stop_cleanly(server)
        finally:
            runner.reap_all()
    assert all(p.returncode is not None for p in runner.started)


@pytest.fixture
def exec_server() -> Iterator[tuple[ApiServer, Runner]]:
    if shutil.which("openssl") is None:
        missing("openssl is not installed")
    yield from serve_with_runner(token=TOKEN, tls=True)


@pytest.fixture
def kubectl(exec_server: tuple[ApiServer, Runner], tmp_path: Path) -> Kubectl:
    return make_kubectl(exec_server[0], tmp_path)


def kubectl_exec(kubectl: Kubectl, *args: str, stdin: str | None = None
                 ) -> subprocess.CompletedProcess[str]:
    return kubectl("exec", "web", "-c", "app", "-n", NS, *args, stdin=stdin, check=False)


# --- the real kubectl ----------------------------------------------------------------------


def test_stdout_and_stderr_apart_and_the_exit_code(
        exec_server: tuple[ApiServer, Runner], kubectl: Kubectl) -> None:
    server, runner = exec_server
    ok = kubectl_exec(kubectl, "--", "sh", "-c", "printf 'out 1\\n'; printf 'err 1' >&2; "
                                              "printf 'out 2:%s/%s' $KMESH_POD $KMESH_CONTAINER")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "out 1\nout 2:web/app", "err 1")
    sidecar = kubectl("exec", "web", "-c", "sidecar", "-n", NS, "--", "sh", "-c",
                      "echo $KMESH_CONTAINER")
    assert sidecar.stdout == "sidecar\n"
    failed = kubectl_exec(kubectl, "--", "sh", "-c", "printf out; printf err >&2; exit 3")
    assert (failed.returncode, failed.stdout) == (3, "out")
    assert failed.stderr == "errcommand terminated with exit code 3\n"
    assert [r.command[0] for r in runner.requests] == ["sh", "sh", "sh"]
    assert runner.requests[0] == ExecRequest(NS, "web", "app", runner.requests[0].command,
                                             stdin=False, stdout=True, stderr=True, tty=False)
    # kubectl took the WebSocket at once: no SPDY fallback was needed.
    assert [r.method for r in server.requests_for(f"/api/v1/namespaces/{NS}/pods/web/exec")
            ] == ["GET"] * 3
    assert [p.returncode for p in runner.started] == [0, 0, 3]


def test_large_output_arrives_intact(kubectl: Kubectl) -> None:
    out = kubectl_exec(kubectl, "--", "seq", "1", "800000")  # 5.4 MB
    assert out.returncode == 0, out.stderr
    assert out.stdout == "".join(f"{i}\n" for i in range(1, 800001))
    both = kubectl_exec(kubectl, "--", "sh", "-c",
                        "head -c 3000000 /dev/zero | tr '\\0' o; head -c 2000000 /dev/zero "
                        "| tr '\\0' e >&2")
    assert (both.returncode, both.stdout, both.stderr) == (0, "o" * 3_000_000, "e" * 2_000_000)


def test_stdin_with_dash_i(kubectl: Kubectl) -> None:
    echo = kubectl("exec", "-i", "web", "-c", "app", "-n", NS, "--", "cat",
                   stdin="hello\nworld\n")
    assert echo.stdout == "hello\nworld\n"
    big = kubectl("exec", "-i", "web", "-c", "app", "-n", NS, "--", "wc", "-c",
                  stdin="x" * 3_000_000)
    assert big.stdout.strip() == "3000000"
    # Without -i the process gets no stdin: cat ends at once.
    assert kubectl_exec(kubectl, "--", "cat").returncode == 0


def test_a_missing_pod_and_a_refused_container(
        exec_server: tuple[ApiServer, Runner], kubectl: Kubectl) -> None:
    started = time.monotonic()
    gone = kubectl("exec", "nope", "-c", "app", "-n", NS, "--", "true", check=False)
    assert gone.returncode == 1
    assert gone.stderr.strip() == 'Error from server (NotFound): pods "nope" not found'
    refused = kubectl("exec", "web", "-c", "db", "-n", NS, "--", "true", check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("Error from server (BadRequest): container db is not "
                                      "valid for pod web")
    assert time.monotonic() - started < 10
    assert not exec_server[1].started


def test_a_tty_is_refused_before_anything_runs(
        exec_server: tuple[ApiServer, Runner], tmp_path: Path) -> None:
    """kubectl asks for a tty only with -i and a terminal on its stdin: give it a pty. The
    server has no terminal to offer (no pty, stderr would be lost), so it says so."""
    server, runner = exec_server
    config = server.write_kubeconfig(tmp_path / "tty.config")
    leader, follower = os.openpty()
    try:
        out = subprocess.run(
            ["kubectl", "--kubeconfig", str(config), "--cache-dir", str(tmp_path / "tty-cache"),
             "exec", "-it", "web", "-c", "app", "-n", NS, "--", "sh", "-c", "echo ran"],
            stdin=follower, capture_output=True, text=True, timeout=KUBECTL_TIMEOUT,
            env={**os.environ, "HOME": str(tmp_path)})
    finally:
        os.close(follower)
        os.close(leader)
    assert out.returncode == 1, out
    assert out.stderr.strip() == ("Error from server (BadRequest): tty is not supported by the "
                                  "kmesh lab; run without -t"), out.stderr
    assert [r.tty for r in runner.requests] == [] and not runner.started
    # The same kubectl without -t runs the command.
    assert kubectl_exec(make_kubectl(server, tmp_path), "--", "echo", "ran").stdout == "ran\n"


def test_without_a_runner_exec_answers_an_error(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        missing("openssl is not installed")
    with ApiServer(token=TOKEN, tls=True) as server:
        try:
            seed(server)
            started = time.monotonic()
            out = make_kubectl(server, tmp_path)("exec", "web", "-c", "app", "-n", NS, "--",
                                                 "true", check=False)
            assert out.returncode == 1
            assert "exec is not available" in out.stderr
            assert time.monotonic() - started < 10
        finally:
            stop_cleanly(server)


def start_kubectl(server: ApiServer, tmp_path: Path, *command: str) -> subprocess.Popen[str]:
    if shutil.which("kubectl") is None:
        missing("kubectl is not installed")
    config = server.write_kubeconfig(tmp_path / "bg.config")
    return subprocess.Popen(
        ["kubectl", "--kubeconfig", str(config), "--cache-dir", str(tmp_path / "bg-cache"),
         "exec", "web", "-c", "app", "-n", NS, "--", *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HOME": str(tmp_path)})


def test_stop_during_an_exec_ends_it(exec_server: tuple[ApiServer, Runner],
                                     tmp_path: Path) -> None:
    server, runner = exec_server
    client = start_kubectl(server, tmp_path, "sh", "-c", "sleep 60 & sleep 60")
    try:
        wait_for(lambda: server.open_exec_sessions == 1 and bool(runner.started))
        proc = runner.started[0]
        stop_cleanly(server)  # no thread left, no internal error
        assert proc.returncode == -signal.SIGKILL
        wait_for(lambda: group_gone(proc.pid))  # the background sleep too
        assert server.open_exec_sessions == 0
        client.communicate(timeout=KUBECTL_TIMEOUT)
        assert client.returncode != 0
    finally:
        client.kill()
        client.communicate()


def test_a_client_that_goes_away_kills_the_process(exec_server: tuple[ApiServer, Runner],
                                                   tmp_path: Path) -> None:
    server, runner = exec_server
    client = start_kubectl(server, tmp_path, "sh", "-c", "sleep 60 & sleep 60")
    try:
        wait_for(lambda: server.open_exec_sessions == 1 and bool(runner.started))
        client.kill()
        client.communicate(timeout=TIMEOUT)
        proc = runner.started[0]
        wait_for(lambda: server.open_exec_sessions == 0 and proc.returncode is not None)
        assert proc.returncode == -signal.SIGKILL
        wait_for(lambda: group_gone(proc.pid))
    finally:
        client.kill()
        client.communicate()


# --- a raw WebSocket client ----------------------------------------------------------------


class RawExec:
    """One exec request over a plain socket (http server, no token)."""

    def __init__(self, server: ApiServer, query: str, *, method: str = "GET",
                 protocols: tuple[str, ...] = (PROTOCOL_V5,), websocket: bool = True,
                 extra: tuple[str, ...] = (), pod_name: str = "web") -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"{method} /api/v1/namespaces/{NS}/pods/{pod_name}/exec?{query} HTTP/1.1",
                 f"Host: 127.0.0.1:{server.port}"]
        if websocket:
            lines += ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                      f"Sec-WebSocket-Key: {key}"]
        if protocols:
            lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
        lines += [*extra, "Content-Length: 0"]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
        head, self.rest = data.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.code = int(status_line.split()[1])
        self.headers = {k.lower(): v.strip() for k, v in
                        (h.split(":", 1) for h in header_lines)}
        self.key = key
        self.decoder = Decoder(expect_masked=False)

    def body(self) -> bytes:
        length = int(self.headers.get("content-length", "0"))
        while len(self.rest) < length:
            self.rest += self.sock.recv(65536)
        return self.rest[:length]

    def send(self, opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True
             ) -> None:
        self.sock.sendall(encode_frame(opcode, payload, fin=fin,
                                       mask=os.urandom(4) if masked else None))

    def messages(self, until: Callable[[int, bytes], bool]) -> list[tuple[int, bytes]]:
        """Messages up to the first that ``until`` accepts (included)."""
        got: list[tuple[int, bytes]] = []
        pending, self.rest = self.rest, b""
        while True:
            for message in self.decoder.feed(pending):
                got.append(message)
                if until(*message):
                    return got
            pending = self.sock.recv(65536)
            assert pending, f"EOF after {got!r}"

    def close(self) -> None:
        self.sock.close()


def channel_data(messages: list[tuple[int, bytes]], channel: int) -> bytes:
    return b"".join(p[1:] for op, p in messages if op == OP_BINARY and p[:1] == bytes([channel]))


@pytest.fixture
def plain_server() -> Iterator[tuple[ApiServer, Runner]]:
    yield from serve_with_runner()


def test_v4_pings_and_fragmented_stdin(plain_server: tuple[ApiServer, Runner]) -> None:
    server, runner = plain_server
    raw = RawExec(server, "command=cat&stdin=true&stdout=1&stderr=true&container=app",
                  protocols=("v3.channel.k8s.io", PROTOCOL_V4))
    try:
        assert raw.code == 101
        assert raw.headers["sec-websocket-protocol"] == PROTOCOL_V4
        assert raw.headers["sec-websocket-accept"] == accept_key(raw.key)
        raw.send(OP_PING, b"beat")
        assert raw.messages(lambda op, _: op == OP_PONG)[-1] == (OP_PONG, b"beat")
        raw.send(OP_BINARY, b"\x00hel", fin=False)
        raw.send(OP_PING, b"between")
        raw.send(OP_CONTINUATION, b"lo ", fin=False)
        raw.send(OP_CONTINUATION, b"world", fin=True)
        echoed = bytearray()

        def until_world(op: int, payload: bytes) -> bool:
            echoed.extend(channel_data([(op, payload)], 1))
            return echoed.endswith(b"world")

        got = raw.messages(until_world)
        assert (OP_PONG, b"between") in got
        raw.send(OP_BINARY, b"\xff\x00")  # v5's close of stdin, accepted on v4 too
        rest = raw.messages(lambda op, _: op == OP_CLOSE)
        assert (channel_data(got, 1) + channel_data(rest, 1)) == b"hello world"
        assert channel_data(rest, 3) == b'{"metadata":{},"status":"Success"}'
        assert parse_close(rest[-1][1])[0] == CLOSE_NORMAL
        raw.send(OP_CLOSE, CLOSE_NORMAL.to_bytes(2, "big"))
        assert raw.sock.recv(1) == b""  # the server ends the connection
        assert runner.requests[0].command == ["cat"]
        wait_for(lambda: server.open_exec_sessions == 0)
    finally:
        raw.close()


def test_an_unmasked_client_frame_is_a_protocol_error(
        plain_server: tuple[ApiServer, Runner]) -> None:
    server, runner = plain_server
    raw = RawExec(server, "command=sleep&command=60&stdout=true&container=app")
    try:
        assert raw.code == 101
        raw.send(OP_BINARY, b"\x00x", masked=False)
        close = raw.messages(lambda op, _: op == OP_CLOSE)[-1]
        assert parse_close(close[1]) == (CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        proc = runner.started[0]
        wait_for(lambda: proc.returncode is not None and server.open_exec_sessions == 0)
        assert proc.returncode == -signal.SIGKILL
    finally:
        raw.close()


def test_non_zero_exit_and_a_signal_on_the_error_channel(
        plain_server: tuple[ApiServer, Runner]) -> None:
    server, _ = plain_server
    for command, code in (("exit 7", 7), ("kill -9 $$", 137)):
        raw = RawExec(server, f"command=sh&command=-c&command={command.replace(' ', '+')}"
                              f"&stdout=true")
        try:
            assert raw.code == 101
            got = raw.messages(lambda op, _: op == OP_CLOSE)
            assert channel_data(got, 3).decode() == (
                '{"metadata":{},"status":"Failure","message":"command terminated with non-zero '
                f'exit code: exit status {code}","reason":"NonZeroExitCode","details":'
                f'{{"causes":[{{"reason":"ExitCode","message":"{code}"}}]}}}}')
        finally:
            raw.close()


def test_requests_that_are_not_a_websocket_exec(plain_server: tuple[ApiServer, Runner]
                                                ) -> None:
    server, runner = plain_server
    query = "command=true&stdout=true&container=app"
    spdy = RawExec(server, query, method="POST", websocket=False, protocols=(),
                   extra=("Connection: Upgrade", "Upgrade: SPDY/3.1",
                          "X-Stream-Protocol-Version: v4.channel.k8s.io"))
    plain = RawExec(server, query, websocket=False, protocols=())
    other = RawExec(server, query, protocols=("v3.channel.k8s.io",))
    missing_pod = RawExec(server, query, pod_name="nope")
    no_command = RawExec(server, "stdout=true")
    delete = RawExec(server, query, method="DELETE", websocket=False, protocols=())
    try:
        for raw in (spdy, plain, other):
            assert raw.code == 400
            assert b"speaks exec only over WebSocket (v5.channel.k8s.io or v4.channel.k8s.io)" \
                in raw.body()
        assert (missing_pod.code, b'pods \\"nope\\" not found' in missing_pod.body()) == (
            404, True)
        assert (no_command.code, b"at least 1 command" in no_command.body()) == (400, True)
        assert delete.code == 405
        assert not runner.started
    finally:
        for raw in (spdy, plain, other, missing_pod, no_command, delete):
            raw.close()
