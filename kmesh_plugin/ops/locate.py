"""Find the config of the agent that runs for a node on this machine (``--node NAME``).

A machine usually runs one agent, but a test bed runs one per simulated node, and an operator
should not have to find each node's plugin.toml. The running agents already say where their
config is: their command line (``kmesh-plugin run --config PATH``, relative to their working
directory). So this reads /proc instead of keeping a registry: nothing to write, nothing left
stale when an agent is SIGKILLed.

A containerised agent's paths are in its own mount namespace: they are read through
``/proc/PID/root``. Its node name is resolved as the agent resolves it: ``[node] name``, else its
``NODE_NAME`` environment variable, else the host name.
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path

from kmesh_plugin.config import NODE_NAME_ENV
from kmesh_plugin.errors import KmeshError

PROC = Path("/proc")
DEFAULT_CONFIG = "plugin.toml"
_PROGRAMS = ("kmesh-plugin",)
_MODULES = ("kmesh_plugin.cli", "kmesh_plugin")


class LocateError(KmeshError):
    """No agent, or more than one, runs for the node asked for."""


@dataclass(frozen=True)
class RunningAgent:
    pid: int
    node: str
    config: Path  # as this process can open it


def agent_config_arg(argv: list[str]) -> str | None:
    """The ``--config`` of a ``kmesh-plugin run`` command line, or None if ``argv`` is not one.

    Recognised: the console script (``.../kmesh-plugin run``, also behind an interpreter) and
    ``python -m kmesh_plugin.cli run``."""
    start = None
    for i, arg in enumerate(argv):
        if os.path.basename(arg) in _PROGRAMS:
            start = i + 1
            break
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1] in _MODULES:
            start = i + 2
            break
    if start is None or start >= len(argv) or argv[start] != "run":
        return None
    config = DEFAULT_CONFIG
    rest = argv[start + 1:]
    for i, arg in enumerate(rest):
        if arg in ("--config", "-c") and i + 1 < len(rest):
            config = rest[i + 1]
        elif arg.startswith("--config="):
            config = arg.partition("=")[2]
        elif arg.startswith("-c") and len(arg) > 2:
            config = arg[2:]
    return config


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:  # the process ended, or is not ours to read
        return None


def _node_of(config: Path, environ: bytes, root: Path) -> str | None:
    try:
        raw = tomllib.loads(config.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None  # not an agent we could ask anything of anyway
    node = raw.get("node")
    name = node.get("name") if isinstance(node, dict) else None
    if isinstance(name, str) and name:
        return name
    for entry in environ.split(b"\0"):
        key, _, value = entry.partition(b"=")
        if key.decode(errors="replace") == NODE_NAME_ENV and value:
            return value.decode(errors="replace")
    hostname = _read(root / "etc" / "hostname") if root != Path("/") else None
    return (hostname or b"").decode(errors="replace").strip() or socket.gethostname()


def running_agents(proc: Path = PROC) -> list[RunningAgent]:
    """Every ``kmesh-plugin run`` on this machine whose config this process can read."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        cmdline = _read(entry / "cmdline")
        if not cmdline:
            continue
        argv = [a.decode(errors="surrogateescape") for a in cmdline.rstrip(b"\0").split(b"\0")]
        arg = agent_config_arg(argv)
        if arg is None:
            continue
        try:
            root = Path(os.readlink(entry / "root"))
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        path = Path(arg) if os.path.isabs(arg) else cwd / arg
        visible = path if root == Path("/") else entry / "root" / path.relative_to("/")
        node = _node_of(visible, _read(entry / "environ") or b"", root)
        if node is not None:
            found.append(RunningAgent(int(entry.name), node, visible))
    return sorted(found, key=lambda a: (a.node, a.pid))


def config_for_node(node: str, proc: Path = PROC) -> Path:
    """The config of the one agent running for ``node``; LocateError names what runs instead."""
    agents = running_agents(proc)
    mine = [a for a in agents if a.node == node]
    # One agent re-executing itself (an upgrade) shows twice with the same config: one answer.
    configs = {a.config.resolve() for a in mine}
    if len(configs) == 1:
        return mine[0].config
    if not mine:
        others = ", ".join(f"{a.node} (pid {a.pid})" for a in agents) or "none"
        raise LocateError(f"no kmesh-plugin agent for node {node!r} runs on this machine "
                          f"(running agents: {others}); pass --config PATH")
    listed = ", ".join(f"pid {a.pid}: {a.config}" for a in mine)
    raise LocateError(f"more than one kmesh-plugin agent runs for node {node!r} ({listed}); "
                      "pass --config PATH")
