"""Read a live datapath back: every map decoded, counters summed over CPUs, links resolved.

One reader serves `dump`, `status`, `explain` and the metrics exporter, so all four always
agree on what the kernel holds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmesh_plugin.datapath import records, syscall
from kmesh_plugin.datapath.loader import PROGRAMS, Datapath, map_specs
from kmesh_plugin.datapath.records import MODE_NAMES, Frontend
from kmesh_plugin.datapath.writer import Published, read_table
from kmesh_plugin.errors import BpfError


@dataclass(frozen=True)
class TierStats:
    hits: int = 0
    refused: int = 0


@dataclass
class LinkView:
    name: str
    link_id: int | None = None
    prog_id: int | None = None
    prog_name: str | None = None
    prog_tag: str | None = None
    cgroup_id: int | None = None
    error: str | None = None


@dataclass
class DatapathView:
    pin_dir: Path
    groups: dict[Frontend, Published]
    vips: list[records.IPAddress]
    stats: dict[int, dict[int, TierStats]]  # sid -> tier -> counters (summed over CPUs)
    entries: dict[str, int]  # map name -> entries in use
    capacity: dict[str, int]  # map name -> max_entries
    links: list[LinkView] = field(default_factory=list)
    enrolment: str = "all"  # records.ENROL_NAMES of kmesh_config: which sockets are ours
    enrolled: list[int] = field(default_factory=list)  # netns cookies in kmesh_enrolled

    def to_json(self) -> dict[str, Any]:
        return {
            "pin_dir": str(self.pin_dir),
            "enrolment": self.enrolment,
            "enrolled_netns_cookies": self.enrolled,
            "links": [vars(link) for link in self.links],
            "maps": {
                name: {"entries": self.entries[name], "capacity": self.capacity[name]}
                for name in sorted(self.capacity)
            },
            "frontends": [group_json(f, p, self.stats.get(p.sid, {}))
                          for f, p in sorted(self.groups.items(), key=lambda i: i[1].sid)],
            "vips": [str(ip) for ip in self.vips],
        }


def group_json(frontend: Frontend, p: Published, stats: dict[int, TierStats]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "frontend": str(frontend),
        "sid": p.sid,
        "active_set": p.set,
        "generation": p.generation,
    }
    if p.backends is None:
        out["error"] = "the active set is incomplete (a count points at a missing slot)"
    else:
        out["mode"] = MODE_NAMES.get(p.backends.mode, str(p.backends.mode))
        out["tiers"] = [[str(b) for b in tier] for tier in p.backends.tiers]
    out["counters"] = {
        str(tier): {"connects": s.hits, "refused": s.refused} for tier, s in sorted(stats.items())
    }
    return out


def read(dp: Datapath) -> DatapathView:
    """Everything the kernel holds for this datapath, now."""
    groups = read_table(dp)
    vips = [records.decode_addr(k) for k in dp[records.MAP_VIPS].keys()]
    entries, capacity = map_fill(dp, groups)
    return DatapathView(
        pin_dir=dp.pins.root,
        groups=groups,
        vips=sorted(vips, key=lambda ip: (ip.version, ip)),
        stats=read_stats(dp, sorted({p.sid for p in groups.values()})),
        entries=entries,
        capacity=capacity,
        links=read_links(dp.pins.root),
        enrolment=records.ENROL_NAMES.get(dp.enrolment(), f"unknown ({dp.enrolment()})"),
        enrolled=dp.enrolled(),
    )


def read_stats(dp: Datapath, sids: Iterable[int]) -> dict[int, dict[int, TierStats]]:
    """The per-CPU counters of ``sids``, summed: sid -> tier -> connects and refusals.

    Tiers without a connect are left out; refusals are reported on tier 0.
    """
    stats: dict[int, dict[int, TierStats]] = {}
    stats_map = dp[records.MAP_STATS]
    for sid in sids:
        per_cpu = [records.STATS.unpack(v)
                   for v in stats_map.lookup_percpu(records.U32.pack(sid)) or []]
        hits = [sum(v["hits"][t] for v in per_cpu) for t in range(records.MAX_TIERS)]
        refused = sum(v["refused"] for v in per_cpu)
        tiers = {t: TierStats(h, 0) for t, h in enumerate(hits) if h}
        if refused:
            tiers[0] = TierStats(hits[0], refused)
        if tiers:
            stats[sid] = tiers
    return stats


def map_fill(
    dp: Datapath, groups: dict[Frontend, Published] | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """Entries in use and capacity of every map."""
    if groups is None:
        groups = read_table(dp)
    used_sids = len({p.sid for p in groups.values()})
    # Arrays are always "full"; what they hold in use is one element (records: one per set)
    # per service group.
    in_use_of_array = {records.MAP_ACTIVE: used_sids, records.MAP_RECORDS: used_sids * records.SETS}
    entries = {}
    capacity = {}
    for name in map_specs(dp.capacities):
        capacity[name] = dp[name].max_entries
        if name in in_use_of_array:
            entries[name] = in_use_of_array[name]
        else:
            entries[name] = len(dp[name].lookup_batch())
    return entries, capacity


def read_links(pin_dir: Path) -> list[LinkView]:
    """The pinned links and the programs they run."""
    out = []
    for name in PROGRAMS:
        view = LinkView(name)
        path = pin_dir / "links" / name
        try:
            link_fd = syscall.obj_get(path)
        except BpfError as e:
            view.error = str(e)
            out.append(view)
            continue
        try:
            info = syscall.link_info(link_fd)
            view.link_id, view.prog_id, view.cgroup_id = info.id, info.prog_id, info.cgroup_id
            # Through its pin, not BPF_PROG_GET_FD_BY_ID: that command needs CAP_SYS_ADMIN,
            # which nothing else of the agent or its status probe needs (deploy/README.md).
            prog_fd = syscall.obj_get(pin_dir / "progs" / name)
            try:
                prog = syscall.prog_info(prog_fd)
            finally:
                os.close(prog_fd)
            if prog.id == info.prog_id:
                view.prog_name, view.prog_tag = prog.name, prog.tag
            else:  # an agent is swapping programs right now: the pin is about to follow
                view.prog_name, view.prog_tag = f"(program id {info.prog_id}, not pinned)", ""
        except BpfError as e:
            view.error = str(e)
        finally:
            os.close(link_fd)
        out.append(view)
    return out
