"""Read a live datapath back: every map decoded, counters summed over CPUs, links resolved.

One reader serves `dump`, `status`, `explain` and the metrics exporter, so all four always
agree on what the kernel holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmesh_plugin.datapath import records, syscall
from kmesh_plugin.datapath.loader import PROGRAMS, Datapath, map_specs
from kmesh_plugin.datapath.records import MODE_NAMES, MODE_STRICT, Backend, Frontend
from kmesh_plugin.datapath.writer import Published, read_table
from kmesh_plugin.errors import BpfError

# Storage maps hold one value per kernel object (a socket, a task). Userspace cannot walk them
# (BPF_MAP_GET_NEXT_KEY answers ENOTSUPP) and their max_entries is 0: a pinned one (the
# datapath has none now; an earlier draft had socket storage) is left out of the entry counts
# rather than failing every `dump`, `status` and `explain`.
PER_OBJECT_MAP_TYPES = frozenset({syscall.BPF_MAP_TYPE_SK_STORAGE,
                                  syscall.BPF_MAP_TYPE_INODE_STORAGE,
                                  syscall.BPF_MAP_TYPE_TASK_STORAGE})
NSEC_PER_SEC = 1_000_000_000
_U64_MASK = (1 << 64) - 1


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


@dataclass(frozen=True)
class ReverseView:
    """A way back: socket ``socket_cookie`` asked for ``frontend`` and was sent to
    ``endpoint``; getpeername() and recvmsg() show it the frontend. ``held``: in
    kmesh_translated ("translated": noted by a connect, not asked for yet) or in kmesh_reverse
    ("reverse": sent by an unconnected UDP sendmsg, or asked for since)."""

    socket_cookie: int
    endpoint: Backend
    frontend: Frontend
    held: str = "reverse"

    def to_json(self) -> dict[str, Any]:
        return {"socket_cookie": self.socket_cookie, "endpoint": str(self.endpoint),
                "frontend": str(self.frontend), "held": self.held}


@dataclass(frozen=True)
class AffinityView:
    """A kmesh_affinity entry: the endpoint the client (a network namespace) was last given
    for one sessionAffinity frontend."""

    netns_cookie: int
    frontend_key: bytes  # the packed kmesh_frontend_key: the kernel matches these bytes
    frontend: Frontend
    endpoint: Backend
    tier: int  # where the program last found the endpoint
    index: int
    last_used: int  # CLOCK_MONOTONIC ns (bpf_ktime_get_ns) of the last connect it decided


@dataclass(frozen=True)
class AffinityState:
    """What the next connect of an affinity entry's client does with it."""

    idle_seconds: float | None  # since its last use; None: a last use in the future
    left_seconds: float | None  # before it expires; None once expired
    state: str  # "held": the next connect gets its endpoint; "expired"; "stale"
    why: str  # for a state other than "held"


@dataclass
class DatapathView:
    pin_dir: Path
    groups: dict[Frontend, Published]
    vips: list[records.IPAddress]
    stats: dict[int, dict[int, TierStats]]  # sid -> tier -> counters (summed over CPUs)
    entries: dict[str, int]  # map name -> entries in use (per-object maps left out)
    capacity: dict[str, int]  # map name -> max_entries (same maps)
    links: list[LinkView] = field(default_factory=list)
    enrolment: str = "all"  # records.ENROL_NAMES of kmesh_config: which sockets are ours
    enrolled: list[int] = field(default_factory=list)  # netns cookies in kmesh_enrolled
    reverse: list[ReverseView] = field(default_factory=list)
    affinity: list[AffinityView] = field(default_factory=list)
    # time.monotonic_ns() just after the maps were read: the clock of AffinityView.last_used.
    read_at: int = 0
    # Frontends a kmesh_frontend_cache line holds with their sid: a connect to one of them
    # needs no hash lookup. The others share a line with one of these (the hash finds them).
    cached: set[Frontend] = field(default_factory=set)

    def published_for(self, a: AffinityView) -> Published | None:
        """The group an affinity entry is for, if its key is one a connect can build (the
        canonical key of a frontend in the maps)."""
        p = self.groups.get(a.frontend)
        return p if p is not None and a.frontend.pack() == a.frontend_key else None

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
            "frontends": [group_json(f, p, self.stats.get(p.sid, {}), f in self.cached)
                          for f, p in sorted(self.groups.items(), key=lambda i: i[1].sid)],
            "vips": [str(ip) for ip in self.vips],
            "reverse": [r.to_json() for r in self.reverse],
            "affinity": [affinity_json(a, self.published_for(a), self.read_at)
                         for a in self.affinity],
        }


