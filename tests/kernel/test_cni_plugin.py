"""kmesh-cni with the real datapath in enrolment mode "cni": only the pod it enrolled is ours.

The datapath is attached with enrolment=ENROL_CNI to a fresh test cgroup and pin dir and serves
one UDP Service (ClusterIP 198.19.0.10:53 -> 198.18.0.7:5353). Two fresh network namespaces
each hold 198.18.0.7 on their loopback and a client process placed in the test cgroup. A UDP
connect() runs the connect4 hook and sends nothing; its peer address says whether the datapath
translated it. A namespace has no default route, so an untranslated connect to the ClusterIP
ends in ENETUNREACH inside it (never ECONNREFUSED, which would be a refusal by the datapath).

kmesh-cni runs as the installed script, as a runtime runs it. Everything made here (namespaces,
cgroup, pins, processes, the state directory) is removed also when a test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from datapath_bed import WORKLOADS, Client, ip, tiers

from kmesh_lab import procs
from kmesh_plugin.cni import enrol, spool
from kmesh_plugin.datapath import loader, records, syscall
from kmesh_plugin.datapath.build import Capacities, compile_object
from kmesh_plugin.datapath.records import MODE_FAILOVER, Backend, Frontend
from kmesh_plugin.datapath.writer import MapWriter

pytestmark = pytest.mark.kernel

VIP = "198.19.0.10"
EP = "198.18.0.7"
FRONT = Frontend(ip(VIP), 53, socket.IPPROTO_UDP)
KMESH_CNI = str(Path(sys.executable).with_name("kmesh-cni"))
PREFIX = "kmesh-test-"


class Node:
    """The datapath in CNI mode, two pod namespaces with a client each, and kmesh-cni's conf."""

    def __init__(self, pin_dir: Path, cgroup: Path, build_dir: Path, state_dir: Path) -> None:
        self.pin_dir = pin_dir
        self.cgroup = cgroup
        self.state_dir = state_dir
        self.netns: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dp: loader.Datapath | None = None
        self.writer: MapWriter | None = None
        caps = Capacities(64, 1024)
        self.dp = loader.attach(pin_dir, cgroup, caps, build_dir,
                                obj=compile_object(caps, build_dir),
                                enrolment=records.ENROL_CNI)
        self.writer = MapWriter(self.dp)
        self.writer.recover()
        self.writer.publish({FRONT: tiers([Backend(ip(EP), 5353)], mode=MODE_FAILOVER)})

    def pod(self) -> tuple[str, Client]:
        """A new namespace (lo up, the endpoint address on it) and a client in it."""
        name = f"{PREFIX}{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.netns.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", f"{EP}/32", "dev", "lo"], check=True)
        path = f"/var/run/netns/{name}"
        proc = procs.spawn([*WORKLOADS, "client"], netns=path, cgroup=str(self.cgroup),
                           stdin=subprocess.PIPE)
        self.procs.append(proc)
        return path, Client(proc)

    def cni(self, command: str, netns: str, cid: str, namespace: str = "default",
            **extra: str) -> subprocess.CompletedProcess[bytes]:
        prev = {"cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": netns}],
                "ips": [{"address": "198.18.0.20/24", "interface": 0}]}
        conf = {"cniVersion": "1.0.0", "name": "podnet", "type": "kmesh-cni",
                "pinDir": str(self.pin_dir), "stateDir": str(self.state_dir),
                "prevResult": prev, **extra}
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("CNI_")},
               "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
               "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
               "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={cid};"
                           f"K8S_POD_UID=u-{cid}"}
        p = subprocess.run([KMESH_CNI], input=json.dumps(conf).encode(), env=env,
                           capture_output=True, timeout=60)
        assert p.returncode == 0, (p.stdout, p.stderr)
        assert b"Traceback" not in p.stderr
        if command == "ADD":
            assert json.loads(p.stdout) == prev
        return p

    def close(self) -> None:
        for proc in self.procs:
            procs.stop(proc)
        if self.writer is not None:
            self.writer.close()
        if self.dp is not None:
            self.dp.close()
        for name in self.netns:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        assert not any(Path("/var/run/netns", n).exists() for n in self.netns)


@pytest.fixture
def node(pin_dir: Path, cgroup: Path, build_dir: Path, tmp_path: Path) -> Iterator[Node]:
    n: Node | None = None
    try:
        n = Node(pin_dir, cgroup, build_dir, tmp_path / "cni-state")
        yield n
    finally:
        if n is not None:
            n.close()


def peers(client: Client, count: int = 3) -> list[Any]:
    """Where each UDP connect to the ClusterIP went: "addr:port", or the errno name."""
    return [r["endpoint"] if r["ok"] else r["errno"]
            for r in client.connect(VIP, 53, proto="udp", count=count)]


def cookie_via_nsenter(netns: str) -> int:
    code = ("import socket,struct;s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM);"
            "print(struct.unpack('=Q',s.getsockopt(socket.SOL_SOCKET,71,8))[0])")
    return int(subprocess.run(["nsenter", f"--net={netns}", sys.executable, "-S", "-c", code],
                              check=True, capture_output=True, text=True).stdout)


