"""Find the config of the agent that runs for a node on this machine (``--node NAME``).

A machine usually runs one agent, but a test bed runs one per simulated node, and an operator
should not have to find each node's plugin.toml. The running agents already say where their
config is: their command line (``kmesh-plugin run --config PATH``, relative to their working
directory). So this reads /proc instead of keeping a registry: nothing to write, nothing left
stale when an agent is SIGKILLed.

An agent that does not share this process's view of the file system (another mount namespace,
as in a container, or another root directory) names paths in its own view. readlink of
``/proc/PID/root`` cannot tell: it is "/" for a container's root too. So unless the agent is in
our mount namespace with our root, its paths are read through ``/proc/PID/root``, their
symlinks resolved as the agent resolves them (an absolute target from its root). Its node name
is resolved as the agent resolves it: ``[node] name``, else its ``NODE_NAME`` environment
variable, else its host name.

/proc is read as hostile input: processes end mid-scan, and any user can start a process whose
command line looks like an agent's. Every failure skips that process (or is a LocateError);
files are read bounded, never a FIFO or a device.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

from kmesh_plugin.config import MAX_CONFIG_BYTES, NODE_NAME_ENV
from kmesh_plugin.errors import KmeshError
from kmesh_plugin.sources.decode import DecodeError, read_regular_file

PROC = Path("/proc")
DEFAULT_CONFIG = "plugin.toml"
_PROGRAMS = ("kmesh-plugin",)
# ``python -m kmesh_plugin`` needs a kmesh_plugin/__main__.py; recognised for when it has one
# (a process started that way today exits at once and is never seen twice).
_MODULES = ("kmesh_plugin.cli", "kmesh_plugin")
_INTERPRETERS = ("python", "pypy")  # argv[0] basenames: python3, python3.11, pypy3, ...
# CPython's own options (Python/getopt.c and initconfig.c, 3.11-3.13): flags, and the two
# that take a value (attached, -Wdefault, or the next argument). -c runs a command and -h,
# -V, -? print and exit: never an agent.
_PYTHON_FLAGS = frozenset("bBdEiIOPqRsSuvx")
_PYTHON_VALUED = frozenset("WX")
_PYTHON_LONG_VALUED = ("--check-hash-based-pycs",)
_HOSTNAME_BYTES = 256  # HOST_NAME_MAX is 64; anything longer is not a host name file
_MAX_SYMLINKS = 40  # the kernel's limit on one path's symlinks (ELOOP)


class LocateError(KmeshError):
    """No agent, or more than one, runs for the node asked for."""


@dataclass(frozen=True)
class RunningAgent:
    pid: int
    node: str
    config: Path  # as this process can open it
    # (st_dev, st_ino) of the config: the same file reached by two paths is one config.
    file: tuple[int, int] = field(default=(0, 0), compare=False)


class _NotAnAgent(Exception):
    """The agent's argument parser refused the command line: that process exits at once."""


class _SilentParser(argparse.ArgumentParser):
    """The CLI's parser that neither prints (help, usage, errors) nor exits: it raises."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _NotAnAgent(message)

    def _print_message(self, message: str, file: Any = None) -> None:
        pass


@functools.lru_cache(maxsize=1)
def _agent_parser() -> tuple[argparse.ArgumentParser, Callable[..., Any]]:
    """The CLI's parser, and the function it sets for ``run``."""
    from kmesh_plugin import cli  # ops is imported by the CLI: import when used

    return cli._parser(_SilentParser, extensions=False), cli.cmd_run


def _cli_args(argv: list[str]) -> list[str] | None:
    """What the kmesh-plugin CLI gets as its arguments (``sys.argv[1:]``) when ``argv`` runs
    it: the console script (``kmesh-plugin``, or an interpreter running a script of that
    name, as a shebang does) or ``python -m kmesh_plugin.cli``. None for any other program."""
    if not argv:
        return None
    program = os.path.basename(argv[0])
    if program in _PROGRAMS:
        return argv[1:]
    if not program.startswith(_INTERPRETERS):
        return None
    i = 1
    # The interpreter's options come first, as CPython parses them: combined short flags
    # (-Im, -IWerror), a value attached or in the next argument, -m ending the options.
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--"):
            if arg in _PYTHON_LONG_VALUED:
                i += 2
                continue
            if arg.partition("=")[0] in _PYTHON_LONG_VALUED:
                i += 1
                continue
            return None  # --help, --version, ...: it prints and exits
        if not arg.startswith("-") or arg == "-":
            break  # the script ("-" is stdin)
        for j in range(1, len(arg)):
            flag = arg[j]
            if flag == "m":
                if j + 1 < len(arg):
                    module, rest = arg[j + 1:], i + 1
                elif i + 1 < len(argv):
                    module, rest = argv[i + 1], i + 2
                else:
                    return None
                return argv[rest:] if module in _MODULES else None
            if flag in _PYTHON_VALUED:
                if j + 1 == len(arg):
                    i += 1  # its value is the next argument
                break
            if flag not in _PYTHON_FLAGS:
                return None  # -c, -h, -V, or not an option CPython accepts
        i += 1
    if i < len(argv) and os.path.basename(argv[i]) in _PROGRAMS:
        return argv[i + 1:]
    return None


