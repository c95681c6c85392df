"""Pod processes: start a program inside a cgroup v2 directory and a network namespace.

A lab pod is a network namespace plus a cgroup: the cgroup eBPF connect hook of the datapath is
attached to a node's cgroup subtree, and only processes inside that subtree are translated. So
every pod process must be in its cgroup *before* its first ``connect()``, i.e. before ``exec``.

The pod's network namespace is entered (``setns(CLONE_NEWNET)``), never a mount namespace of
``ip netns exec``, which would remount /sys and hide /sys/fs/bpf and the cgroup tree from the
child. A program that reads the pod's /etc/hosts and resolv.conf itself (``kubectl exec``'s
commands: curl resolves names through glibc) gets a private mount namespace of its own with
those files bind-mounted over the host's (``binds``); nothing else of the host's mounts changes.

The helpers here also create and tear down cgroup trees, waiting for the kernel to report a
cgroup empty (``cgroup.events``) instead of sleeping for a fixed time.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import select
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from kmesh_plugin.datapath.mounts import cgroup2_root

__all__ = [
    "LineReader",
    "SpawnError",
    "cgroup_pids",
    "make_cgroup",
    "remove_cgroup_tree",
    "spawn",
    "stop",
]

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

# Resolved once in the parent: the pre-exec hook runs between fork and exec, where loading a
# library (which allocates and takes locks) is best avoided.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.mount.restype = ctypes.c_int

_File = int | IO[Any] | None


class SpawnError(OSError):
    """A pod process could not be started; the message names the cgroup or netns at fault."""


# --------------------------------------------------------------------------------------------
# Spawning and stopping
# --------------------------------------------------------------------------------------------


def _open_targets(netns: str | None, cgroup: str | None) -> tuple[int | None, int | None]:
    """Open the netns file and ``cgroup.procs`` in the parent, where errors are easy to report."""
    ns_fd = cg_fd = None
    try:
        if cgroup is not None:
            procs = os.path.join(cgroup, "cgroup.procs")
            try:
                cg_fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise SpawnError(exc.errno, f"cannot join cgroup {cgroup}: {exc.strerror}") from exc
        if netns is not None:
            try:
                ns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise SpawnError(
                    exc.errno, f"cannot open network namespace {netns}: {exc.strerror}"
                ) from exc
    except BaseException:
        for fd in (ns_fd, cg_fd):
            if fd is not None:
                os.close(fd)
        raise
    return ns_fd, cg_fd


def _make_preexec(
    ns_fd: int | None,
    cg_fd: int | None,
    report_fd: int,
    netns: str | None,
    cgroup: str | None,
    binds: Sequence[tuple[bytes, bytes]] = (),
) -> Any:
    """Build the pre-exec hook: join the cgroup, then the netns, then bind-mount ``binds`` in a
    private mount namespace; report failures on a pipe.

    ``subprocess`` turns any pre-exec exception into a bare "Exception occurred in
    preexec_fn.", so the hook writes ``errno:message`` to ``report_fd`` first; the parent reads
    it back and raises a :class:`SpawnError` that says what failed.
    """

    def preexec() -> None:
        step = ""
        try:
            if cg_fd is not None:
                step = f"join cgroup {cgroup}"
                os.write(cg_fd, b"0")
            if ns_fd is not None:
                step = f"setns into network namespace {netns}"
                if _libc.setns(ns_fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            if binds:
                step = "unshare a mount namespace"
                # Private first: the bind mounts must not propagate back to the host's.
                if (_libc.unshare(CLONE_NEWNS) != 0
                        or _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0):
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
                for target, source in binds:
                    step = f"bind-mount {source.decode()} over {target.decode()}"
                    if _libc.mount(source, target, None, MS_BIND, None) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err))
        except OSError as exc:
            os.write(report_fd, f"{exc.errno or 0}:{step}: {exc.strerror}".encode())
            raise

    return preexec


def _read_report(report_r: int) -> tuple[int, str] | None:
    """Return ``(errno, message)`` written by a failed pre-exec hook, or None."""
    data = b""
    while chunk := os.read(report_r, 4096):
        data += chunk
    if not data:
        return None
    code, _, message = data.decode(errors="replace").partition(":")
    return (int(code) if code.isdigit() else 0), message


def spawn(
    argv: Sequence[str],
    *,
    netns: str | None,
    cgroup: str | None,
    env: Mapping[str, str] | None = None,
    stdin: _File = subprocess.DEVNULL,
    stdout: _File = subprocess.PIPE,
    stderr: _File = None,
    cwd: str | None = None,
    binds: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in cgroup directory ``cgroup`` and network namespace file ``netns``.

    Either may be None to stay where the caller is. ``binds`` (target -> source file): a
    private mount namespace where each source is bind-mounted over its target. The child is a
    session and process-group leader, so :func:`stop` can signal everything it forks. Raises
    :class:`SpawnError` naming the path when the cgroup or namespace cannot be joined, and
    OSError when ``argv[0]`` cannot be executed.
    """
    ns_fd, cg_fd = _open_targets(netns, cgroup)
    report_r, report_w = os.pipe()  # O_CLOEXEC: closes by itself when exec succeeds
    try:
        binds_b = [(t.encode(), src.encode()) for t, src in (binds or {}).items()]
        preexec = _make_preexec(ns_fd, cg_fd, report_w, netns, cgroup, binds_b)
        try:
            return subprocess.Popen(
                list(argv),
                env=dict(env) if env is not None else None,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except subprocess.SubprocessError as exc:
            os.close(report_w)
            report_w = -1
            report = _read_report(report_r)
            if report is None:
                raise
            raise SpawnError(report[0], f"{argv[0]}: {report[1]}") from exc
    finally:
        for fd in (ns_fd, cg_fd, report_r, report_w):
            if fd is not None and fd >= 0:
                os.close(fd)


def _wait_exited(pidfd: int, timeout: float) -> bool:
    """Wait until the process behind ``pidfd`` has exited (not reaped); True if it has."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int:
    """SIGTERM the process group of ``proc``, SIGKILL it after ``timeout`` s, reap; return code.

    Leftover members of the group are SIGKILLed while the leader is still a zombie, so its pid
    (the group id) cannot have been reused by an unrelated process.
    """
    if proc.returncode is not None:
        return proc.returncode
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return proc.wait()
    try:
        if not _wait_exited(pidfd, 0):
            _killpg(proc.pid, signal.SIGTERM)
            if not _wait_exited(pidfd, timeout):
                _killpg(proc.pid, signal.SIGKILL)
                _wait_exited(pidfd, timeout)
        _killpg(proc.pid, signal.SIGKILL)  # stragglers the leader forked
    finally:
        os.close(pidfd)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    return proc.wait(timeout=timeout)


class LineReader:
    """Read newline-terminated lines from a child's pipe with a deadline.

    ``readline()`` of a buffered file blocks forever if the child hangs; this reads the raw fd
    under ``select`` and keeps any bytes past the newline for the next call.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._fd = stream.fileno()
        self._buffer = b""

    def readline(self, timeout: float) -> str:
        """Return the next line without its newline; TimeoutError / EOFError otherwise."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line within {timeout:.1f}s (got {self._buffer[-200:]!r})")
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise EOFError(f"pipe closed (partial line {self._buffer[-200:]!r})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def expect(self, expected: str, timeout: float) -> None:
        """Read lines until one equals ``expected`` (e.g. ``ready``) within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while self.readline(max(0.0, deadline - time.monotonic())) != expected:
            pass  # e.g. warnings printed before the readiness line


# --------------------------------------------------------------------------------------------
# cgroup v2
# --------------------------------------------------------------------------------------------


def make_cgroup(path: str) -> str:
    """Create cgroup directory ``path`` (and missing parents); it must be on the cgroup2 mount."""
    root = str(cgroup2_root())
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root or real == root:
        raise ValueError(f"{path} is not below the cgroup2 mount {root}")
    os.makedirs(real, exist_ok=True)
    return real


def cgroup_pids(path: str) -> list[int]:
    """Return the pids listed in ``path``/cgroup.procs (empty if the cgroup is gone)."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as handle:
            return [int(line) for line in handle if line.strip()]
    except FileNotFoundError:
        return []


def _populated(events_fd: int) -> bool:
    os.lseek(events_fd, 0, os.SEEK_SET)
    for line in os.read(events_fd, 4096).decode().splitlines():
        key, _, value = line.partition(" ")
        if key == "populated":
            return value.strip() != "0"
    return False


def _kill_cgroup(path: str) -> None:
    """SIGKILL every process in the subtree at ``path``: ``cgroup.kill`` or pid by pid."""
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as handle:
            handle.write("1")
        return
    except FileNotFoundError:
        if not os.path.isdir(path):
            return
    # Kernels before 5.14 have no cgroup.kill; a process forking meanwhile is caught by the
    # caller's wait loop, which comes back here.
    for current, _dirs, _files in os.walk(path):
        for pid in cgroup_pids(current):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _wait_unpopulated(path: str, deadline: float) -> None:
    """Block until ``path``/cgroup.events says ``populated 0``, or raise TimeoutError.

    The kernel wakes pollers of cgroup.events (POLLPRI) on every change, and poll returns at
    once when the file changed after our last read, so there is no lost-wakeup window.
    """
    try:
        fd = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while _populated(fd):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"cgroup {path} still has processes: {cgroup_pids(path)}")
            _kill_cgroup(path)  # again: a process may have forked while being killed
            poller.poll(int(min(remaining, 0.5) * 1000) + 1)
    finally:
        os.close(fd)


def _rmdir_cgroup(path: str, deadline: float) -> None:
    """rmdir a cgroup directory whose subtree is empty; EBUSY is retried until the deadline."""
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise
            _wait_unpopulated(path, deadline)


def remove_cgroup_tree(path: str, timeout: float = 10.0) -> None:
    """Kill every process in the cgroup subtree at ``path`` and remove it, deepest first.

    Idempotent: a missing ``path`` is not an error. Raises TimeoutError if processes survive
    ``timeout`` seconds (e.g. stuck in uninterruptible sleep).
    """
    if not os.path.isdir(path):
        return
    deadline = time.monotonic() + timeout
    _kill_cgroup(path)
    for current, _dirs, _files in os.walk(path, topdown=False):
        _wait_unpopulated(current, deadline)
        _rmdir_cgroup(current, deadline)
