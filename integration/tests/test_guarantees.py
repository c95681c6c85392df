"""The guarantees of README "Guarantees", each a test that counts what it tried.

A real agent (`kmesh-plugin run`, kubernetes source) follows the in-test API server; endpoint
servers answer with their own address; a client in the agent's cgroup connects in a loop and
records, for every connection, when it started and which endpoint answered. The tests then
hold those answers against what the API server said and when the agent applied it.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agent_bed import AgentProcess, Client, Endpoints, converged, start_agent

from kmesh_lab.apiserver import ApiServer
from kmesh_plugin.datapath import loader, syscall
from kmesh_plugin.datapath.build import Capacities, compile_object
from kmesh_plugin.datapath.loader import Datapath
from kmesh_plugin.datapath.writer import read_table
from kmesh_plugin.sources.inotify import Inotify

pytestmark = pytest.mark.kernel

ZONE = "topology.kubernetes.io/zone"
REGION = "topology.kubernetes.io/region"
NODES = {"n1": "z1", "n2": "z1", "n3": "z2"}  # n1 is the agent's node
CAPACITIES = Capacities(256, 4096)


def node(name: str, zone: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {REGION: "r", ZONE: zone}}}


def service(name: str, ip: str, policy: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"clusterIP": ip, "clusterIPs": [ip],
                            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    if policy == "Local":
        spec["internalTrafficPolicy"] = "Local"
    elif policy:
        spec["trafficDistribution"] = policy
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def endpoint_slice(service_name: str, endpoints: dict[str, tuple[str, bool]]) -> dict[str, Any]:
    """``endpoints``: address -> (node, ready)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-a", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [a], "nodeName": n, "conditions": {"ready": r}}
                          for a, (n, r) in sorted(endpoints.items())]}


@dataclass
class Svc:
    """One Service of the churn: its ClusterIP, its pool of endpoint addresses (no other
    Service ever has them) and the one that always stays, ready, on a fixed node."""

    name: str
    ip: str
    policy: str | None
    pool: dict[str, str]  # address -> node
    stable: str
    members: dict[str, bool] = field(default_factory=dict)  # address -> ready, now


@dataclass
class World:
    server: ApiServer
    agent: AgentProcess
    endpoints: Endpoints
    client: Client
    services: list[Svc]
    tmp: Path
    pin_dir: Path
    cgroup: Path
    build_dir: Path
    kubeconfig: Path

    def publish(self, svc: Svc) -> int:
        """Write svc's slice; the resourceVersion of that write."""
        obj = endpoint_slice(svc.name, {a: (svc.pool[a], r) for a, r in svc.members.items()})
        try:
            current = self.server.get("endpointslices", "default", f"{svc.name}-a")
        except Exception:
            return int(self.server.create(obj)["metadata"]["resourceVersion"])
        obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return int(self.server.update(obj)["metadata"]["resourceVersion"])

    def loop(self, seconds: float, limit: int = 100_000) -> None:
        self.client.send({"op": "loop", "urls": [f"http://{s.ip}/hello" for s in self.services],
                          "seconds": seconds, "max": limit, "timeout": 2.0})

    def results(self, seconds: float) -> list[dict[str, Any]]:
        return self.client.receive(seconds + 60)["results"]  # type: ignore[no-any-return]


def build_world(tmp: Path, pin_dir: Path, cgroup: Path, netns: str, build_dir: Path,
                server: ApiServer) -> World:
    specs = [("pc-1", "PreferClose"), ("pc-2", "PreferClose"), ("zone-1", "PreferSameZone"),
             ("local-1", "Local"), ("plain-1", None)]
    endpoints = Endpoints(netns)
    services = []
    for i, (name, policy) in enumerate(specs, start=1):
        pool = {f"198.18.{i}.{k}": ("n1", "n2", "n3")[k % 3] for k in range(1, 7)}
        stable = f"198.18.{i}.3"  # on n1 (3 % 3 == 0): local, so Local always has one
        services.append(Svc(name, f"198.19.1.{i}", policy, pool, stable,
                            {stable: True, f"198.18.{i}.1": True}))
        for address in pool:
            endpoints.start(address)
    for name, zone in NODES.items():
        server.create(node(name, zone))
    kubeconfig = server.write_kubeconfig(tmp / "kubeconfig")
    world = World(server, None, endpoints, None, services, tmp, pin_dir, cgroup,  # type: ignore[arg-type]
                  build_dir, kubeconfig)
    for svc in services:
        server.create(service(svc.name, svc.ip, svc.policy))
        world.publish(svc)
    world.agent = start_agent(tmp, "agent", kubeconfig, pin_dir, cgroup, build_dir)
    converged(world.agent, server)
    world.client = Client.start(netns, cgroup)
    return world


@pytest.fixture
def world(tmp_path: Path, pin_dir: Path, cgroup: Path, netns: str,
          build_dir: Path) -> Iterator[World]:
    with ApiServer(token="kmesh-test", bookmark_interval=0.5) as server:
        w = None
        try:
            w = build_world(tmp_path, pin_dir, cgroup, netns, build_dir, server)
            yield w
        finally:
            if w is not None:
                if w.client is not None:
                    w.client.close()
                if w.agent is not None:
                    w.agent.stop()
                w.endpoints.close()


