"""The agent's reconcile loop against a recording map writer (no kernel).

The writer here applies changes to a dict exactly as MapWriter's contract says (None removes a
group); the kernel side of that contract is tested in tests/kernel.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kmesh_plugin import hookimpl
from kmesh_plugin.agent.agent import Agent
from kmesh_plugin.agent.state import ClusterState
from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.datapath.records import (
    MODE_FAILOVER,
    MODE_RANDOM,
    Backend,
    BackendSet,
    Frontend,
)
from kmesh_plugin.datapath.writer import PublishStats
from kmesh_plugin.errors import DatapathError
from kmesh_plugin.hookspecs import PRIORITY_THIRD_PARTY, StrategySettings
from kmesh_plugin.model import Claim, LocalityLabels, Mode, Scope, Strategy
from kmesh_plugin.model.objects import object_key, parse
from kmesh_plugin.plugins import Plugins
from kmesh_plugin.sources.base import Batch, Event, Source

ZONE = "topology.kubernetes.io/zone"
REGION = "topology.kubernetes.io/region"


class RecordingWriter:
    def __init__(self) -> None:
        self.published: dict[Frontend, BackendSet] = {}
        self.fail_next: Exception | None = None
        self.calls: list[dict[Frontend, BackendSet | None]] = []

    def recover(self) -> int:
        return len(self.published)

    def publish(self, changes: Mapping[Frontend, BackendSet | None]) -> PublishStats:
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e
        stats = PublishStats()
        real = {f: b for f, b in changes.items() if self.published.get(f) != b}
        self.calls.append(dict(real))
        for frontend, backends in real.items():
            if backends is None:
                if self.published.pop(frontend, None) is not None:
                    stats.removed += 1
            else:
                stats.added += frontend not in self.published
                self.published[frontend] = backends
        return stats

    def sync(self, desired: Mapping[Frontend, BackendSet]) -> PublishStats:
        changes: dict[Frontend, BackendSet | None] = dict(desired)
        changes.update({f: None for f in self.published if f not in desired})
        return self.publish(changes)

    def slots_in_use(self) -> int:
        return sum(b.size for b in self.published.values())

    def slots_retired(self) -> int:
        return 0

    def collect(self) -> int:
        return 0

    def settle(self) -> None:
        pass

    def close(self) -> None:
        pass


class ListSource(Source):
    kind = "list"

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.closed = False

    def start(self) -> None:
        pass

    def next_batch(self, timeout: float) -> Batch | None:
        return self.batches.pop(0) if self.batches else None

    def close(self) -> None:
        self.closed = True


def node(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def service(name: str, ip: str, ns: str = "sample", **spec: Any) -> dict[str, Any]:
    annotations = spec.pop("annotations", {})
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}], **spec}}


def eps(svc: str, *members: tuple[str, str], ns: str = "sample",
        zone_hint: str | None = None) -> dict[str, Any]:
    hint = {} if zone_hint is None else {"zone": zone_hint}
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{svc}-x", "namespace": ns,
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [ip], "nodeName": n, "conditions": {"ready": True}, **hint}
                      for ip, n in members],
    }


def up(*objs: dict[str, Any]) -> list[Event]:
    return [Event(object_key(o), parse(o)) for o in objs]


def gone(obj: dict[str, Any]) -> Event:
    return Event(object_key(obj), None)


def fe(ip: str) -> Frontend:
    return Frontend(ipaddress.ip_address(ip), 80, socket.IPPROTO_TCP)


def be(ip: str) -> Backend:
    return Backend(ipaddress.ip_address(ip), 8080)


class Recorder:
    """A lifecycle plugin that records what it was told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    @hookimpl
    def kmesh_agent_started(self, node: Any, datapath: Any) -> None:
        self.seen.append(("started", node.name))

    @hookimpl
    def kmesh_node_locality_changed(self, node: Any, previous: Any, current: Any,
                                    is_local: bool) -> None:
        self.seen.append(("relabel", (node.name, previous.zone, current.zone, is_local)))

    @hookimpl
    def kmesh_agent_stopping(self, node: Any) -> None:
        self.seen.append(("stopping", node.name))


@pytest.fixture
def plugins() -> Plugins:
    return Plugins.load(["local", "prefer_close"])


