"""Named network namespaces, made and removed exactly as ``ip netns add/del`` does.

A named namespace is a bind mount of a namespace file on /var/run/netns/NAME, so it outlives
the processes in it and any tool (CNI plugins, ``nsenter --net``) can open it by path. We call
``ip`` itself rather than re-implementing the mount dance: it is the reference implementation.

Commands that must run *inside* a namespace go through :func:`procs.spawn` (setns only), never
``ip netns exec``, which remounts /sys and hides /sys/fs/bpf and the cgroup tree.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence

from kmesh_lab import procs

__all__ = [
    "NETNS_DIR",
    "NetnsError",
    "add",
    "delete",
    "exists",
    "list_names",
    "path",
    "run_in",
    "sysctl",
]

NETNS_DIR = "/var/run/netns"

# What `ip netns add` accepts, minus '/' tricks; keeps names safe as path components.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


class NetnsError(RuntimeError):
    """A namespace command failed; the message holds the command and its stderr."""


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid network namespace name {name!r}")
    return name


def path(name: str) -> str:
    """Return the file that represents namespace ``name`` (what CNI_NETNS wants)."""
    return os.path.join(NETNS_DIR, _check_name(name))


def exists(name: str) -> bool:
    """True if a named namespace ``name`` exists."""
    return os.path.exists(path(name))


def _run(argv: Sequence[str], timeout: float = 30.0) -> str:
    """Run a host command, raise NetnsError with its stderr on failure, return stdout."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def run_in(name: str, argv: Sequence[str], timeout: float = 30.0) -> str:
    """Run ``argv`` inside namespace ``name`` (network namespace only); return its stdout."""
    proc = procs.spawn(
        argv,
        netns=path(name),
        cgroup=None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        procs.stop(proc, timeout=5.0)
    if proc.returncode != 0:
        raise NetnsError(
            f"in netns {name}: {' '.join(argv)}: exit {proc.returncode}: {err.decode().strip()}"
        )
    return out.decode()


def sysctl(name: str, settings: dict[str, str]) -> None:
    """Set sysctls (``{"net.ipv6.conf.default.accept_dad": "0"}``) inside namespace ``name``.

    /proc/sys/net is per network namespace as seen by the *writing* task, so the writer must
    run inside the namespace.
    """
    if settings:
        run_in(name, ["sysctl", "-q", "-w", *(f"{key}={value}" for key, value in settings.items())])


def add(name: str, *, lo_up: bool = True) -> str:
    """Create named namespace ``name`` with ``lo`` up; return its path. Fails if it exists."""
    _run(["ip", "netns", "add", _check_name(name)])
    if lo_up:
        try:
            # `ip -n` switches only the ip process itself; fine for one netlink request.
            _run(["ip", "-n", name, "link", "set", "dev", "lo", "up"])
        except BaseException:
            delete(name)
            raise
    return path(name)


def delete(name: str) -> None:
    """Delete named namespace ``name``; a missing one is not an error.

    The namespace itself lives on while a process is still in it: stop pods first.
    """
    if exists(name):
        _run(["ip", "netns", "del", name])


def list_names(prefix: str = "") -> list[str]:
    """Return the names of named namespaces that start with ``prefix``, sorted."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.startswith(prefix))
