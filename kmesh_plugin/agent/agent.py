"""The node agent: source -> cluster state -> strategies -> tiers -> maps, forever.

The first reconcile after the source's initial sync is a full one: it also removes frontends
that the maps hold but the cluster no longer has (a restart over changed state). After that,
each batch of events recomputes only the Services it touches (and those waiting for a
ClusterIP:port that a touched Service let go of); any label change of the agent's own node
recomputes everything, and each group still switches at once (see datapath/writer.py).

A plugin error changes nothing for the Service involved: the kernel keeps its last good state
and the error is logged with the Service's name. A kernel error during a publish leaves every
group with its last set or its new one, whole (the writer's books follow the kernel), and the
publish is retried with backoff.

Capacity. What does not fit in the maps (datapath.max_services, datapath.max_endpoints) never
holds up the rest: every deletion is applied and every Service that fits is written, group by
group if need be (see datapath/writer.py); the groups left out are named in the log, in the
status file (``not_programmed``) and in the metrics, each with its reason, and keep what the maps
held for them (nothing for a new Service, its last set for a changed one). Once a publish frees
room for some of them (a deletion, a Service that shrank), they are written in the same
reconcile. A tier of more than 65,535 endpoints (the kernel's slot index is 16 bits) is an
error of that Service alone, reported the same way.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmesh_plugin import gcpause
from kmesh_plugin.agent.metrics import AgentMetrics
from kmesh_plugin.agent.planner import GroupPlan, Planner
from kmesh_plugin.agent.pods import PodWatch
from kmesh_plugin.agent.state import ClusterState, Impact, ServiceKey
from kmesh_plugin.agent.status import StatusFile
from kmesh_plugin.datapath.loader import PROGRAMS, Datapath
from kmesh_plugin.datapath.records import BackendSet, Frontend
from kmesh_plugin.datapath.writer import (
    GRACE_PERIOD,
    MAX_ENDPOINTS,
    MAX_SERVICES,
    MapWriter,
    PublishStats,
)
from kmesh_plugin.errors import KmeshError
from kmesh_plugin.hookspecs import StrategySettings
from kmesh_plugin.model import DatapathInfo, NodeInfo
from kmesh_plugin.plugins import Plugins
from kmesh_plugin.sources.base import Batch, Source

log = logging.getLogger(__name__)

HOUSEKEEPING = 2.0  # seconds between housekeeping calls while idle (the conflist guard)
HEARTBEAT = 10.0  # seconds between status rewrites while idle (status shows a hung agent)
RETRY_MIN = 0.5  # seconds before the first retry of a failed publish
RETRY_MAX = 30.0
MAX_TIER_ENDPOINTS = 0xFFFF  # kmesh_slot_key.index is a u16
TIER_TOO_LARGE = "tier_too_large"  # NotProgrammed.reason: a tier beyond the u16 slot index
REASONS = (MAX_ENDPOINTS, MAX_SERVICES, GRACE_PERIOD, TIER_TOO_LARGE)
STATUS_LISTED = 100  # Services the status file lists by name (all are counted)
LOG_LISTED = 50  # Services a log line names


@dataclass(frozen=True)
class NotProgrammed:
    """A group of a Service (or the whole Service: ``frontend`` None) that the maps do not
    hold as planned, and why."""

    frontend: Frontend | None
    reason: str  # MAX_ENDPOINTS, MAX_SERVICES, GRACE_PERIOD or TIER_TOO_LARGE
    detail: str
    stale: bool  # the maps keep an older set of it
    slots: int = 0  # free endpoint slots it needs to fit
    groups: int = 0  # free service groups it needs to fit

    def to_json(self) -> dict[str, Any]:
        return {"frontend": None if self.frontend is None else str(self.frontend),
                "reason": self.reason, "detail": self.detail, "stale": self.stale}


@dataclass
class ReconcileReport:
    at: float
    seconds: float
    full: bool
    services: int
    publish: PublishStats
    errors: list[str] = field(default_factory=list)
    failed: bool = False  # the publish failed: the maps kept their last good state
    # Of the Services this reconcile handled: what the maps do not hold as planned.
    not_programmed: dict[ServiceKey, list[NotProgrammed]] = field(default_factory=dict)

    def merge(self, other: ReconcileReport) -> ReconcileReport:
        """This report followed by ``other`` (the Services written once room was freed)."""
        p, q = self.publish, other.publish
        publish = PublishStats(
            added=p.added + q.added, updated=p.updated + q.updated,
            removed=p.removed + q.removed, unchanged=p.unchanged + q.unchanged,
            slot_writes=p.slot_writes + q.slot_writes, syscalls=p.syscalls + q.syscalls,
            seconds=p.seconds + q.seconds, steps=p.steps + q.steps,
            left_out={**p.left_out, **q.left_out},
        )
        return ReconcileReport(self.at, self.seconds + other.seconds, self.full,
                               self.services + other.services, publish,
                               self.errors + other.errors, self.failed or other.failed,
                               {**self.not_programmed, **other.not_programmed})


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
        pods: PodWatch | None = None,
        housekeeping: Callable[[], str | None] | None = None,
    ) -> None:
        """``pods``: follow kmesh-cni's records (enrolment mode cni) and fire the pod hooks.
        ``housekeeping``: called every HOUSEKEEPING s while idle (the CNI conflist guard); a
        line it returns is logged."""
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
        # What the maps do not hold as planned, by Service; and of those, the ones waiting for
        # room: the least (slots, groups) one of their groups needs free.
        self.not_programmed: dict[ServiceKey, list[NotProgrammed]] = {}
        self._waiting: dict[ServiceKey, tuple[int, int]] = {}
        self._headroom_seen: tuple[int, int] | None = None
        self._logged_left_out: dict[ServiceKey, str] = {}
        self._np_changed = False  # not_programmed changed since it was last logged
        self._np_status: dict[str, Any] | None = None  # its status summary, while unchanged
        self.started_at = time.time()
        self._status_written = 0.0
        self.pods = pods
        if pods is not None:
            pods.node = self.node_info
            if pods.selector is not None and pods.ready is None:
                pods.ready = lambda: self.synced
        self.housekeeping = housekeeping
        self._housekept = 0.0

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
        if self.pods is not None:
            self.pods.poll()
        self._write_status()
        try:
            while not self.stop_event.is_set():
                batch = self.source.next_batch(timeout=0.2)
                if batch is not None:
                    self.handle(batch)
                    if self.pods is not None:  # a busy source must not hold enrolment back
                        self.pods.poll()
                    continue
                # Idle: retry what failed or waits for room that a publish freed, delete the
                # old sets whose grace period is over, and keep the status fresh so `status`
                # can tell a hung agent.
                if self.retry_due() or self._room_changed():
                    self.handle(Batch())
                if self.writer.slots_retired():
                    with self.lock:
                        self.writer.collect()
                if self.pods is not None:
                    self.pods.poll()
                if self.housekeeping is not None and \
                        time.monotonic() - self._housekept > HOUSEKEEPING:
                    self._housekept = time.monotonic()
                    done = self.housekeeping()
                    if done:
                        log.warning("%s", done)
                if time.time() - self._status_written > HEARTBEAT:
                    self._write_status()
        finally:
            self.plugins.notify("kmesh_agent_stopping", node=self.node_info())
            self.source.close()
            # Leave no retired set behind: delete what is due, after one grace period. One
            # that does not pass in time leaves them to the next agent's recovery.
            if not self.writer.settle():
                log.warning("retired sets are left in the maps for the next agent to reclaim",
                            extra={"slots": self.writer.slots_retired()})
            self.writer.close()
            log.info("agent stopped; the datapath stays attached", extra={"node": self.node_name})

    def _room_changed(self) -> bool:
        """Services wait for room, and the room in the maps changed since last looked at."""
        return bool(self._waiting) and self.writer.headroom() != self._headroom_seen

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
            report = self._reconcile(impact, started)
        if self.synced and not (report is not None and report.failed):
            # A publish that freed room writes what was left out for want of it, at once.
            due = self._room_for_left_out()
            if due:
                log.info("room freed in the maps: writing %d Services left out before",
                         len(due))
                extra = self._reconcile(Impact(services=due), time.perf_counter())
                report = extra if report is None else report.merge(extra)
        if report is not None:
            self.last = report
            self._log_left_out()
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

    def _reconcile(self, impact: Impact, started: float) -> ReconcileReport:
        with gcpause.paused():
            report = self._full() if impact.everything else self._partial(impact.services)
        if report.full:
            gcpause.settle()
        self._note_outcome(report, impact)
        report.seconds = time.perf_counter() - started
        log.info(
            "reconciled",
            extra={
                "full": report.full, "services": report.services,
                "added": report.publish.added, "updated": report.publish.updated,
                "removed": report.publish.removed, "unchanged": report.publish.unchanged,
                "left_out": len(report.publish.left_out), "steps": report.publish.steps,
                "seconds": round(report.seconds, 6),
            },
        )
        return report

    def _note_outcome(self, report: ReconcileReport, impact: Impact) -> None:
        if not report.failed:
            self._pending, self._pending_full = set(), False
            # A group held up by a grace period (slow or failing barrier) is retried like a
            # failed publish; one left out for want of room waits for room (_waiting).
            deferred = {key for key, entries in report.not_programmed.items()
                        if any(e.reason == GRACE_PERIOD for e in entries)}
            if not deferred:
                self._retry_delay = RETRY_MIN
                return
            self._pending = deferred
            self._retry_at = time.monotonic() + self._retry_delay
            log.info("%d Services wait for a grace period; retrying in %.1f s", len(deferred),
                     self._retry_delay)
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
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
            report.errors.append(f"publish failed, retrying: {e}")
            log.error("publish failed (each group holds its last set or its new one, whole); "
                      "retrying: %s", e)
            return report
        self.groups_of = planned
        self._holder = {f: key for key, groups in planned.items() for f in groups}
        self._refused = {**kept_refusals, **refused}
        self._left_out(report, planned, everything=True)
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
            report.errors.append(f"publish failed, retrying: {e}")
            log.error("publish failed (each group holds its last set or its new one, whole); "
                      "retrying: %s", e,
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
        self._left_out(report, planned, everything=False)
        return report

    def _left_out(self, report: ReconcileReport,
                  planned: dict[ServiceKey, dict[Frontend, GroupPlan]], everything: bool) -> None:
        """Record what the maps do not hold as planned, for the Services just reconciled."""
        found = report.not_programmed  # planning errors (tiers too large) are in already
        if report.publish.left_out:
            owner = {f: key for key, groups in planned.items() for f in groups}
            lines = 0
            for frontend, lo in report.publish.left_out.items():
                key = owner.get(frontend)
                if key is None:
                    continue
                found.setdefault(key, []).append(NotProgrammed(
                    frontend, lo.reason, lo.detail, lo.stale, lo.slots, lo.groups))
                lines += 1
                if lines <= LOG_LISTED:
                    report.errors.append(
                        f"Service {key[0]}/{key[1]}: {frontend} not programmed ({lo.reason}): "
                        f"{lo.detail}" + ("; the maps keep its last set" if lo.stale else ""))
            if lines > LOG_LISTED:
                report.errors.append(f"... and {lines - LOG_LISTED} more groups not programmed "
                                     "(the status file's not_programmed lists them)")
        if everything:
            self._np_changed = bool(self.not_programmed) or bool(found)
            self.not_programmed, self._waiting = {}, {}
        else:
            for key in (*planned, *found):
                if self.not_programmed.pop(key, None) is not None:
                    self._np_changed = True
                self._waiting.pop(key, None)
        if found:
            self._np_changed = True
        if self._np_changed:
            self._np_status = None
        for key, entries in found.items():
            self.not_programmed[key] = entries
            room = [(e.slots, e.groups) for e in entries
                    if e.reason in (MAX_ENDPOINTS, MAX_SERVICES)]
            if room:
                self._waiting[key] = min(room)

    def _room_for_left_out(self) -> set[ServiceKey]:
        """The Services left out for want of room that may fit now: O(1) while the room in
        the maps is as it was when last looked at."""
        if not self._waiting:
            return set()
        groups, slots = self.writer.headroom()
        if self._headroom_seen == (groups, slots):
            return set()
        self._headroom_seen = (groups, slots)
        return {key for key, (s, g) in self._waiting.items() if s <= slots and g <= groups}

    def _log_left_out(self) -> None:
        """One line naming the Services not programmed, whenever that set changes."""
        if not self._np_changed:
            return
        self._np_changed = False
        now = {key: entries[0].reason for key, entries in self.not_programmed.items()}
        if now == self._logged_left_out:
            return
        self._logged_left_out = now
        if not now:
            log.info("every Service is programmed again")
            return
        names = [f"{ns}/{name} ({reason})" for (ns, name), reason in sorted(now.items())]
        more = f" and {len(names) - LOG_LISTED} more" if len(names) > LOG_LISTED else ""
        log.error(
            "%d Services are not (fully) programmed in the maps: %s%s",
            len(names), ", ".join(names[:LOG_LISTED]), more,
            extra={"services": [f"{ns}/{name}" for ns, name in sorted(now)],
                   "reasons": dict(collections.Counter(now.values()))},
        )

    def _plan(self, key: ServiceKey, report: ReconcileReport) -> dict[Frontend, GroupPlan] | None:
        """The Service's groups by frontend; {} when it has none; None when planning failed."""
        try:
            plan = self.planner.plan_service(self.state, key, detail=False)
        except ValueError as e:
            if not _tier_overflow(e):
                return self._plan_failed(key, report, e)
            stale = bool(self.groups_of.get(key))
            message = (
                f"Service {key[0]}/{key[1]}: not programmed: {e} (a tier of the datapath holds "
                f"at most {MAX_TIER_ENDPOINTS} endpoints: its slot index is 16 bits)"
                + ("; the maps keep its last set" if stale else "")
            )
            report.errors.append(message)
            log.error(message, extra={"service": f"{key[0]}/{key[1]}"})
            report.not_programmed[key] = [NotProgrammed(None, TIER_TOO_LARGE, str(e), stale)]
            return None
        except Exception as e:  # a plugin's bug must not take the agent down
            return self._plan_failed(key, report, e)
        if plan is None:
            return {}
        if plan.warning and (key, plan.warning) not in self._warned:
            self._warned.add((key, plan.warning))
            log.warning(plan.warning, extra={"service": f"{key[0]}/{key[1]}"})
        return {g.frontend: g for g in plan.groups}

    def _plan_failed(self, key: ServiceKey, report: ReconcileReport,
                     e: Exception) -> dict[Frontend, GroupPlan] | None:
        message = f"Service {key[0]}/{key[1]}: planning failed, kept last good state: {e}"
        report.errors.append(message)
        log.error(message, extra={"service": f"{key[0]}/{key[1]}"})
        return None

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
        writer_status = getattr(self.writer, "status", None)  # test doubles may have none
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
                "pods": self.pods.status() if self.pods is not None else None,
                "capacity": {
                    "max_services": self.datapath.capacities.max_services,
                    "max_endpoints": self.datapath.capacities.max_endpoints,
                },
                "writer": writer_status() if writer_status is not None else None,
            },
            "not_programmed": self.not_programmed_status(),
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
                "steps": last.publish.steps,
                "left_out": len(last.publish.left_out),
                "errors": last.errors,
            },
        }

    def not_programmed_status(self) -> dict[str, Any]:
        """What the maps do not hold as planned: counted by reason, the first Services (by
        name) listed with each group's reason. Made again only when it changed: a status
        is written after every reconcile."""
        if self._np_status is not None:
            return self._np_status
        reasons: collections.Counter[str] = collections.Counter(
            e.reason for entries in self.not_programmed.values() for e in entries)
        listed = sorted(self.not_programmed)[:STATUS_LISTED]
        self._np_status = {
            "count": len(self.not_programmed),
            "groups": {reason: reasons[reason] for reason in REASONS},
            "services": {f"{ns}/{name}": [e.to_json() for e in self.not_programmed[(ns, name)]]
                         for ns, name in listed},
            "truncated": len(self.not_programmed) > len(listed),
        }
        return self._np_status

    def _write_status(self) -> None:
        if self.status is not None:
            self.status.write(self.status_dict())
            self._status_written = time.time()


def _tier_overflow(e: ValueError) -> bool:
    """The planner's BackendSet refused a tier beyond the u16 slot index (records.py says
    "a tier holds at most 65535 endpoints, got N")."""
    return "tier holds at most" in str(e)
