"""The only code that writes the datapath maps: the update protocol of SPEC.md section 6.

Every service group (frontend) owns two record sets; ``kmesh_active[sid]`` names the one the
program reads. One publish *step*, for any number of groups:

1. write each group's complete new set (slots, then record) into its *inactive* set;
2. flip ``kmesh_active`` for updated groups; insert frontends of new groups (after their data);
   give kmesh_frontend_cache lines to new frontends and take them from removed ones; delete
   frontends of removed groups; then make kmesh_vips follow the frontends.
3. the sets switched away from are *retired*: after an RCU grace period (``GracePeriods``, in a
   background thread) no connect() can still be reading them, and they are deleted. A set is
   never rewritten before its grace period has passed, and a removed group's sid is given to
   another frontend only once its sets are reclaimed.

kmesh_frontend_cache is a copy of kmesh_frontends that the program reads first (see
bpf/kmesh_lb.h): a line names a frontend only while kmesh_frontends holds it, with its sid, so
a frontend is cached after its insert and uncached before its delete. A pair of lines caches
the first two frontends that come to it; a third waits (the hash finds it) and takes the line
the first to go leaves. ``recover`` (and any re-read after a failure) rewrites every line from
kmesh_frontends, which stays the truth.

So a connect() reads one consistent set from start to end: never a count that points at a
missing slot, never a half-written tier, and a recompute of a group switches at once. A
connect() that starts after ``publish`` returned sees only the new sets; one that was already
running when the flip happened is concurrent with the update and may finish with the old
choice. Nothing is written for a group whose set is unchanged, so an agent restart over
unchanged state changes nothing in the maps.

Capacity. A publish applies every removal, and as many of the new and changed groups as fit
(old and new sets coexist until the grace period: a change needs room for its new set beside
the old one). When the whole does not fit at once it goes group by group: one step with what
fits, then, once the grace period has reclaimed what that step retired, the next, until the
rest fits or nothing more can be freed. Each group still switches atomically. What could not
be written is returned in ``PublishStats.left_out`` with a reason (``LeftOut``); such a group
keeps what the maps held for it (nothing for a new one, its last set for a changed one). One
publish takes ``max_steps`` steps at most (each may wait a grace period: a map filled to the
brim would otherwise take one per group); what remains is left out to be published again.

Failures. A kernel error in step 1 deletes the inactive sets written so far and propagates:
nothing reachable changed. One in step 2 or later leaves each group either switched or not
(each flip is one store); the writer then re-reads what the kernel holds (``read_table``) and
rebuilds its books from it: what a connect can reach becomes ``published``, every other set
is retired (deleted after a grace period), every sid that serves no frontend returns to the
pool after a grace period. If even that read fails, the books are marked stale and rebuilt
before the next publish. Either way the error propagates and no later publish writes into a set
a connect may be reading. A grace period that fails or takes long only delays reclaiming: a
change that needs a set still in its grace period waits ``grace_timeout`` at most, then is
left out (reason ``grace_period``) for the caller to retry.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kmesh_plugin.datapath import records
from kmesh_plugin.datapath.grace import GracePeriods
from kmesh_plugin.datapath.loader import Datapath
from kmesh_plugin.datapath.records import Backend, BackendSet, Frontend
from kmesh_plugin.errors import BpfError, DatapathError

log = logging.getLogger(__name__)

# Why a group was left out of a publish (LeftOut.reason).
MAX_SERVICES = "max_services"  # no service group (sid) free
MAX_ENDPOINTS = "max_endpoints"  # not enough endpoint slots for its new set
GRACE_PERIOD = "grace_period"  # the room it needs is still in a grace period (slow or failing)
GRACE_TIMEOUT = 2.0  # seconds a publish waits for a grace period before leaving a group out
MAX_STEPS = 32  # steps of one publish (each may wait a grace period); the rest is left out


@dataclass(frozen=True)
class Published:
    """A group as it stands in the kernel: its id, active set, generation and content."""

    sid: int
    set: int
    generation: int
    backends: BackendSet | None  # None: the maps hold an incomplete set (repaired on publish)


@dataclass(frozen=True)
class LeftOut:
    """A group a publish could not write, and why. ``slots``/``groups``: what it needs free
    (in steady state) to fit; ``stale``: the maps still hold an older set of it."""

    reason: str
    detail: str
    slots: int
    groups: int
    stale: bool


@dataclass
class PublishStats:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    slot_writes: int = 0
    syscalls: int = 0
    seconds: float = 0.0
    steps: int = 0  # atomic steps (more than one: the change did not fit at once)
    left_out: dict[Frontend, LeftOut] = field(default_factory=dict)

    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


def read_table(dp: Datapath) -> dict[Frontend, Published]:
    """Decode what the kernel holds now: every frontend with its active set."""
    return _scan(dp)[0]


def _scan(dp: Datapath) -> tuple[dict[Frontend, Published], list[bytes], list[bytes]]:
    """``read_table``, every slot key of kmesh_slots, and the keys of frontends no connect
    can use: a non-canonical key, a sid beyond max_services, or a sid whose record names
    another frontend of the table (two frontends on one sid). Only a foreign writer leaves
    those; the writer would otherwise write into a sid it does not own."""
    frontends: dict[Frontend, int] = {}
    dead: list[bytes] = []
    max_services = dp[records.MAP_ACTIVE].max_entries  # one kmesh_active entry per sid
    for k, v in dp[records.MAP_FRONTENDS].lookup_batch():
        sid = records.FRONTEND.unpack(v)["sid"]
        frontend = Frontend.unpack(k)
        # A key that does not pack back to itself (non-zero padding) is never looked up.
        if sid < max_services and frontend.pack() == k:
            frontends[frontend] = sid
        else:
            dead.append(k)
    slot_pairs = dp[records.MAP_SLOTS].lookup_batch()
    slots: dict[tuple[int, int], dict[tuple[int, int], Backend]] = defaultdict(dict)
    for k, v in slot_pairs:
        key = records.SLOT_KEY.unpack(k)
        slots[(key["sid"], key["set"])][(key["tier"], key["index"])] = Backend.unpack(v)
    table = {}
    for frontend, sid in frontends.items():
        raw_active = dp[records.MAP_ACTIVE].lookup(records.U32.pack(sid))
        active = records.U32.unpack(raw_active)[0] & 1 if raw_active else 0
        raw_record = dp[records.MAP_RECORDS].lookup(records.record_index(sid, active))
        record = records.RECORD.unpack(raw_record) if raw_record else None
        backends = None
        # A record that names another frontend is no set of this one (the program treats
        # the frontend as absent): recovered as incomplete, and rewritten on publish.
        if record is not None and record["frontend"] == frontend.pack() and \
                1 <= record["ntiers"] <= records.MAX_TIERS:
            have = slots.get((sid, active), {})
            tiers = []
            for tier in range(record["ntiers"]):
                members = [have.get((tier, i)) for i in range(record["count"][tier])]
                if any(m is None for m in members):
                    tiers = None
                    break
                tiers.append(tuple(m for m in members if m is not None))
            if tiers is not None:
                backends = BackendSet(record["mode"], tuple(tiers), record["affinity_timeout"])
                # The record's inline copies of the picked tier must be those slots (the
                # program reads them instead): any other record is rewritten on publish.
                if raw_record != backends.record(record["generation"], frontend.pack()):
                    backends = None
        generation = record["generation"] if record else 0
        table[frontend] = Published(sid, active, generation, backends)
    by_sid: dict[int, list[Frontend]] = defaultdict(list)
    for frontend, p in table.items():
        by_sid[p.sid].append(frontend)
    for sharing in by_sid.values():
        if len(sharing) > 1:
            # The owner is the one its record names (the program checks the same); none if
            # the record names no one of them.
            owners = [f for f in sharing if table[f].backends is not None]
            for frontend in sharing:
                if frontend not in owners[:1]:
                    del table[frontend]
                    dead.append(frontend.pack())
    return table, [k for k, _ in slot_pairs], dead


_NO_SET = -1  # a retirement that only returns a sid to the pool


@dataclass
class _Retired:
    seq: int
    sid: int
    set: int
    keys: list[bytes]
    frees_sid: bool  # the group was removed: its sid returns to the pool once reclaimed


_Plan = list[tuple[Frontend, int, int, int, BackendSet]]  # frontend, sid, set, generation, set


class MapWriter:
    def __init__(self, dp: Datapath) -> None:
        if dp.barrier is None:
            raise DatapathError(f"the datapath at {dp.pins.root} is open read-only: no writer")
        self.dp = dp
        self.published: dict[Frontend, Published] = {}
        self.grace = GracePeriods(dp.barrier)
        self.grace_timeout = GRACE_TIMEOUT
        self.max_steps = MAX_STEPS
        self._next_sid = 0
        self._free_sids: list[int] = []
        self._seq = 0
        self._retired: list[_Retired] = []  # in seq order
        self._busy: dict[tuple[int, int], int] = {}  # (sid, set) retired -> its highest seq
        self._collected = 0  # the grace period up to which retired sets are deleted
        self._collect_failing = False
        self._stale = False  # the books may disagree with the kernel: re-read before writing
        self.vips: set[records.IPAddress] = set()  # what kmesh_vips holds
        self._vips_dirty: set[records.IPAddress] = set()  # to make agree with the frontends
        # Kept up to date on every publish: a single change must not cost O(cluster).
        self._ip_refs: Counter[records.IPAddress] = Counter()  # ClusterIP -> frontends
        self._active_slots = 0
        self._retired_slots = 0
        self._lines = dp[records.MAP_FRONTEND_CACHE].max_entries
        # kmesh_frontend_cache: who holds each line, and the frontends that found none (by
        # the hash meanwhile), in order of arrival, with their sids.
        self._holder: dict[int, Frontend] = {}
        self._line: dict[Frontend, tuple[int, int]] = {}  # frontend -> (its line, its sid)
        self._waiting: dict[Frontend, int] = {}

    def close(self) -> None:
        self.grace.close()

    @property
    def stale(self) -> bool:
        """True after a failure whose aftermath could not be read back from the kernel: the
        books are rebuilt from the maps before the next write."""
        return self._stale

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> int:
        """Adopt what the maps hold (agent restart) and retire what no frontend reaches.

        Leftovers of a publish that was interrupted (inactive sets, dead groups) may still be
        read by a connect() that started before this agent did: they are deleted after a grace
        period, in the background. Returns the number of groups adopted.
        """
        self.published, self._free_sids, self._next_sid = {}, [], 0
        self._retired, self._busy = [], {}
        self._resync()
        try:
            self._sync_vips(set())
        except BpfError as e:  # the next publish repairs them
            self._vips_dirty = set(self.vips) ^ set(self._ip_refs)
            log.warning("cannot repair kmesh_vips yet: %s", e)
        log.info("recovered %d service groups from the maps", len(self.published),
                 extra={"garbage_slots": self._retired_slots})
        return len(self.published)

    def _resync(self) -> None:
        """Rebuild the books from what the kernel holds (see the module docstring)."""
        table, slot_keys, dead = _scan(self.dp)
        # Before the dead frontends go: no line may name a frontend kmesh_frontends lacks.
        self._rewrite_cache(table)
        if dead:
            # They route nothing (the program finds no set of theirs); left in place they
            # would make the writer share a sid with another group.
            self._delete_keys(records.MAP_FRONTENDS, dead)
            log.warning("deleted %d kmesh_frontends entries that no connect can use", len(dead))
        vips = {records.decode_addr(k) for k in self.dp[records.MAP_VIPS].keys()}
        live: set[bytes] = set()
        unknown: set[tuple[int, int]] = set()  # incomplete active sets: every key is theirs
        for p in table.values():
            if p.backends is None:
                unknown.add((p.sid, p.set))
            else:
                live.update(_known_set_keys(p))
        garbage: dict[tuple[int, int], list[bytes]] = defaultdict(list)
        active = 0
        for k in slot_keys:
            if k in live or _slot_owner(k) in unknown:
                active += 1
            else:
                garbage[_slot_owner(k)].append(k)
        self._seq += 1
        seq = self._seq
        used = {p.sid for p in table.values()}
        dirty_sids = {sid for sid, _ in garbage}
        top = max(self._next_sid, max(used, default=-1) + 1)
        # Sids already back in the pool stayed safe; any other that serves no frontend may
        # have served one a moment ago: it returns to the pool after a grace period.
        free = [s for s in self._free_sids if s not in used and s not in dirty_sids]
        retired = [_Retired(seq, sid, set_, keys, False) for (sid, set_), keys in garbage.items()]
        pooled = set(free)
        retired += [_Retired(seq, s, _NO_SET, [], True)
                    for s in range(top) if s not in used and s not in pooled]
        heapq.heapify(free)
        self._free_sids, self._next_sid = free, top
        self._retired = retired
        # A live group's other set may have been live until a moment ago.
        self._busy = {(p.sid, 1 - p.set): seq for p in table.values()}
        self._busy.update(dict.fromkeys(garbage, seq))
        self.published = table
        self._active_slots = active
        self._retired_slots = sum(len(v) for v in garbage.values())
        self._ip_refs = Counter(f.ip for f in table)
        self.vips = vips
        self._vips_dirty = vips ^ set(self._ip_refs)
        self._stale = False
        if retired:
            self.grace.request(seq)

    def _lost_track(self, error: BpfError) -> None:
        """A write failed after something reachable may have changed: re-read the kernel."""
        self._stale = True
        try:
            self._resync()
        except BpfError as e:
            log.error("a map write failed (%s) and the maps cannot be read back (%s); they are "
                      "read again before the next publish", error, e)
        else:
            log.warning("a map write failed (%s); the writer re-read what the maps hold",
                        error, extra={"groups": len(self.published)})

    # -- publishing -------------------------------------------------------------------------

    def sync(self, desired: Mapping[Frontend, BackendSet]) -> PublishStats:
        """Make the maps hold exactly ``desired`` (as far as it fits): a full reconcile."""
        if self._stale:
            self._resync()
        changes: dict[Frontend, BackendSet | None] = dict(desired)
        for frontend in self.published:
            if frontend not in desired:
                changes[frontend] = None
        return self.publish(changes)

    def publish(self, changes: Mapping[Frontend, BackendSet | None]) -> PublishStats:
        """Apply ``changes`` (None removes a group) with the protocol in the module docstring.

        Every removal is applied; a group that cannot be written now is in ``left_out`` of
        the result. Raises BpfError when the kernel refuses a write (see the docstring for
        what the maps and the books hold then)."""
        started = time.perf_counter()
        stats = PublishStats()
        if self._stale:
            self._resync()
        self.collect()
        adds: dict[Frontend, BackendSet] = {}
        updates: dict[Frontend, BackendSet] = {}
        removes: list[Frontend] = []
        for frontend, backends in changes.items():
            current = self.published.get(frontend)
            if backends is None:
                if current is not None:
                    removes.append(frontend)
            elif current is None:
                adds[frontend] = backends
            elif current.backends != backends:
                updates[frontend] = backends
            else:
                stats.unchanged += 1
        if not (adds or updates or removes):
            if self._vips_dirty:
                self._guarded_vips(set(), stats)
            stats.seconds = time.perf_counter() - started
            return stats

        stats.left_out.update(self._await_targets(updates))
        wanted = {f: b for f, b in updates.items() if f not in stats.left_out}
        if len(wanted) > 1:
            # Shrinking changes first: each makes room for the next step. Then new groups.
            wanted = dict(sorted(wanted.items(),
                                 key=lambda item: item[1].size - _size(self.published[item[0]])))
        wanted.update(adds)
        blocked = False  # a grace period we needed did not pass in time
        while True:
            fit = self._fit(wanted)
            if len(fit) < len(wanted) and self._retired:
                # Reclaiming what is retired may let the rest in, in this same step.
                if self.settle(self.grace_timeout):
                    fit = self._fit(wanted)
                else:
                    blocked = True
            if not fit and not removes:
                break
            self._step({f: b for f, b in fit.items() if f in adds},
                       {f: b for f, b in fit.items() if f not in adds}, removes, stats)
            removes = []
            for frontend in fit:
                del wanted[frontend]
            if not wanted or not self._retired or blocked or stats.steps >= self.max_steps:
                break
        if wanted:
            stats.left_out.update(self._why_left_out(wanted, blocked, stats.steps))
        stats.seconds = time.perf_counter() - started
        return stats

    def _await_targets(self, updates: Mapping[Frontend, BackendSet]) -> dict[Frontend, LeftOut]:
        """Wait (``grace_timeout`` at most) until the inactive sets ``updates`` will write
        are reclaimed; the groups whose set is not are returned, left out."""
        waiting = {}
        for frontend in updates:
            cur = self.published[frontend]
            seq = self._busy.get((cur.sid, 1 - cur.set))
            if seq is not None:
                waiting[frontend] = (cur.sid, 1 - cur.set)
        if not waiting:
            return {}
        need = max(self._busy[t] for t in waiting.values())
        if need > self.grace.completed:
            # Switched away from less than a grace period ago: readers may remain.
            self.grace.wait_for(need, self.grace_timeout)
        self.collect()
        return {
            f: LeftOut(GRACE_PERIOD, self._grace_detail(), updates[f].size, 0, True)
            for f, target in waiting.items() if target in self._busy
        }

    def _grace_detail(self) -> str:
        why = self.grace.failing
        if why:
            return f"its inactive set awaits a grace period; the barrier fails: {why}"
        if self._collect_failing:
            return "its inactive set awaits deletion, which the kernel refuses for now"
        return f"its inactive set awaits a grace period that took over {self.grace_timeout} s"

    def _fit(self, wanted: Mapping[Frontend, BackendSet]) -> dict[Frontend, BackendSet]:
        """The groups of ``wanted`` that fit now, first come first served."""
        caps = self.dp.capacities
        slots = caps.max_endpoints - self._active_slots - self._retired_slots
        sids = len(self._free_sids) + max(0, caps.max_services - self._next_sid)
        if sum(b.size for b in wanted.values()) <= slots and \
                sum(f not in self.published for f in wanted) <= sids:
            return dict(wanted)  # the common case: everything fits
        out = {}
        for frontend, backends in wanted.items():
            new = frontend not in self.published
            if (new and sids < 1) or backends.size > slots:
                continue
            out[frontend] = backends
            slots -= backends.size
            sids -= new
        return out

    def _why_left_out(self, wanted: Mapping[Frontend, BackendSet], blocked: bool,
                      steps: int) -> dict[Frontend, LeftOut]:
        caps = self.dp.capacities
        groups_free = caps.max_services - len(self.published)
        slots_free = caps.max_endpoints - self._active_slots
        now_free = slots_free - self._retired_slots
        out = {}
        for frontend, backends in wanted.items():
            new = frontend not in self.published
            need = backends.size
            fits_later = need <= slots_free and (not new or groups_free > 0)
            if blocked and fits_later:
                reason, detail = GRACE_PERIOD, (
                    f"needs {need} endpoint slots that a grace period has yet to reclaim"
                    + (f" (the barrier fails: {self.grace.failing})" if self.grace.failing
                       else ""))
            elif fits_later and steps >= self.max_steps:
                reason, detail = MAX_ENDPOINTS, (
                    f"needs {need} endpoint slots, free only once the {steps} steps of this "
                    "publish are reclaimed (the maps are nearly full); written next")
            elif need > now_free or not new:
                beside = "" if new else (
                    f" beside the {_size(self.published[frontend])} of its current set")
                reason, detail = MAX_ENDPOINTS, (
                    f"needs {need} endpoint slots{beside}; {max(now_free, 0)} of "
                    f"datapath.max_endpoints={caps.max_endpoints} are free"
                    + (" (and no service group is)" if new and groups_free < 1 else ""))
            else:
                reason, detail = MAX_SERVICES, (
                    f"no service group free: {len(self.published)} of datapath.max_services="
                    f"{caps.max_services} in use")
            out[frontend] = LeftOut(reason, detail, need, int(new), not new)
        return out

    def _step(self, adds: Mapping[Frontend, BackendSet], updates: Mapping[Frontend, BackendSet],
              removes: list[Frontend], stats: PublishStats) -> None:
        """One atomic step of the protocol for groups that fit."""
        plan: _Plan = []
        for frontend, backends in updates.items():
            cur = self.published[frontend]
            plan.append((frontend, cur.sid, 1 - cur.set, cur.generation + 1, backends))
        for frontend, backends in adds.items():
            plan.append((frontend, self._alloc_sid(), 0, 1, backends))
        # Step 1: new sets into inactive slots. New groups take set 0 of a free sid.
        slot_items = [
            (records.slot_key(sid, set_, tier, i), backend.pack())
            for _, sid, set_, _, backends in plan
            for tier, members in enumerate(backends.tiers)
            for i, backend in enumerate(members)
        ]
        try:
            if adds:
                # A sid may have served a removed group: its counters start again from zero.
                zero = bytes(self.dp[records.MAP_STATS].buffer_size)
                self._update(records.MAP_STATS, [
                    (records.U32.pack(sid), zero) for f, sid, _, _, _ in plan if f in adds
                ], stats)
            self._update(records.MAP_SLOTS, slot_items, stats)
            self._update(
                records.MAP_RECORDS,
                [(records.record_index(sid, s), b.record(gen, f.pack()))
                 for f, sid, s, gen, b in plan],
                stats,
            )
        except BpfError as e:
            self._undo(plan, slot_items, e)
            raise
        stats.slot_writes += len(slot_items)

        # Step 2: switch. The active index goes first for new groups, the frontend last.
        try:
            self._update(
                records.MAP_ACTIVE,
                [(records.U32.pack(sid), records.U32.pack(s)) for _, sid, s, _, _ in plan],
                stats,
            )
            self._update(records.MAP_FRONTENDS, [
                (frontend.pack(), records.FRONTEND.pack({"sid": sid}))
                for frontend, sid, _, _, _ in plan if frontend in adds
            ], stats)
            # Between the inserts and the deletes: a line names only what kmesh_frontends has.
            self._update(records.MAP_FRONTEND_CACHE, self._cache_changes(
                [(f, sid) for f, sid, _, _, _ in plan if f in adds], removes), stats)
            if removes:
                self._delete_keys(records.MAP_FRONTENDS, [f.pack() for f in removes])
                stats.syscalls += 1
        except BpfError as e:
            self._lost_track(e)
            raise

        # Step 3: retire what was switched away from; reclaimed after a grace period.
        self._seq += 1
        for frontend in (*updates, *removes):
            self._retire(self.published[frontend], frees_sid=frontend not in updates)
        for frontend, sid, set_, gen, backends in plan:
            self.published[frontend] = Published(sid, set_, gen, backends)
            self._active_slots += backends.size
        for frontend in removes:
            del self.published[frontend]
        # ClusterIPs follow their frontends: added after them, removed after the last one.
        touched = set()
        for frontend in adds:
            self._ip_refs[frontend.ip] += 1
            touched.add(frontend.ip)
        for frontend in removes:
            self._ip_refs[frontend.ip] -= 1
            if self._ip_refs[frontend.ip] <= 0:
                del self._ip_refs[frontend.ip]
            touched.add(frontend.ip)
        self.grace.request(self._seq)
        stats.added += len(adds)
        stats.updated += len(updates)
        stats.removed += len(removes)
        stats.steps += 1
        self._guarded_vips(touched, stats)

    def _undo(self, plan: _Plan, slot_items: list[tuple[bytes, bytes]], error: BpfError) -> None:
        """Step 1 failed: nothing it wrote is reachable; delete it now."""
        try:
            self._delete_keys(records.MAP_SLOTS, [k for k, _ in slot_items])
        except BpfError:
            self._lost_track(error)  # the sids stay out of the pool until reclaimed
            return
        for frontend, sid, _, _, _ in plan:
            if frontend not in self.published:
                heapq.heappush(self._free_sids, sid)

    def _guarded_vips(self, touched: set[records.IPAddress], stats: PublishStats) -> None:
        try:
            stats.syscalls += self._sync_vips(touched)
        except BpfError as e:
            self._lost_track(e)
            raise

    def collect(self) -> int:
        """Delete retired sets whose grace period has passed; returns how many. A kernel
        error is logged (once) and leaves them for a later call."""
        safe = self.grace.completed
        if safe <= self._collected:
            return 0
        ready = [r for r in self._retired if r.seq <= safe]
        keys = [k for r in ready for k in r.keys]
        if keys:
            try:
                self._delete_keys(records.MAP_SLOTS, keys)
            except BpfError as e:
                if not self._collect_failing:
                    log.warning("cannot delete %d retired slots yet (%s); will try again",
                                len(keys), e)
                self._collect_failing = True
                return 0
        if self._collect_failing:
            log.info("retired slots are deleted again")
            self._collect_failing = False
        self._retired = [r for r in self._retired if r.seq > safe]
        self._retired_slots -= len(keys)
        for r in ready:
            if r.frees_sid:
                heapq.heappush(self._free_sids, r.sid)
        if self._busy:
            self._busy = {owner: seq for owner, seq in self._busy.items() if seq > safe}
        self._collected = safe
        return len(ready)

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until every retired set is deleted (tests, shutdown, capacity pressure), for
        ``timeout`` seconds at most (``grace_timeout`` when None). False if some remain: they
        are deleted by a later ``collect``."""
        if self._retired:
            wait = self.grace_timeout if timeout is None else timeout
            self.grace.wait_for(self._seq, wait)
            self.collect()
        return not self._retired

    # -- kmesh_frontend_cache ----------------------------------------------------------------

    def _candidates(self, frontend: Frontend) -> tuple[int, ...]:
        return records.frontend_candidates(frontend.pack(), self._lines)

    def _cache_changes(self, adds: list[tuple[Frontend, int]],
                       removes: list[Frontend]) -> list[tuple[bytes, bytes]]:
        """Book the frontends ``adds`` (with their sids) and ``removes`` onto their lines;
        return the line writes that follow, in the order they must happen. A removed
        frontend's line goes to the first frontend waiting for it, or is cleared. An added one
        takes a free line of its two pairs; when all four are taken, a holder with a free line
        in its own other pair moves there first (its copy is written before its old line is,
        so the program finds it all along); failing that it waits. Removals first, so that an
        add takes a line freed in the same step."""
        writes: dict[int, bytes] = {}

        def put(line: int, frontend: Frontend, sid: int) -> None:
            self._holder[line] = frontend
            self._line[frontend] = (line, sid)
            writes.pop(line, None)  # re-inserted: dict order is write order
            writes[line] = records.frontend_line(frontend.pack(), sid)

        for frontend in removes:
            if self._waiting.pop(frontend, None) is not None:
                continue
            held = self._line.pop(frontend, None)
            if held is None:
                continue
            line = held[0]
            del self._holder[line]
            heir = next((f for f in self._waiting if line in self._candidates(f)), None)
            if heir is not None:
                put(line, heir, self._waiting.pop(heir))
            else:
                writes.pop(line, None)
                writes[line] = bytes(records.FRONTEND_LINE.size)
        for frontend, sid in adds:
            if not self._place(frontend, sid, put):
                self._waiting[frontend] = sid
        return [(records.U32.pack(line), value) for line, value in writes.items()]

    def _place(self, frontend: Frontend, sid: int,
               put: Callable[[int, Frontend, int], None]) -> bool:
        candidates = self._candidates(frontend)
        for line in candidates:
            if line not in self._holder:
                put(line, frontend, sid)
                return True
        for line in candidates:  # every line taken: move a holder that has room elsewhere
            holder = self._holder[line]
            for room in self._candidates(holder):
                if room not in self._holder:
                    put(room, holder, self._line[holder][1])
                    put(line, frontend, sid)
                    return True
        return False

    def _rewrite_cache(self, table: Mapping[Frontend, Published]) -> None:
        """Make every kmesh_frontend_cache line what ``table`` (read from kmesh_frontends)
        gives it, and rebuild the books: whatever a crash, a failed write or a foreign
        writer left there."""
        self._holder, self._line, self._waiting = {}, {}, {}
        ordered = sorted(table.items(), key=lambda item: item[1].sid)
        want = dict(self._cache_changes([(f, p.sid) for f, p in ordered], []))
        empty = bytes(records.FRONTEND_LINE.size)
        fixes = [(key, want.get(key, empty))
                 for key, value in self.dp[records.MAP_FRONTEND_CACHE].lookup_batch()
                 if value != want.get(key, empty)]
        if fixes:
            self.dp[records.MAP_FRONTEND_CACHE].update_batch(fixes)

    # -- helpers ----------------------------------------------------------------------------

    def slots_in_use(self) -> int:
        """Slots of the active sets."""
        return self._active_slots

    def headroom(self) -> tuple[int, int]:
        """(service groups, endpoint slots) free once every retired set is reclaimed."""
        caps = self.dp.capacities
        return caps.max_services - len(self.published), caps.max_endpoints - self._active_slots

    def entries(self) -> dict[str, int]:
        """Entries in use per map, from the writer's own books (it is the only writer), so a
        metrics scrape costs nothing per endpoint. `kmesh-plugin status` counts the kernel's."""
        groups = len(self.published)
        return {
            records.MAP_FRONTENDS: groups,
            records.MAP_FRONTEND_CACHE: len(self._holder),
            records.MAP_VIPS: len(self.vips),
            records.MAP_ACTIVE: groups,
            records.MAP_RECORDS: groups * records.SETS,
            records.MAP_SLOTS: self._active_slots + self._retired_slots,
            records.MAP_STATS: groups,
        }

    def slots_retired(self) -> int:
        """Slots of sets switched away from, deleted once their grace period is over."""
        return self._retired_slots

    def status(self) -> dict[str, object]:
        """The writer's health, for the agent's status file."""
        return {"stale": self._stale, "reclaim_failing": self._collect_failing,
                "grace": self.grace.status()}

    def _sync_vips(self, touched: set[records.IPAddress]) -> int:
        """Make kmesh_vips agree with the frontends for the ClusterIPs in ``touched`` (and
        those a failure left in doubt); returns the syscalls made."""
        dirty = self._vips_dirty
        if dirty:
            touched = touched | dirty
        add = [ip for ip in touched
               if ip in self._ip_refs and (ip not in self.vips or ip in dirty)]
        drop = [ip for ip in touched
                if ip not in self._ip_refs and (ip in self.vips or ip in dirty)]
        calls = 0
        if add:
            self.dp[records.MAP_VIPS].update_batch([(records.vip_key(ip), b"\1") for ip in add])
            self.vips.update(add)
            calls += 1
        if drop:
            self._delete_keys(records.MAP_VIPS, [records.vip_key(ip) for ip in drop])
            self.vips.difference_update(drop)
            calls += 1
        if dirty:
            self._vips_dirty = set()
        return calls

    def _retire(self, old: Published, frees_sid: bool) -> None:
        keys = self._set_keys(old)
        self._active_slots -= len(keys)
        self._retired_slots += len(keys)
        self._retired.append(_Retired(self._seq, old.sid, old.set, keys, frees_sid))
        self._busy[(old.sid, old.set)] = self._seq

    def _alloc_sid(self) -> int:
        if self._free_sids:
            return heapq.heappop(self._free_sids)
        sid = self._next_sid
        self._next_sid += 1
        return sid

    def _update(self, name: str, items: list[tuple[bytes, bytes]], stats: PublishStats) -> None:
        if items:
            self.dp[name].update_batch(items)
            stats.syscalls += 1

    def _delete_keys(self, name: str, keys: list[bytes]) -> None:
        """Delete keys that should all exist; tolerate ones that are already gone."""
        try:
            self.dp[name].delete_batch(keys)
        except BpfError:
            # The batch stops at the first missing key; finish one by one.
            for key in keys:
                self.dp[name].delete(key)

    def _set_keys(self, published: Published) -> list[bytes]:
        """The slot keys of a group's active set; scanned for when the set was incomplete."""
        if published.backends is not None:
            return _known_set_keys(published)
        owner = (published.sid, published.set)
        return [k for k in self.dp[records.MAP_SLOTS].keys() if _slot_owner(k) == owner]


def _size(published: Published) -> int:
    return published.backends.size if published.backends is not None else 0


def _slot_owner(raw_key: bytes) -> tuple[int, int]:
    key = records.SLOT_KEY.unpack(raw_key)
    return key["sid"], key["set"]


def _known_set_keys(published: Published) -> list[bytes]:
    assert published.backends is not None
    return [
        records.slot_key(published.sid, published.set, tier, i)
        for tier, members in enumerate(published.backends.tiers)
        for i in range(len(members))
    ]
