"""The capacity guarantee, through a real agent on the real datapath.

More Services and endpoints than the configured capacity: the Services that fit are programmed
and answer, the others are named in the log, the status and the metrics with the reason, the
maps hold nothing half-written, every deletion reaches the kernel, and once a deletion frees
room the left-out Services are written. A tier above the u16 slot index is an error of that
Service alone.
"""

from __future__ import annotations

import collections
import errno
import logging
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from datapath_bed import Bed, kernel_view, retired_keys_settled

from kmesh_plugin.agent.agent import Agent
from kmesh_plugin.agent.metrics import AgentMetrics
from kmesh_plugin.agent.state import ClusterState
from kmesh_plugin.agent.status import StatusFile
from kmesh_plugin.datapath import records
from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.datapath.records import Backend, Frontend, parse_ip
from kmesh_plugin.errors import BpfError
from kmesh_plugin.hookspecs import StrategySettings
from kmesh_plugin.model import LocalityLabels, Scope
from kmesh_plugin.model.objects import object_key, parse
from kmesh_plugin.ops import status as ops_status
from kmesh_plugin.plugins import Plugins
from kmesh_plugin.sources.base import Batch, Event, Source

pytestmark = pytest.mark.kernel

CAPS = Capacities(max_services=10, max_endpoints=48)
NS = "cap"


class ListSource(Source):
    kind = "list"

    def start(self) -> None:
        pass

    def next_batch(self, timeout: float) -> Batch | None:
        return None

    def close(self) -> None:
        pass