def agent_config_arg(argv: list[str]) -> str | None:
    """The config path a ``kmesh-plugin run`` command line names (``plugin.toml`` without
    ``--config``), or None if ``argv`` is not one. Parsed by the CLI's own argument parser, so
    every form it accepts (``-c=x``, ``-cx``, ``--conf x``, the last of two) reads the same,
    and a command line it refuses (that process exits at once) is not an agent."""
    args = _cli_args(argv)
    if args is None:
        return None
    parser, cmd_run = _agent_parser()
    try:
        parsed = parser.parse_args(args)
    except Exception:  # _NotAnAgent; or anything else: argparse is not made for hostile input
        return None
    if getattr(parsed, "func", None) is not cmd_run:
        return None  # another command (status, check-config, ...): not an agent
    config = getattr(parsed, "config", None)
    return DEFAULT_CONFIG if config is None else os.fspath(config)


def _read(path: Path, limit: int) -> bytes | None:
    """A regular file's content, at most ``limit`` bytes; None for anything else (gone, not
    ours to read, a FIFO or device a hostile process points at, too big)."""
    try:
        return read_regular_file(path, max_bytes=limit)
    except DecodeError:
        return None


def _read_proc(path: Path) -> bytes | None:
    try:
        return path.read_bytes()  # procfs files: small, and they report size 0
    except OSError:  # the process ended, or is not ours to read
        return None


