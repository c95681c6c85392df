"""Typed collections under one global resourceVersion counter, with the history that watches,
snapshots and ``continue`` tokens are served from.

What it promises:

* Every write takes the next value of one counter (``revision``, etcd's revision) and
  stamps it into ``metadata.resourceVersion``; a :class:`Record` is immutable and carries the
  object's JSON bytes, so a list is a join of cached bytes and nothing is re-serialised.
* Every write appends an :class:`Event` to its collection's history. A collection's
  ``floor`` is the oldest resourceVersion a watch may start from (all events after it are
  retained). :meth:`Store.compact` moves the counter one step and raises every floor to it, so
  every resourceVersion handed out before is too old;
  :meth:`Store.rebase` jumps the counter to a new base with no history before it (an etcd
  restore). A collection keeps at most ``history_limit`` events; older ones are trimmed and
  its floor rises, as a real watch cache forgets.
* Events stay physically retained while an open watch still needs them, so a compaction
  never disturbs a running watch (as in etcd); only a watch that falls behind by more than
  twice the limit loses its events and is told so (410).
* :meth:`Store.snapshot` gives the sorted state of a collection at any retained
  resourceVersion: from a small cache, else rebuilt by undoing history from the current
  state. Pagination serves every page of one list from the snapshot of its first page.

Callers hold :attr:`Store.lock` (an RLock) around read-modify-write sequences; each
collection has a Condition on that lock that its writes notify, so a watcher wakes only for
its own kind. Kubernetes semantics (metadata, status, admission) live in ``registry``.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .resources import ResourceTable, ResourceType

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def object_key(rtype: ResourceType, namespace: str, name: str) -> str:
    """The collection key, ordered as etcd orders ``/registry/<plural>/<ns>/<name>``."""
    return f"{namespace}/{name}" if rtype.namespaced else name


def _field_value(obj: Mapping[str, Any], path: tuple[str, ...]) -> str:
    value: Any = obj
    for part in path:
        if not isinstance(value, Mapping):
            return ""
        value = value.get(part)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True, slots=True)
class Record:
    """One stored version of an object: its bytes plus what selectors look at."""

    key: str
    namespace: str
    name: str
    uid: str
    rv: int
    raw: bytes
    labels: Mapping[str, str]
    fields: Mapping[str, str]

    def object(self) -> dict[str, Any]:
        """A fresh, caller-owned copy of the object."""
        result: dict[str, Any] = json.loads(self.raw)
        return result


def make_record(rtype: ResourceType, obj: dict[str, Any], rv: int | None) -> Record:
    """Stamp ``rv`` (None: drop the resourceVersion, as a dry run answers) and serialise.

    The object is reordered kind, apiVersion, metadata, then the rest, as the real server
    prints it; ``obj`` becomes owned by the record and must not be changed afterwards.
    """
    meta = obj.get("metadata") or {}
    if rv is None:
        meta.pop("resourceVersion", None)
    else:
        meta["resourceVersion"] = str(rv)
    ordered: dict[str, Any] = {"kind": rtype.kind, "apiVersion": rtype.api_version,
                               "metadata": meta}
    for k, v in obj.items():
        if k not in ordered:
            ordered[k] = v
    namespace = str(meta.get("namespace") or "") if rtype.namespaced else ""
    name = str(meta.get("name") or "")
    labels = meta.get("labels") or {}
    fields = {"metadata.name": name, "metadata.namespace": namespace}
    for label, path in rtype.selectable_fields.items():
        fields[label] = _field_value(ordered, path)
    return Record(
        key=object_key(rtype, namespace, name),
        namespace=namespace,
        name=name,
        uid=str(meta.get("uid") or ""),
        rv=rv or 0,
        raw=dumps(ordered),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        fields=fields,
    )


@dataclass(frozen=True, slots=True)
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    record: Record  # the new state; for DELETED the last state stamped with the deletion rv
    previous: Record | None  # the state before, None for ADDED


@dataclass
class Snapshot:
    """A collection's sorted state at ``rv``: ``keys[i]`` is ``records[i].key``."""

    rv: int
    keys: list[str]
    records: list[Record]