def service(name: str, cluster_ip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
            "spec": {"clusterIP": cluster_ip,
                     "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}


def endpoints(name: str, addresses: list[str]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [{"addresses": [a], "nodeName": "w1", "conditions": {"ready": True}}
                          for a in addresses]}


def up(*objs: dict[str, Any]) -> list[Event]:
    return [Event(object_key(o), parse(o)) for o in objs]


def gone(*objs: dict[str, Any]) -> list[Event]:
    return [Event(object_key(o), None) for o in objs]


class World:
    """The Services of the test: name -> (ClusterIP, endpoint addresses)."""

    def __init__(self) -> None:
        self.services: dict[str, tuple[str, list[str]]] = {}

    def add(self, name: str, cluster_ip: str, addresses: list[str]) -> list[Event]:
        self.services[name] = (cluster_ip, addresses)
        return up(service(name, cluster_ip), endpoints(name, addresses))

    def delete(self, *names: str) -> list[Event]:
        events = []
        for name in names:
            cluster_ip, addresses = self.services.pop(name)
            events += gone(service(name, cluster_ip), endpoints(name, addresses))
        return events

    def frontend(self, name: str) -> Frontend:
        return Frontend(parse_ip(self.services[name][0]), 53, socket.IPPROTO_UDP)


@pytest.fixture
def bed(pin_dir: Path, cgroup: Path, netns: str, build_dir: Path) -> Iterator[Bed]:
    b = Bed(pin_dir, cgroup, netns, build_dir, capacities=CAPS)
    try:
        # Every endpoint address is local in the namespace: a UDP connect needs a route only.
        subprocess.run(["ip", "-n", netns, "route", "add", "local", "198.18.0.0/16", "dev",
                        "lo"], check=True)
        yield b
    finally:
        b.close()


def addresses(block: int, count: int) -> list[str]:
    return [f"198.18.{block}.{i}" for i in range(1, count + 1)]


def test_more_than_the_capacity_programs_what_fits_and_names_the_rest(
    bed: Bed, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    status = StatusFile(tmp_path / "status.json")
    agent = Agent(
        node_name="w1", state=ClusterState(LocalityLabels(), "w1"),
        plugins=Plugins.load(["local", "prefer_close"]),
        settings=StrategySettings([Scope.NETWORK, Scope.REGION, Scope.ZONE, Scope.SUBZONE]),
        source=ListSource(), datapath=bed.dp, cgroup=bed.cgroup, status=status,
        writer=bed.writer,
    )
    metrics = AgentMetrics("w1")
    metrics.attach(agent)
    client = bed.client()
    world = World()

    def gauge(name: str, **labels: str) -> float:
        value = metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def check(phase: str, programmed: set[str], left_out: dict[str, str],
              stale: dict[str, list[str]] | None = None) -> None:
        """The maps hold exactly the programmed Services (and the stale ones' last sets),
        completely; connects reach them; the left-out ones are named everywhere."""
        stale = stale or {}
        st = status.read()
        named = {s: entries[0]["reason"]
                 for s, entries in st["not_programmed"]["services"].items()}
        assert named == {f"{NS}/{s}": r for s, r in left_out.items()}, named
        assert st["not_programmed"]["count"] == len(left_out)
        # `kmesh-plugin status` names each of them, with its reason.
        health = ops_status._agent_health(st)
        shown = ops_status.render_status({"node": "w1", "config": "-", "agent": health,
                                          "datapath": {"problem": "not read here"}})
        for s, reason in left_out.items():
            assert f"not programmed: {NS}/{s}" in shown and f"({reason})" in shown, shown
        assert (f"{len(left_out)} Service(s) not (fully) programmed" in " ".join(
            health["warnings"])) == bool(left_out)
        assert gauge("kmesh_services_not_programmed") == len(left_out)
        reasons = collections.Counter(left_out.values())
        for reason in ("max_endpoints", "max_services", "tier_too_large", "grace_period"):
            assert gauge("kmesh_groups_not_programmed", reason=reason) == reasons[reason]
        # Nothing half-written: read the maps back.
        bed.writer.settle()
        view = kernel_view(bed.dp.maps)
        assert retired_keys_settled(bed.writer, bed.dp.maps) == []
        want = {}
        for name in programmed | set(stale):
            addrs = stale.get(name, world.services.get(name, ("", []))[1])
            want[world.frontend(name) if name in world.services else None] = sorted(
                Backend(a, 5353) for a in addrs)
        got = {f: sorted(b for t in p.backends.tiers for b in t) if p.backends else None
               for f, p in view["table"].items()}
        assert got == want, (got, want)
        assert view["vips"] == {f.ip for f in want if f is not None}
        # Connect to every Service of the world.
        counted: collections.Counter[str] = collections.Counter()
        for name, (cluster_ip, addrs) in sorted(world.services.items()):
            if len(addrs) > 1000:
                continue  # the oversized Service: never programmed, nothing to probe
            results = client.connect(cluster_ip, 53, proto="udp", count=10)
            if name in programmed or name in stale:
                allowed = {f"{a}:5353" for a in stale.get(name, addrs)}
                if allowed:
                    assert all(r["ok"] for r in results), (name, results[:2])
                    assert {r["endpoint"] for r in results} <= allowed, name
                    counted["answered"] += len(results)
                else:  # programmed without endpoints: refused at once, never leaked
                    assert {r["errno"] for r in results} == {"ECONNREFUSED"}, name
                    counted["refused (no endpoints)"] += len(results)
            else:
                assert {r["errno"] for r in results} == {"ENETUNREACH"}, name
                counted["untranslated (left out)"] += len(results)
        slots = sum(len(v) for v in view["slots"].values())
        print(f"[{phase}] {len(world.services)} Services, "
              f"{sum(len(a) for _, a in world.services.values())} endpoints tried against "
              f"max_services={CAPS.max_services} max_endpoints={CAPS.max_endpoints}: "
              f"{len(view['table'])} groups / {slots} slots in the maps "
              f"({len(stale)} stale), left out {dict(sorted(left_out.items()))}; "
              f"connects {dict(counted)}")

    with caplog.at_level(logging.INFO):
        # Phase 1, the initial full sync: 17 Services, 65,614 endpoints into 10 groups and
        # 48 slots. By name: big (30) and s00..s05 (18) fill the slots, s06..s09 find none,
        # z0..z2 (no endpoints) take the last three groups, z3 and z4 find no group; `huge`
        # has one tier of 65,536 endpoints, more than a slot index counts.
        events = world.add("big", "198.19.1.1", addresses(1, 30))
        for i in range(10):
            events += world.add(f"s{i:02}", f"198.19.2.{i + 1}", addresses(10 + i, 3))
        for i in range(5):
            events += world.add(f"z{i}", f"198.19.3.{i + 1}", [])
        huge = [f"198.18.{i // 256}.{i % 256}" for i in range(65536)]
        events += world.add("huge", "198.19.4.1", huge)
        report = agent.handle(Batch(events, synced=True))
        assert report is not None and report.full and not report.failed
        left = {**{f"s{i:02}": "max_endpoints" for i in range(6, 10)},
                "z3": "max_services", "z4": "max_services", "huge": "tier_too_large"}
        check("full sync", {"big", *(f"s{i:02}" for i in range(6)), "z0", "z1", "z2"}, left)
        logged = "\n".join(r.getMessage() for r in caplog.records
                           if r.levelno >= logging.WARNING)
        for name in left:
            assert f"{NS}/{name}" in logged, (name, logged)
        assert "65536" in logged and "65535" in logged
        assert not any("planning failed" in e for e in report.errors), report.errors

        # Phase 2: deleting big and z0..z2 frees 30 slots and 4 groups: s06..s09 are written
        # in the same reconcile; z3 and z4 still find no group.
        report = agent.handle(Batch(world.delete("big", "z0", "z1", "z2")))
        assert report is not None and not report.failed
        left = {"z3": "max_services", "z4": "max_services", "huge": "tier_too_large"}
        check("deleted big, z0..z2", {f"s{i:02}" for i in range(10)}, left)

        # Phase 3: s02 grows to 20 endpoints with 18 slots free: its update is left out and
        # its last set stays in the maps (stale, named); the other Services are untouched.
        before = world.services["s02"][1]
        report = agent.handle(Batch(world.add("s02", "198.19.2.3", addresses(12, 20))))
        assert report is not None and not report.failed
        left["s02"] = "max_endpoints"
        check("s02 grew", {f"s{i:02}" for i in range(10)} - {"s02"}, left, stale={"s02": before})
        st = status.read()
        assert st["not_programmed"]["services"][f"{NS}/s02"][0]["stale"] is True

        # Phase 4: deleting s00 and s01 frees 6 slots and 2 groups: s02's new set and z3, z4
        # are written. Only `huge` is left out.
        report = agent.handle(Batch(world.delete("s00", "s01")))
        assert report is not None and not report.failed
        left = {"huge": "tier_too_large"}
        check("deleted s00, s01", {*(f"s{i:02}" for i in range(2, 10)), "z3", "z4"}, left)

        # Phase 5: `huge` goes; nothing is left out.
        report = agent.handle(Batch(world.delete("huge")))
        assert report is not None and not report.failed
        check("deleted huge", {*(f"s{i:02}" for i in range(2, 10)), "z3", "z4"}, {})

    # The scrapes above read the counters through maps the kernel will not let them write.
    reader = metrics._kernel.reader() if metrics._kernel else None
    assert reader is not None and reader.read_only
    with pytest.raises(BpfError) as refused:
        reader[records.MAP_VIPS].update(records.vip_key(parse_ip("198.19.9.9")), b"\1")
    assert refused.value.errno == errno.EPERM
    metrics.close()


def test_a_change_that_does_not_fit_at_once_goes_group_by_group(bed: Bed) -> None:
    """Eight groups of 4 endpoints (32 of 48 slots) all grow to 5: each needs its new set
    beside its old one, so a few fit per step, each step after the grace period of the one
    before; ``max_steps`` bounds one publish and the next goes on where it stopped. Then they
    all grow to 6 (48 in all): the last ones never find 6 free slots beside their old 5, and
    are left out with their old sets in place."""
    from datapath_bed import tiers

    from kmesh_plugin.datapath.records import MODE_RANDOM

    def table(n: int) -> dict[Frontend, Any]:
        return {Frontend(parse_ip(f"198.19.5.{i + 1}"), 53, socket.IPPROTO_UDP):
                tiers([Backend(f"198.18.5.{10 * i + j + 1}", 5353) for j in range(n)],
                      mode=MODE_RANDOM) for i in range(8)}

    def publish_until_done(frm: dict[Frontend, Any], to: dict[Frontend, Any]) -> list[Any]:
        rounds = []
        while len(rounds) < 10:
            stats = bed.writer.publish(to)
            now = {f: p.backends for f, p in kernel_view(bed.dp.maps)["table"].items()}
            # Every group is whole, and either its old or its new set.
            assert all(now[f] in (frm[f], to[f]) for f in to), now
            rounds.append((stats.steps, stats.updated, len(stats.left_out)))
            if not stats.left_out or not stats.updated:
                return rounds
            assert all("written next" in lo.detail for lo in stats.left_out.values()), \
                stats.left_out
        raise AssertionError(rounds)

    assert not bed.writer.publish(table(4)).left_out
    bed.writer.max_steps = 2  # type: ignore[attr-defined]
    rounds = publish_until_done(table(4), table(5))
    print(f"8 groups growing 4 -> 5 endpoints, 16 of 48 slots free, 2 steps per publish: "
          f"(steps, updated, left out) per publish {rounds}")
    assert rounds == [(2, 5, 3), (2, 3, 0)]
    now = {f: p.backends for f, p in kernel_view(bed.dp.maps)["table"].items()}
    assert now == table(5)

    bed.writer.max_steps = 32  # type: ignore[attr-defined]
    stats = bed.writer.publish(table(6))
    now = {f: p.backends for f, p in kernel_view(bed.dp.maps)["table"].items()}
    grown = {f for f in now if now[f] == table(6)[f]}
    print(f"then 5 -> 6 (48 of 48 in the end): {stats.steps} steps, {len(grown)} groups grown, "
          f"left out: {sorted(str(lo.reason) for lo in stats.left_out.values())}")
    # k groups grown leave 48 - 6k - 5(8 - k) = 8 - k slots free: room for 6 while k <= 2.
    assert len(grown) == 3 and set(stats.left_out) == set(now) - grown
    assert all(lo.reason == "max_endpoints" and lo.stale and "beside the 5" in lo.detail
               for lo in stats.left_out.values())
    assert all(now[f] == table(5)[f] for f in stats.left_out)
    bed.writer.settle()
    assert retired_keys_settled(bed.writer, bed.dp.maps) == []
