"""Prometheus metrics of the agent (prometheus-client), served on plugin.toml's metrics port.

Connect counters come from the kernel's per-CPU counters, read and summed at scrape time and
labelled with the Service they belong to; nothing is counted in Python per connection. A
service group's counters restart from zero when the group is removed and its id reused, which
Prometheus' rate() treats as the counter reset it is.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kmesh_plugin import __version__
from kmesh_plugin.datapath import inspect
from kmesh_plugin.datapath.loader import Datapath

if TYPE_CHECKING:
    from kmesh_plugin.agent.agent import Agent

log = logging.getLogger(__name__)

GROUP_LABELS = ["namespace", "service", "port", "family"]
RECONCILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0, 30.0)


class AgentMetrics:
    def __init__(self, node: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._kernel: KernelCollector | None = None
        self.reconcile_seconds = Histogram(
            "kmesh_reconcile_duration_seconds",
            "Time from a batch of cluster changes to the maps holding them.",
            ["kind"], buckets=RECONCILE_BUCKETS, registry=self.registry,
        )
        self.reconciles = Counter(
            "kmesh_reconciles_total", "Reconciles by kind (full, partial) and result.",
            ["kind", "result"], registry=self.registry,
        )
        self.source_events = Counter(
            "kmesh_source_events_total", "Object changes the cluster source delivered.",
            ["kind", "action"], registry=self.registry,
        )
        self.source_errors = Counter(
            "kmesh_source_errors_total",
            "Input the source rejected (a broken manifest); the last good state was kept.",
            registry=self.registry,
        )
        self.synced = Gauge(
            "kmesh_source_synced", "1 once the source delivered its complete initial state.",
            registry=self.registry,
        )
        info = Gauge("kmesh_agent_info", "The agent's node and version.", ["node", "version"],
                     registry=self.registry)
        info.labels(node, __version__).set(1)
        self.url: str | None = None
        self._server = None

    def attach(self, agent: Agent) -> None:
        """Export the agent's kernel counters and map fill levels from now on."""
        self._kernel = KernelCollector(agent)
        self.registry.register(self._kernel)
        self.registry.register(SourceCollector(agent))
        self.registry.register(ProgrammingCollector(agent))
        agent.metrics = self

    def serve(self, address: str, port: int) -> str:
        """Start the HTTP endpoint (port 0 picks a free one); returns its URL."""
        server, _thread = start_http_server(port, address, registry=self.registry)
        self._server = server
        host = f"[{address}]" if ":" in address else address
        self.url = f"http://{host}:{server.server_port}/metrics"
        log.info("metrics at %s", self.url)
        return self.url

    def close(self) -> None:
        if self._kernel is not None:
            self._kernel.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class KernelCollector(Collector):
    """Reads the datapath's counters and map fill levels at scrape time."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._reader: Datapath | None = None  # read-only handles on the agent's pins
        self._reading: Datapath | None = None  # the agent datapath they were opened for
        self._open_lock = threading.Lock()  # scrapes run on the HTTP server's threads

    def reader(self) -> Datapath:
        """The scrape reads through maps opened with BPF_F_RDONLY: whatever the HTTP thread
        does, the kernel refuses a write through them."""
        dp = self.agent.datapath
        with self._open_lock:
            if self._reading is not dp or self._reader is None:
                self._close()
                self._reader, self._reading = Datapath.open(dp.pins.root, read_only=True), dp
            return self._reader

    def close(self) -> None:
        with self._open_lock:
            self._close()

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = self._reading = None

    def collect(self) -> Iterator[Metric]:
        connects = CounterMetricFamily(
            "kmesh_connects", "connect() calls translated, by Service and tier (0 is closest).",
            labels=[*GROUP_LABELS, "tier"],
        )
        refusals = CounterMetricFamily(
            "kmesh_connect_refusals",
            "connect() calls refused with ECONNREFUSED: no eligible endpoint.",
            labels=GROUP_LABELS,
        )
        entries = GaugeMetricFamily("kmesh_map_entries", "Entries in use per BPF map.",
                                    labels=["map"])
        capacity = GaugeMetricFamily("kmesh_map_capacity", "max_entries per BPF map.",
                                     labels=["map"])
        with self.agent.lock:  # the reconcile loop mutates these; copy under the lock
            published = dict(self.agent.writer.published)
            used = self.agent.writer.entries()
            owners = {
                frontend: (key, plan.port.name or str(plan.port.port), plan.family)
                for key, groups in self.agent.groups_of.items()
                for frontend, plan in groups.items()
            }
        dp = self.reader()
        stats = inspect.read_stats(dp, [p.sid for p in published.values()])
        for frontend, p in published.items():
            owner = owners.get(frontend)
            if owner is None:
                continue
            (ns, name), port, family = owner
            labels = [ns, name, port, f"IPv{family}"]
            refused = 0
            for tier, s in sorted(stats.get(p.sid, {}).items()):
                connects.add_metric([*labels, str(tier)], s.hits)
                refused += s.refused
            refusals.add_metric(labels, refused)
        for name in sorted(used):
            entries.add_metric([name], used[name])
            capacity.add_metric([name], dp[name].max_entries)
        yield from (connects, refusals, entries, capacity)


class ProgrammingCollector(Collector):
    """What the maps do not hold as planned (capacity, a tier too large, a grace period that
    holds a change up), and the grace period barrier's errors; read at scrape time."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        from kmesh_plugin.agent.agent import REASONS

        services = GaugeMetricFamily(
            "kmesh_services_not_programmed",
            "Services the maps do not hold (fully) as planned; see kmesh_groups_not_programmed "
            "and the status file's not_programmed for which and why.",
        )
        groups = GaugeMetricFamily(
            "kmesh_groups_not_programmed",
            "Service groups (one per Service port and IP family; a whole Service for "
            "tier_too_large) left out of the maps, by reason: max_endpoints, max_services, "
            "tier_too_large, grace_period.",
            labels=["reason"],
        )
        with self.agent.lock:
            counts = collections.Counter(e.reason for entries in
                                         self.agent.not_programmed.values() for e in entries)
            services.add_metric([], len(self.agent.not_programmed))
        for reason in REASONS:
            groups.add_metric([reason], counts[reason])
        yield from (services, groups)
        grace = getattr(self.agent.writer, "grace", None)
        if grace is not None:
            errors = CounterMetricFamily(
                "kmesh_grace_barrier_errors",
                "RCU grace period barriers the kernel refused (each retried with backoff; "
                "retired sets are reclaimed later meanwhile).",
            )
            errors.add_metric([], grace.errors)
            yield errors