def group_json(frontend: Frontend, p: Published, stats: dict[int, TierStats],
               cached: bool | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "frontend": str(frontend),
        "sid": p.sid,
        "active_set": p.set,
        "generation": p.generation,
    }
    if cached is not None:
        out["cached"] = cached
    if p.backends is None:
        out["error"] = "the active set is incomplete (a count points at a missing slot)"
    else:
        out["mode"] = MODE_NAMES.get(p.backends.mode, str(p.backends.mode))
        out["tiers"] = [[str(b) for b in tier] for tier in p.backends.tiers]
        out["affinity_timeout"] = p.backends.affinity
    out["counters"] = {
        str(tier): {"connects": s.hits, "refused": s.refused} for tier, s in sorted(stats.items())
    }
    return out


def pick_tier(backends: records.BackendSet) -> int | None:
    """The tier a connect picks from now: the first non-empty one (strict: tier 0 only)."""
    tiers = backends.tiers[:1] if backends.mode == MODE_STRICT else backends.tiers
    return next((i for i, t in enumerate(tiers) if t), None)


def affinity_state(a: AffinityView, published: Published | None, now: int) -> AffinityState:
    """What the program does with ``a`` at CLOCK_MONOTONIC ``now`` (ns), as kmesh_sticky()
    decides it: expired once idle longer than the record's timeout (u64 arithmetic, as the
    kernel's: a last use in the future is expired), held while its endpoint is in the tier a
    connect picks from, stale otherwise (the next connect chooses again)."""
    idle_ns = (now - a.last_used) & _U64_MASK
    idle = None if a.last_used > now else idle_ns / NSEC_PER_SEC
    backends = published.backends if published is not None else None
    if backends is None:
        why = ("no such frontend in the maps" if published is None
               else "the frontend's active set is incomplete")
        return AffinityState(idle, None, "stale", why)
    timeout = backends.affinity
    if not timeout:
        return AffinityState(idle, None, "stale", "the frontend has no session affinity")
    if idle_ns > timeout * NSEC_PER_SEC:
        return AffinityState(idle, None, "expired", f"idle longer than its {timeout} s timeout")
    left = timeout - idle_ns / NSEC_PER_SEC
    tier = pick_tier(backends)
    if tier is None:
        return AffinityState(idle, left, "stale", "no eligible endpoint: connects are refused")
    if a.endpoint not in backends.tiers[tier]:
        return AffinityState(idle, left, "stale",
                             f"endpoint not in tier {tier}, the tier a connect picks from")
    return AffinityState(idle, left, "held", "")


def affinity_json(a: AffinityView, published: Published | None, now: int) -> dict[str, Any]:
    st = affinity_state(a, published, now)
    return {
        "netns_cookie": a.netns_cookie,
        "frontend": str(a.frontend),
        "endpoint": str(a.endpoint),
        "tier": a.tier,
        "index": a.index,
        "last_used_ns": a.last_used,
        "idle_seconds": None if st.idle_seconds is None else round(st.idle_seconds, 1),
        "left_seconds": None if st.left_seconds is None else round(st.left_seconds, 1),
        "state": st.state,
        "why": st.why,
    }


def read_reverse(items: Iterable[tuple[bytes, bytes]]) -> list[ReverseView]:
    out = []
    for k, v in items:
        key = records.REVERSE_KEY.unpack(k)
        out.append(ReverseView(key["socket_cookie"], Backend.unpack(key["endpoint"]),
                               Frontend.unpack(records.REVERSE.unpack(v)["frontend"])))
    return sorted(out, key=lambda r: (r.socket_cookie, r.endpoint))