def table(pin_dir: Path) -> dict[Any, Any]:
    """What the kernel holds: every frontend's sid, active set, generation and set."""
    dp = Datapath.open(pin_dir)
    try:
        return {f: (p.sid, p.set, p.generation, p.backends) for f, p in read_table(dp).items()}
    finally:
        dp.close()


def failures(results: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(str(r["errno"]) for r in results if r["errno"])


# -- restart --------------------------------------------------------------------------------


def test_sigkill_restarts_under_load_lose_no_connect_and_rewrite_nothing(world: World) -> None:
    before = table(world.pin_dir)
    world.loop(seconds=120, limit=10_000)
    restarts = 0
    rewritten = 0
    while restarts < 5:
        # Kill the agent mid-traffic, start it again, let it converge; nothing changed in
        # the API meanwhile, so nothing may change in the maps either (generations included).
        world.agent.proc.send_signal(signal.SIGKILL)
        world.agent.proc.wait(timeout=30)
        world.agent.status.unlink(missing_ok=True)
        world.agent = start_agent(world.tmp, "agent", world.kubeconfig, world.pin_dir,
                                  world.cgroup, world.build_dir)
        converged(world.agent, world.server)
        restarts += 1
        now = table(world.pin_dir)
        rewritten += sum(1 for f in before if now.get(f) != before[f])
        assert now == before, f"restart {restarts} changed the maps"
    results = world.results(120)
    failed = failures(results)
    print(f"{restarts} SIGKILL restarts during {len(results)} connects: {sum(failed.values())} "
          f"failed, {rewritten} groups rewritten")
    assert restarts >= 3 and len(results) >= 10_000
    assert not failed, failed

    # A change made while no agent runs is applied by the next one, and only that change.
    world.agent.proc.send_signal(signal.SIGKILL)
    world.agent.proc.wait(timeout=30)
    gone = world.services[-1]
    world.server.delete("services", "default", gone.name)
    world.agent.status.unlink(missing_ok=True)
    world.agent = start_agent(world.tmp, "agent", world.kubeconfig, world.pin_dir,
                              world.cgroup, world.build_dir)
    converged(world.agent, world.server)
    after = table(world.pin_dir)
    removed = {f for f in before if str(f.ip) == gone.ip}
    assert set(after) == set(before) - removed
    assert all(after[f] == before[f] for f in after)


# -- upgrade --------------------------------------------------------------------------------


def test_a_new_build_swaps_in_atomically_under_load(world: World) -> None:
    """A new version of the program over the same map layout: the links switch to it in place
    (same link, new program), the maps are kept, and no connect in between fails."""
    links = world.pin_dir / "links"

    def programs() -> dict[str, tuple[int, int]]:
        out = {}
        for link in sorted(links.iterdir()):
            fd = syscall.obj_get(link)
            try:
                info = syscall.link_info(fd)
            finally:
                os.close(fd)
            out[link.name] = (info.id, info.prog_id)
        return out

    # "The new build": the same source compiled with a changed program (one more, empty
    # bpf_loop round between lookup and read), the layout unchanged.
    new_build = compile_object(CAPACITIES, world.build_dir,
                               defines=("KMESH_TEST_RACE_WINDOW=1",))
    old = programs()
    maps_before = table(world.pin_dir)
    world.agent.stop()  # the datapath keeps translating without an agent
    world.loop(seconds=60, limit=6000)
    swaps = 0
    for _ in range(4):  # new build, old build, new, old: every swap under load
        obj = new_build if swaps % 2 == 0 else None
        dp = loader.attach(world.pin_dir, world.cgroup, CAPACITIES, world.build_dir, obj=obj)
        dp.close()
        swaps += 1
        now = programs()
        assert {k: v[0] for k, v in now.items()} == {k: v[0] for k, v in old.items()}
        assert all(now[k][1] != old[k][1] for k in now)  # a new program on the same link
        old = now
    results = world.results(60)
    failed = failures(results)
    print(f"{swaps} program swaps during {len(results)} connects: {sum(failed.values())} failed")
    assert not failed, failed
    assert table(world.pin_dir) == maps_before  # the maps were reused, not rewritten
    world.agent = start_agent(world.tmp, "agent", world.kubeconfig, world.pin_dir, world.cgroup,
                              world.build_dir)
    converged(world.agent, world.server)
    assert table(world.pin_dir) == maps_before


# -- churn ----------------------------------------------------------------------------------


@dataclass
class Membership:
    """Per (Service, address): the resourceVersions at which it entered and left the slice."""

    intervals: dict[tuple[str, str], list[list[float]]] = field(
        default_factory=lambda: collections.defaultdict(list))

    def enter(self, svc: str, address: str, rv: int) -> None:
        spans = self.intervals[(svc, address)]
        if not spans or spans[-1][1] != float("inf"):
            spans.append([rv, float("inf")])

    def leave(self, svc: str, address: str, rv: int) -> None:
        spans = self.intervals[(svc, address)]
        if spans and spans[-1][1] == float("inf"):
            spans[-1][1] = rv

    def member_between(self, svc: str, address: str, low: int, high: int) -> bool:
        """In the slice at some resourceVersion in [low, high]?"""
        return any(start <= high and end > low for start, end in self.intervals[(svc, address)])


class Applied:
    """When the agent reported each EndpointSlice resourceVersion applied (a thread watching
    its status file): applied_before(t) is the highest version applied by time t."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.points: list[tuple[float, int]] = [(0.0, 0)]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with Inotify() as watch:
            watch.watch(self.agent.status.parent)
            while not self.stop.is_set():
                st = self.agent.read_status() or {}
                rv = int((st.get("source_revision") or {}).get("endpointslices") or 0)
                if rv > self.points[-1][1]:
                    self.points.append((time.monotonic(), rv))
                watch.wait(0.2)

    def applied_before(self, t: float) -> int:
        best = 0
        for at, rv in self.points:
            if at <= t:
                best = rv
        return best

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def test_churn_under_load_never_reaches_a_removed_or_foreign_endpoint(world: World) -> None:
    rng = random.Random(20261202)
    members = Membership()
    written: list[tuple[float, int]] = []  # (time issued, resourceVersion) of every write
    start_rv = world.server.revision
    for svc in world.services:
        for address in svc.members:
            members.enter(svc.name, address, 0)
    applied = Applied(world.agent)
    duration = 40.0
    world.loop(seconds=duration)
    changes = collections.Counter()
    end = time.monotonic() + duration - 2
    pace = 1 / 120  # changes per second: thousands over the run, each seen by many connects
    next_at = time.monotonic()
    try:
        while time.monotonic() < end:
            next_at += pace
            time.sleep(max(0.0, next_at - time.monotonic()))  # a rate, not a wait for a state
            svc = rng.choice(world.services)
            op = rng.choice(["add", "remove", "flip", "flip", "relabel", "strategy"])
            # Taken before the write: a connect that ended after this moment may have met the
            # write's state, so its window must include it.
            issued = time.monotonic()
            if op == "add":
                address = rng.choice(sorted(set(svc.pool) - set(svc.members)) or [svc.stable])
                svc.members[address] = True
                rv = world.publish(svc)
                members.enter(svc.name, address, rv)
            elif op == "remove":
                spare = sorted(set(svc.members) - {svc.stable})
                if not spare:
                    continue
                address = rng.choice(spare)
                del svc.members[address]
                rv = world.publish(svc)
                members.leave(svc.name, address, rv)
            elif op == "flip":
                spare = sorted(set(svc.members) - {svc.stable})
                if not spare:
                    continue
                address = rng.choice(spare)
                svc.members[address] = not svc.members[address]
                rv = world.publish(svc)
            elif op == "relabel":
                name = rng.choice(["n2", "n3"])
                rv = int(world.server.update(node(name, rng.choice(["z1", "z2", "z3"])))
                         ["metadata"]["resourceVersion"])
            else:
                if svc.policy == "Local":
                    continue  # the strict Service stays strict: its checks below rely on it
                svc.policy = rng.choice(["PreferClose", "PreferSameZone", "PreferSameNode",
                                         None])
                rv = int(world.server.update(service(svc.name, svc.ip, svc.policy))
                         ["metadata"]["resourceVersion"])
            written.append((issued, rv))
            changes[op] += 1
        results = world.results(duration)
        converged(world.agent, world.server)
    finally:
        applied.close()

    def written_by(t: float) -> int:
        # The highest: a write that changes nothing (a relabel to the same zone) answers
        # with the object's old resourceVersion.
        return max([start_rv, *(rv for at, rv in written if at <= t)])

    foreign = removed = off_node = 0
    failed = failures(results)
    by_url = {i: s for i, s in enumerate(world.services)}
    for r in results:
        if r["errno"]:
            continue
        svc = by_url[r["url"]]
        address = r["version"]
        if address not in svc.pool:
            foreign += 1
            continue
        if svc.policy == "Local" and svc.pool[address] != "n1":
            off_node += 1
        # Not a member at any version between what was applied when the connect started
        # and what had been written by the time it ended: it reached a removed endpoint.
        low = applied.applied_before(r["t"])
        high = written_by(r["done"])
        if not members.member_between(svc.name, address, low, high):
            removed += 1
            if removed <= 3:
                print(f"  {svc.name}: {address} answered at {r['t']:.3f} although not in the "
                      f"slice between versions {low} and {high}")
    print(f"{sum(changes.values())} changes {dict(changes)} during {len(results)} connects: "
          f"{sum(failed.values())} failed, {removed} reached a removed endpoint, {foreign} "
          f"another Service's, {off_node} off-node for the strict Service")
    assert sum(changes.values()) >= 1000 and len(results) >= 3000
    assert not failed, failed  # every Service kept a ready endpoint throughout
    assert (removed, foreign, off_node) == (0, 0, 0)
