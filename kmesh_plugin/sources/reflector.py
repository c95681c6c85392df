"""A reflector for one API resource, in the manner of client-go's: list, then watch, forever.

* **List**, paginated (``limit`` 500, ``continue``): the first page is a consistent read, the
  later ones come from the same snapshot. The result is diffed against what this reflector
  reported before: new and changed objects (by resourceVersion) are upserts, and keys that are
  gone are deletes, so the deletes that happened while we were not watching (a 410 gap, an
  outage) are synthesised instead of lost.
* **Watch** from the list's resourceVersion with ``allowWatchBookmarks`` and a server timeout
  drawn from 5-10 minutes (so many agents do not reconnect in step), a client read timeout and
  TCP keepalive (:mod:`kmesh_plugin.sources.kubeapi`). The resourceVersion is taken from every
  event, bookmarks included, so a re-watch resumes exactly where the last one stopped.
* **410 Gone** (an HTTP answer, an ERROR event, or an expired ``continue`` token) means the
  server no longer has the history we asked for: list again and diff. No backoff: the server
  said exactly what to do.
* **Errors** (connection refused, 5xx, 429 with ``Retry-After``, a dropped stream, a malformed
  answer) are retried after a jittered exponential backoff from 0.8 s to 30 s, which starts
  over once no error happened for :attr:`Backoff.reset_after`. A run of errors with the same
  reason is logged once (then again when it changes, and once more when the server answers
  again); every error is counted by reason for the metrics and ``status``.

A reflector never interprets objects. It hands raw JSON objects to ``emit`` as
:class:`Update` values, from its own thread; the source decides what they mean. While the API
server is unreachable nothing is emitted, so the datapath keeps its last good state.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kmesh_plugin import gcpause
from kmesh_plugin.errors import KmeshError
from kmesh_plugin.sources.kubeapi import ApiError, WatchStream
from kmesh_plugin.sources.resources import Resource

log = logging.getLogger(__name__)

PAGE_SIZE = 500
WATCH_TIMEOUT = (300, 600)  # seconds, the server ends each watch within this range
# A watch with no event and no bookmark for this long is assumed stuck and reopened; cheap,
# since it resumes from the last resourceVersion.
WATCH_READ_TIMEOUT = 90.0
LIST_READ_TIMEOUT = 60.0
# A watch that delivered an event, or stayed open this long, counts as having worked.
HEALTHY_WATCH = 1.0

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped kinds


class Transport(Protocol):
    def get(self, path: str, query: dict[str, str], *, read_timeout: float = ...,
            what: str = ...) -> Any: ...

    def stream(self, path: str, query: dict[str, str], *, read_timeout: float,
               what: str = ...) -> WatchStream: ...


@dataclass
class Update:
    """What one list or one watch event changed: raw objects to upsert, keys deleted.

    ``synced``: this update ends a complete list (the first one is the initial state).
    ``resource_version``: the collection's resourceVersion after this update.
    """

    resource: Resource
    upserts: list[dict[str, Any]] = field(default_factory=list)
    deletes: list[Key] = field(default_factory=list)
    synced: bool = False
    resource_version: str = ""
    relist: bool = False  # a list after the first (410, restart): upserts are a diff
    # Some upsert may hold an out-of-range integer or nest too deep: check each one before
    # use (kmesh_plugin.sources.decode.check_part), which names the object and field.
    suspect: bool = False


@dataclass
class Backoff:
    """Jittered exponential backoff, as client-go's: 0.8 s doubling up to 30 s, each delay
    stretched by up to ``jitter`` of itself, and back to the start once ``reset_after`` seconds
    passed without a failure."""

    initial: float = 0.8
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.25
    reset_after: float = 120.0
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic
    _steps: int = 0
    _last_failure: float | None = None

    def next(self, retry_after: float | None = None) -> float:
        """The delay before the next attempt after a failure (``Retry-After`` honoured)."""
        now = self.clock()
        if self._last_failure is not None and now - self._last_failure > self.reset_after:
            self._steps = 0
        self._last_failure = now
        base = min(self.cap, self.initial * self.factor ** self._steps)
        self._steps += 1
        delay = min(self.cap, base * (1 + self.jitter * self.rng.random()))
        if retry_after is not None:
            # The server knows its load; never wait less than it asks, within reason.
            delay = max(delay, min(retry_after, 2 * self.cap))
        return delay


@dataclass
class ReflectorStats:
    """What ``status`` and the metrics show of one reflector."""

    state: str = "starting"  # listing | watching | backoff | stopped
    resource_version: str = ""
    synced: bool = False
    objects: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # by reason
    relists: int = 0
    watches: int = 0
    watch_restarts: Counter[str] = field(default_factory=Counter)  # ended early, by reason
    last_error: str | None = None
    last_error_at: float | None = None
    failing_since: float | None = None  # wall time of the first error of the current streak


class Reflector:
    def __init__(
        self,
        resource: Resource,
        transport: Transport,
        emit: Callable[[Update], None],
        *,
        stop: threading.Event,
        page_size: int = PAGE_SIZE,
        watch_timeout: tuple[int, int] = WATCH_TIMEOUT,
        watch_read_timeout: float = WATCH_READ_TIMEOUT,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.resource = resource
        self.transport = transport
        self.emit = emit
        self.stop = stop
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.watch_read_timeout = watch_read_timeout
        self.backoff = backoff or Backoff()
        self.rng = rng or random.Random()
        self.stats = ReflectorStats()
        self._versions: dict[Key, str] = {}  # what we reported, with its resourceVersion
        self._stream: WatchStream | None = None
        self._streak: tuple[str, int] | None = None  # (reason, count) of the current errors
        self._bad_seen: set[str] = set()  # malformed input already logged
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        r = self.resource
        return f"/apis/{r.group}/{r.version}/{r.plural}" if r.group else (
            f"/api/{r.version}/{r.plural}")

    def _query(self) -> dict[str, str]:
        return {"labelSelector": self.resource.label_selector} if self.resource.label_selector \
            else {}

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        need_list = True
        while not self.stop.is_set():
            try:
                if need_list:
                    with gcpause.paused():
                        self._list()
                    need_list = False
                self._watch()
            except ApiError as e:
                if self.stop.is_set():
                    break
                if e.expired:
                    # The history we asked for is gone: list again (and diff), at once.
                    log.info("%s: %s; listing again", self.resource.plural, e,
                             extra={"resource": self.resource.plural})
                    self.stats.relists += 1
                    need_list = True
                    continue
                self._wait_after(e.reason, str(e), e.retry_after)
            except KmeshError as e:  # an answer we cannot use (malformed, too large)
                if self.stop.is_set():
                    break
                self._wait_after("malformed answer", str(e), None)
            except Exception as e:  # our bug: keep the agent alive, and say so loudly
                if self.stop.is_set():
                    break
                log.exception("%s: reflector failed", self.resource.plural)
                self._wait_after(type(e).__name__, f"{type(e).__name__}: {e}", None)
        self.stats.state = "stopped"

    def close(self) -> None:
        """Unblock a watch in progress; ``run`` returns once ``stop`` is set."""
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()

    # -- errors -----------------------------------------------------------------------------

    def _wait_after(self, reason: str, message: str, retry_after: float | None) -> None:
        s = self.stats
        s.errors[reason] += 1
        s.last_error, s.last_error_at = message, time.time()
        if s.failing_since is None:
            s.failing_since = s.last_error_at
        delay = self.backoff.next(retry_after)
        if self._streak is None or self._streak[0] != reason:
            log.warning("%s: %s; retrying in %.1f s (the maps keep their last good state)",
                        self.resource.plural, message, delay,
                        extra={"resource": self.resource.plural, "reason": reason})
            self._streak = (reason, 1)
        else:
            self._streak = (reason, self._streak[1] + 1)
            log.debug("%s: %s again (%d times); retrying in %.1f s", self.resource.plural,
                      reason, self._streak[1], delay)
        s.state = "backoff"
        self.stop.wait(delay)

    def _bad_input(self, message: str) -> None:
        """An answer or event the reflector cannot use at all: counted and logged (once per
        distinct message), then skipped; the objects it carried keep their last good state."""
        s = self.stats
        s.errors["malformed"] += 1
        s.last_error, s.last_error_at = message, time.time()
        if message not in self._bad_seen:
            if len(self._bad_seen) < 100:
                self._bad_seen.add(message)
            log.error("%s: %s; skipped", self.resource.plural, message,
                      extra={"resource": self.resource.plural})

    def _succeeded(self) -> None:
        if self._streak is not None:
            since = self.stats.failing_since or time.time()
            log.info("%s: the API server answers again after %d error(s) in %.0f s",
                     self.resource.plural, self._streak[1], time.time() - since,
                     extra={"resource": self.resource.plural})
            self._streak = None
        self.stats.failing_since = None

    # -- list -------------------------------------------------------------------------------

    def _list(self) -> None:
        self.stats.state = "listing"
        items: dict[Key, dict[str, Any]] = {}
        resource_version = ""
        token = ""
        first = True
        suspect = False
        while True:
            query = {"limit": str(self.page_size), **self._query()}
            if token:
                query["continue"] = token
            body, page_suspect = self.transport.get(
                self.path, query, read_timeout=LIST_READ_TIMEOUT,
                what=f"list {self.resource.plural}")
            suspect |= page_suspect
            meta = _list_meta(body, self.resource)
            if first:
                # Every page is served from the first page's snapshot.
                resource_version = str(meta.get("resourceVersion") or "")
                first = False
            for item in body.get("items") or []:
                key = _key_or_none(item)
                if key is None:
                    self._bad_input(f"list {self.resource.plural}: an item without a "
                                    f"metadata.name: {_short(item)}")
                    continue
                items[key] = item
            token = str(meta.get("continue") or "")
            if not token or self.stop.is_set():
                break
        if self.stop.is_set():
            return
        relist = self.stats.synced
        update = Update(self.resource, synced=True, resource_version=resource_version,
                        relist=relist, suspect=suspect)
        versions: dict[Key, str] = {}
        for key, item in items.items():
            rv = _resource_version(item)
            versions[key] = rv
            if not relist or self._versions.get(key) != rv:
                update.upserts.append(item)
        update.deletes = [key for key in self._versions if key not in items]
        self._versions = versions
        self.stats.resource_version = resource_version
        self.stats.objects = len(versions)
        self.stats.synced = True
        self._succeeded()
        self.emit(update)

    # -- watch ------------------------------------------------------------------------------

    def _watch(self) -> None:
        low, high = self.watch_timeout
        query = {
            "watch": "1",
            "resourceVersion": self.stats.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.rng.randint(low, high)),
            **self._query(),
        }
        stream = self.transport.stream(self.path, query, read_timeout=self.watch_read_timeout,
                                       what=f"watch {self.resource.plural}")
        with self._lock:
            self._stream = stream
        self.stats.watches += 1
        self.stats.state = "watching"
        self._succeeded()
        opened, events = time.monotonic(), 0
        try:
            for event, suspect in stream:
                if self.stop.is_set():
                    return
                if isinstance(event, KmeshError):  # a line that is not JSON at all
                    self._bad_input(str(event))
                    continue
                try:
                    self._event(event, suspect)
                except ApiError:
                    raise
                except KmeshError as e:  # one malformed event: skip it, keep watching
                    self._bad_input(str(e))
                    continue
                events += 1
        except ApiError as e:
            # A watch that worked for a while and then lost its connection (a proxy's idle
            # timeout, an API server rolling over) resumes at once from its resourceVersion:
            # nothing is lost, and a server that is really gone fails the next request,
            # which backs off. One that breaks at once is an error like any other.
            if e.status == 0 and (events or time.monotonic() - opened >= HEALTHY_WATCH):
                log.info("%s; resuming from resourceVersion %s", e,
                         self.stats.resource_version, extra={"resource": self.resource.plural})
                self.stats.watch_restarts[e.reason] += 1
                return
            raise
        finally:
            with self._lock:
                self._stream = None
            stream.close()

    def _event(self, event: Any, suspect: bool = False) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise KmeshError(f"watch {self.resource.plural}: malformed event {event!r:.200}")
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            code = obj.get("code")
            raise ApiError(f"watch {self.resource.plural} (ERROR event)",
                           code if isinstance(code, int) else 0,
                           str(obj.get("reason") or "error"), str(obj.get("message") or ""))
        rv = _resource_version(obj)
        update = Update(self.resource, resource_version=rv or self.stats.resource_version,
                        suspect=suspect)
        if kind in ("ADDED", "MODIFIED"):
            key = _key(obj)
            self._versions[key] = rv
            update.upserts.append(obj)
        elif kind == "DELETED":
            key = _key(obj)
            if self._versions.pop(key, None) is not None:
                update.deletes.append(key)
        elif kind != "BOOKMARK":
            raise KmeshError(f"watch {self.resource.plural}: unknown event type {kind!r}")
        if rv:
            self.stats.resource_version = rv
        self.stats.objects = len(self._versions)
        self.emit(update)


def _list_meta(body: Any, resource: Resource) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("items", []), list):
        raise KmeshError(f"list {resource.plural}: the answer is not a list: {body!r:.200}")
    meta = body.get("metadata") or {}
    if not isinstance(meta, dict):
        raise KmeshError(f"list {resource.plural}: metadata is not a mapping")
    return meta


def _key_or_none(obj: Any) -> Key | None:
    try:
        return _key(obj)
    except KmeshError:
        return None


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, dict | list | str) else type(value).__name__
    return text[:200]


def _key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise KmeshError(f"an object without metadata.name: {obj!r:.200}")
    namespace = meta.get("namespace")
    return (namespace if isinstance(namespace, str) else "", meta["name"])


def _resource_version(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) else ""