def make_agent(plugins: Plugins, writer: RecordingWriter, source: ListSource | None = None,
               node_name: str = "w1") -> Agent:
    datapath = SimpleNamespace(pins=SimpleNamespace(root=Path("/sys/fs/bpf/x")), events=[],
                               capacities=Capacities(16, 64))
    return Agent(
        node_name=node_name,
        state=ClusterState(LocalityLabels(), node_name),
        plugins=plugins,
        settings=StrategySettings([Scope.NETWORK, Scope.REGION, Scope.ZONE, Scope.SUBZONE]),
        source=source or ListSource(),
        datapath=datapath,  # type: ignore[arg-type]
        cgroup="/sys/fs/cgroup/x",
        writer=writer,  # type: ignore[arg-type]
    )


WORLD = [
    node("w1", **{REGION: "r", ZONE: "z1"}),
    node("w2", **{REGION: "r", ZONE: "z1"}),
    node("w3", **{REGION: "r", ZONE: "z2"}),
]


def test_initial_sync_publishes_tiers_and_nothing_before_it(plugins: Plugins) -> None:
    writer = RecordingWriter()
    agent = make_agent(plugins, writer)
    objs = [*WORLD, service("hw", "198.19.0.10", trafficDistribution="PreferClose"),
            eps("hw", ("198.18.1.1", "w1"), ("198.18.2.1", "w2"), ("198.18.3.1", "w3"))]
    assert agent.handle(Batch(up(*objs), synced=False)) is None
    assert writer.calls == []  # not synced: never publish (and so never delete) early
    report = agent.handle(Batch([], synced=True))
    assert report is not None and report.full
    assert writer.published == {
        fe("198.19.0.10"): BackendSet(MODE_FAILOVER, (
            (be("198.18.1.1"), be("198.18.2.1")),  # same zone, subzone "" == ""
            (), (be("198.18.3.1"),), (), (),
        )),
    }


def test_relabel_of_own_node_recomputes_every_service(plugins: Plugins) -> None:
    writer = RecordingWriter()
    rec = Recorder()
    plugins.register(rec, "recorder")
    agent = make_agent(plugins, writer)
    agent.handle(Batch(up(*WORLD,
                          service("a", "198.19.0.10", trafficDistribution="PreferSameZone"),
                          eps("a", ("198.18.2.1", "w2"), ("198.18.3.1", "w3")),
                          service("b", "198.19.0.11", trafficDistribution="PreferSameZone"),
                          eps("b", ("198.18.2.2", "w2"), ("198.18.3.2", "w3"))), synced=True))
    assert writer.published[fe("198.19.0.10")].tiers[0] == (be("198.18.2.1"),)
    report = agent.handle(Batch(up(node("w1", **{REGION: "r", ZONE: "z2"}))))
    assert report is not None and report.full
    assert writer.published[fe("198.19.0.10")].tiers[0] == (be("198.18.3.1"),)
    assert writer.published[fe("198.19.0.11")].tiers[0] == (be("198.18.3.2"),)
    assert ("relabel", ("w1", "z1", "z2", True)) in rec.seen


def test_relabel_of_another_node_touches_only_its_services(plugins: Plugins) -> None:
    writer = RecordingWriter()
    agent = make_agent(plugins, writer)
    agent.handle(Batch(up(*WORLD,
                          service("a", "198.19.0.10", trafficDistribution="PreferSameZone"),
                          eps("a", ("198.18.2.1", "w2"), ("198.18.3.1", "w3")),
                          service("c", "198.19.0.12"), eps("c", ("198.18.1.9", "w1"))),
                       synced=True))
    report = agent.handle(Batch(up(node("w3", **{REGION: "r", ZONE: "z1"}))))
    assert report is not None and not report.full and report.services == 1
    assert writer.published[fe("198.19.0.10")].tiers[0] == (be("198.18.2.1"), be("198.18.3.1"))