def read_translated(items: Iterable[tuple[bytes, bytes]]) -> list[ReverseView]:
    """The kmesh_translated slots a reader would use: check set and matching the fields (a
    slot being written, or left empty, shows nothing)."""
    out = []
    for _, v in items:
        t = records.TRANSLATION.unpack(v)
        if not t["check"] or t["check"] != records.translation_check(
                t["socket_cookie"], t["endpoint"], t["frontend"]):
            continue
        out.append(ReverseView(t["socket_cookie"], Backend.unpack(t["endpoint"]),
                               Frontend.unpack(t["frontend"]), held="translated"))
    return sorted(out, key=lambda r: (r.socket_cookie, r.endpoint))


def read_cached(items: Iterable[tuple[bytes, bytes]], lines: int,
                groups: dict[Frontend, Published]) -> set[Frontend]:
    """The frontends of ``groups`` with a kmesh_frontend_cache line the program would use for
    them: in one of their two pairs, whole, and naming the sid the group has."""
    out = set()
    for k, v in items:
        line = records.read_frontend_line(v)
        if line is None:
            continue
        frontend = Frontend.unpack(line[0])
        p = groups.get(frontend)
        if p is not None and p.sid == line[1] and frontend.pack() == line[0] and \
                records.U32.unpack(k)[0] in records.frontend_candidates(line[0], lines):
            out.add(frontend)
    return out


def read_affinity(items: Iterable[tuple[bytes, bytes]]) -> list[AffinityView]:
    out = []
    for k, v in items:
        key, value = records.AFFINITY_KEY.unpack(k), records.AFFINITY.unpack(v)
        out.append(AffinityView(key["netns_cookie"], key["frontend"],
                                Frontend.unpack(key["frontend"]),
                                Backend.unpack(value["endpoint"]), value["tier"],
                                value["index"], value["last_used"]))
    return sorted(out, key=lambda a: (a.frontend_key, a.netns_cookie))


def read(dp: Datapath) -> DatapathView:
    """Everything the kernel holds for this datapath, now."""
    groups = read_table(dp)
    vips = [records.decode_addr(k) for k in dp[records.MAP_VIPS].keys()]
    # Read once: their entries are shown and counted (the counts then match the lists).
    reverse = read_reverse(dp[records.MAP_REVERSE].lookup_batch())
    translated = read_translated(dp[records.MAP_TRANSLATED].lookup_batch())
    affinity = dp[records.MAP_AFFINITY].lookup_batch()
    cache = dp[records.MAP_FRONTEND_CACHE]
    cached = read_cached(cache.lookup_batch(), cache.max_entries, groups)
    read_at = time.monotonic_ns()  # after the reads: a last use is never in its future
    entries, capacity = map_fill(dp, groups, {records.MAP_REVERSE: len(reverse),
                                              records.MAP_TRANSLATED: len(translated),
                                              records.MAP_AFFINITY: len(affinity),
                                              records.MAP_FRONTEND_CACHE: len(cached)})
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
        reverse=translated + reverse,
        affinity=read_affinity(affinity),
        read_at=read_at,
        cached=cached,
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
    dp: Datapath, groups: dict[Frontend, Published] | None = None,
    counted: dict[str, int] | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Entries in use and capacity of every map but per-object storage (PER_OBJECT_MAP_TYPES).
    ``counted``: entries of maps the caller has read already."""
    if groups is None:
        groups = read_table(dp)
    used_sids = len({p.sid for p in groups.values()})
    # Arrays are always "full"; what they hold in use is one element (records: one per set)
    # per service group.
    known = {records.MAP_ACTIVE: used_sids, records.MAP_RECORDS: used_sids * records.SETS,
             **(counted or {})}
    entries = {}
    capacity = {}
    for name in map_specs(dp.capacities):
        if dp[name].map_type in PER_OBJECT_MAP_TYPES:
            continue
        capacity[name] = dp[name].max_entries
        if name in known:
            entries[name] = known[name]
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
