"""Where the kernel's filesystems are: the cgroup v2 mount and bpffs.

Never hard-coded: a hybrid host mounts cgroup v2 at /sys/fs/cgroup/unified, a pure-v2 host at
/sys/fs/cgroup; bpffs is not mounted at all on a fresh machine.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kmesh_plugin.errors import DatapathError

BPFFS_DEFAULT = Path("/sys/fs/bpf")


@dataclass(frozen=True)
class Mount:
    mount_point: Path
    fstype: str


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    """Mounts of this process's mount namespace."""
    out = []
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            # Fields: id parent major:minor root mount_point options [optional...] - fstype ...
            left, _, right = line.partition(" - ")
            out.append(Mount(Path(_unescape(left.split()[4])), right.split()[0]))
    return out


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as 3-digit octal (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """Where cgroup v2 is mounted: /sys/fs/cgroup (pure v2) or e.g. /sys/fs/cgroup/unified."""
    for m in mounts(mountinfo):
        if m.fstype == "cgroup2":
            return m.mount_point
    raise DatapathError(f"no cgroup v2 filesystem is mounted (see {mountinfo})")


def filesystem_of(path: Path) -> Mount | None:
    """The mount that holds ``path`` (the longest mount point that is a prefix)."""
    path = Path(os.path.abspath(path))
    best: Mount | None = None
    for m in mounts():
        if path == m.mount_point or m.mount_point in path.parents:  # noqa: SIM102
            if best is None or len(m.mount_point.parts) >= len(best.mount_point.parts):
                best = m
    return best


def is_cgroup2_dir(path: Path) -> bool:
    fs = filesystem_of(path)
    return fs is not None and fs.fstype == "cgroup2" and path.is_dir()


def ensure_bpffs(pin_dir: Path) -> None:
    """Make sure ``pin_dir`` lies on bpffs, mounting it at /sys/fs/bpf when that is missing."""
    fs = filesystem_of(pin_dir)
    if fs is not None and fs.fstype == "bpf":
        return
    if pin_dir == BPFFS_DEFAULT or BPFFS_DEFAULT in pin_dir.parents:
        proc = subprocess.run(
            ["mount", "-t", "bpf", "bpf", str(BPFFS_DEFAULT)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise DatapathError(f"mount -t bpf bpf {BPFFS_DEFAULT}: {proc.stderr.strip()}")
        return
    raise DatapathError(f"{pin_dir} is not on a bpf filesystem (mount -t bpf bpf <dir>)")


def cgroup_id(path: Path) -> int:
    """A cgroup v2 directory's id: its inode number, which the kernel reports in link info."""
    return os.stat(path).st_ino
