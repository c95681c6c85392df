"""The only code that writes the datapath maps: the update protocol of SPEC.md section 6.

Every service group (frontend) owns two record sets; ``kmesh_active[sid]`` names the one the
program reads. One publish, for any number of groups:

1. write each group's complete new set (slots, then record) into its *inactive* set;
2. flip ``kmesh_active`` for updated groups; insert frontends of new groups (after their data);
   delete frontends of removed groups. ``publish`` returns here.
3. the sets switched away from are *retired*: after an RCU grace period (``GracePeriods``, in a
   background thread) no connect() can still be reading them, and they are deleted. A set is
   never rewritten before its grace period has passed.

So a connect() reads one consistent set from start to end: never a count that points at a
missing slot, never a half-written tier, and a recompute of a group switches at once. A
connect() that starts after ``publish`` returned sees only the new sets; one that was already
running when the flip happened is concurrent with the update and may finish with the old
choice. Nothing is written for a group whose set is unchanged, so an agent restart over
unchanged state changes nothing in the maps.

If the kernel refuses a write in step 1 (e.g. a full map), the inactive sets written so far are
deleted again and the error propagates: the active state is untouched.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from kmesh_plugin.datapath import records
from kmesh_plugin.datapath.grace import GracePeriods
from kmesh_plugin.datapath.loader import Datapath
from kmesh_plugin.datapath.records import Backend, BackendSet, Frontend
from kmesh_plugin.errors import BpfError, DatapathError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    """A group as it stands in the kernel: its id, active set, generation and content."""

    sid: int
    set: int
    generation: int
    backends: BackendSet | None  # None: the maps hold an incomplete set (repaired on publish)


@dataclass
class PublishStats:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    slot_writes: int = 0
    syscalls: int = 0
    seconds: float = 0.0

    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


def read_table(dp: Datapath) -> dict[Frontend, Published]:
    """Decode what the kernel holds now: every frontend with its active set."""
    frontends = {
        Frontend.unpack(k): records.FRONTEND.unpack(v)["sid"]
        for k, v in dp[records.MAP_FRONTENDS].lookup_batch()
    }
    slots: dict[tuple[int, int], dict[tuple[int, int], Backend]] = defaultdict(dict)
    for k, v in dp[records.MAP_SLOTS].lookup_batch():
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
                backends = BackendSet(record["mode"], tuple(tiers))
        generation = record["generation"] if record else 0
        table[frontend] = Published(sid, active, generation, backends)
    return table


@dataclass
class _Retired:
    seq: int
    sid: int
    set: int
    keys: list[bytes]
    frees_sid: bool  # the group was removed: its sid returns to the pool once reclaimed


class MapWriter:
    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.published: dict[Frontend, Published] = {}
        self.grace = GracePeriods(dp.barrier)
        self._next_sid = 0
        self._free_sids: list[int] = []
        self._seq = 0
        self._retired: list[_Retired] = []
        self._busy: dict[tuple[int, int], int] = {}  # (sid, set) retired -> its seq
        self.vips: set[records.IPAddress] = set()  # what kmesh_vips holds
        # Kept up to date on every publish: a single change must not cost O(cluster).
        self._ip_refs: Counter[records.IPAddress] = Counter()  # ClusterIP -> frontends
        self._active_slots = 0
        self._retired_slots = 0

    def close(self) -> None:
        self.grace.close()

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> int:
        """Adopt what the maps hold (agent restart) and remove what no frontend reaches.

        Returns the number of groups adopted.
        """
        self.published = read_table(self.dp)
        self._active_slots = sum(p.backends.size for p in self.published.values() if p.backends)
        self._ip_refs = Counter(f.ip for f in self.published)
        self.vips = {
            records.decode_addr(k) for k in self.dp[records.MAP_VIPS].keys()
        }
        self._sync_vips(set(self.vips) | set(self._ip_refs))
        live = {(p.sid, p.set) for p in self.published.values()}
        used = {p.sid for p in self.published.values()}
        self._next_sid = max(used, default=-1) + 1
        self._free_sids = [s for s in range(self._next_sid) if s not in used]
        heapq.heapify(self._free_sids)

        # Leftovers of a publish that was interrupted: inactive sets and dead groups. Nothing
        # reaches them but a connect() that started before this agent did; wait that out.
        garbage = [
            k for k, _ in self.dp[records.MAP_SLOTS].lookup_batch()
            if _slot_owner(k) not in live
        ]
        if garbage:
            self.dp.barrier.wait()
            self._delete_keys(records.MAP_SLOTS, garbage)
        log.info("recovered %d service groups from the maps", len(self.published),
                 extra={"garbage_slots": len(garbage)})
        return len(self.published)

    # -- publishing -------------------------------------------------------------------------

    def sync(self, desired: Mapping[Frontend, BackendSet]) -> PublishStats:
        """Make the maps hold exactly ``desired``: a full reconcile."""
        changes: dict[Frontend, BackendSet | None] = dict(desired)
        for frontend in self.published:
            if frontend not in desired:
                changes[frontend] = None
        return self.publish(changes)

    def publish(self, changes: Mapping[Frontend, BackendSet | None]) -> PublishStats:
        """Apply ``changes`` (None removes a group) with the protocol in the module docstring."""
        started = time.perf_counter()
        stats = PublishStats()
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
            stats.seconds = time.perf_counter() - started
            return stats
        self._make_room(adds, updates)

        # Step 1: new sets into inactive slots. New groups take set 0 of a free sid.
        plan: list[tuple[Frontend, int, int, int, BackendSet]] = []  # frontend, sid, set, gen
        for frontend, backends in updates.items():
            cur = self.published[frontend]
            target = (cur.sid, 1 - cur.set)
            if target in self._busy:
                # Switched away from less than a grace period ago: readers may remain.
                self.grace.wait_for(self._busy[target])
                self.collect()
            plan.append((frontend, cur.sid, 1 - cur.set, cur.generation + 1, backends))
        for frontend, backends in adds.items():
            plan.append((frontend, self._alloc_sid(), 0, 1, backends))
        if adds:
            # A sid may have served a removed group: its counters start again from zero.
            stats_map = self.dp[records.MAP_STATS]
            zero = bytes(stats_map.buffer_size)
            self._update(records.MAP_STATS, [
                (records.U32.pack(sid), zero) for f, sid, _, _, _ in plan if f in adds
            ], stats)
        slot_items = [
            (records.slot_key(sid, set_, tier, i), backend.pack())
            for _, sid, set_, _, backends in plan
            for tier, members in enumerate(backends.tiers)
            for i, backend in enumerate(members)
        ]
        try:
            self._update(records.MAP_SLOTS, slot_items, stats)
            self._update(
                records.MAP_RECORDS,
                [(records.record_index(sid, s), b.record(gen, f.pack()))
                 for f, sid, s, gen, b in plan],
                stats,
            )
        except BpfError:
            self._rollback(plan, slot_items)
            raise
        stats.slot_writes = len(slot_items)

        # Step 2: switch. The active index goes first for new groups, the frontend last.
        self._update(
            records.MAP_ACTIVE,
            [(records.U32.pack(sid), records.U32.pack(s)) for _, sid, s, _, _ in plan],
            stats,
        )
        new_frontends = [
            (frontend.pack(), records.FRONTEND.pack({"sid": sid}))
            for frontend, sid, _, _, _ in plan
            if frontend in adds
        ]
        self._update(records.MAP_FRONTENDS, new_frontends, stats)
        if removes:
            self._delete_keys(records.MAP_FRONTENDS, [f.pack() for f in removes])
            stats.syscalls += 1

        # Step 3: retire what was switched away from; reclaimed after a grace period.
        self._seq += 1
        for frontend in (*updates, *removes):
            old = self.published[frontend]
            self._retire(old, frees_sid=frontend in removes)
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
        stats.syscalls += self._sync_vips(touched)
        self.grace.request(self._seq)
        stats.added, stats.updated, stats.removed = len(adds), len(updates), len(removes)
        stats.seconds = time.perf_counter() - started
        return stats

    def collect(self) -> int:
        """Delete retired sets whose grace period has passed; returns how many."""
        safe = self.grace.completed
        ready = [r for r in self._retired if r.seq <= safe]
        if not ready:
            return 0
        self._retired = [r for r in self._retired if r.seq > safe]
        keys = [k for r in ready for k in r.keys]
        self._retired_slots -= len(keys)
        if keys:
            self._delete_keys(records.MAP_SLOTS, keys)
        for r in ready:
            self._busy.pop((r.sid, r.set), None)
            if r.frees_sid:
                heapq.heappush(self._free_sids, r.sid)
        return len(ready)

    def settle(self) -> None:
        """Block until every retired set is deleted (tests, shutdown, capacity pressure)."""
        if self._retired:
            self.grace.wait_for(self._seq)
            self.collect()

    # -- helpers ----------------------------------------------------------------------------

    def slots_in_use(self) -> int:
        """Slots of the active sets."""
        return self._active_slots

    def entries(self) -> dict[str, int]:
        """Entries in use per map, from the writer's own books (it is the only writer), so a
        metrics scrape costs nothing per endpoint. `kmesh-plugin status` counts the kernel's."""
        groups = len(self.published)
        return {
            records.MAP_FRONTENDS: groups,
            records.MAP_VIPS: len(self.vips),
            records.MAP_ACTIVE: groups,
            records.MAP_RECORDS: groups * records.SETS,
            records.MAP_SLOTS: self._active_slots + self._retired_slots,
            records.MAP_STATS: groups,
        }

    def slots_retired(self) -> int:
        """Slots of sets switched away from, deleted once their grace period is over."""
        return self._retired_slots

    def _make_room(
        self, adds: Mapping[Frontend, BackendSet], updates: Mapping[Frontend, BackendSet]
    ) -> None:
        """Refuse a publish that cannot fit before writing anything; reclaim retired sets
        early when only they stand in the way."""
        caps = self.dp.capacities
        groups = len(self.published) + len(adds)
        if groups > caps.max_services:
            raise DatapathError(
                f"{groups} service groups needed, datapath.max_services is {caps.max_services}"
            )
        new = sum(b.size for b in (*adds.values(), *updates.values()))
        if self.slots_in_use() + self.slots_retired() + new > caps.max_endpoints:
            self.settle()
        needed = self.slots_in_use() + new  # old and new sets coexist until reclaimed
        if needed > caps.max_endpoints:
            raise DatapathError(
                f"{needed} endpoint slots needed during this update, "
                f"datapath.max_endpoints is {caps.max_endpoints}"
            )
        if len(self._free_sids) < len(adds) and self._next_sid + len(adds) > caps.max_services:
            self.settle()  # removed groups' sids come back once reclaimed

    def _sync_vips(self, touched: set[records.IPAddress]) -> int:
        """Make kmesh_vips agree with the frontends for the ClusterIPs in ``touched``;
        returns the syscalls made."""
        add = [ip for ip in touched if ip in self._ip_refs and ip not in self.vips]
        drop = [ip for ip in touched if ip not in self._ip_refs and ip in self.vips]
        calls = 0
        if add:
            self.dp[records.MAP_VIPS].update_batch([(records.vip_key(ip), b"\1") for ip in add])
            self.vips.update(add)
            calls += 1
        if drop:
            self._delete_keys(records.MAP_VIPS, [records.vip_key(ip) for ip in drop])
            self.vips.difference_update(drop)
            calls += 1
        return calls

    def _retire(self, old: Published, frees_sid: bool) -> None:
        keys = self._set_keys(old)
        self._active_slots -= old.backends.size if old.backends else 0
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

    def _rollback(
        self, plan: list[tuple[Frontend, int, int, int, BackendSet]],
        slot_items: list[tuple[bytes, bytes]],
    ) -> None:
        for key, _ in slot_items:
            self.dp[records.MAP_SLOTS].delete(key)
        for frontend, sid, _, _, _ in plan:
            if frontend not in self.published:
                heapq.heappush(self._free_sids, sid)


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