def _link(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:  # the process ended, or is not ours to read
        return None


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _shares_our_view(entry: Path, proc: Path) -> bool:
    """Whether ``entry``'s process names paths as we do: our mount namespace and our root.
    readlink of /proc/PID/root alone cannot tell (it is "/" in another mount namespace)."""
    ours = _link(proc / "self" / "ns" / "mnt")
    if ours is None or _link(entry / "ns" / "mnt") != ours:
        return False
    root = _file_id(entry / "root")
    return root is not None and root == _file_id(proc / "self" / "root")


def _in_root(root: Path, path: PurePosixPath) -> Path | None:
    """Absolute ``path`` as a process whose root is ``root`` (a /proc/PID/root) opens it:
    symlinks resolved here, an absolute target from ``root`` and ``..`` never above it (the
    kernel would resolve both from our root instead). None: too many symlinks (a loop)."""
    todo = list(reversed(path.parts[1:]))
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop()
        if part == "..":
            if done:
                done.pop()
            continue
        target = _link(root.joinpath(*done, part))
        if target is None:  # not a symlink, or not there (which the read then finds)
            done.append(part)
            continue
        links += 1
        if links > _MAX_SYMLINKS:
            return None
        link = PurePosixPath(target)
        if link.is_absolute():
            done = []
        todo.extend(reversed(link.parts[1:] if link.is_absolute() else link.parts))
    return root.joinpath(*done)


def _config_path(entry: Path, proc: Path, arg: str) -> Path | None:
    """The agent's ``--config`` as this process can open it; None if it cannot be placed."""
    cwd = _link(entry / "cwd")
    if cwd is None:
        return None
    if _shares_our_view(entry, proc):
        return Path(cwd, arg)  # its paths are ours
    root = _link(entry / "root")
    if root is None:
        return None
    if os.path.isabs(arg):
        inner = PurePosixPath(arg)
    else:
        # readlink of its cwd is the path in its own view when its root is "/" to us (another
        # mount namespace), else the path in ours, under its root (a chroot).
        here = PurePosixPath(cwd)
        if cwd.endswith(" (deleted)") or not here.is_absolute():
            return None  # its working directory is gone: so is a config relative to it
        if root != "/":
            try:
                here = PurePosixPath("/") / here.relative_to(root)
            except ValueError:  # its cwd is outside its root: open it as it would
                return entry / "cwd" / arg
        inner = here / arg
    return _in_root(entry / "root", inner)


def _environ_value(environ: bytes, key: str) -> str | None:
    """``key`` of a /proc/PID/environ as Python's os.environ reads it: the first entry wins,
    names and values decoded as file system strings, entries without "=" skipped."""
    for entry in environ.split(b"\0"):
        name, eq, value = entry.partition(b"=")
        if eq and os.fsdecode(name) == key:
            return os.fsdecode(value)
    return None


def _hostname(entry: Path, proc: Path) -> str | None:
    """The agent's socket.gethostname(): ours in our UTS namespace, else its /etc/hostname (a
    container runtime writes it from the pod's host name); None if neither can tell."""
    ours = _link(proc / "self" / "ns" / "uts")
    if ours is not None and _link(entry / "ns" / "uts") == ours:
        return socket.gethostname()
    path = _in_root(entry / "root", PurePosixPath("/etc/hostname"))
    data = _read(path, _HOSTNAME_BYTES) if path is not None else None
    name = os.fsdecode(data).strip() if data else ""
    return name or None


def _node_of(entry: Path, proc: Path, text: bytes) -> str | None:
    """The node name the agent with config ``text`` resolved, or None if it cannot be told."""
    try:
        raw = tomllib.loads(text.decode())
    except Exception:  # not UTF-8, not TOML, the int digit limit, too deep: no agent of ours
        return None
    node = raw.get("node")
    name = node.get("name") if isinstance(node, dict) else None
    if isinstance(name, str) and name:
        return name
    environ = _read_proc(entry / "environ")
    if environ is None:
        return None  # not ours to read (another user's agent): its $NODE_NAME is unknown
    return _environ_value(environ, NODE_NAME_ENV) or _hostname(entry, proc)


@dataclass
class _Scan:
    agents: list[RunningAgent]
    unreadable: list[int]  # pids that look like agents whose node or config we cannot read


def _scan(proc: Path) -> _Scan:
    try:
        entries = list(proc.iterdir())
    except OSError as e:
        raise LocateError(f"cannot list the processes in {proc}: {e.strerror or e}; "
                          "pass --config PATH") from None
    scan = _Scan([], [])
    for entry in entries:
        if not (entry.name.isascii() and entry.name.isdigit()):
            continue
        cmdline = _read_proc(entry / "cmdline")
        if not cmdline:
            continue  # gone, or a kernel thread
        argv = [os.fsdecode(a) for a in cmdline.rstrip(b"\0").split(b"\0")]
        arg = agent_config_arg(argv)
        if arg is None:
            continue
        config = _config_path(entry, proc, arg)
        text = _read(config, MAX_CONFIG_BYTES) if config is not None else None
        file = _file_id(config) if config is not None else None
        node = _node_of(entry, proc, text) if text is not None else None
        if config is None or file is None or node is None:
            alive = entry.exists()
            if alive and (_link(entry / "cwd") is None or _read_proc(entry / "environ") is None):
                scan.unreadable.append(int(entry.name))  # alive, but not ours to read
            continue
        scan.agents.append(RunningAgent(int(entry.name), node, config, file))
    scan.agents.sort(key=lambda a: (a.node, a.pid))
    scan.unreadable.sort()
    return scan


def running_agents(proc: Path = PROC) -> list[RunningAgent]:
    """Every ``kmesh-plugin run`` on this machine whose config this process can read."""
    return _scan(proc).agents


def config_for_node(node: str, proc: Path = PROC) -> Path:
    """The config of the one agent running for ``node``; LocateError names what runs instead."""
    scan = _scan(proc)
    mine = [a for a in scan.agents if a.node == node]
    # One agent re-executing itself (an upgrade) shows twice with the same config: one answer.
    # The same file, not the same path: a resolved /proc/PID/root/... path would be the host's.
    if len({a.file for a in mine}) == 1:
        return mine[0].config
    if not mine:
        others = ", ".join(f"{a.node} (pid {a.pid})" for a in scan.agents) or "none"
        hidden = ""
        if scan.unreadable:
            pids = ", ".join(str(pid) for pid in scan.unreadable)
            hidden = f"; not readable by this user: pid {pids}"
        raise LocateError(f"no kmesh-plugin agent for node {node!r} runs on this machine "
                          f"(running agents: {others}{hidden}); pass --config PATH")
    listed = ", ".join(f"pid {a.pid}: {a.config}" for a in mine)
    raise LocateError(f"more than one kmesh-plugin agent runs for node {node!r} ({listed}); "
                      "pass --config PATH")
