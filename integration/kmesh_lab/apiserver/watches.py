"""One watch: the event lines a watcher receives, with the real server's filtering and timing.

A :class:`WatchStream` turns a collection's history into the lines of a watch response
(``{"type":...,"object":...}\\n``), independent of HTTP:

* start: ``resourceVersion`` unset or ``"0"`` (or ``sendInitialEvents=true``) first sends
  ADDED for every existing object that matches; otherwise events strictly after the given
  resourceVersion, or, when it is older than the collection's floor, one ERROR event with a
  410 Expired Status (``too old resource version: X (Y)``) and the end of the stream.
* selectors: an object that stops matching is sent as DELETED (its previous content at the
  event's resourceVersion), one that starts matching as ADDED, as the watch cache does.
* bookmarks (``allowWatchBookmarks``): every ``bookmark_interval`` seconds and 2 s before
  the timeout, as kube-apiserver schedules them (none when the watch is shorter than 2 s);
  with ``sendInitialEvents`` one more, annotated ``k8s.io/initial-events-end``, after the
  initial ADDED events.
* the stream ends after ``timeout`` seconds, or at once when :meth:`close` is called (the
  server then drops the connection without ending the chunked body), or within a second of
  ``peer_gone()`` turning true (the client closed the connection).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from . import errors
from .errors import ApiError
from .resources import ResourceType
from .selectors import FieldSelector, LabelSelector
from .store import ADDED, DELETED, MODIFIED, Cursor, Record, Store, dumps

PRE_TIMEOUT_BOOKMARK = 2.0  # seconds before the deadline, as the watch cache does
PEER_CHECK_INTERVAL = 1.0  # how often a quiet watch looks whether its client went away


def event_line(event_type: str, raw: bytes) -> bytes:
    return b'{"type":"' + event_type.encode() + b'","object":' + raw + b"}\n"


def error_line(error: ApiError) -> bytes:
    return event_line("ERROR", dumps(error.status))


class WatchStream:
    def __init__(
        self,
        store: Store,
        rtype: ResourceType,
        namespace: str = "",
        labels: LabelSelector | None = None,
        fields: FieldSelector | None = None,
        *,
        resource_version: str | None = None,
        send_initial_events: bool = False,
        allow_bookmarks: bool = False,
        timeout: float = 1800.0,
        bookmark_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        peer_gone: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.rtype = rtype
        self.namespace = namespace if rtype.namespaced else ""
        self.labels = labels or LabelSelector()
        self.fields = fields or FieldSelector()
        unsupported = self.fields.unsupported(rtype.field_labels())
        if unsupported:
            raise errors.bad_request(f"field label not supported: {unsupported}")
        self.resource_version = resource_version or ""
        if self.resource_version not in ("", "0"):
            try:
                int(self.resource_version)
            except ValueError:
                raise errors.bad_request(
                    f"invalid resource version: {self.resource_version!r}") from None
        self.send_initial_events = send_initial_events
        self.allow_bookmarks = allow_bookmarks
        self.bookmark_interval = bookmark_interval
        self.clock = clock
        self.peer_gone = peer_gone
        self.deadline = clock() + max(0.0, timeout)
        self.finished = False
        self.dropped = False  # closed by the server: end without the terminating chunk
        self._cursor: Cursor | None = None
        self._next_bookmark: float | None = None
        self._condition = store.collection(rtype).condition

    # --- filtering ---------------------------------------------------------------------

    def _matches(self, record: Record) -> bool:
        if self.namespace and record.namespace != self.namespace:
            return False
        return self.labels.matches(record.labels) and self.fields.matches(record.fields)

    def _line(self, event_type: str, record: Record, previous: Record | None,
              rv: int) -> bytes | None:
        now_passes = event_type != DELETED and self._matches(record)
        before_passed = previous is not None and self._matches(previous)
        if now_passes and before_passed:
            return event_line(MODIFIED, record.raw)
        if now_passes:
            return event_line(ADDED, record.raw)
        if not before_passed:
            return None
        if event_type == DELETED:
            return event_line(DELETED, record.raw)
        assert previous is not None
        # No longer selected: the previous content, stamped with this event's version.
        obj: dict[str, Any] = json.loads(previous.raw)
        obj["metadata"]["resourceVersion"] = str(rv)
        return event_line(DELETED, dumps(obj))

    def _bookmark(self, rv: int, initial_events_end: bool = False) -> bytes:
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if initial_events_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        obj = {"kind": self.rtype.kind, "apiVersion": self.rtype.api_version, "metadata": meta}
        return event_line("BOOKMARK", dumps(obj))

    def _schedule_bookmark(self, now: float) -> None:
        if not self.allow_bookmarks:
            self._next_bookmark = None
            return
        at = now + self.bookmark_interval
        pre_timeout = self.deadline - PRE_TIMEOUT_BOOKMARK
        if pre_timeout < at:
            at = pre_timeout
        self._next_bookmark = at if at >= now else None

    # --- the stream --------------------------------------------------------------------

    def open(self) -> list[bytes]:
        """The first lines: initial ADDED events, or a 410 ERROR (then the stream is over)."""
        with self.store.lock:
            lines: list[bytes] = []
            if self.resource_version in ("", "0") or self.send_initial_events:
                snap = self.store.snapshot(self.rtype)
                lines = [event_line(ADDED, r.raw) for r in snap.records if self._matches(r)]
                start = snap.rv
                if self.send_initial_events and self.allow_bookmarks:
                    lines.append(self._bookmark(snap.rv, initial_events_end=True))
            else:
                start = int(self.resource_version)
                too_old = self.store.too_old(self.rtype, start)
                if too_old is not None:
                    self.finished = True
                    return [error_line(too_old)]
            self._cursor = self.store.open_cursor(self.rtype, start)
            self._schedule_bookmark(self.clock())
            return lines

    def next_lines(self) -> list[bytes] | None:
        """Wait for the next lines to send; None when the stream is over."""
        if self.finished or self._cursor is None:
            return None
        with self._condition:
            while True:
                if self.finished:
                    return None
                try:
                    events = self.store.events_after(self._cursor)
                except ApiError as e:  # fell behind the retained history
                    self.finished = True
                    return [error_line(e)]
                if events:
                    self._cursor.rv = events[-1].rv
                    lines = [line for ev in events
                             if (line := self._line(ev.type, ev.record, ev.previous, ev.rv))]
                    if lines:
                        return lines
                    continue
                now = self.clock()
                if now >= self.deadline:
                    self.finished = True
                    return None
                if self._next_bookmark is not None and now >= self._next_bookmark:
                    self._schedule_bookmark(now)
                    # Every event of this kind up to the revision is consumed, so a watch
                    # resumed from the current revision misses nothing.
                    self._cursor.rv = max(self._cursor.rv, self.store.revision)
                    return [self._bookmark(self.store.revision)]
                wake = self.deadline
                if self._next_bookmark is not None:
                    wake = min(wake, self._next_bookmark)
                if self.peer_gone is not None:
                    if self.peer_gone():
                        # The client closed its end: stop waiting for events nobody reads.
                        self.finished = self.dropped = True
                        return None
                    wake = min(wake, now + PEER_CHECK_INTERVAL)
                self._condition.wait(max(0.0, wake - now))

    def close(self, dropped: bool = False) -> None:
        """End the stream now; ``dropped``: the connection is cut, not ended cleanly."""
        with self._condition:
            self.dropped = self.dropped or dropped
            self.finished = True
            self._condition.notify_all()
        self.release()

    def release(self) -> None:
        if self._cursor is not None:
            self.store.close_cursor(self._cursor)
            self._cursor = None
