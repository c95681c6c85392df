"""Load, pin and attach the datapath; reopen it after an agent restart.

Pin layout under ``pin_dir``::

    progs/kmesh_connect4, progs/kmesh_connect6     the loaded programs
    maps/kmesh_frontends, ..., maps/kmesh_barrier  the maps (state survives the agent)
    links/kmesh_connect4, links/kmesh_connect6     bpf_links on the cgroup

The links are made with BPF_LINK_CREATE (bpftool 7.1 cannot) and pinned, so the datapath keeps
translating while no agent runs. A starting agent always loads the programs afresh, bound to
the pinned maps, and swaps each link to the new program with BPF_LINK_UPDATE: an atomic
switch, with no moment in which the cgroup has no program.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kmesh_plugin.datapath import records, syscall
from kmesh_plugin.datapath.bpftool import Bpftool
from kmesh_plugin.datapath.build import Capacities, compile_object
from kmesh_plugin.datapath.mounts import cgroup_id, ensure_bpffs, is_cgroup2_dir
from kmesh_plugin.errors import BpfError, DatapathError

log = logging.getLogger(__name__)

BARRIER = "kmesh_barrier"

PROGRAMS = {
    records.PROG_CONNECT4: syscall.BPF_CGROUP_INET4_CONNECT,
    records.PROG_CONNECT6: syscall.BPF_CGROUP_INET6_CONNECT,
}


@dataclass(frozen=True)
class MapSpec:
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


def map_specs(capacities: Capacities) -> dict[str, MapSpec]:
    """What bpf/kmesh_lb.c declares, computed from the Python layouts and the capacities."""
    svc = capacities.max_services
    return {
        records.MAP_FRONTENDS: MapSpec(
            syscall.BPF_MAP_TYPE_HASH, records.FRONTEND_KEY.size, records.FRONTEND.size, svc
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


@dataclass
class Datapath:
    """Open handles on a pinned datapath's maps. Only the core writes through them."""

    pins: Pins
    maps: dict[str, syscall.Map]
    barrier: syscall.Barrier
    capacities: Capacities
    events: list[str] = field(default_factory=list)  # what attach() did, for logs and status

    def __getitem__(self, name: str) -> syscall.Map:
        return self.maps[name]

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.barrier.close()

    @classmethod
    def open(cls, pin_dir: Path) -> Datapath:
        """Open an existing datapath read-write without loading anything (dump, explain)."""
        pins = Pins(pin_dir)
        names = list(map_specs(Capacities(1, 1)))  # the names; capacities come from the pins
        missing = [n for n in (*names, BARRIER) if not pins.map(n).exists()]
        if missing:
            raise DatapathError(
                f"no datapath pinned at {pin_dir} (missing {', '.join(missing)}); "
                "is the agent running with this pin_dir?"
            )
        maps = {n: syscall.Map.open_pinned(pins.map(n)) for n in names}
        caps = Capacities(
            maps[records.MAP_FRONTENDS].max_entries, maps[records.MAP_SLOTS].max_entries
        )
        return cls(pins, maps, syscall.Barrier.open_pinned(pins.map(BARRIER)), caps)


def attach(
    pin_dir: Path,
    cgroup: Path,
    capacities: Capacities,
    build_dir: Path,
    *,
    clang: str = "clang",
    bpftool: Bpftool | None = None,
    obj: Path | None = None,
) -> Datapath:
    """Compile, load and attach, or reload over a running datapath. Returns open map handles.

    ``obj``: load this object instead of compiling bpf/kmesh_lb.c (tests load variants)."""
    tool = bpftool or Bpftool()
    if not is_cgroup2_dir(cgroup):
        raise DatapathError(f"{cgroup} is not a cgroup v2 directory")
    ensure_bpffs(pin_dir)
    obj = obj or compile_object(capacities, build_dir, clang)
    pins = Pins(pin_dir)
    pins.root.mkdir(parents=True, exist_ok=True)
    pins.links.mkdir(exist_ok=True)
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
        _remove_tree(pins.maps)  # left by a load that crashed half-way; nothing uses it
        present = []
    if present:
        _check_pinned_maps(pins, specs)

    # Refuse a link that is not ours to swap before loading anything.
    _check_links(pins, cgroup)

    # bpffs refuses names with a dot: "progs-new-<pid>", not "progs.new.<pid>".
    for stale in pins.root.glob("progs-new-*"):
        _remove_tree(stale)
    new_progs = pins.root / f"progs-new-{os.getpid()}"
    barrier: syscall.Barrier | None = None
    maps: dict[str, syscall.Map] = {}
    try:
        if present:
            tool.prog_loadall(obj, new_progs, reuse_maps={n: pins.map(n) for n in specs})
            events.append(f"loaded {obj.name} reusing the pinned maps")
        else:
            pins.maps.mkdir(exist_ok=True)
            tool.prog_loadall(obj, new_progs, pin_maps_dir=pins.maps)
            events.append(f"loaded {obj.name} with new maps")

        barrier_path = pins.map(BARRIER)
        barrier = (
            syscall.Barrier.open_pinned(barrier_path)
            if barrier_path.exists()
            else syscall.Barrier.create_pinned(barrier_path)
        )
        events += _swap_links(pins, cgroup, new_progs)

        # The links now hold the new programs; the old program pins only keep dead programs
        # alive.
        if pins.progs.exists():
            _remove_tree(pins.progs)
        os.rename(new_progs, pins.progs)
        for n in specs:
            maps[n] = syscall.Map.open_pinned(pins.map(n))
    except BaseException:
        # Leave nothing of this attempt behind: no program pins, no open fds.
        for m in maps.values():
            m.close()
        if barrier is not None:
            barrier.close()
        _remove_tree(new_progs)
        raise
    for event in events:
        log.info("datapath: %s", event, extra={"pin_dir": str(pin_dir)})
    return Datapath(pins, maps, barrier, capacities, events)


def _check_links(pins: Pins, cgroup: Path) -> None:
    """Every pinned link must sit on ``cgroup`` with the attach type its program needs."""
    want_cgroup = cgroup_id(cgroup)
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


def _swap_links(pins: Pins, cgroup: Path, new_progs: Path) -> list[str]:
    """Point every link at its program in ``new_progs``, creating the missing links."""
    events = []
    for name, attach_type in PROGRAMS.items():
        with _fd(syscall.obj_get(new_progs / name)) as prog_fd:
            link_path = pins.link(name)
            if link_path.exists():
                with _fd(syscall.obj_get(link_path)) as link_fd:
                    info = syscall.link_info(link_fd)
                    syscall.link_update(link_fd, prog_fd)
                events.append(f"swapped {name} on link {info.id} (BPF_LINK_UPDATE)")
            else:
                with _fd(os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)) as cg_fd:
                    link_fd = syscall.link_create(prog_fd, cg_fd, attach_type)
                with _fd(link_fd):
                    syscall.obj_pin(link_fd, link_path)
                events.append(f"attached {name} to {cgroup} with a pinned link")
    return events


def remove(pin_dir: Path) -> list[str]:
    """Detach the links and remove every pin under ``pin_dir``. Returns what it did."""
    pins = Pins(pin_dir)
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
        with syscall.Map.open_pinned(pins.map(name)) as m:
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
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)
