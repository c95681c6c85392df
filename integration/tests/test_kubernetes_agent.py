"""A real agent (`kmesh-plugin run`, kubernetes source) against the in-test API server, with
the kernel maps read back: an outage changes nothing, and after a long random sequence of
changes and faults the maps equal what a fresh agent makes of the final state."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_bed import converged, frontends, start_agent

from kmesh_lab.apiserver import ApiServer

pytestmark = pytest.mark.kernel

ZONE = "topology.kubernetes.io/zone"
REGION = "topology.kubernetes.io/region"
NODES = ("n1", "n2", "n3")


def node(name: str, zone: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {REGION: "r", ZONE: zone}}}


def service(i: int, distribution: str | None = "PreferClose") -> dict[str, Any]:
    spec: dict[str, Any] = {"clusterIP": f"198.19.1.{i}", "clusterIPs": [f"198.19.1.{i}"],
                            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    if distribution == "Local":
        spec["internalTrafficPolicy"] = "Local"
    elif distribution:
        spec["trafficDistribution"] = distribution
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i}", "namespace": "default"}, "spec": spec}


def endpoint_slice(i: int, endpoints: list[tuple[str, str, bool]]) -> dict[str, Any]:
    """Endpoints as (address, node, ready)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc-{i}-a", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [a], "nodeName": n, "conditions": {"ready": r}}
                          for a, n, r in endpoints]}


@pytest.fixture
def server() -> Iterator[ApiServer]:
    with ApiServer(token="kmesh-test", bookmark_interval=0.5) as s:
        yield s


def populate(server: ApiServer, count: int) -> None:
    for i, name in enumerate(NODES):
        server.create(node(name, f"z{i % 2}"))
    for i in range(1, count + 1):
        server.create(service(i))
        server.create(endpoint_slice(i, [(f"198.18.{i}.{k}", NODES[k % 3], True)
                                         for k in range(1, 4)]))


def test_an_api_outage_leaves_the_maps_alone_and_its_changes_arrive_after(
    server: ApiServer, tmp_path: Path, pin_dir: Path, cgroup: Path, build_dir: Path
) -> None:
    populate(server, 5)
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    agent = start_agent(tmp_path, "agent", kubeconfig, pin_dir, cgroup, build_dir)
    try:
        converged(agent, server)
        before = frontends(agent.dump())
        assert len(before) == 5
        server.stop()
        server.delete("services", "default", "svc-1")
        server.create(service(9))
        server.create(endpoint_slice(9, [("198.18.9.1", "n1", True)]))
        # Every reflector has failed at least twice (0.8 s, then 1.6 s later) meanwhile; the
        # agent rewrites its status after each of its own heartbeats and reconciles only.
        deadline = time.monotonic() + 30
        checks = 0
        while True:
            resources = (agent.read_status() or {}).get("source", {}).get("resources", {})
            if resources and all(sum(r["errors"].values()) >= 2 for r in resources.values()):
                break
            assert time.monotonic() < deadline, resources
            assert frontends(agent.dump()) == before  # nothing moves while it is down
            checks += 1
        assert frontends(agent.dump()) == before
        print(f"maps unchanged through {checks} reads during the outage")
        server.start()
        converged(agent, server)
        after = frontends(agent.dump())
        assert "198.19.1.1:80/TCP" not in after and "198.19.1.9:80/TCP" in after
        assert after["198.19.1.9:80/TCP"][1][0] == ["198.18.9.1:8080"]
    finally:
        agent.stop()


def _mutate(server: ApiServer, rng: random.Random, count: int) -> str:
    i = rng.randrange(1, count + 1)
    what = rng.choice(["endpoints", "endpoints", "readiness", "delete", "recreate",
                       "strategy", "relabel"])
    existing = {o["metadata"]["name"] for o in server.list("services")}
    if what in ("endpoints", "readiness"):
        addresses = [(f"198.18.{i}.{k}", rng.choice(NODES), rng.random() < 0.8)
                     for k in rng.sample(range(1, 40), rng.randrange(0, 6))]
        obj = endpoint_slice(i, addresses)
        try:
            current = server.get("endpointslices", "default", f"svc-{i}-a")
        except Exception:
            server.create(obj)
        else:
            obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            server.update(obj)
    elif what == "delete" and f"svc-{i}" in existing:
        server.delete("services", "default", f"svc-{i}")
    elif what == "recreate" and f"svc-{i}" not in existing:
        server.create(service(i))
    elif what == "strategy" and f"svc-{i}" in existing:
        server.update(service(i, rng.choice(["PreferClose", "PreferSameZone", "Local", None])))
    elif what == "relabel":
        name = rng.choice(NODES)
        server.update(node(name, rng.choice(["z0", "z1", "z2"])))
    return what


def _fault(server: ApiServer, rng: random.Random, count: int) -> str:
    fault = rng.choice(["none", "none", "compact", "drop", "fail500", "fail429", "outage",
                        "restart"])
    if fault == "compact":
        server.faults.compact()
    elif fault == "drop":
        server.faults.drop_watches()
    elif fault == "fail500":
        server.faults.fail(rng.randrange(1, 4), status=500)
    elif fault == "fail429":
        server.faults.fail(1, status=429, retry_after=1)
    elif fault == "outage":
        server.stop()
        for _ in range(rng.randrange(1, 4)):
            _mutate(server, rng, count)
        server.faults.compact()
        server.start()
    elif fault == "restart":
        server.restart(new_history=True)
    return fault


def test_after_a_long_random_fault_sequence_the_maps_equal_a_fresh_reconcile(
    server: ApiServer, tmp_path: Path, pin_dir: Path, cgroup: Path, build_dir: Path,
    kernel: None,
) -> None:
    import secrets

    from kmesh_plugin.datapath import loader
    from kmesh_plugin.datapath.mounts import cgroup2_root

    count = 12
    populate(server, count)
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    agent = start_agent(tmp_path, "agent", kubeconfig, pin_dir, cgroup, build_dir)
    fresh_pins = Path("/sys/fs/bpf") / f"kmesh-test-{secrets.token_hex(4)}"
    fresh_cgroup = cgroup2_root() / f"kmesh-test-{secrets.token_hex(4)}"
    fresh = None
    rng = random.Random(20261202)
    log: list[str] = []
    try:
        converged(agent, server)
        # CI runs a short sequence; KMESH_FAULT_ROUNDS=200 runs a long one (README).
        for step in range(int(os.environ.get("KMESH_FAULT_ROUNDS", "16"))):
            log.append(f"{step}: {_mutate(server, rng, count)} / {_fault(server, rng, count)}")
            if rng.random() < 0.5:
                # Half the time the agent catches up, through whatever fault is pending, before
                # the next round: it meets every fault with state to lose, not only a burst.
                converged(agent, server, timeout=120)
        server.faults.clear()
        converged(agent, server, timeout=120)
        fresh_pins.mkdir()
        fresh_cgroup.mkdir()
        fresh = start_agent(tmp_path, "fresh", kubeconfig, fresh_pins, fresh_cgroup, build_dir)
        converged(fresh, server)
        got, want = frontends(agent.dump()), frontends(fresh.dump())
        print(f"{len(log)} rounds of changes and faults; {len(want)} frontends compared")
        assert got == want, "\n".join(log)
        resources = agent.read_status()["source"]["resources"]  # type: ignore[index]
        print({p: (r["relists"], r["watches"], r["errors"]) for p, r in resources.items()})
    finally:
        agent.stop()
        if fresh is not None:
            fresh.stop()
        loader.remove(fresh_pins)
        from kmesh_lab import procs

        procs.remove_cgroup_tree(str(fresh_cgroup))
