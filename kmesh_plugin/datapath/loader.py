"""Load, pin and attach the datapath; reopen it after an agent restart.

Pin layout under ``pin_dir`` (every directory 0700, root's)::

    progs/kmesh_connect4, ..., kmesh_getpeername6  the loaded programs (``PROGRAMS``)
    maps/kmesh_frontends, ..., maps/kmesh_barrier  the maps (state survives the agent)
    maps/kmesh_meta                                the maps' layout version (see below)
    links/kmesh_connect4, ..., kmesh_getpeername6  bpf_links on the cgroup, one per program

The links are made with BPF_LINK_CREATE (bpftool 7.1 cannot) and pinned, so the datapath keeps
translating while no agent runs. A starting agent always loads the programs afresh, bound to
the pinned maps, and swaps each link to the new program with BPF_LINK_UPDATE: an atomic
switch, with no moment in which the cgroup has no program. The swap names the program the link
must be running (BPF_F_REPLACE with the old program, opened through its pin ``progs/<name>``,
never by id: BPF_PROG_GET_FD_BY_ID needs CAP_SYS_ADMIN), so a link another writer changed is
never overwritten; a link that does not run the pinned program is refused before anything loads.
A failed attach leaves what it found: links it swapped go back, links it made go, pins it made
go, and no fd stays open.

One writer per pin dir (:class:`PinLock`): an exclusive flock(2) on an fd of the pin directory
itself (bpffs holds only BPF objects, so there is no lock file; flock works on any inode). The
agent takes it before it attaches and holds it until it exits; the kernel drops it with the
process, SIGKILL included. Whoever finds it taken waits a bounded time for the holder to exit
(an overlapping restart), or fails naming the pin dir and the holder's pid (from /proc/locks).
Meanwhile the pinned datapath keeps translating: nothing needs an agent to run.

Layout version: ``maps/kmesh_meta`` is a frozen 1-entry ARRAY holding the layout version of the
maps (records.LAYOUT_VERSION, KMESH_LAYOUT_VERSION in bpf/kmesh_lb.h) that made them. Pinned
maps of any other version, older or newer, are refused by attach and open alike, never misread;
pins made before the record existed have none and count as version 1. There is no migration:
the message says to start over (`kmesh-plugin datapath remove`) or run a matching build.

Trust: a pin dir, its progs/, maps/ and links/, a build dir and a cached object are used only if
root owns them and neither group nor others can write them (mounts.check_trusted); the CLI
checks before it touches the kernel (:func:`check_paths`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import select
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from kmesh_plugin.datapath import records, syscall
from kmesh_plugin.datapath.bpftool import Bpftool
from kmesh_plugin.datapath.build import Capacities, check_build, compile_object
from kmesh_plugin.datapath.mounts import (
    cgroup_id,
    check_trusted,
    check_trusted_stat,
    ensure_bpffs,
    is_cgroup2_dir,
)
from kmesh_plugin.errors import BpfError, DatapathError

log = logging.getLogger(__name__)

BARRIER = "kmesh_barrier"
META = "kmesh_meta"  # the layout version of the pinned maps
LEGACY_LAYOUT_VERSION = 1  # pins made before kmesh_meta existed
DIR_MODE = 0o700
# How long `kmesh-plugin run` waits for the agent holding the pin dir to exit by default: more
# than a pod's default terminationGracePeriodSeconds (30 s), after which the kubelet kills it.
LOCK_TIMEOUT = 60.0
_LOCK_RETRY = 0.25  # s between tries of a taken lock (its holder's exit wakes us at once)

# Every program, each with its own link on the cgroup (the attach type is also the program's
# expected_attach_type, which bpftool takes from its section name).
PROGRAMS = {
    records.PROG_CONNECT4: syscall.BPF_CGROUP_INET4_CONNECT,
    records.PROG_CONNECT6: syscall.BPF_CGROUP_INET6_CONNECT,
    records.PROG_SENDMSG4: syscall.BPF_CGROUP_UDP4_SENDMSG,
    records.PROG_SENDMSG6: syscall.BPF_CGROUP_UDP6_SENDMSG,
    records.PROG_RECVMSG4: syscall.BPF_CGROUP_UDP4_RECVMSG,
    records.PROG_RECVMSG6: syscall.BPF_CGROUP_UDP6_RECVMSG,
    records.PROG_GETPEERNAME4: syscall.BPF_CGROUP_INET4_GETPEERNAME,
    records.PROG_GETPEERNAME6: syscall.BPF_CGROUP_INET6_GETPEERNAME,
    records.PROG_RELEASE: syscall.BPF_CGROUP_INET_SOCK_RELEASE,
}


@dataclass(frozen=True)
class MapSpec:
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


ZERO_KEY = records.U32.pack(0)  # the one entry of kmesh_config and kmesh_meta


def map_specs(capacities: Capacities) -> dict[str, MapSpec]:
    """What bpf/kmesh_lb.c declares, computed from the Python layouts and the capacities."""
    svc = capacities.max_services
    return {
        records.MAP_FRONTENDS: MapSpec(
            syscall.BPF_MAP_TYPE_HASH, records.FRONTEND_KEY.size, records.FRONTEND.size, svc
        ),
        records.MAP_FRONTEND_CACHE: MapSpec(
            syscall.BPF_MAP_TYPE_ARRAY, 4, records.FRONTEND_LINE.size, capacities.frontend_lines
        ),
        records.MAP_VIPS: MapSpec(syscall.BPF_MAP_TYPE_HASH, records.VIP.size, 1, svc),
        records.MAP_ACTIVE: MapSpec(syscall.BPF_MAP_TYPE_ARRAY, 4, 4, svc),
        records.MAP_RECORDS: MapSpec(
            syscall.BPF_MAP_TYPE_ARRAY, 4, records.RECORD.size, svc * records.SETS
        ),
        records.MAP_SLOTS: MapSpec(
            syscall.BPF_MAP_TYPE_HASH, records.SLOT_KEY.size, records.ENDPOINT.size,
            capacities.max_endpoints,
        ),
        records.MAP_STATS: MapSpec(syscall.BPF_MAP_TYPE_PERCPU_ARRAY, 4, records.STATS.size, svc),
        records.MAP_CONFIG: MapSpec(syscall.BPF_MAP_TYPE_ARRAY, 4, records.CONFIG.size, 1),
        records.MAP_ENROLLED: MapSpec(
            syscall.BPF_MAP_TYPE_HASH, 8, records.ENROLMENT.size, records.MAX_PODS,
            syscall.BPF_F_NO_PREALLOC,
        ),
        records.MAP_REVERSE: MapSpec(
            syscall.BPF_MAP_TYPE_LRU_HASH, records.REVERSE_KEY.size, records.REVERSE.size,
            records.MAX_REVERSE,
        ),
        records.MAP_AFFINITY: MapSpec(
            syscall.BPF_MAP_TYPE_LRU_HASH, records.AFFINITY_KEY.size, records.AFFINITY.size,
            records.MAX_AFFINITY,
        ),
        records.MAP_TRANSLATED: MapSpec(
            syscall.BPF_MAP_TYPE_ARRAY, 4, records.TRANSLATION.size, records.MAX_TRANSLATED
        ),
    }


@dataclass(frozen=True)
class Pins:
    root: Path

    @property
    def progs(self) -> Path:
        return self.root / "progs"

    @property
    def maps(self) -> Path:
        return self.root / "maps"

    @property
    def links(self) -> Path:
        return self.root / "links"

    def map(self, name: str) -> Path:
        return self.maps / name

    def link(self, name: str) -> Path:
        return self.links / name


# --------------------------------------------------------------------------------------------
# One writer: the pin dir's lock
# --------------------------------------------------------------------------------------------


def _lock_holders(st: os.stat_result) -> list[int]:
    """Pids holding a flock on the inode of ``st``, from /proc/locks (0: in a pid namespace
    this process cannot see). Lines of waiters ("->") are not holders."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    with contextlib.suppress(OSError), open("/proc/locks", encoding="ascii") as f:
        for line in f:
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 00:27:4242 0 EOF"
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want:
                with contextlib.suppress(ValueError):
                    pids.append(int(fields[4]))
    return pids


