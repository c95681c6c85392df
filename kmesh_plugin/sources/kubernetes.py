"""The Kubernetes API source: one reflector per watched resource, merged into batches.

Each resource in :data:`WATCHED` has a :class:`~kmesh_plugin.sources.reflector.Reflector` in a
thread of its own. Their updates meet in one queue; :meth:`KubernetesSource.next_batch` drains
it into a :class:`~kmesh_plugin.sources.base.Batch` of events for the agent:

* the first batch is held back until every reflector has listed its resource, and then holds
  the complete initial state (``synced``), so a restarting agent never removes a frontend
  before it has heard of every Service;
* objects are parsed by the same parser the manifest source uses; an object that does not
  parse is reported (``Batch.errors``, ``status``) with the object and field named, and its
  last good version stays in effect;
* an upsert that parses to what the agent already has (a relist after 410, a restarted API
  server with a new resourceVersion history) produces no event: nothing is recomputed.

``Batch.revision`` is the resourceVersion of each resource (``{"nodes": "42", ...}``) up to
which the batch is complete; the agent's status shows it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from kmesh_plugin import gcpause
from kmesh_plugin.errors import KmeshError
from kmesh_plugin.model.objects import KubeObject, ObjectKey, parse
from kmesh_plugin.sources.base import Batch, Event, Source
from kmesh_plugin.sources.decode import check_part
from kmesh_plugin.sources.kubeapi import Transport, load_configuration
from kmesh_plugin.sources.reflector import Reflector, Update
from kmesh_plugin.sources.resources import PROXY_SELECTOR, WATCHED, Resource

__all__ = ["PROXY_SELECTOR", "WATCHED", "KubernetesSource", "Resource"]

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 5.0


class KubernetesSource(Source):
    kind = "kubernetes"

    def __init__(
        self,
        kubeconfig: Path | None,
        *,
        resources: tuple[Resource, ...] = WATCHED,
        reflector_options: dict[str, Any] | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.resources = resources
        self.reflector_options = dict(reflector_options or {})
        self.transport: Transport | None = None
        self.reflectors: dict[str, Reflector] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._updates: queue.SimpleQueue[Update] = queue.SimpleQueue()
        self._view: dict[ObjectKey, KubeObject] = {}
        self._synced: set[str] = set()
        self._initial: Batch | None = Batch()  # accumulates until every resource listed
        self.versions: dict[str, str] = {}  # resource plural -> resourceVersion applied
        self.errors: dict[str, str] = {}  # object -> why it was rejected (last good kept)

    # -- Source -----------------------------------------------------------------------------

    def check(self) -> None:
        load_configuration(self.kubeconfig)

    def start(self) -> None:
        self.transport = Transport.load(self.kubeconfig)
        for resource in self.resources:
            reflector = Reflector(resource, self.transport, self._updates.put, stop=self._stop,
                                  **self.reflector_options)
            self.reflectors[resource.plural] = reflector
            thread = threading.Thread(target=reflector.run, name=f"kmesh-{resource.plural}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()
        log.info("watching the Kubernetes API at %s", self.transport.server,
                 extra={"server": self.transport.server})

    def next_batch(self, timeout: float) -> Batch | None:
        try:
            first = self._updates.get(timeout=max(timeout, 0))
        except queue.Empty:
            return None
        updates = [first]
        while True:  # take everything that is already there: one reconcile for a burst
            try:
                updates.append(self._updates.get_nowait())
            except queue.Empty:
                break
        batch = self._initial if self._initial is not None else Batch(synced=True)
        with gcpause.paused():
            for update in updates:
                self._apply(update, batch)
        if self._initial is not None:
            if len(self._synced) < len(self.resources):
                return None  # keep collecting the initial state
            self._initial = None
            batch.synced = True
        batch.revision = dict(self.versions)  # type: ignore[assignment]
        return batch

    def close(self) -> None:
        self._stop.set()
        for reflector in self.reflectors.values():
            reflector.close()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.transport is not None:
            self.transport.close()

    def describe(self) -> dict[str, object]:
        resources = {}
        for plural, reflector in self.reflectors.items():
            s = reflector.stats
            resources[plural] = {
                "state": s.state,
                "resource_version": s.resource_version,
                "synced": s.synced,
                "objects": s.objects,
                "watches": s.watches,
                "watch_restarts": dict(s.watch_restarts),
                "relists": s.relists,
                "errors": dict(s.errors),
                "last_error": s.last_error,
                "last_error_at": s.last_error_at,
                "failing_since": s.failing_since,
            }
        return {
            "kind": self.kind,
            "server": self.transport.server if self.transport else None,
            "synced": self._initial is None,
            "objects": len(self._view),
            "resources": resources,
            "errors": dict(self.errors),
        }

    # -- updates ----------------------------------------------------------------------------

    def _apply(self, update: Update, batch: Batch) -> None:
        resource = update.resource
        for raw in update.upserts:
            # List items carry no kind or apiVersion; watch events do.
            raw.setdefault("kind", resource.kind)
            raw.setdefault("apiVersion", resource.api_version)
            try:
                if update.suspect:
                    check_part(raw, f"kubernetes: {_label(resource, raw)}")
                obj = parse(raw, "kubernetes")
            except KmeshError as e:
                label = _label(resource, raw)
                message = str(e)
                if self.errors.get(label) != message:
                    log.error("object rejected, keeping its last good state: %s", message,
                              extra={"object": label})
                self.errors[label] = message
                batch.errors.append(message)
                continue
            key = _object_key(resource, obj)
            self.errors.pop(_label(resource, raw), None)
            if self._view.get(key) != obj:
                self._view[key] = obj
                batch.events.append(Event(key, obj))
        for namespace, name in update.deletes:
            key = ObjectKey(resource.kind, namespace, name)
            self.errors.pop(str(key), None)
            if self._view.pop(key, None) is not None:
                batch.events.append(Event(key, None))
        if update.synced:
            self._synced.add(resource.plural)
        if update.resource_version:
            self.versions[resource.plural] = update.resource_version


def _object_key(resource: Resource, obj: KubeObject) -> ObjectKey:
    namespace = getattr(obj, "namespace", "")
    return ObjectKey(resource.kind, namespace, obj.name)


def _label(resource: Resource, raw: dict[str, Any]) -> str:
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    namespace = meta.get("namespace") if isinstance(meta.get("namespace"), str) else ""
    name = meta.get("name") if isinstance(meta.get("name"), str) else "?"
    return str(ObjectKey(resource.kind, namespace, name))