@dataclass(eq=False)
class Cursor:
    """An open watch's position: events with rv <= ``rv`` are consumed."""

    rtype: ResourceType
    rv: int


@dataclass(eq=False)
class Collection:
    rtype: ResourceType
    condition: threading.Condition
    items: dict[str, Record] = field(default_factory=dict)
    history: list[Event] = field(default_factory=list)
    history_rvs: list[int] = field(default_factory=list)
    floor: int = 0  # a watch may start at any rv >= floor
    pruned_to: int = 0  # events with rv <= pruned_to are gone from history
    cursors: set[Cursor] = field(default_factory=set)
    last_change: int = 0  # the resourceVersion of the last write
    _sorted: list[str] | None = None

    def sorted_keys(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self.items)
        return self._sorted


class Store:
    def __init__(self, table: ResourceTable, history_limit: int = 50_000,
                 snapshot_cache_size: int = 32) -> None:
        if history_limit < 1:
            raise ValueError("history_limit must be at least 1")
        self.table = table
        self.history_limit = history_limit
        self.lock = threading.RLock()
        self.revision = 0
        self._collections = {
            t: Collection(t, threading.Condition(self.lock)) for t in table
        }
        self._snapshots: OrderedDict[tuple[ResourceType, int], Snapshot] = OrderedDict()
        self._snapshot_cache_size = snapshot_cache_size

    def collection(self, rtype: ResourceType) -> Collection:
        return self._collections[rtype]

    def collections(self) -> Iterable[Collection]:
        return self._collections.values()

    def get(self, rtype: ResourceType, key: str) -> Record | None:
        return self._collections[rtype].items.get(key)

    # --- writes ------------------------------------------------------------------------

    def write(self, rtype: ResourceType, obj: dict[str, Any], previous: Record | None) -> Record:
        """Store ``obj`` as a new version (ADDED when ``previous`` is None)."""
        with self.lock:
            coll = self._collections[rtype]
            self.revision += 1
            record = make_record(rtype, obj, self.revision)
            if previous is None and record.key in coll.items:
                raise RuntimeError(f"store: {record.key} exists")  # the registry checks first
            if record.key not in coll.items:
                coll._sorted = None
            coll.items[record.key] = record
            self._append(coll, Event(record.rv, ADDED if previous is None else MODIFIED,
                                     record, previous))
            return record

    def remove(self, rtype: ResourceType, previous: Record) -> Record:
        """Delete an object; the DELETED event carries its last state at the new revision."""
        with self.lock:
            coll = self._collections[rtype]
            if coll.items.get(previous.key) is not previous:
                raise RuntimeError(f"store: {previous.key} changed under a delete")
            self.revision += 1
            record = make_record(rtype, previous.object(), self.revision)
            del coll.items[previous.key]
            coll._sorted = None
            self._append(coll, Event(record.rv, DELETED, record, previous))
            return record

    def _append(self, coll: Collection, event: Event) -> None:
        coll.last_change = event.rv
        coll.history.append(event)
        coll.history_rvs.append(event.rv)
        if len(coll.history) > self.history_limit + max(1, self.history_limit // 8):
            # Trim to the limit: the floor rises past the forgotten events.
            coll.floor = max(coll.floor, coll.history_rvs[-self.history_limit - 1])
            self._prune(coll)
        coll.condition.notify_all()

    def _prune(self, coll: Collection) -> None:
        """Drop events no new watch may ask for and no open watch still needs."""
        cutoff = coll.floor
        if coll.cursors:
            cutoff = min(cutoff, *(c.rv for c in coll.cursors))
        if len(coll.history) > 2 * self.history_limit:
            # A watch that fell this far behind loses its events (it is told 410).
            cutoff = max(cutoff, coll.history_rvs[-2 * self.history_limit])
            coll.floor = max(coll.floor, cutoff)
        drop = bisect.bisect_right(coll.history_rvs, cutoff)
        if drop:
            coll.pruned_to = max(coll.pruned_to, coll.history_rvs[drop - 1])
            del coll.history[:drop]
            del coll.history_rvs[:drop]

    def compact(self) -> int:
        """Make every resourceVersion handed out so far too old (410 for watches and
        continue tokens from it); returns the new floor.

        The counter first moves one step, as etcd's revision moves with any write to any
        key: the floor is that new revision, so a client that lists again gets a version it
        can watch from, while every version it held before is compacted away.
        """
        with self.lock:
            self.revision += 1
            for coll in self._collections.values():
                coll.floor = max(coll.floor, self.revision)
                self._prune(coll)
            self._snapshots.clear()
            return self.revision

    def rebase(self, gap: int = 1000) -> int:
        """Jump the counter ``gap`` ahead and forget all history (an etcd restore)."""
        with self.lock:
            self.revision += gap
            for coll in self._collections.values():
                coll.history.clear()
                coll.history_rvs.clear()
                coll.floor = coll.pruned_to = self.revision
                coll.condition.notify_all()
            self._snapshots.clear()
            return self.revision

    # --- reads -------------------------------------------------------------------------

    def too_old(self, rtype: ResourceType, rv: int) -> errors.ApiError | None:
        floor = self._collections[rtype].floor
        if rv < floor:
            return errors.expired(f"too old resource version: {rv} ({floor})")
        return None

    def snapshot(self, rtype: ResourceType, rv: int | None = None) -> Snapshot:
        """The sorted state at ``rv`` (default: now); ApiError 410 if it is compacted."""
        with self.lock:
            coll = self._collections[rtype]
            if rv is None or rv >= self.revision:
                rv = self.revision
            elif (err := self.too_old(rtype, rv)) is not None:
                raise err
            cache_key = (rtype, rv)
            cached = self._snapshots.get(cache_key)
            if cached is not None:
                self._snapshots.move_to_end(cache_key)
                return cached
            if rv == self.revision:
                keys = list(coll.sorted_keys())
                snap = Snapshot(rv, keys, [coll.items[k] for k in keys])
            else:
                snap = self._rebuild(coll, rv)
            self._snapshots[cache_key] = snap
            while len(self._snapshots) > self._snapshot_cache_size:
                self._snapshots.popitem(last=False)
            return snap

    def _rebuild(self, coll: Collection, rv: int) -> Snapshot:
        state = dict(coll.items)
        start = bisect.bisect_right(coll.history_rvs, rv)
        for event in reversed(coll.history[start:]):
            if event.type == ADDED:
                state.pop(event.record.key, None)
            elif event.previous is not None:
                state[event.previous.key] = event.previous
        keys = sorted(state)
        return Snapshot(rv, keys, [state[k] for k in keys])

    # --- watches -----------------------------------------------------------------------

    def open_cursor(self, rtype: ResourceType, rv: int) -> Cursor:
        with self.lock:
            cursor = Cursor(rtype, rv)
            self._collections[rtype].cursors.add(cursor)
            return cursor

    def close_cursor(self, cursor: Cursor) -> None:
        with self.lock:
            self._collections[cursor.rtype].cursors.discard(cursor)

    def events_after(self, cursor: Cursor) -> list[Event]:
        """Events past the cursor (call with the lock held); 410 if they were pruned."""
        coll = self._collections[cursor.rtype]
        if cursor.rv < coll.pruned_to:
            raise errors.expired(f"too old resource version: {cursor.rv} ({coll.floor})")
        start = bisect.bisect_right(coll.history_rvs, cursor.rv)
        return coll.history[start:]