def _describe(pid: int | None) -> str:
    return f"pid {pid}" if pid else "pid unknown: it runs in another pid namespace"


def _wait_for_exit(pid: int | None, seconds: float) -> None:
    """Block until process ``pid`` exits or ``seconds`` pass: a pidfd wakes us the moment the
    holder exits (by then the kernel has dropped its locks), when its pid is ours to see."""
    if pid and pid != os.getpid():
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
        if pidfd >= 0:
            try:
                select.select([pidfd], [], [], max(seconds, 0.0))
            finally:
                os.close(pidfd)
            return
    time.sleep(max(seconds, 0.0))


class PinLock:
    """An exclusive flock(2) on the pin directory: the right to write its maps and links.

    Held from :meth:`acquire` to :meth:`release` (or the process's end). Owns its fd, which is
    close-on-exec, so bpftool and clang children never inherit the lock."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(
        cls,
        pin_dir: Path,
        timeout: float = 0.0,
        *,
        on_wait: Callable[[int | None], None] | None = None,
    ) -> Self:
        """Lock ``pin_dir`` (which must exist), waiting up to ``timeout`` s for a holder to let
        go. ``on_wait(pid)`` is called once if it has to wait (default: a warning in the log).

        Raises DatapathError naming the pin dir and the holder's pid when the time is up, and
        when the pin dir is not root's alone (see mounts.check_trusted)."""
        deadline = time.monotonic() + max(timeout, 0.0)
        told = False
        while True:
            try:
                fd = os.open(pin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                raise DatapathError(f"pin dir {pin_dir} does not exist") from None
            except OSError as e:
                raise DatapathError(f"pin dir {pin_dir}: cannot open it: {e.strerror}") from None
            try:
                st = os.fstat(fd)
                check_trusted_stat(pin_dir, "pin dir", st)
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        holders = [p for p in _lock_holders(st) if p != 0] or [0]
                        holder = holders[0] or None
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise DatapathError(_busy(pin_dir, holder, timeout)) from None
                        if not told:
                            told = True
                            if on_wait is not None:
                                on_wait(holder)
                            else:
                                log.warning(
                                    "pin dir %s is held by another kmesh-plugin agent (%s); "
                                    "waiting up to %g s for it to exit", pin_dir,
                                    _describe(holder), timeout, extra={"pin_dir": str(pin_dir)},
                                )
                        # A holder may also let go without exiting: try again every slice.
                        _wait_for_exit(holder, min(left, _LOCK_RETRY))
                # Still the pin dir? It may have been removed (and made again) while we waited.
                try:
                    now = os.lstat(pin_dir)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    return cls(pin_dir, fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # a lock on a directory nobody uses any more: try the new one

    @staticmethod
    def holder(pin_dir: Path) -> int | None:
        """The pid holding ``pin_dir``'s lock (0 if not visible from here), or None."""
        try:
            holders = _lock_holders(os.stat(pin_dir))
        except FileNotFoundError:
            return None
        return holders[0] if holders else None

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        """Let go of the lock (idempotent): closing the fd drops the flock."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _busy(pin_dir: Path, holder: int | None, timeout: float) -> str:
    waited = f" and did not let go within {timeout:g} s" if timeout > 0 else ""
    return (
        f"pin dir {pin_dir} is held by another kmesh-plugin agent ({_describe(holder)}){waited}: "
        "two agents on one pin dir would overwrite each other's map updates; stop it first "
        "(`kmesh-plugin run --lock-timeout SECONDS` waits for it), or give each agent its own "
        "datapath.pin_dir"
    )


def lock_pin_dir(
    pin_dir: Path, timeout: float = 0.0, *, on_wait: Callable[[int | None], None] | None = None
) -> PinLock:
    """Make sure ``pin_dir`` exists on bpffs (mounting bpffs 0700 at /sys/fs/bpf if needed,
    creating the directory 0700) and take its lock (:meth:`PinLock.acquire`)."""
    check_pins_trusted(pin_dir)
    ensure_bpffs(pin_dir)
    pin_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    return PinLock.acquire(pin_dir, timeout, on_wait=on_wait)


# --------------------------------------------------------------------------------------------
# Trust and layout
# --------------------------------------------------------------------------------------------


def check_pins_trusted(pin_dir: Path) -> None:
    """Refuse a pin dir, or its progs/, maps/ or links/, that root does not own alone."""
    if check_trusted(pin_dir, "pin dir"):
        pins = Pins(pin_dir)
        for sub in (pins.progs, pins.maps, pins.links):
            check_trusted(sub, "pin dir subdirectory", ancestors=False)


def check_paths(pin_dir: Path, build_dir: Path, capacities: Capacities) -> None:
    """Everything of the node that the agent would trust, checked before the kernel is touched:
    the pin dir and its subdirectories, the build dir and the cached object."""
    check_pins_trusted(pin_dir)
    check_build(capacities, build_dir)


def pinned_layout(pins: Pins) -> int:
    """The layout version recorded with the pinned maps (LEGACY_LAYOUT_VERSION without one)."""
    path = pins.map(META)
    if not path.exists():
        return LEGACY_LAYOUT_VERSION
    with syscall.Map.open_pinned(path, read_only=True) as meta:
        if meta.map_type != syscall.BPF_MAP_TYPE_ARRAY or meta.key_size != 4 or \
                meta.value_size < 4 or meta.max_entries < 1:
            raise DatapathError(
                f"{path} is no layout record (map type {meta.map_type}, key {meta.key_size}, "
                f"value {meta.value_size} bytes): run `kmesh-plugin datapath remove` to start over"
            )
        raw = meta.lookup(records.U32.pack(0)) or bytes(4)
    return int(records.U32.unpack(raw[:4])[0])


def _check_layout(pins: Pins) -> None:
    pinned, needed = pinned_layout(pins), records.LAYOUT_VERSION
    if pinned != needed:
        raise DatapathError(
            f"{pins.maps}: pinned maps are layout version {pinned}, this build needs {needed}: "
            "run `kmesh-plugin datapath remove` to start over, or run a matching build"
        )


def _write_layout(pins: Pins) -> Path:
    """Pin maps/kmesh_meta holding this build's layout version, frozen (read-only for every
    fd from now on)."""
    path = pins.map(META)
    with syscall.Map.create(syscall.BPF_MAP_TYPE_ARRAY, 4, 4, 1, name=META) as meta:
        meta.update(records.U32.pack(0), records.U32.pack(records.LAYOUT_VERSION))
        meta.freeze()
        meta.pin(path)
    return path


def _open_barrier(path: Path) -> syscall.Barrier:
    try:
        return syscall.Barrier.open_pinned(path)
    except ValueError as e:
        raise DatapathError(f"{e}: run `kmesh-plugin datapath remove` to start over") from None


# --------------------------------------------------------------------------------------------
# The datapath
# --------------------------------------------------------------------------------------------


@dataclass
class Datapath:
    """Open handles on a pinned datapath's maps. Only the core writes through them.

    ``barrier`` is None for a read-only datapath (nothing there waits for programs); ``lock``
    is the pin dir's lock for a writable one, released by :meth:`close`."""

    pins: Pins
    maps: dict[str, syscall.Map]
    barrier: syscall.Barrier | None
    capacities: Capacities
    events: list[str] = field(default_factory=list)  # what attach() did, for logs and status
    lock: PinLock | None = None
    read_only: bool = False

    def __getitem__(self, name: str) -> syscall.Map:
        return self.maps[name]

    def enrolment(self) -> int:
        """Which sockets are ours now (records.ENROL_*), read from kmesh_config."""
        raw = self.maps[records.MAP_CONFIG].lookup(ZERO_KEY)
        return records.CONFIG.unpack(raw)["enrolment"] if raw else records.ENROL_ALL

    def enrolled(self) -> list[int]:
        """The netns cookies in kmesh_enrolled."""
        return sorted(records.U64.unpack(k)[0] for k in self.maps[records.MAP_ENROLLED].keys())

    def close(self) -> None:
        """Close every fd (idempotent) and release the lock: the datapath stays pinned."""
        for m in self.maps.values():
            m.close()
        if self.barrier is not None:
            self.barrier.close()
        if self.lock is not None:
            self.lock.release()

    @classmethod
    def open(cls, pin_dir: Path, *, read_only: bool = True) -> Datapath:
        """Open an existing datapath without loading anything.

        ``read_only`` (dump, explain, status, metrics): every map is opened with BPF_F_RDONLY,
        so the kernel refuses any write through these handles, and no barrier is made (that
        would create a map, which needs CAP_BPF). ``read_only=False`` opens the maps for
        writing, with the barrier, and takes the pin dir's lock (failing at once if an agent
        holds it): a writer is a writer whoever runs it."""
        pins = Pins(pin_dir)
        check_pins_trusted(pin_dir)
        names = list(map_specs(Capacities(1, 1)))  # the names; capacities come from the pins
        needed = names if read_only else [*names, BARRIER]
        missing = [n for n in needed if not pins.map(n).exists()]
        if missing:
            raise DatapathError(
                f"no datapath pinned at {pin_dir} (missing {', '.join(missing)}); "
                "is the agent running with this pin_dir?"
            )
        lock = None if read_only else PinLock.acquire(pin_dir)
        maps: dict[str, syscall.Map] = {}
        barrier = None
        try:
            _check_layout(pins)
            for n in names:
                maps[n] = syscall.Map.open_pinned(pins.map(n), read_only=read_only)
            if not read_only:
                barrier = _open_barrier(pins.map(BARRIER))
        except BaseException:
            for m in maps.values():
                m.close()
            if lock is not None:
                lock.release()
            raise
        caps = Capacities(
            maps[records.MAP_FRONTENDS].max_entries, maps[records.MAP_SLOTS].max_entries
        )
        return cls(pins, maps, barrier, caps, lock=lock, read_only=read_only)


def attach(
    pin_dir: Path,
    cgroup: Path,
    capacities: Capacities,
    build_dir: Path,
    *,
    clang: str = "clang",
    bpftool: Bpftool | None = None,
    obj: Path | None = None,
    lock: PinLock | None = None,
    lock_timeout: float = 0.0,
    enrolment: int = records.ENROL_ALL,
) -> Datapath:
    """Compile, load and attach, or reload over a running datapath. Returns open map handles
    holding the pin dir's lock until :meth:`Datapath.close`.

    ``lock``: the pin dir's lock, taken beforehand (the agent does, before it binds its ports);
    attach takes it over, and releases it if it fails. Without one, attach takes it, waiting up
    to ``lock_timeout`` s. ``obj``: load this object instead of compiling bpf/kmesh_lb.c (tests
    load variants). ``enrolment``: which sockets are ours (records.ENROL_*), written to
    kmesh_config before any link runs the programs."""
    try:
        if not is_cgroup2_dir(cgroup):
            raise DatapathError(f"{cgroup} is not a cgroup v2 directory")
        check_pins_trusted(pin_dir)
        if obj is None:
            check_build(capacities, build_dir)
        if lock is None:
            lock = lock_pin_dir(pin_dir, lock_timeout)
        obj = obj or compile_object(capacities, build_dir, clang)
        dp = _attach_locked(Pins(pin_dir), cgroup, capacities, bpftool or Bpftool(), obj,
                            enrolment)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    dp.lock = lock
    for event in dp.events:
        log.info("datapath: %s", event, extra={"pin_dir": str(pin_dir)})
    return dp


def _attach_locked(
    pins: Pins, cgroup: Path, capacities: Capacities, tool: Bpftool, obj: Path,
    enrolment: int = records.ENROL_ALL,
) -> Datapath:
    if enrolment not in records.ENROL_NAMES:
        raise DatapathError(f"unknown enrolment mode {enrolment}")
    for sub in (pins.links, pins.maps):
        if not sub.exists():
            sub.mkdir(mode=DIR_MODE)
    check_pins_trusted(pins.root)  # again, now that no other agent can change them
    events: list[str] = []

    specs = map_specs(capacities)
    present = [n for n in specs if pins.map(n).exists()]
    live_links = [n for n in PROGRAMS if pins.link(n).exists()]
    if present and len(present) < len(specs):
        if live_links:
            raise DatapathError(
                f"{pins.maps} holds only {', '.join(present)} while links are attached; "
                "run `kmesh-plugin datapath remove` and start again"
            )
        _clear_dir(pins.maps)  # left by a load that crashed half-way; nothing uses it
        present = []
    if present:
        _check_layout(pins)
        _check_pinned_maps(pins, specs)

    # Refuse a link that is not ours to swap before loading anything; keep the programs they
    # run open, to name them in BPF_F_REPLACE.
    olds = _old_programs(pins, cgroup)
    # bpffs refuses names with a dot: "progs-new-<pid>", not "progs.new.<pid>".
    new_progs = pins.root / f"progs-new-{os.getpid()}"
    barrier: syscall.Barrier | None = None
    maps: dict[str, syscall.Map] = {}
    made: list[Path] = []  # pins this attempt added to reused maps/, removed on failure
    swap = _LinkSwap(pins, cgroup, new_progs, olds)
    old_config: bytes | None = None  # kmesh_config as found, restored if the attach fails
    try:
        for stale in pins.root.glob("progs-new-*"):
            _remove_tree(stale)  # an attach that crashed; we hold the lock, nobody else's
        if present:
            tool.prog_loadall(obj, new_progs, reuse_maps={n: pins.map(n) for n in specs})
            events.append(f"loaded {obj.name} reusing the pinned maps")
        else:
            _clear_dir(pins.maps)  # a stale barrier or layout record without maps: start clean
            _write_layout(pins)
            tool.prog_loadall(obj, new_progs, pin_maps_dir=pins.maps)
            events.append(f"loaded {obj.name} with new maps (layout {records.LAYOUT_VERSION})")

        barrier_path = pins.map(BARRIER)
        if barrier_path.exists():
            barrier = _open_barrier(barrier_path)
        else:
            barrier = syscall.Barrier.create_pinned(barrier_path)
            made.append(barrier_path)
        for n in specs:
            maps[n] = syscall.Map.open_pinned(pins.map(n))

        # The enrolment mode, before a link runs the new programs (a new map reads as ALL).
        config = maps[records.MAP_CONFIG]
        old_config = config.lookup(ZERO_KEY)
        new_config = records.CONFIG.pack({"enrolment": enrolment, "pad": 0})
        if old_config != new_config:
            config.update(ZERO_KEY, new_config)
            events.append(f"enrolment mode {records.ENROL_NAMES[enrolment]}")

        # The commit: every link to its new program, then progs/ to the new pins.
        events += swap.run()
        _install_progs(pins, new_progs)
    except BaseException:
        # Leave what we found: links as they were, no pin of this attempt, no open fd.
        swap.undo()
        if present and old_config is not None and records.MAP_CONFIG in maps:
            with contextlib.suppress(BpfError):
                maps[records.MAP_CONFIG].update(ZERO_KEY, old_config)
        for m in maps.values():
            m.close()
        if barrier is not None:
            barrier.close()
        _remove_tree(new_progs)
        if not present:
            _clear_dir(pins.maps)  # everything in it is this attempt's
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise
    finally:
        for fd in olds.values():
            os.close(fd)
    return Datapath(pins, maps, barrier, capacities, events)


def _old_programs(pins: Pins, cgroup: Path) -> dict[str, int]:
    """For every pinned link: an fd of the program it runs, opened through a pin of ours.

    Every link must sit on ``cgroup`` with the attach type its program needs, and run the
    program pinned at progs/<name> (or, after an attach that crashed between swapping the links
    and renaming progs-new-<pid>/ into place, the one pinned there). Anything else is refused:
    the link is not ours to swap."""
    want_cgroup = cgroup_id(cgroup)
    olds: dict[str, int] = {}
    try:
        for name, attach_type in PROGRAMS.items():
            link_path = pins.link(name)
            if not link_path.exists():
                continue
            with _fd(syscall.obj_get(link_path)) as link_fd:
                info = syscall.link_info(link_fd)
            if info.cgroup_id != want_cgroup:
                raise DatapathError(
                    f"{link_path} is attached to cgroup id {info.cgroup_id}, but "
                    f"datapath.cgroup is {cgroup} (id {want_cgroup}); run "
                    "`kmesh-plugin datapath remove` to move the datapath"
                )
            # BPF_LINK_UPDATE checks the program type, and whether it also checks the expected
            # attach type differs between kernel builds: never hand it a program for another
            # hook, whatever this kernel would accept.
            if info.attach_type != attach_type:
                raise DatapathError(
                    f"{link_path} is a link of attach type {_attach_name(info.attach_type)}, "
                    f"but {name} needs {_attach_name(attach_type)}; refusing to swap it in (run "
                    "`kmesh-plugin datapath remove` and start again)"
                )
            olds[name] = _pinned_program(pins, name, info.prog_id, link_path)
    except BaseException:
        for fd in olds.values():
            os.close(fd)
        raise
    return olds


def _pinned_program(pins: Pins, name: str, prog_id: int, link_path: Path) -> int:
    """An fd of the program ``prog_id`` through its pin (never by id: CAP_SYS_ADMIN)."""
    seen = []
    for path in [pins.progs / name, *sorted(pins.root.glob(f"progs-new-*/{name}"))]:
        try:
            fd = syscall.obj_get(path)
        except BpfError as e:
            seen.append(f"{path}: {errno.errorcode.get(e.errno or 0, e.errno)}")
            continue
        try:
            found = syscall.prog_info(fd).id
        except BaseException:
            os.close(fd)
            raise
        if found == prog_id:
            return fd
        os.close(fd)
        seen.append(f"{path} is program id {found}")
    raise DatapathError(
        f"{link_path} runs program id {prog_id}, which is not the pinned program "
        f"({'; '.join(seen)}): another agent may be updating this datapath, or the pins were "
        "changed by hand; refusing to swap it (run `kmesh-plugin datapath remove` to start over)"
    )


class _LinkSwap:
    """Points every link at its program in ``new_progs`` (creating the missing links), and
    puts back what it changed if the attach fails after all."""

    def __init__(self, pins: Pins, cgroup: Path, new_progs: Path, olds: dict[str, int]) -> None:
        self.pins, self.cgroup, self.new_progs, self.olds = pins, cgroup, new_progs, olds
        self.swapped: list[str] = []
        self.created: list[Path] = []

    def run(self) -> list[str]:
        events = []
        for name, attach_type in PROGRAMS.items():
            link_path = self.pins.link(name)
            with _fd(syscall.obj_get(self.new_progs / name)) as prog_fd:
                if name in self.olds:
                    with _fd(syscall.obj_get(link_path)) as link_fd:
                        link_id = syscall.link_info(link_fd).id
                        self._update(link_fd, prog_fd, self.olds[name], link_path)
                    self.swapped.append(name)
                    events.append(f"swapped {name} on link {link_id} (BPF_LINK_UPDATE, "
                                  "BPF_F_REPLACE)")
                else:
                    with _fd(os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)) as cg_fd:
                        link_fd = syscall.link_create(prog_fd, cg_fd, attach_type)
                    with _fd(link_fd):  # closing an unpinned link detaches it
                        syscall.obj_pin(link_fd, link_path)
                    self.created.append(link_path)
                    events.append(f"attached {name} to {self.cgroup} with a pinned link")
        return events

    @staticmethod
    def _update(link_fd: int, prog_fd: int, old_fd: int, link_path: Path) -> None:
        try:
            syscall.link_update(link_fd, prog_fd, old_prog_fd=old_fd)
        except BpfError as e:
            if e.errno != errno.EPERM:
                raise
            raise DatapathError(
                f"{link_path} no longer runs the program it ran when this attach began "
                "(BPF_F_REPLACE refused the swap): another agent is updating this datapath; "
                "nothing of it was overwritten"
            ) from e

    def undo(self) -> None:
        """Best effort, never raising: the error that made us undo is the one to report."""
        for name in reversed(self.swapped):
            try:
                with _fd(syscall.obj_get(self.pins.link(name))) as link_fd, \
                        _fd(syscall.obj_get(self.new_progs / name)) as new_fd:
                    syscall.link_update(link_fd, self.olds[name], old_prog_fd=new_fd)
            except (OSError, KeyError) as e:
                log.error("datapath: could not swap %s back after a failed attach: %s", name, e)
        for link_path in reversed(self.created):
            try:
                with _fd(syscall.obj_get(link_path)) as link_fd:
                    syscall.link_detach(link_fd)
                link_path.unlink()
            except OSError as e:
                log.error("datapath: could not remove %s after a failed attach: %s",
                          link_path, e)
        self.swapped, self.created = [], []


