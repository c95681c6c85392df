"""End-to-end: the lab's nodes, agents and pods with the real datapath.

Each test builds a fresh lab (three nodes, one agent each), drives it like a user would
(manifests, labels, deletes) and asserts *which instance answered* each request, read from
the helloworld body. The lab removes everything it made, also when a test fails.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kmesh_lab import scenario
from kmesh_lab.cluster import Lab
from kmesh_lab.kind import SEED_LOCALITY
from kmesh_plugin.datapath import records
from kmesh_plugin.datapath.loader import Datapath
from kmesh_plugin.datapath.writer import read_table

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
THIRD_PARTY = REPO / "tests" / "fixtures" / "same_region_strict"
URL = "http://helloworld:5000/hello"
SEED_NODES = SEED_LOCALITY  # the seed's three workers, labelled as its commands leave them


@pytest.fixture
def lab_host(kernel: None, cni_plugins: None) -> None:
    """This machine can run a lab: root, BPF, cgroup v2, bpffs and the CNI plugins."""


@pytest.fixture
def lab_factory(lab_host: None) -> Iterator[Any]:
    labs: list[Lab] = []

    def make(nodes: dict[str, dict[str, str]] | None = None, **kwargs: Any) -> Lab:
        lab = Lab(nodes or SEED_NODES, **kwargs)
        labs.append(lab)
        lab.__enter__()
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.close()
        for lab in labs:
            assert not lab.state.exists()
            assert not lab.cgroup.exists()
            assert not lab.pin_root.exists()


@pytest.fixture
def lab(lab_factory: Any) -> Lab:
    return lab_factory()


def service(name: str = "helloworld", annotations: dict[str, str] | None = None,
            **spec: Any) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, **({"annotations": annotations} if annotations else {})},
        "spec": {"ports": [{"port": 5000, "name": "http"}], "selector": {"app": "helloworld"},
                 **spec},
    })


def helloworld(version: str, node: str, replicas: int = 1) -> str:
    labels = {"app": "helloworld", "version": version}
    return yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"helloworld-{version}", "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{
                        "name": "helloworld", "image": "docker.io/istio/examples-helloworld-v1",
                        "env": [{"name": "SERVICE_VERSION", "value": version}],
                        "ports": [{"containerPort": 5000}],
                    }],
                    "nodeSelector": {"kubernetes.io/hostname": node},
                },
            },
        },
    })


def sleep_client(node: str = "ambient-worker") -> str:
    return yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "sleep"},
        "spec": {
            "selector": {"matchLabels": {"app": "sleep"}},
            "template": {
                "metadata": {"labels": {"app": "sleep"}},
                "spec": {"containers": [{"name": "sleep", "image": "curlimages/curl",
                                         "command": ["/bin/sleep", "infinity"]}],
                         "nodeSelector": {"kubernetes.io/hostname": node}},
            },
        },
    })


def versions(lab: Lab, count: int = 30) -> collections.Counter[str | None]:
    results = lab.request("sample", "sleep", URL, count)
    return collections.Counter(r["version"] if r["ok"] else r["errno"] for r in results)


def two_remote_instances() -> str:
    return helloworld("two", "ambient-worker2") + "---\n" + helloworld("three", "ambient-worker3")


def three_instances(lab: Lab, svc: str) -> None:
    lab.apply(svc, "sample")
    lab.apply("---\n".join(helloworld(v, n) for v, n in (
        ("one", "ambient-worker"), ("two", "ambient-worker2"), ("three", "ambient-worker3"))),
        "sample")
    lab.apply(sleep_client(), "sample")


SCENARIOS = sorted((REPO / "integration" / "kmesh_lab" / "scenarios").glob("*.yaml"))


@pytest.mark.parametrize("source", ["kubernetes", "manifests"])
@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_shipped_scenarios_pass_step_for_step(lab_host: None, path: Path, source: str) -> None:
    lines: list[str] = []
    code = scenario.execute(scenario.load(path), out=lines.append, source=source)
    assert code == scenario.EXIT_OK, "\n".join(lines)
    text = "\n".join(lines)
    if path.stem == "seed":
        assert "20 x Hello version: region.zone1.subzone1, instance: helloworld-region.zone1" \
            in text
        assert "20 x Hello version: region.zone1.subzone2, instance: helloworld-region.zone1" \
            in text
    if path.stem == "seed-local":
        assert "20 x error: ECONNREFUSED" in text


def test_local_strict_answers_locally_then_refuses_within_100ms(lab: Lab) -> None:
    three_instances(lab, service(internalTrafficPolicy="Local"))
    assert versions(lab) == {"one": 30}
    lab.delete("Deployment", "sample", "helloworld-one")
    results = lab.request("sample", "sleep", URL, 30)
    assert {r["errno"] for r in results} == {"ECONNREFUSED"}
    assert not any(r["ok"] for r in results)
    assert max(r["connect_ms"] for r in results) < 100


def test_service_without_strategy_spreads_over_every_node(lab: Lab) -> None:
    three_instances(lab, service())
    seen = versions(lab, 150)
    assert set(seen) == {"one", "two", "three"}
    assert min(seen.values()) >= 25, seen  # 50 expected each; 25 is > 5 sigma away


def test_relabelling_the_clients_own_node_recomputes(lab: Lab) -> None:
    lab.apply(service(trafficDistribution="PreferClose"), "sample")
    lab.apply(two_remote_instances(), "sample")
    lab.apply(sleep_client(), "sample")
    assert versions(lab) == {"two": 30}  # same zone as the client's node
    lab.label("ambient-worker", {"topology.kubernetes.io/zone": "zone2",
                                 "topology.kubernetes.io/subzone": None})
    assert versions(lab) == {"three": 30}  # now the client's node is in zone2


def test_switching_a_live_service_from_local_to_prefer_close(lab: Lab) -> None:
    lab.apply(service(internalTrafficPolicy="Local"), "sample")
    lab.apply(two_remote_instances(), "sample")
    lab.apply(sleep_client(), "sample")
    assert versions(lab) == {"ECONNREFUSED": 30}  # nothing on the client's node
    lab.apply(service(trafficDistribution="PreferClose"), "sample")
    assert versions(lab) == {"two": 30}
    lab.apply(service(internalTrafficPolicy="Local"), "sample")
    assert versions(lab) == {"ECONNREFUSED": 30}


def test_agent_killed_and_restarted_under_load_loses_no_connection(lab: Lab) -> None:
    three_instances(lab, service(trafficDistribution="PreferClose"))
    node_pins = lab.pin_root / "ambient-worker"
    before = _table(node_pins)
    pod = lab.client_pod("sample", "sleep")
    batches: list[tuple[float, float, list[dict[str, Any]]]] = []
    restarting = threading.Event()
    done = threading.Event()

    def load() -> None:
        # Small batches of new connections until the restarts are over.
        while not done.is_set():
            start = time.monotonic()
            reply = lab.call(pod, {"op": "get", "url": URL, "count": 20, "timeout": 2.0})
            batches.append((start, time.monotonic(), reply["results"]))
            restarting.set()

    worker = threading.Thread(target=load)
    worker.start()
    try:
        restarting.wait(30)
        window_start = time.monotonic()
        for _ in range(3):
            lab.restart_agent("ambient-worker", signal.SIGKILL)
        window_end = time.monotonic()
    finally:
        done.set()
        worker.join(timeout=60)
    results = [r for _, _, rs in batches for r in rs]
    during = [r for s, e, rs in batches if s < window_end and e > window_start for r in rs]
    print(f"{len(during)} requests overlapped the restarts")
    assert len(during) >= 100, f"only {len(during)} requests overlapped the restarts"
    assert [r["errno"] for r in results if not r["ok"]] == []
    assert {r["version"] for r in results} == {"one"}
    # A restart over unchanged state changes nothing in the maps (generations included).
    assert _table(node_pins) == before


def test_third_party_strategy_changes_which_endpoint_answers(lab_factory: Any) -> None:
    nodes = {
        "ambient-worker": {"topology.kubernetes.io/region": "east"},
        "ambient-worker2": {"topology.kubernetes.io/region": "east"},
        "ambient-worker3": {"topology.kubernetes.io/region": "west"},
    }
    lab = lab_factory(
        nodes,
        strategies={"enabled": ["same_region_strict", "local", "prefer_close"]},
        plugin_paths=[str(THIRD_PARTY)],
    )
    # Without the annotation no strategy applies: all three regions answer.
    three_instances(lab, service())
    assert set(versions(lab, 90)) == {"one", "two", "three"}
    # The third party claims the Service (before the built-ins, even with PreferClose set).
    lab.apply(service(annotations={"example.com/locality": "same-region"},
                      trafficDistribution="PreferClose"), "sample")
    assert set(versions(lab, 90)) == {"one", "two"}
    # Strict: with no endpoint left in the region, connects are refused, never sent west.
    lab.delete("Deployment", "sample", "helloworld-one")
    lab.delete("Deployment", "sample", "helloworld-two")
    assert versions(lab) == {"ECONNREFUSED": 30}


def test_scenario_with_an_unmet_expectation_exits_3(lab_host: None, tmp_path: Path) -> None:
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump({
        "nodes": {"n1": {"topology.kubernetes.io/zone": "a"}, "n2": {}},
        "steps": [
            {"apply": service(trafficDistribution="PreferClose"), "namespace": "sample"},
            {"apply": helloworld("far", "n2"), "namespace": "sample"},
            {"apply": sleep_client("n1"), "namespace": "sample"},
            {"request": {"from": {"namespace": "sample", "deployment": "sleep"}, "url": URL,
                         "count": 5},
             "expect": {"versions": ["near"]}},
        ],
    }))
    lines: list[str] = []
    assert scenario.execute(scenario.load(path), out=lines.append) == scenario.EXIT_EXPECTATION
    assert "answers from versions outside ['near']: {'far': 5}" in "\n".join(lines)


def test_lab_down_removes_what_a_killed_lab_left(lab_host: None, tmp_path: Path) -> None:
    path = _long_scenario(tmp_path)
    runner = subprocess.Popen(
        [sys.executable, "-m", "kmesh_plugin.cli", "lab", "run", str(path), "-v"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert runner.stdout is not None
        for line in runner.stdout:  # wait until the lab is fully up and under load
            if line.startswith("[4/4]"):
                break
        state = sorted(Path("/run/kmesh-lab").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
        lab_id = state.name
        runner.kill()
        runner.wait()
        assert (Path("/sys/fs/bpf") / f"kmesh-lab-{lab_id}").exists()  # the crash left it
    finally:
        if runner.poll() is None:
            runner.kill()
    down = subprocess.run([sys.executable, "-m", "kmesh_plugin.cli", "lab", "down"],
                          capture_output=True, text=True, check=True)
    assert f"lab {lab_id}: removed" in down.stdout
    assert not (Path("/sys/fs/bpf") / f"kmesh-lab-{lab_id}").exists()
    assert not state.exists()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"kmesh-lab-{lab_id}" not in netns
    from kmesh_plugin.datapath.mounts import cgroup2_root

    assert not (cgroup2_root() / f"kmesh-lab-{lab_id}").exists()
    agents = [p for p in Path("/proc").glob("[0-9]*/cmdline")
              if f"/run/kmesh-lab/{lab_id}/".encode() in _read(p)]
    assert agents == []


def test_ctrl_c_stops_a_lab_run_and_removes_everything(lab_host: None, tmp_path: Path) -> None:
    path = _long_scenario(tmp_path)
    runner = subprocess.Popen(
        [sys.executable, "-m", "kmesh_plugin.cli", "lab", "run", str(path), "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert runner.stdout is not None
    for line in runner.stdout:
        if line.startswith("[4/4]"):
            break
    state = sorted(Path("/run/kmesh-lab").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    runner.send_signal(signal.SIGINT)
    _, err = runner.communicate(timeout=120)
    assert runner.returncode == 130, err
    assert "interrupted" in err
    assert not state.exists()
    assert not (Path("/sys/fs/bpf") / f"kmesh-lab-{state.name}").exists()
    from kmesh_plugin.datapath.mounts import cgroup2_root

    assert not (cgroup2_root() / f"kmesh-lab-{state.name}").exists()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"kmesh-lab-{state.name}" not in netns


def _long_scenario(tmp_path: Path) -> Path:
    """Two nodes, a server, a client, then a request step that runs for a long while."""
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump({
        "nodes": {"n1": {}, "n2": {}},
        "steps": [
            {"apply": service(), "namespace": "sample"},
            {"apply": helloworld("x", "n1"), "namespace": "sample"},
            {"apply": sleep_client("n2"), "namespace": "sample"},
            {"request": {"from": {"namespace": "sample", "deployment": "sleep"}, "url": URL,
                         "count": 10000}},
        ],
    }))
    return path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _table(pin_dir: Path) -> dict[Any, Any]:
    dp = Datapath.open(pin_dir)
    try:
        return {
            "groups": read_table(dp),
            "records": dict(dp[records.MAP_RECORDS].lookup_batch()),
            "active": dict(dp[records.MAP_ACTIVE].lookup_batch()),
            "slots": dict(dp[records.MAP_SLOTS].lookup_batch()),
        }
    finally:
        dp.close()
