"""End-to-end: pods enrolled only through the real CNI chain, in enrolment mode ``cni``.

Every lab node runs its agent with ``[datapath] enrolment = "cni"``; ``kmesh-plugin cni install``
chains kmesh-cni after Debian's bridge + host-local in the node's own conflist, and the lab's
kubelet runs go-cni's loopback network and that conflist for every pod, as containerd's CRI does
(CNI_ARGS ``IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;K8S_POD_INFRA_CONTAINER_ID=..;
K8S_POD_UID=..``). A pod wired by the bridge config alone (``Lab.add_unenrolled_pod``) sits in the
same node cgroup, so the connect hook runs for it too: the datapath must leave it alone.

What is asserted is what the kernel did: which instance answered (the helloworld body), the
errno of an untranslated connect (ENETUNREACH: pods have no default route), and the netns
cookies in each node's kmesh_enrolled map against the pods' own cookies.
"""

from __future__ import annotations

import collections
import contextlib
import json
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kmesh_lab import cni, netns, scenario
from kmesh_lab.cluster import Lab
from kmesh_lab.kind import SEED_LOCALITY, WORKERS
from kmesh_lab.kube import RunningPod
from kmesh_plugin.cni import spool

pytestmark = pytest.mark.lab

URL = "http://helloworld:5000/hello"
NODES = {node: SEED_LOCALITY[node] for node in WORKERS[:2]}
CLIENT_NODE = "ambient-worker"


@pytest.fixture
def lab_factory(kernel: None, cni_plugins: None) -> Iterator[Any]:
    labs: list[Lab] = []

    def make(nodes: dict[str, dict[str, str]] | None = None, **kwargs: Any) -> Lab:
        lab = Lab(nodes or NODES, **kwargs)
        labs.append(lab)
        lab.__enter__()
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.close()
        for lab in labs:
            assert not lab.state.exists()  # conflists, launchers, kmesh-cni state and logs
            assert not lab.cgroup.exists()
            assert not lab.pin_root.exists()
            names = subprocess.run(["ip", "netns", "list"], capture_output=True,
                                   text=True).stdout
            assert lab.name not in names


def manifests(instances: dict[str, str], client_node: str = CLIENT_NODE) -> str:
    """helloworld Service (PreferClose), one instance per (version -> node), a sleep client."""
    docs: list[dict[str, Any]] = [{
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "helloworld"},
        "spec": {"ports": [{"port": 5000, "name": "http"}], "selector": {"app": "helloworld"},
                 "trafficDistribution": "PreferClose"},
    }]
    for version, node in instances.items():
        labels = {"app": "helloworld", "version": version}
        docs.append({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": f"helloworld-{version}", "labels": labels},
            "spec": {"selector": {"matchLabels": labels}, "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{
                    "name": "helloworld", "image": "docker.io/istio/examples-helloworld-v1",
                    "env": [{"name": "SERVICE_VERSION", "value": version}],
                    "ports": [{"containerPort": 5000}]}],
                    "nodeSelector": {"kubernetes.io/hostname": node}}}},
        })
    docs.append({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "sleep"},
        "spec": {"selector": {"matchLabels": {"app": "sleep"}}, "template": {
            "metadata": {"labels": {"app": "sleep"}},
            "spec": {"containers": [{"name": "sleep", "image": "curlimages/curl",
                                     "command": ["/bin/sleep", "infinity"]}],
                     "nodeSelector": {"kubernetes.io/hostname": client_node}}}},
    })
    return yaml.safe_dump_all(docs)


def pod_of(lab: Lab, prefix: str) -> RunningPod:
    (pod,) = [p for p in lab.pods.values() if p.spec.name.startswith(prefix)]
    return pod


def get(lab: Lab, pod: RunningPod, url: str, count: int) -> list[dict[str, Any]]:
    return lab.call(pod, {"op": "get", "url": url, "count": count, "timeout": 2.0})["results"]