def test_a_clusterip_port_claimed_twice_stays_with_its_holder(plugins: Plugins) -> None:
    writer = RecordingWriter()
    agent = make_agent(plugins, writer)
    agent.handle(Batch(up(*WORLD, service("a", "198.19.0.10"), eps("a", ("198.18.1.1", "w1"))),
                       synced=True))
    report = agent.handle(Batch(up(service("0-early", "198.19.0.10"),
                                   eps("0-early", ("198.18.9.9", "w2")))))
    assert report is not None
    assert report.errors == [
        "Service sample/0-early: 198.19.0.10:80/TCP is already used by Service sample/a; "
        "ignoring it here"
    ]
    assert writer.published[fe("198.19.0.10")] == BackendSet(MODE_RANDOM, ((be("198.18.1.1"),),))


def _two_services_on_one_frontend(agent: Agent) -> None:
    """sample/a holds 198.19.0.10:80; sample/0-early wants it too and is refused."""
    agent.handle(Batch(up(*WORLD, service("a", "198.19.0.10"), eps("a", ("198.18.1.1", "w1"))),
                       synced=True))
    agent.handle(Batch(up(service("0-early", "198.19.0.10"),
                          eps("0-early", ("198.18.9.9", "w2")))))


def test_a_released_frontend_goes_to_the_refused_service_in_the_same_reconcile(
    plugins: Plugins,
) -> None:
    writer = RecordingWriter()
    agent = make_agent(plugins, writer)
    _two_services_on_one_frontend(agent)
    report = agent.handle(Batch([gone(service("a", "198.19.0.10"))]))
    assert report is not None and report.errors == []
    early = BackendSet(MODE_RANDOM, ((be("198.18.9.9"),),))
    assert writer.published[fe("198.19.0.10")] == early
    # One write switches the frontend over: no moment in which it is missing.
    assert writer.calls[-1] == {fe("198.19.0.10"): early}
    # The new holder keeps it from now on.
    report = agent.handle(Batch(up(service("a", "198.19.0.10"))))
    assert report is not None
    assert report.errors == [
        "Service sample/a: 198.19.0.10:80/TCP is already used by Service sample/0-early; "
        "ignoring it here"
    ]
    assert writer.published[fe("198.19.0.10")] == early


def test_a_frontend_refused_at_the_initial_sync_is_taken_over_later(plugins: Plugins) -> None:
    writer = RecordingWriter()
    agent = make_agent(plugins, writer)
    report = agent.handle(Batch(up(*WORLD, service("a", "198.19.0.10"),
                                   eps("a", ("198.18.1.1", "w1")), service("b", "198.19.0.10"),
                                   eps("b", ("198.18.2.2", "w2"))), synced=True))
    assert report is not None and report.full
    assert report.errors == [
        "Service sample/b: 198.19.0.10:80/TCP is already used by Service sample/a; "
        "ignoring it here"
    ]
    agent.handle(Batch([gone(service("a", "198.19.0.10"))]))
    assert writer.published == {fe("198.19.0.10"): BackendSet(MODE_RANDOM,
                                                              ((be("198.18.2.2"),),))}


def test_a_holder_that_moves_away_hands_the_frontend_over(plugins: Plugins) -> None:
    writer = RecordingWriter()
    agent = make_agent(plugins, writer)
    _two_services_on_one_frontend(agent)
    report = agent.handle(Batch(up(service("a", "198.19.0.20"))))
    assert report is not None and report.errors == []
    assert writer.published == {
        fe("198.19.0.10"): BackendSet(MODE_RANDOM, ((be("198.18.9.9"),),)),
        fe("198.19.0.20"): BackendSet(MODE_RANDOM, ((be("198.18.1.1"),),)),
    }


def test_a_takeover_whose_publish_failed_happens_on_the_retry(plugins: Plugins) -> None:
    writer = RecordingWriter()
    agent = make_agent(plugins, writer)
    _two_services_on_one_frontend(agent)
    before = dict(writer.published)
    writer.fail_next = DatapathError("datapath.max_services is 16")
    report = agent.handle(Batch([gone(service("a", "198.19.0.10"))]))
    assert report is not None and report.failed
    assert writer.published == before
    agent._retry_at = 0.0  # the backoff has passed
    retry = agent.handle(Batch())
    assert retry is not None and not retry.failed
    assert writer.published == {fe("198.19.0.10"): BackendSet(MODE_RANDOM,
                                                              ((be("198.18.9.9"),),))}