def test_only_the_enrolled_pod_is_translated(node: Node) -> None:
    assert node.dp is not None
    assert node.dp.enrolment() == records.ENROL_CNI
    pod_a, client_a = node.pod()
    _pod_b, client_b = node.pod()
    # Nothing enrolled: both pods pass untouched, even to the ClusterIP.
    assert peers(client_a) == ["ENETUNREACH"] * 3
    assert peers(client_b) == ["ENETUNREACH"] * 3

    node.cni("ADD", pod_a, "pod-a")
    # The running process in A is translated from its next connect on; B is not.
    assert peers(client_a) == [f"{EP}:5353"] * 3
    assert peers(client_b) == ["ENETUNREACH"] * 3
    cookie = cookie_via_nsenter(pod_a)
    assert node.dp.enrolled() == [cookie]
    [rec] = spool.read_records(node.state_dir)
    assert (rec.container_id, rec.netns, rec.netns_cookie, rec.pod_name, rec.ips) == (
        "pod-a", pod_a, cookie, "pod-a", ("198.18.0.20",))
    node.cni("CHECK", pod_a, "pod-a")

    node.cni("DEL", pod_a, "pod-a")
    assert peers(client_a) == ["ENETUNREACH"] * 3
    assert peers(client_b) == ["ENETUNREACH"] * 3
    assert node.dp.enrolled() == []
    assert spool.read_records(node.state_dir) == []
    node.cni("DEL", pod_a, "pod-a")  # again: still fine


def test_each_pod_is_enrolled_and_removed_on_its_own(node: Node) -> None:
    pod_a, client_a = node.pod()
    pod_b, client_b = node.pod()
    node.cni("ADD", pod_a, "pod-a")
    node.cni("ADD", pod_b, "pod-b")
    assert peers(client_a) == peers(client_b) == [f"{EP}:5353"] * 3
    node.cni("DEL", pod_b, "pod-b")
    assert peers(client_a) == [f"{EP}:5353"] * 3
    assert peers(client_b) == ["ENETUNREACH"] * 3
    assert node.dp is not None and node.dp.enrolled() == [cookie_via_nsenter(pod_a)]


def test_enrolled_map_agrees_with_syscall_map(node: Node) -> None:
    """enrol.EnrolledMap (its own bpf(2) calls) and syscall.Map see the same kmesh_enrolled."""
    path = node.pin_dir / "maps" / records.MAP_ENROLLED
    with enrol.EnrolledMap(str(node.pin_dir)) as ours, syscall.Map.open_pinned(path) as theirs:
        assert ours.max_entries == theirs.max_entries == records.MAX_PODS
        ours.add(11)
        theirs.update(records.U64.pack(22), records.ENROLMENT.pack({"flags": 0, "pad": 0}))
        assert sorted(records.U64.unpack(k)[0] for k in theirs.keys()) == [11, 22]
        assert sorted(ours.cookies()) == [11, 22]
        assert theirs.lookup(records.U64.pack(11)) == bytes(records.ENROLMENT.size)
        assert ours.contains(22) and not ours.contains(33)
        assert ours.remove(22) and not ours.remove(22)
        assert theirs.delete(records.U64.pack(11))
        assert ours.cookies() == []
    assert node.dp is not None and node.dp.enrolled() == []


def test_with_a_namespace_selector_the_agent_enrols_by_namespace_labels(node: Node) -> None:
    from kmesh_plugin.agent.pods import PodWatch
    from kmesh_plugin.model.selector import parse
    from kmesh_plugin.plugins import Plugins

    assert node.dp is not None
    pod_a, client_a = node.pod()
    pod_b, client_b = node.pod()
    # `enrol: agent` (what `cni install` writes when cni.namespace_selector is set): ADD only
    # records the pod.
    node.cni("ADD", pod_a, "ca", namespace="mesh", enrol="agent")
    node.cni("ADD", pod_b, "cb", namespace="plain", enrol="agent")
    assert node.dp.enrolled() == []
    assert {r.pod_namespace for r in spool.read_records(node.state_dir)} == {"mesh", "plain"}
    labels: dict[str, dict[str, str]] = {"mesh": {"istio.io/dataplane-mode": "kmesh"}}
    synced = [False]
    watch = PodWatch(node.state_dir, Plugins(), selector=parse("istio.io/dataplane-mode=kmesh"),
                     enrolled=node.dp[records.MAP_ENROLLED],
                     namespace_labels=lambda ns: labels.get(ns), ready=lambda: synced[0])
    # Before the agent's first sync nothing is added or taken away.
    watch.poll()
    assert node.dp.enrolled() == [] and peers(client_a) == ["ENETUNREACH"] * 3
    synced[0] = True
    labels["mesh"] = {}
    watch.poll()
    assert node.dp.enrolled() == [] and peers(client_a) == ["ENETUNREACH"] * 3
    # The Namespace gets the label: its pod is enrolled at the next poll; "plain" is unknown
    # (no Namespace object): it keeps what it has, nothing.
    labels["mesh"] = {"istio.io/dataplane-mode": "kmesh"}
    watch.poll()
    assert node.dp.enrolled() == [cookie_via_nsenter(pod_a)]
    # A cookie someone else removed (kmesh-cni's DEL of another attachment of that netns) is
    # put back: the map is read on every poll, not remembered.
    node.dp[records.MAP_ENROLLED].delete(records.U64.pack(cookie_via_nsenter(pod_a)))
    watch.poll()
    assert node.dp.enrolled() == [cookie_via_nsenter(pod_a)]
    assert peers(client_a) == [f"{EP}:5353"] * 3
    assert peers(client_b) == ["ENETUNREACH"] * 3
    assert set(watch.pods) == {("ca", "eth0")}
    # The label goes: un-enrolled. DEL of a recorded, unenrolled pod succeeds.
    labels["mesh"] = {}
    watch.poll()
    assert node.dp.enrolled() == [] and peers(client_a) == ["ENETUNREACH"] * 3
    labels["mesh"] = {"istio.io/dataplane-mode": "kmesh"}
    watch.poll()
    node.cni("DEL", pod_a, "ca", namespace="mesh", enrol="agent")
    node.cni("DEL", pod_b, "cb", namespace="plain", enrol="agent")
    assert node.dp.enrolled() == [] and spool.read_records(node.state_dir) == []
    watch.poll()
    assert watch.pods == {} and node.dp.enrolled() == []