class SourceCollector(Collector):
    """The API source's reflectors, read at scrape time: errors by reason, relists, watches.

    Sources without reflectors (the manifest directory) export nothing here."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        resources = self.agent.source.describe().get("resources")
        if not isinstance(resources, dict):
            return
        errors = CounterMetricFamily(
            "kmesh_source_api_errors",
            "Failed requests to the API server, by resource and reason (retried with backoff).",
            labels=["resource", "reason"],
        )
        relists = CounterMetricFamily(
            "kmesh_source_relists",
            "Lists after the first (410 Gone: the watch history was compacted away).",
            labels=["resource"],
        )
        watches = CounterMetricFamily("kmesh_source_watches", "Watch requests opened.",
                                      labels=["resource"])
        up = GaugeMetricFamily(
            "kmesh_source_api_up",
            "1 while the resource's last request to the API server succeeded.",
            labels=["resource"],
        )
        for plural, r in sorted(resources.items()):
            for reason, count in sorted((r.get("errors") or {}).items()):
                errors.add_metric([plural, reason], count)
            relists.add_metric([plural], r.get("relists") or 0)
            watches.add_metric([plural], r.get("watches") or 0)
            up.add_metric([plural], 0 if r.get("failing_since") else 1)
        yield from (errors, relists, watches, up)