def test_an_endpoint_follows_its_node_as_the_node_appears_and_goes(plugins: Plugins) -> None:
    # SPEC.md section 2: an endpoint's locality is its node's; a node the agent has no
    # object for has no labels. The slice's zone hint is not used: with it, w9's endpoint
    # would count as zone z1 while w9 is unknown, and again after its Node is deleted.
    writer = RecordingWriter()
    agent = make_agent(plugins, writer, node_name="w4")
    agent.handle(Batch(up(node("w4", **{ZONE: "z1"}),  # a client without a region label
                          service("a", "198.19.0.10", trafficDistribution="PreferSameZone"),
                          eps("a", ("198.18.9.1", "w9"), zone_hint="z1")), synced=True))
    unknown_node = ((), (be("198.18.9.1"),), (), ())  # zone "" != z1: tier 1
    assert writer.published[fe("198.19.0.10")].tiers == unknown_node
    report = agent.handle(Batch(up(node("w9", **{ZONE: "z1"}))))
    assert report is not None and report.services == 1
    assert writer.published[fe("198.19.0.10")].tiers == ((be("198.18.9.1"),), (), (), ())
    agent.handle(Batch([gone(node("w9"))]))
    assert writer.published[fe("198.19.0.10")].tiers == unknown_node


class BuddyRanker:
    """A third party's strategy that ranks by a label that is no locality label: tier 0 is
    the endpoint on the node that the client node's ``example.com/buddy`` label names."""

    @hookimpl
    def kmesh_strategy_claim(self) -> Claim:
        return Claim(Strategy("Buddy", Mode.FAILOVER, (), "test"), PRIORITY_THIRD_PARTY)

    @hookimpl
    def kmesh_endpoint_tiers(self, strategy: Strategy, client: Any,
                             endpoints: Any) -> list[int | None] | None:
        if strategy.name != "Buddy":
            return None
        buddy = client.labels.get("example.com/buddy")
        return [0 if e.node == buddy else 1 for e in endpoints]


def test_own_node_relabel_of_a_non_locality_label_recomputes_every_service(
    plugins: Plugins,
) -> None:
    writer = RecordingWriter()
    rec = Recorder()
    plugins.register(rec, "recorder")
    plugins.register(BuddyRanker(), "buddy")
    agent = make_agent(plugins, writer)
    me = {REGION: "r", ZONE: "z1"}
    agent.handle(Batch(up(node("w1", **me, **{"example.com/buddy": "w2"}), *WORLD[1:],
                          service("a", "198.19.0.10"),
                          eps("a", ("198.18.2.1", "w2"), ("198.18.3.1", "w3"))), synced=True))
    assert writer.published[fe("198.19.0.10")].tiers == ((be("198.18.2.1"),),
                                                          (be("198.18.3.1"),))
    rec.seen.clear()
    report = agent.handle(Batch(up(node("w1", **me, **{"example.com/buddy": "w3"}))))
    assert report is not None and report.full
    assert writer.published[fe("198.19.0.10")].tiers == ((be("198.18.3.1"),),
                                                          (be("198.18.2.1"),))
    # The locality did not change: the locality hook stays silent.
    assert rec.seen == []


class Exploding:
    @hookimpl
    def kmesh_strategy_claim(self, service: Any) -> None:
        if service.name == "bad":
            raise RuntimeError("plugin bug")


def test_a_failing_plugin_keeps_the_last_good_state_of_that_service(plugins: Plugins) -> None:
    writer = RecordingWriter()
    agent = make_agent(plugins, writer)
    agent.handle(Batch(up(*WORLD, service("bad", "198.19.0.10"),
                          eps("bad", ("198.18.1.1", "w1"))), synced=True))
    before = dict(writer.published)
    plugins.register(Exploding(), "exploding")
    report = agent.handle(Batch(up(eps("bad", ("198.18.2.2", "w2")),
                                   service("good", "198.19.0.11"),
                                   eps("good", ("198.18.3.3", "w3")))))
    assert report is not None
    assert any("Service sample/bad: planning failed" in e and "plugin bug" in e
               for e in report.errors)
    assert writer.published[fe("198.19.0.10")] == before[fe("198.19.0.10")]
    assert fe("198.19.0.11") in writer.published