# renameat2(2) flag: swap two paths atomically (bpffs supports it, as simple_rename does).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def _install_progs(pins: Pins, new_progs: Path) -> None:
    """Make ``new_progs`` the progs/ directory. With an old progs/, both are exchanged in one
    renameat2(RENAME_EXCHANGE), so progs/ never goes missing; the old programs, now under
    ``new_progs``, are unpinned (the links no longer use them)."""
    if not pins.progs.exists():
        os.rename(new_progs, pins.progs)
        return
    renameat2 = getattr(_libc, "renameat2", None)
    done = False
    if renameat2 is not None:
        ret = renameat2(_AT_FDCWD, os.fsencode(new_progs), _AT_FDCWD, os.fsencode(pins.progs),
                        _RENAME_EXCHANGE)
        if ret != 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EINVAL):
                raise OSError(err, f"renameat2 {new_progs} <-> {pins.progs}: {os.strerror(err)}")
        done = ret == 0
    if not done:  # no RENAME_EXCHANGE: a moment without progs/ (attach recovers from it)
        _remove_tree(pins.progs)
        os.rename(new_progs, pins.progs)
        return
    try:
        _remove_tree(new_progs)
    except OSError as e:  # only dead programs stay pinned; the next attach removes them
        log.warning("datapath: could not remove the old programs at %s: %s", new_progs, e)


