"""Where the kernel's filesystems are (the cgroup v2 mount and bpffs), and which directories
the agent may trust.

Never hard-coded: a hybrid host mounts cgroup v2 at /sys/fs/cgroup/unified, a pure-v2 host at
/sys/fs/cgroup; bpffs is not mounted at all on a fresh machine.

Trust: the agent runs as root and loads whatever object it finds in its build dir and reuses
whatever maps and links it finds in its pin dir. Both are only trusted when root owns them and
neither group nor others can write them (:func:`check_trusted`); the same holds for every
directory above them (a sticky one, such as the 1777 root of bpffs or /tmp, may be writable by
all: nobody can rename or replace what root owns there).
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kmesh_plugin.errors import DatapathError

BPFFS_DEFAULT = Path("/sys/fs/bpf")
# bpffs's own default root mode is 1777; a bpffs the agent mounts is root's alone.
BPFFS_MODE = 0o700
TRUSTED_UID = 0


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
    """Make sure ``pin_dir`` lies on bpffs, mounting it at /sys/fs/bpf when that is missing.

    A bpffs mounted here gets mode 0700 (``-o mode=0700``), not bpffs's default 1777."""
    fs = filesystem_of(pin_dir)
    if fs is not None and fs.fstype == "bpf":
        return
    if pin_dir == BPFFS_DEFAULT or BPFFS_DEFAULT in pin_dir.parents:
        argv = ["mount", "-t", "bpf", "-o", f"mode={BPFFS_MODE:04o}", "bpf", str(BPFFS_DEFAULT)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise DatapathError(f"{' '.join(argv)}: {proc.stderr.strip()}")
        return
    raise DatapathError(f"{pin_dir} is not on a bpf filesystem (mount -t bpf bpf <dir>)")


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _problem(st: os.stat_result, *, sticky_ok: bool) -> str | None:
    if st.st_uid != TRUSTED_UID:
        return "not owned by root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        if sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
            return None
        return "writable by group or others"
    return None


def _refuse(path: Path, what: str, st: os.stat_result, problem: str) -> DatapathError:
    return DatapathError(
        f"{path} ({what}) is owned by {_owner(st.st_uid)} with mode "
        f"{stat.S_IMODE(st.st_mode):04o} ({problem}): kmesh-plugin only trusts what is owned "
        f"by root and not writable by group or others; fix it (chown root {path}; "
        f"chmod go-w {path}) or remove it"
    )


def check_trusted_stat(path: Path, what: str, st: os.stat_result) -> None:
    """Raise DatapathError unless ``st`` (of ``path``) is root's and not group/other-writable."""
    problem = _problem(st, sticky_ok=False)
    if problem:
        raise _refuse(path, what, st, problem)


def check_trusted(path: Path, what: str, *, ancestors: bool = True) -> bool:
    """Refuse ``path`` (and every directory above it) unless root owns it and neither group
    nor others can write it; ``what`` names it in the error ("pin dir", "build dir", ...).

    ``path`` itself must not be a symbolic link. Returns False when ``path`` does not exist
    (nothing to trust yet: whoever creates it creates it root's); raises DatapathError naming
    the path, its owner and mode otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise DatapathError(f"{path} ({what}) is a symbolic link; refusing to follow it "
                            "(point the configuration at the real directory)")
    check_trusted_stat(path, what, st)
    if ancestors:
        parent = Path(os.path.realpath(Path(os.path.abspath(path)).parent))
        for directory in (parent, *parent.parents):
            dst = os.stat(directory)
            problem = _problem(dst, sticky_ok=True)
            if problem:
                raise _refuse(directory, f"a directory above {what} {path}", dst, problem)
    return True


def cgroup_id(path: Path) -> int:
    """A cgroup v2 directory's id: its inode number, which the kernel reports in link info."""
    return os.stat(path).st_ino