def test_a_failed_publish_changes_nothing_and_is_retried(plugins: Plugins) -> None:
    writer = RecordingWriter()
    agent = make_agent(plugins, writer)
    agent.handle(Batch(up(*WORLD, service("a", "198.19.0.10"), eps("a", ("198.18.1.1", "w1"))),
                       synced=True))
    writer.fail_next = DatapathError("datapath.max_endpoints is 64")
    report = agent.handle(Batch(up(eps("a", ("198.18.1.1", "w1"), ("198.18.2.1", "w2")))))
    assert report is not None and report.errors[0].startswith("publish failed, retrying")
    assert writer.published[fe("198.19.0.10")].size == 1
    assert report.failed
    # The failed Service is retried, after a backoff, with no new event.
    agent._retry_at = 0.0  # the backoff has passed
    assert agent.retry_due()
    retry = agent.handle(Batch())
    assert retry is not None and not retry.failed
    assert writer.published[fe("198.19.0.10")].size == 2
    assert not agent.retry_due()


def test_unknown_annotation_warns_once(plugins: Plugins, caplog: pytest.LogCaptureFixture) -> None:
    writer = RecordingWriter()
    agent = make_agent(plugins, writer)
    svc = service("a", "198.19.0.10",
                  annotations={"networking.istio.io/traffic-distribution": "Nearby"})
    with caplog.at_level(logging.WARNING):
        agent.handle(Batch(up(*WORLD, svc, eps("a", ("198.18.1.1", "w1"))), synced=True))
        agent.handle(Batch(up(eps("a", ("198.18.2.1", "w2")))))
        agent.handle(Batch(up(eps("a", ("198.18.3.1", "w3")))))
    warnings = [r for r in caplog.records if "unknown value 'Nearby'" in r.getMessage()]
    assert len(warnings) == 1
    assert writer.published[fe("198.19.0.10")].mode == MODE_RANDOM


def test_run_notifies_start_and_stop_and_closes_the_source(plugins: Plugins) -> None:
    writer = RecordingWriter()
    rec = Recorder()
    plugins.register(rec, "recorder")
    source = ListSource()
    agent = make_agent(plugins, writer, source)

    class StopAfterSync(Source):
        kind = "wrapper"

        def start(self) -> None:
            pass

        def next_batch(self, timeout: float) -> Batch | None:
            agent.stop()
            return Batch(up(*WORLD), synced=True, revision="7")

        def close(self) -> None:
            source.close()

    agent.source = StopAfterSync()
    agent.run()
    assert rec.seen[0] == ("started", "w1") and rec.seen[-1] == ("stopping", "w1")
    assert source.closed
    assert agent.revision == "7" and agent.synced


def many_eps(svc: str, count: int) -> dict[str, Any]:
    return eps(svc, *[(f"198.18.{i // 256}.{i % 256}", "w1") for i in range(count)])


def test_a_tier_beyond_the_slot_index_is_an_error_of_that_service_alone(
    plugins: Plugins, caplog: pytest.LogCaptureFixture
) -> None:
    writer = RecordingWriter()
    agent = make_agent(plugins, writer)
    with caplog.at_level(logging.ERROR):
        report = agent.handle(Batch(up(*WORLD, service("a", "198.19.0.10"),
                                       eps("a", ("198.18.1.1", "w1")),
                                       service("big", "198.19.0.11"),
                                       many_eps("big", 65536)), synced=True))
    assert report is not None and report.full and not report.failed
    assert report.errors == [
        "Service sample/big: not programmed: a tier holds at most 65535 endpoints, got 65536 "
        "(a tier of the datapath holds at most 65535 endpoints: its slot index is 16 bits)"
    ]
    assert set(writer.published) == {fe("198.19.0.10")}  # the rest is programmed
    st = agent.status_dict()["not_programmed"]
    assert st["count"] == 1 and st["groups"]["tier_too_large"] == 1
    assert st["services"]["sample/big"][0]["reason"] == "tier_too_large"
    assert any("sample/big (tier_too_large)" in r.getMessage() for r in caplog.records)
    # Once it shrinks under the limit, it is programmed like any other.
    report = agent.handle(Batch(up(many_eps("big", 3))))
    assert report is not None and report.errors == []
    assert writer.published[fe("198.19.0.11")].size == 3
    assert agent.status_dict()["not_programmed"]["count"] == 0