def remove(pin_dir: Path) -> list[str]:
    """Detach the links and remove every pin under ``pin_dir``. Returns what it did."""
    pins = Pins(pin_dir)
    check_pins_trusted(pin_dir)
    done = []
    if pins.links.exists():
        for link_path in sorted(pins.links.iterdir()):
            try:
                with _fd(syscall.obj_get(link_path)) as link_fd:
                    syscall.link_detach(link_fd)
                done.append(f"detached {link_path}")
            except BpfError as e:
                done.append(f"could not detach {link_path}: {e}")
    if pins.root.exists():
        _remove_tree(pins.root)
        done.append(f"removed {pin_dir}")
    return done


def _check_pinned_maps(pins: Pins, specs: dict[str, MapSpec]) -> None:
    """A pinned map must match what this object declares, or reuse would corrupt it."""
    for name, spec in specs.items():
        with syscall.Map.open_pinned(pins.map(name), read_only=True) as m:
            got = MapSpec(m.map_type, m.key_size, m.value_size, m.max_entries, m.map_flags)
        if got != spec:
            hint = ""
            if got.max_entries != spec.max_entries:
                hint = (
                    " (map capacities in plugin.toml [datapath] differ from the pinned datapath;"
                    " restore them, or run `kmesh-plugin datapath remove` and start again)"
                )
            raise DatapathError(f"pinned map {pins.map(name)} is {got}, expected {spec}{hint}")


def _attach_name(attach_type: int | None) -> str:
    """BPF_CGROUP_INET4_CONNECT for 10: the name bpf.h gives an attach type number."""
    for name, value in vars(syscall).items():
        if name.startswith("BPF_CGROUP_") and value == attach_type:
            return f"{name} ({attach_type})"
    return str(attach_type)


def _remove_tree(path: Path) -> None:
    """Remove a directory of pins (bpffs allows unlink and rmdir, which drop references)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _clear_dir(path: Path) -> None:
    """Remove what ``path`` holds, keeping the directory itself."""
    if path.is_dir():
        for entry in path.iterdir():
            _remove_tree(entry)


@contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)