def outcomes(results: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(r["version"] if r["ok"] else f"error {r['errno']}"
                               for r in results)


def cookie_seen_from_inside(netns_name: str) -> int:
    """SO_NETNS_COOKIE read by a process that nsenter put into the pod's namespace: a check of
    the lab's own reading that shares no code with it."""
    code = ("import socket, struct; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
            "print(struct.unpack('=Q', s.getsockopt(socket.SOL_SOCKET, 71, 8))[0])")
    out = subprocess.run(["nsenter", f"--net=/var/run/netns/{netns_name}", sys.executable,
                          "-c", code], capture_output=True, text=True, check=True, timeout=30)
    return int(out.stdout)


def expected_cookies(lab: Lab) -> dict[str, set[int]]:
    return {node: {p.extra["cookie"] for p in lab.pods_on(node)} for node in lab.initial_nodes}


def enrolled(lab: Lab) -> dict[str, set[int]]:
    return {node: lab.enrolled_cookies(node) for node in lab.initial_nodes}


def records(lab: Lab, node: str) -> set[tuple[Any, ...]]:
    return {(r.pod_namespace, r.pod_name, r.pod_uid, r.container_id, r.ifname, r.netns_cookie,
             r.netns, tuple(sorted(r.ips)))
            for r in spool.read_records(lab.cni_state_dir(node))}


def expected_records(lab: Lab, node: str) -> set[tuple[Any, ...]]:
    """What kmesh-cni must have recorded from CNI_ARGS (K8S_POD_*), CNI_CONTAINERID,
    CNI_IFNAME, CNI_NETNS and the bridge's prevResult, for each of the node's pods."""
    out = set()
    for p in lab.pods_on(node):
        obj = lab.client.get("Pod", p.spec.namespace, p.spec.name)
        assert obj is not None
        out.add((p.spec.namespace, p.spec.name, obj["metadata"]["uid"], p.extra["cid"], "eth0",
                 p.extra["cookie"], f"/var/run/netns/{p.extra['netns']}",
                 tuple(sorted(filter(None, [p.ip, p.ipv6])))))
    return out


def test_the_chain_enrols_pods_and_an_unenrolled_pod_keeps_its_untranslated_path(
        lab_factory: Any) -> None:
    lab = lab_factory()
    for node in lab.initial_nodes:
        assert lab.enrolment_mode(node) == "cni"
        plugins = cni.load_conflist(lab.conflist_path(node))["plugins"]
        assert [p["type"] for p in plugins] == ["bridge", "kmesh-cni"]
        assert plugins[-1]["pinDir"] == str(lab.pin_root / node)
        assert plugins[-1]["stateDir"] == str(lab.cni_state_dir(node))
        assert enrolled(lab)[node] == set()  # nothing but the chain ever enrols

    lab.apply(manifests({"one": "ambient-worker", "two": "ambient-worker2"}), "sample")
    outsider = lab.add_unenrolled_pod(CLIENT_NODE, namespace="sample")
    client = lab.client_pod("sample", "sleep")
    one, two = pod_of(lab, "helloworld-one-"), pod_of(lab, "helloworld-two-")
    assert outsider.node == client.node == one.node == CLIENT_NODE
    cluster_ip = lab.client.get("Service", "sample", "helloworld")["spec"]["clusterIP"]

    # The cookies: the lab's reading matches a process inside each namespace, and each node's
    # kmesh_enrolled holds exactly its enrolled pods' cookies: never the outsider's.
    for p in (client, one, two, outsider):
        assert cookie_seen_from_inside(p.extra["netns"]) == p.extra["cookie"]
    assert len({p.extra["cookie"] for p in (client, one, two, outsider)}) == 4
    assert enrolled(lab) == expected_cookies(lab) == {
        "ambient-worker": {client.extra["cookie"], one.extra["cookie"]},
        "ambient-worker2": {two.extra["cookie"]},
    }
    for node in lab.initial_nodes:
        assert records(lab, node) == expected_records(lab, node)
    print(f"kmesh_enrolled: {json.dumps({n: sorted(c) for n, c in enrolled(lab).items()})}; "
          f"outsider's cookie {outsider.extra['cookie']}")

    # At the same time, on the same node: the enrolled client is translated to the local
    # instance; the outsider's connect to the ClusterIP is left alone and fails inside its
    # namespace for want of a route (not refused, not answered). Both loop for one second,
    # each request a new connection stamped with the host's monotonic clock.
    results: dict[str, list[dict[str, Any]]] = {}

    def run(key: str, pod: RunningPod) -> None:
        loop = {"op": "loop", "urls": [URL], "seconds": 1.0, "max": 100_000}
        results[key] = lab.call(pod, loop)["results"]

    threads = [threading.Thread(target=run, args=(k, p))
               for k, p in (("client", client), ("outsider", outsider))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    by_pod = {k: collections.Counter(r["version"] or r["errno"] for r in rs)
              for k, rs in results.items()}
    start = max(rs[0]["t"] for rs in results.values())
    end = min(rs[-1]["done"] for rs in results.values())
    overlap = {k: sum(1 for r in rs if start <= r["t"] <= end) for k, rs in results.items()}
    print(f"at once ({end - start:.2f} s overlap, requests in it {overlap}): {by_pod}")
    assert end - start > 0.5 and min(overlap.values()) >= 100, overlap
    assert by_pod["client"] == {"one": len(results["client"])}
    assert by_pod["outsider"] == {"ENETUNREACH": len(results["outsider"])}
    instances = {r["instance"] for r in get(lab, client, URL, 20)}
    assert instances == {one.spec.name}
    # A bare connect() to the ClusterIP literal (the Service is TCP only): the same split.
    probe = {"op": "connect", "host": cluster_ip, "port": 5000, "proto": "tcp", "count": 10}
    assert {(r["ok"], r["errno"]) for r in lab.call(outsider, probe)["results"]} == {
        (False, "ENETUNREACH")}
    assert {(r["ok"], r["errno"]) for r in lab.call(client, probe)["results"]} == {(True, None)}
    # The outsider's network itself works: it reaches an instance by its pod IP.
    assert outcomes(get(lab, outsider, f"http://{one.ip}:5000/hello", 5)) == {"one": 5}

    # CNI DEL of an enrolled pod (its Deployment deleted) takes exactly its cookie out.
    lab.delete("Deployment", "sample", "helloworld-one")
    assert enrolled(lab) == expected_cookies(lab) == {
        "ambient-worker": {client.extra["cookie"]},
        "ambient-worker2": {two.extra["cookie"]},
    }
    for node in lab.initial_nodes:
        assert records(lab, node) == expected_records(lab, node)
    assert outcomes(get(lab, client, URL, 30)) == {"two": 30}  # failover, translated
    assert outcomes(get(lab, outsider, URL, 30)) == {"error ENETUNREACH": 30}

    # The outsider's own DEL (bridge + host-local only) changes no map.
    lab.remove_unenrolled_pod(outsider.spec.name)
    assert enrolled(lab) == expected_cookies(lab)
    print(f"after the DELs: {json.dumps({n: sorted(c) for n, c in enrolled(lab).items()})}")


def test_the_seed_passes_with_pods_enrolled_only_through_the_chain(lab_factory: Any) -> None:
    seed = scenario.load(scenario.seed_path())
    lab = lab_factory(seed.nodes)
    runner = scenario.Runner(seed, out=lambda _line: None)
    for step in seed.steps:
        record = scenario.StepRecord(step.index + 1, step.kind, scenario.describe(step))
        runner.run_step(lab, step, record)  # raises Unmet on a failed expectation
        # After every step, each node's map holds exactly its running pods' cookies.
        assert enrolled(lab) == expected_cookies(lab), scenario.describe(step)
        if record.versions is not None:
            print(f"[{step.index + 1}] {record.title}: {record.versions}")
    for node in lab.initial_nodes:
        assert lab.enrolment_mode(node) == "cni"
        assert records(lab, node) == expected_records(lab, node)
    assert sum(len(c) for c in enrolled(lab).values()) == len(lab.pods)


def test_in_mode_all_the_same_outsider_is_translated(lab_factory: Any) -> None:
    lab = lab_factory({"ambient-worker": NODES["ambient-worker"]}, enrolment="all")
    assert lab.enrolment_mode("ambient-worker") == "all"
    plugins = cni.load_conflist(lab.conflist_path("ambient-worker"))["plugins"]
    assert [p["type"] for p in plugins] == ["bridge"]  # no kmesh-cni in mode all
    lab.apply(manifests({"one": "ambient-worker"}), "sample")
    outsider = lab.add_unenrolled_pod("ambient-worker", namespace="sample")
    assert outcomes(get(lab, outsider, URL, 20)) == {"one": 20}
    assert outcomes(lab.request("sample", "sleep", URL, 20)) == {"one": 20}
    assert lab.enrolled_cookies("ambient-worker") == set()


# -- the lab's CNI driver, traced: what containerd's CRI would have run ------------------------

TRACER = """#!{python} -I
import json, os, subprocess, sys
name = os.path.basename(sys.argv[0])
raw = sys.stdin.buffer.read()
doc = json.loads(raw)
env = os.environ
with open({log!r}, "a") as log:
    log.write(json.dumps({{
        "plugin": name, "command": env.get("CNI_COMMAND"), "ifname": env.get("CNI_IFNAME"),
        "containerId": env.get("CNI_CONTAINERID"), "netns": env.get("CNI_NETNS"),
        "args": env.get("CNI_ARGS"), "path": env.get("CNI_PATH"),
        "cniVersion": doc.get("cniVersion"), "network": doc.get("name"),
        "prevResult": "prevResult" in doc}}) + "\\n")
if name == "chained":  # a chained plugin that changes nothing, as kmesh-cni
    if env.get("CNI_COMMAND") == "ADD":
        print(json.dumps({{**doc["prevResult"], "cniVersion": doc["cniVersion"]}}))
    sys.exit(0)
done = subprocess.run([os.path.join({real!r}, name)], input=raw, capture_output=True)
sys.stdout.buffer.write(done.stdout)
sys.stderr.buffer.write(done.stderr)
sys.exit(done.returncode)
"""


def test_the_driver_runs_loopback_then_the_chain_with_the_cri_arguments(
        kernel: None, cni_plugins: None, tmp_path: Path) -> None:
    tag = f"kmesh-test-{secrets.token_hex(2)}"  # 15 bytes: also the bridge name
    bin_dir, log = tmp_path / "bin", tmp_path / "trace.jsonl"
    bin_dir.mkdir()
    for name in ("loopback", "bridge", "chained"):  # found first in CNI_PATH, before Debian's
        path = bin_dir / name
        path.write_text(TRACER.format(python=sys.executable, log=str(log),
                                      real=cni.DEFAULT_CNI_PATH))
        path.chmod(0o755)
    cni_path = f"{bin_dir}:{cni.DEFAULT_CNI_PATH}"
    fabric = cni.Fabric(f"{tag}-fabric", tag, str(tmp_path / "state"))
    pod_ns, cid, uid = f"{tag}-a", f"{tag}-sandbox", "0b1c2d3e-aaaa-bbbb-cccc-0123456789ab"
    try:
        fabric.create()
        netns.add(pod_ns, lo_up=False)
        config = fabric.network_config(("198.18.7.10", "198.18.7.20"))
        config["plugins"].append({"type": "chained", "some": "setting"})
        args = cni.k8s_args("sample", "pod-a", cid, uid)
        address = fabric.add_pod(pod_ns, cid, config=config, cni_args=args, cni_path=cni_path,
                                 loopback=True)
        assert address.ipv4.startswith("198.18.7.")
        lo = json.loads(netns.run_in(pod_ns, ["ip", "-j", "link", "show", "dev", "lo"]))
        assert "UP" in lo[0]["flags"]  # the loopback plugin, not the namespace's creation
        fabric.del_pod(pod_ns, cid)
        assert fabric.pods() == []
    finally:
        with contextlib.suppress(Exception):
            fabric.destroy()
        with contextlib.suppress(Exception):
            netns.delete(pod_ns)
    trace = [json.loads(line) for line in log.read_text().splitlines()]
    want_args = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE=sample;K8S_POD_NAME=pod-a;"
                 f"K8S_POD_INFRA_CONTAINER_ID={cid};K8S_POD_UID={uid}")
    assert {(t["args"], t["containerId"], t["path"], t["netns"]) for t in trace} == {
        (want_args, cid, cni_path, f"/var/run/netns/{pod_ns}")}
    steps = [(t["command"], t["plugin"], t["ifname"], t["network"], t["cniVersion"],
              t["prevResult"]) for t in trace]
    for step in steps:
        print(step)
    assert steps == [
        ("ADD", "loopback", "lo", "cni-loopback", "0.3.1", False),
        ("ADD", "bridge", "eth0", fabric.network_name, "1.0.0", False),
        ("ADD", "chained", "eth0", fabric.network_name, "1.0.0", True),
        ("DEL", "loopback", "lo", "cni-loopback", "0.3.1", False),  # no prevResult before 0.4
        ("DEL", "chained", "eth0", fabric.network_name, "1.0.0", True),
        ("DEL", "bridge", "eth0", fabric.network_name, "1.0.0", True),
    ]
