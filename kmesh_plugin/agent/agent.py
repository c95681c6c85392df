"""The node agent: source -> cluster state -> strategies -> tiers -> maps, forever.

The first reconcile after the source's initial sync is a full one: it also removes frontends
that the maps hold but the cluster no longer has (a restart over changed state). After that,
each batch of events recomputes only the Services it touches (and those waiting for a
ClusterIP:port that a touched Service let go of); any label change of the agent's own node
recomputes everything, and each group still switches at once (see datapath/writer.py).

A reconcile that fails (a plugin error, a full map) changes nothing for the Services involved:
the kernel keeps their last good state, and the error is logged with the Service's name.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmesh_plugin import gcpause
from kmesh_plugin.agent.metrics import AgentMetrics
from kmesh_plugin.agent.planner import GroupPlan, Planner
from kmesh_plugin.agent.state import ClusterState, Impact, ServiceKey
from kmesh_plugin.agent.status import StatusFile
from kmesh_plugin.datapath.loader import PROGRAMS, Datapath
from kmesh_plugin.datapath.records import BackendSet, Frontend
from kmesh_plugin.datapath.writer import MapWriter, PublishStats
from kmesh_plugin.errors import KmeshError
from kmesh_plugin.hookspecs import StrategySettings
from kmesh_plugin.model import DatapathInfo, NodeInfo
from kmesh_plugin.plugins import Plugins
from kmesh_plugin.sources.base import Batch, Source

log = logging.getLogger(__name__)

HEARTBEAT = 10.0  # seconds between status rewrites while idle (status shows a hung agent)
RETRY_MIN = 0.5  # seconds before the first retry of a failed publish
RETRY_MAX = 30.0


@dataclass
class ReconcileReport:
    at: float
    seconds: float
    full: bool
    services: int
    publish: PublishStats
    errors: list[str] = field(default_factory=list)
    failed: bool = False  # the publish failed: the maps kept their last good state


class Agent:
    def __init__(
        self,
        *,
        node_name: str,
        state: ClusterState,
        plugins: Plugins,
        settings: StrategySettings,
        source: Source,
        datapath: Datapath,
        cgroup: os.PathLike[str] | str,
        status: StatusFile | None = None,
        writer: MapWriter | None = None,
    ) -> None:
        self.node_name = node_name
        self.state = state
        self.plugins = plugins
        self.planner = Planner(plugins, settings)
        self.source = source
        self.datapath = datapath
        self.cgroup = cgroup
        self.writer = writer or MapWriter(datapath)
        self.status = status
        self.groups_of: dict[ServiceKey, dict[Frontend, GroupPlan]] = {}
        self._holder: dict[Frontend, ServiceKey] = {}  # who has each frontend in the maps
        # Frontends a Service wants but another holds: it takes them over once they are let go.
        self._refused: dict[ServiceKey, set[Frontend]] = {}
        self.synced = False
        self.revision: str | None = None
        self.last: ReconcileReport | None = None
        self.stop_event = threading.Event()
        self.lock = threading.RLock()  # held by reconciles; scrapes copy state under it
        self.metrics: AgentMetrics | None = None
        self._warned: set[tuple[ServiceKey, str]] = set()
        # What a failed publish left undone, retried with backoff until it lands.
        self._pending: set[ServiceKey] = set()
        self._pending_full = False
        self._retry_delay = RETRY_MIN
        self._retry_at = 0.0
        self.started_at = time.time()
        self._status_written = 0.0

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        adopted = self.writer.recover()
        info = DatapathInfo(
            self.datapath.pins.root, Path(self.cgroup), tuple(PROGRAMS),
            tuple(self.datapath.events),
        )
        self.plugins.notify("kmesh_agent_started", node=self.node_info(), datapath=info)
        log.info("agent started", extra={"node": self.node_name, "adopted_groups": adopted})
        self.source.start()
        self._write_status()
        try:
            while not self.stop_event.is_set():
                batch = self.source.next_batch(timeout=0.2)
                if batch is not None:
                    self.handle(batch)
                    continue
                # Idle: retry what failed, delete the old sets whose grace period is over,
                # and keep the status fresh so `status` can tell a hung agent.
                if self.retry_due():
                    self.handle(Batch())
                if self.writer.slots_retired():
                    with self.lock:
                        self.writer.collect()
                if time.time() - self._status_written > HEARTBEAT:
                    self._write_status()
        finally:
            self.plugins.notify("kmesh_agent_stopping", node=self.node_info())
            self.source.close()
            # Leave no retired set behind: delete what is due, after one grace period.
            self.writer.settle()
            self.writer.close()
            log.info("agent stopped; the datapath stays attached", extra={"node": self.node_name})

    def retry_due(self) -> bool:
        return (self._pending_full or bool(self._pending)) and time.monotonic() >= self._retry_at

    def stop(self) -> None:
        self.stop_event.set()

    def node_info(self) -> NodeInfo:
        return self.planner.client(self.state)

    # -- reconcile --------------------------------------------------------------------------

    def handle(self, batch: Batch) -> ReconcileReport | None:
        with self.lock:
            report = self._handle(batch)
        if self.metrics is not None:
            self._count(batch, report)
        return report

    def _count(self, batch: Batch, report: ReconcileReport | None) -> None:
        m = self.metrics
        assert m is not None
        for event in batch.events:
            m.source_events.labels(event.key.kind, "upsert" if event.obj else "delete").inc()
        if batch.errors:
            m.source_errors.inc(len(batch.errors))
        m.synced.set(1 if self.synced else 0)
        if report is not None:
            kind = "full" if report.full else "partial"
            m.reconcile_seconds.labels(kind).observe(report.seconds)
            m.reconciles.labels(kind, "failed" if report.failed else "ok").inc()

    def _handle(self, batch: Batch) -> ReconcileReport | None:
        started = time.perf_counter()
        with gcpause.paused():
            impact = self.state.apply(batch.events)
        if not self.synced:
            if not batch.synced:
                return None  # keep collecting the initial state
            self.synced = True
            impact = Impact(everything=True, relabelled=impact.relabelled)
        impact.everything |= self._pending_full
        impact.services |= self._pending
        report = None
        if impact:
            with gcpause.paused():
                report = self._full() if impact.everything else self._partial(impact.services)
            if report.full:
                gcpause.settle()
            self._note_outcome(report, impact)
            report.seconds = time.perf_counter() - started
            self.last = report
            log.info(
                "reconciled",
                extra={
                    "full": report.full, "services": report.services,
                    "added": report.publish.added, "updated": report.publish.updated,
                    "removed": report.publish.removed, "unchanged": report.publish.unchanged,
                    "seconds": round(report.seconds, 6),
                },
            )
        for name, before, after in impact.relabelled:
            node = self.planner.client(self.state) if name == self.node_name else NodeInfo(
                name, after, dict(self.state.nodes[name].labels) if name in self.state.nodes
                else {}
            )
            self.plugins.notify(
                "kmesh_node_locality_changed", node=node, previous=before, current=after,
                is_local=name == self.node_name,
            )
        if batch.revision is not None:
            self.revision = batch.revision
        self._write_status()
        return report

    def _note_outcome(self, report: ReconcileReport, impact: Impact) -> None:
        if not report.failed:
            self._pending, self._pending_full = set(), False
            self._retry_delay = RETRY_MIN
            return
        if impact.everything:
            self._pending_full = True
        else:
            self._pending |= impact.services
        self._retry_at = time.monotonic() + self._retry_delay
        log.warning("will retry the failed publish in %.1f s", self._retry_delay)
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def _full(self) -> ReconcileReport:
        report = ReconcileReport(time.time(), 0.0, True, len(self.state.services), PublishStats())
        planned: dict[ServiceKey, dict[Frontend, GroupPlan]] = {}
        kept_refusals: dict[ServiceKey, set[Frontend]] = {}
        for key in sorted(self.state.services):
            groups = self._plan(key, report)
            if groups is None:
                # Planning failed: keep what the kernel has for this Service.
                groups = self.groups_of.get(key, {})
                if key in self._refused:
                    kept_refusals[key] = self._refused[key]
            if groups:
                planned[key] = groups
        desired, refused = self._claim_frontends(planned, report)
        planned = {k: v for k, v in planned.items() if v}
        try:
            report.publish = self.writer.sync(desired)
        except KmeshError as e:
            report.failed = True
            report.errors.append(f"publish failed, maps unchanged: {e}")
            log.error("publish failed, maps keep their last good state: %s", e)
            return report
        self.groups_of = planned
        self._holder = {f: key for key, groups in planned.items() for f in groups}
        self._refused = {**kept_refusals, **refused}
        return report

    def _partial(self, services: set[ServiceKey]) -> ReconcileReport:
        report = ReconcileReport(time.time(), 0.0, False, len(services), PublishStats())
        changes: dict[Frontend, BackendSet | None] = {}
        planned: dict[ServiceKey, dict[Frontend, GroupPlan]] = {}
        failed: set[ServiceKey] = set()
        todo = set(services)
        while todo:
            for key in sorted(todo):
                groups = self._plan(key, report)
                if groups is None:
                    failed.add(key)
                    continue
                planned[key] = groups
                for frontend in self.groups_of.get(key, {}):
                    if frontend not in groups:
                        changes[frontend] = None
            # A frontend its holder lets go of goes, in this same publish, to a Service that
            # was refused it: replan those too (SPEC.md section 6: no window without it).
            released = {
                frontend
                for key, groups in planned.items()
                for frontend in self.groups_of.get(key, {})
                if frontend not in groups and self._holder.get(frontend) == key
            }
            todo = {
                key for key, wanted in self._refused.items()
                if wanted & released and key not in planned and key not in failed
            }
        report.services = len(planned) + len(failed)
        claimed, refused = self._claim_frontends(planned, report)
        changes.update(claimed)
        try:
            report.publish = self.writer.publish(changes)
        except KmeshError as e:
            report.failed = True
            report.errors.append(f"publish failed, maps unchanged: {e}")
            log.error("publish failed, maps keep their last good state: %s", e,
                      extra={"services": sorted(f"{n}/{s}" for n, s in services)})
            return report
        for key, groups in planned.items():
            for frontend in self.groups_of.pop(key, {}):
                if self._holder.get(frontend) == key:
                    del self._holder[frontend]
            if groups:
                self.groups_of[key] = groups
                self._holder.update(dict.fromkeys(groups, key))
            self._refused.pop(key, None)
            if key in refused:
                self._refused[key] = refused[key]
        return report

    def _plan(self, key: ServiceKey, report: ReconcileReport) -> dict[Frontend, GroupPlan] | None:
        """The Service's groups by frontend; {} when it has none; None when planning failed."""
        try:
            plan = self.planner.plan_service(self.state, key, detail=False)
        except Exception as e:  # a plugin's bug must not take the agent down
            message = f"Service {key[0]}/{key[1]}: planning failed, kept last good state: {e}"
            report.errors.append(message)
            log.error(message, extra={"service": f"{key[0]}/{key[1]}"})
            return None
        if plan is None:
            return {}
        if plan.warning and (key, plan.warning) not in self._warned:
            self._warned.add((key, plan.warning))
            log.warning(plan.warning, extra={"service": f"{key[0]}/{key[1]}"})
        return {g.frontend: g for g in plan.groups}

    def _claim_frontends(
        self, planned: dict[ServiceKey, dict[Frontend, GroupPlan]], report: ReconcileReport
    ) -> tuple[dict[Frontend, BackendSet], dict[ServiceKey, set[Frontend]]]:
        """One frontend, one Service. A ClusterIP:port wanted by two Services stays with the
        one that has it in the maps (else the first by namespace/name); the other is reported
        with both names and gets no frontend there. Returns the sets of ``planned`` and, per
        Service of ``planned`` refused a frontend, those frontends (it gets them once the
        holder lets them go: see ``_partial``)."""

        def wants(key: ServiceKey, frontend: Frontend) -> bool:
            groups = planned[key] if key in planned else self.groups_of.get(key, {})
            return frontend in groups

        incumbent = self._holder
        taken: dict[Frontend, ServiceKey] = {}
        out: dict[Frontend, BackendSet] = {}
        refused: dict[ServiceKey, set[Frontend]] = {}
        for key in sorted(planned):
            kept = {}
            for frontend, group in planned[key].items():
                holder = incumbent.get(frontend)
                if holder is None or holder == key or not wants(holder, frontend):
                    holder = taken.setdefault(frontend, key)
                if holder != key:
                    message = (
                        f"Service {key[0]}/{key[1]}: {frontend} is already used by Service "
                        f"{holder[0]}/{holder[1]}; ignoring it here"
                    )
                    report.errors.append(message)
                    log.error(message, extra={"service": f"{key[0]}/{key[1]}"})
                    refused.setdefault(key, set()).add(frontend)
                    continue
                kept[frontend] = group
                out[frontend] = group.backends
            planned[key] = kept
        return out, refused

    # -- status -----------------------------------------------------------------------------

    def status_dict(self) -> dict[str, Any]:
        last = self.last
        return {
            "node": self.node_name,
            "pid": os.getpid(),
            "updated_at": time.time(),
            "started_at": self.started_at,
            "synced": self.synced,
            "source_revision": self.revision,
            "source": self.source.describe(),  # its current problems, not just the last batch's
            "datapath": {
                "pin_dir": str(self.datapath.pins.root),
                "cgroup": str(self.cgroup),
                "programs": list(PROGRAMS),
                "events": list(self.datapath.events),
                "groups": len(self.writer.published),
                "slots": self.writer.slots_in_use(),
                "slots_retired": self.writer.slots_retired(),
                "capacity": {
                    "max_services": self.datapath.capacities.max_services,
                    "max_endpoints": self.datapath.capacities.max_endpoints,
                },
            },
            "plugins": self.plugins.names,
            "metrics": self.metrics.url if self.metrics else None,
            "last_reconcile": None if last is None else {
                "at": last.at,
                "seconds": last.seconds,
                "full": last.full,
                "services": last.services,
                "added": last.publish.added,
                "updated": last.publish.updated,
                "removed": last.publish.removed,
                "unchanged": last.publish.unchanged,
                "slot_writes": last.publish.slot_writes,
                "syscalls": last.publish.syscalls,
                "errors": last.errors,
            },
        }

    def _write_status(self) -> None:
        if self.status is not None:
            self.status.write(self.status_dict())
            self._status_written = time.time()