class RoomWriter(RecordingWriter):
    """RecordingWriter with room for ``groups`` groups: what does not fit is left out, as
    MapWriter does (every removal applied first)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.hold_up: set[Frontend] = set()  # updates left out once for a grace period

    def publish(self, changes: Mapping[Frontend, BackendSet | None]) -> PublishStats:
        from kmesh_plugin.datapath.writer import GRACE_PERIOD, MAX_SERVICES, LeftOut

        removes: dict[Frontend, BackendSet | None] = {
            f: None for f, b in changes.items() if b is None}
        stats = super().publish(removes) if removes else PublishStats()
        left = {}
        fitting: dict[Frontend, BackendSet | None] = {}
        for f, b in changes.items():
            if b is None:
                continue
            if f in self.hold_up and f in self.published:
                self.hold_up.discard(f)
                left[f] = LeftOut(GRACE_PERIOD, "its inactive set awaits a grace period",
                                  b.size, 0, True)
            elif f not in self.published and len(self.published) + sum(
                    g not in self.published for g in fitting) >= self.groups:
                left[f] = LeftOut(MAX_SERVICES, "no service group free", b.size, 1, False)
            else:
                fitting[f] = b
        more = super().publish(fitting) if fitting else PublishStats()
        more.removed += stats.removed
        more.left_out = left
        return more

    def headroom(self) -> tuple[int, int]:
        return self.groups - len(self.published), 1000


def test_groups_left_out_for_room_are_named_and_written_once_room_frees(
    plugins: Plugins,
) -> None:
    writer = RoomWriter(groups=2)
    agent = make_agent(plugins, writer)
    report = agent.handle(Batch(up(*WORLD, service("a", "198.19.0.10"),
                                   eps("a", ("198.18.1.1", "w1")),
                                   service("b", "198.19.0.11"), eps("b", ("198.18.1.2", "w1")),
                                   service("c", "198.19.0.12"), eps("c", ("198.18.1.3", "w1"))),
                               synced=True))
    assert report is not None and not report.failed  # was: the whole sync refused, retried
    assert set(writer.published) == {fe("198.19.0.10"), fe("198.19.0.11")}
    assert report.errors == ["Service sample/c: 198.19.0.12:80/TCP not programmed "
                             "(max_services): no service group free"]
    st = agent.status_dict()
    assert st["not_programmed"]["services"] == {"sample/c": [{
        "frontend": "198.19.0.12:80/TCP", "reason": "max_services",
        "detail": "no service group free", "stale": False}]}
    assert st["last_reconcile"]["left_out"] == 1
    assert not agent.retry_due()  # waiting for room, not retried in a loop
    # A deletion frees a group: c is written in the same reconcile.
    report = agent.handle(Batch([gone(service("a", "198.19.0.10"))]))
    assert report is not None and report.errors == []
    assert set(writer.published) == {fe("198.19.0.11"), fe("198.19.0.12")}
    assert writer.calls[-2] == {fe("198.19.0.10"): None}  # the deletion went first
    assert agent.status_dict()["not_programmed"]["count"] == 0


def test_a_change_held_up_by_a_grace_period_is_retried_with_backoff(plugins: Plugins) -> None:
    writer = RoomWriter(groups=10)
    agent = make_agent(plugins, writer)
    agent.handle(Batch(up(*WORLD, service("a", "198.19.0.10"), eps("a", ("198.18.1.1", "w1"))),
                       synced=True))
    writer.hold_up = {fe("198.19.0.10")}
    report = agent.handle(Batch(up(eps("a", ("198.18.1.1", "w1"), ("198.18.2.1", "w2")))))
    assert report is not None and not report.failed
    assert writer.published[fe("198.19.0.10")].size == 1  # the last set stays meanwhile
    entry = agent.status_dict()["not_programmed"]["services"]["sample/a"][0]
    assert entry["reason"] == "grace_period" and entry["stale"] is True
    assert not agent.retry_due()  # after a backoff
    agent._retry_at = 0.0  # the backoff has passed
    assert agent.retry_due()
    retry = agent.handle(Batch())
    assert retry is not None and not retry.failed
    assert writer.published[fe("198.19.0.10")].size == 2
    assert agent.status_dict()["not_programmed"]["count"] == 0
    assert not agent.retry_due()
