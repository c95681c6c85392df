"""The lab's low-level network: real CNI bridge/host-local pods, cgroups, pod workloads.

Root tests build a small lab (fabric namespace, pod namespaces, node cgroups, pod processes)
with names "kmesh-test-XXXX..." that are unique per run, and tear all of it down in fixture
finalizers, which pytest runs also when a test fails. Without root they skip, or fail when
KMESH_REQUIRE_BPF=1 (CI must not silently skip them).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmesh_lab import cni, netns, procs, workloads
from kmesh_plugin.datapath.mounts import cgroup2_root

PREFIX = "kmesh-test-"
REPO = str(Path(__file__).resolve().parents[2])
CNI_PATH = cni.DEFAULT_CNI_PATH
READY_TIMEOUT = 20.0
UNREACHABLE_V4 = "198.19.0.10"  # benchmarking range, in no namespace: must never be routed
UNREACHABLE_V6 = "2001:2:ffff::10"  # benchmarking range, outside the fabric's /64
SEARCH = "default.svc.cluster.local svc.cluster.local cluster.local"


# --------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------


def _unique_id() -> str:
    """Claim "kmesh-test-XXXX" (15 bytes, the most a bridge name may have) for one lab.

    mkdir of the cgroup directory is the atomic claim, so concurrent runs never share an id;
    the caller owns that directory and must remove it.
    """
    root = str(cgroup2_root())
    while True:
        lab_id = PREFIX + secrets.token_hex(2)
        if netns.list_names(lab_id):
            continue  # a namespace left by a crashed run: keep away from it
        with contextlib.suppress(FileExistsError):
            os.mkdir(os.path.join(root, lab_id))
            return lab_id


class Pod:
    """A running pod process and its stdout reader."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.out = procs.LineReader(proc.stdout)  # type: ignore[arg-type]

    def ask(self, command: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Send one JSON command to a client pod and return its JSON reply."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()
        return json.loads(self.out.readline(timeout))


class MiniLab:
    """One fabric, pod namespaces and node cgroups; :meth:`close` removes every one of them."""

    def __init__(self, state_dir: str, ipv6_subnet: str | None = None) -> None:
        self.id = _unique_id()
        self.state_dir = state_dir
        self.cgroup = os.path.join(str(cgroup2_root()), self.id)
        self.fabric = cni.Fabric(f"{self.id}-fabric", self.id, state_dir, ipv6_subnet=ipv6_subnet)
        self.pod_netns: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.hosts_file = os.path.join(state_dir, f"{self.id}-hosts")

    def start(self) -> MiniLab:
        procs.make_cgroup(self.cgroup)
        self.fabric.create()
        Path(self.hosts_file).write_text("127.0.0.1 localhost\n")
        return self

    def add_pod(
        self, name: str, ip_range: cni.IpRange | None = None, ipv6_range: cni.IpRange | None = None
    ) -> cni.PodAddress:
        """Create pod namespace ``<id>-<name>`` and attach it with CNI ADD."""
        ns_name = f"{self.id}-{name}"
        netns.add(ns_name)
        self.pod_netns.append(ns_name)
        return self.fabric.add_pod(ns_name, ns_name, ip_range=ip_range, ipv6_range=ipv6_range)

    def pod_cgroup(self, node: str, pod: str) -> str:
        return procs.make_cgroup(os.path.join(self.cgroup, node, pod))

    def run(self, pod: str, node: str, args: list[str], stdin: bool = False) -> Pod:
        """Start a workload in pod ``pod`` on node ``node``; return once it printed ready."""
        proc = procs.spawn(
            [sys.executable, "-m", "kmesh_lab.workloads", *args],
            netns=netns.path(f"{self.id}-{pod}"),
            cgroup=self.pod_cgroup(node, pod),
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": REPO},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            cwd=REPO,
        )
        self.procs.append(proc)
        pod_proc = Pod(proc)
        pod_proc.out.expect("ready", READY_TIMEOUT)
        return pod_proc

    def helloworld(self, pod: str, node: str, version: str) -> Pod:
        return self.run(
            pod, node, ["helloworld", "--version", version, "--instance", f"{self.id}-{pod}"]
        )

    def client(self, pod: str, node: str) -> Pod:
        # The lab id in argv lets leftovers() find a stray client by its command line.
        args = ["client", "--hosts", self.hosts_file, "--search", f"{SEARCH} {self.id}.local"]
        return self.run(pod, node, args, stdin=True)

    def close(self) -> None:
        """Stop processes, DEL pods, delete namespaces and cgroups; raise the first error."""
        errors: list[BaseException] = []
        steps = [lambda proc=proc: procs.stop(proc, timeout=5.0) for proc in self.procs]
        steps.append(self.fabric.destroy)
        steps += [lambda name=name: netns.delete(name) for name in self.pod_netns]
        steps.append(lambda: procs.remove_cgroup_tree(self.cgroup))
        for step in steps:
            try:
                step()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def leftovers(self) -> list[str]:
        """Everything of this lab still on the machine (empty after a clean close)."""
        found = [f"netns {name}" for name in netns.list_names(self.id)]
        if os.path.exists(self.cgroup):
            found.append(f"cgroup {self.cgroup}")
        if os.path.exists(os.path.join("/sys/class/net", self.id)):
            found.append(f"bridge {self.id} in the host namespace")
        if os.path.exists(self.fabric.data_dir):
            found.append(f"host-local data {self.fabric.data_dir}")
        found += [f"process {pid}" for pid in _pids_mentioning(self.id)]
        return found


def _pids_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (not counting this test process)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as handle:
            if text.encode() in handle.read():
                pids.append(int(entry))
    return pids


def _build_lab(tmp_path: Path, ipv6_subnet: str | None = None) -> Iterator[MiniLab]:
    lab = MiniLab(str(tmp_path), ipv6_subnet=ipv6_subnet)
    try:
        yield lab.start()
    finally:
        # Runs whether the test passed or failed; a leftover fails the test at teardown.
        lab.close()
        assert lab.leftovers() == []


@pytest.fixture
def lab(tmp_path: Path, cni_plugins: None) -> Iterator[MiniLab]:
    yield from _build_lab(tmp_path)


@pytest.fixture
def lab6(tmp_path: Path, cni_plugins: None) -> Iterator[MiniLab]:
    yield from _build_lab(tmp_path, ipv6_subnet="2001:2::/64")


def _ns_inode(path: str) -> int:
    return os.stat(path).st_ino


def _routes(ns_name: str, family: str, *selector: str) -> list[dict[str, Any]]:
    return json.loads(netns.run_in(ns_name, ["ip", "-j", family, "route", "show", *selector]))


# --------------------------------------------------------------------------------------------
# Root tests: the lab network
# --------------------------------------------------------------------------------------------


@pytest.mark.lab
def test_client_pod_gets_exact_body_from_server_pod(lab: MiniLab) -> None:
    server = lab.add_pod("a", ip_range=("198.18.1.10", "198.18.1.250"))
    client_addr = lab.add_pod("b", ip_range=("198.18.2.10", "198.18.2.250"))
    assert server.ipv4.startswith("198.18.1.") and client_addr.ipv4.startswith("198.18.2.")
    assert server.ipv4_prefixlen == 16 and server.ipv6 is None

    hello = lab.helloworld("a", "node-a", "v1")
    with open(lab.hosts_file, "w") as handle:
        handle.write(f"# lab services\n{server.ipv4} helloworld.default.svc.cluster.local\n")
    client = lab.client("b", "node-b")

    reply = client.ask({"op": "get", "url": "http://helloworld:5000/hello", "count": 3,
                        "endpoint": True})

    body = f"Hello version: v1, instance: {lab.id}-a\n"
    assert [r["body"] for r in reply["results"]] == [body] * 3, reply
    for result in reply["results"]:
        assert result["ok"] and result["errno"] is None
        assert (result["version"], result["instance"]) == ("v1", f"{lab.id}-a")
        assert result["peer"] == result["endpoint"] == f"{server.ipv4}:5000"
        assert 0 <= result["connect_ms"] <= result["total_ms"]
    # Each pod process is in its node's cgroup and its pod's network namespace, and shares our
    # mount namespace (no /sys remount, bpffs and cgroups stay visible).
    for pod, node, pid in (("a", "node-a", hello.proc.pid), ("b", "node-b", client.proc.pid)):
        with open(f"/proc/{pid}/cgroup") as handle:
            assert f"0::/{lab.id}/{node}/{pod}\n" in handle.read()
        assert _ns_inode(f"/proc/{pid}/ns/net") == _ns_inode(netns.path(f"{lab.id}-{pod}"))
        assert _ns_inode(f"/proc/{pid}/ns/mnt") == _ns_inode("/proc/self/ns/mnt")


@pytest.mark.lab
def test_pod_has_no_default_route_and_foreign_address_is_unreachable(lab: MiniLab) -> None:
    lab.add_pod("a")
    client = lab.client("a", "node-a")

    assert _routes(f"{lab.id}-a", "-4", "default") == []
    for proto in ("tcp", "udp"):
        reply = client.ask(
            {"op": "connect", "host": UNREACHABLE_V4, "port": 5000, "proto": proto, "count": 2}
        )
        assert [r["errno"] for r in reply["results"]] == ["ENETUNREACH"] * 2, reply
    # The bridge lives in the fabric namespace only.
    assert not os.path.exists(f"/sys/class/net/{lab.id}")
    links = json.loads(netns.run_in(lab.fabric.netns_name, ["ip", "-j", "link", "show"]))
    assert lab.id in {link["ifname"] for link in links}


@pytest.mark.lab
def test_del_releases_the_host_local_address(lab: MiniLab) -> None:
    single = ("198.18.9.10", "198.18.9.10")  # a node range of exactly one address
    first = lab.add_pod("a", ip_range=single)
    assert first.ipv4 == "198.18.9.10"
    netns.add(f"{lab.id}-b")
    lab.pod_netns.append(f"{lab.id}-b")

    with pytest.raises(cni.CniError) as exhausted:
        lab.fabric.add_pod(f"{lab.id}-b", f"{lab.id}-b", ip_range=single)
    assert exhausted.value.plugin == "bridge" and exhausted.value.code is not None
    assert "198.18.9.10" in exhausted.value.msg or "no IP" in exhausted.value.msg
    with pytest.raises(ValueError, match="already has eth0"):
        lab.fabric.add_pod(f"{lab.id}-a", "another-container", ip_range=("198.18.9.11",) * 2)

    lab.fabric.del_pod(f"{lab.id}-a", f"{lab.id}-a")
    lab.fabric.del_pod(f"{lab.id}-a", f"{lab.id}-a")  # idempotent
    veths = netns.run_in(f"{lab.id}-a", ["ip", "-j", "link", "show", "type", "veth"])
    assert json.loads(veths) == []  # DEL removed the pod's interface too

    second = lab.fabric.add_pod(f"{lab.id}-b", f"{lab.id}-b", ip_range=single)
    assert second.ipv4 == "198.18.9.10"

    # DEL after the pod's namespace is gone still releases the lease.
    netns.delete(f"{lab.id}-b")
    lab.fabric.del_pod(f"{lab.id}-b", f"{lab.id}-b")
    third = lab.fabric.add_pod(f"{lab.id}-a", f"{lab.id}-a", ip_range=single)
    assert third.ipv4 == "198.18.9.10"


@pytest.mark.lab
def test_dual_stack_pods(lab6: MiniLab) -> None:
    server = lab6.add_pod("a", ip_range=("198.18.1.10", "198.18.1.20"))
    lab6.add_pod("b", ipv6_range=("2001:2::100", "2001:2::1ff"))
    assert server.ipv6 is not None and server.ipv6.startswith("2001:2::")
    lab6.helloworld("a", "node-a", "v2")
    client = lab6.client("b", "node-b")

    body = f"Hello version: v2, instance: {lab6.id}-a\n"
    for url, peer in (
        (f"http://[{server.ipv6}]:5000/hello", f"[{server.ipv6}]:5000"),
        (f"http://{server.ipv4}:5000/hello", f"{server.ipv4}:5000"),
    ):
        (result,) = client.ask({"op": "get", "url": url})["results"]
        assert (result["body"], result["peer"]) == (body, peer), result

    for pod in ("a", "b"):
        assert _routes(f"{lab6.id}-{pod}", "-6", "default") == []
        assert _routes(f"{lab6.id}-{pod}", "-4", "default") == []
    reply = client.ask({"op": "connect", "host": UNREACHABLE_V6, "port": 5000, "count": 1})
    assert reply["results"][0]["errno"] == "ENETUNREACH", reply


@pytest.mark.lab
def test_everything_is_removed_even_when_the_test_body_fails(
    tmp_path: Path, cni_plugins: None
) -> None:
    lab = MiniLab(str(tmp_path))
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="deliberate"):
        try:
            lab.start()
            lab.add_pod("a")
            lab.add_pod("b")
            pids.append(lab.helloworld("a", "node-a", "v1").proc.pid)
            pids.append(lab.client("b", "node-b").proc.pid)
            raise RuntimeError("deliberate failure")
        finally:
            lab.close()
    assert lab.leftovers() == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")


@pytest.mark.lab
def test_remove_cgroup_tree_kills_what_is_left(cni_plugins: None) -> None:
    root = os.path.join(str(cgroup2_root()), _unique_id())
    try:
        leaf = procs.make_cgroup(os.path.join(root, "node", "pod"))
        # A shell with a child of its own: both must die, and nothing may be left unreaped.
        proc = procs.spawn(["sh", "-c", "sleep 300 & echo ready; wait"], netns=None, cgroup=leaf)
        procs.LineReader(proc.stdout).expect("ready", READY_TIMEOUT)  # type: ignore[arg-type]
        assert len(procs.cgroup_pids(leaf)) == 2

        procs.remove_cgroup_tree(root, timeout=10.0)

        assert not os.path.exists(root)
        assert proc.wait(timeout=10.0) == -9
    finally:
        procs.remove_cgroup_tree(root)


# --------------------------------------------------------------------------------------------
# Unit tests (no root)
# --------------------------------------------------------------------------------------------

HOSTS = """\
127.0.0.1 localhost
# comment line
198.18.1.10  helloworld.default.svc.cluster.local  hw   # trailing comment
198.18.1.11  helloworld.default.svc.cluster.local
2001:2::5    v6only.default.svc.cluster.local
198.18.7.7   helloworld.other.svc.cluster.local
198.18.8.8   helloworld
not-an-ip    broken
198.18.9.9   a.b.c.d.e.f
"""


def test_parse_hosts_keeps_file_order_and_skips_junk() -> None:
    table = workloads.parse_hosts(HOSTS)
    assert table["helloworld.default.svc.cluster.local"] == ["198.18.1.10", "198.18.1.11"]
    assert table["hw"] == ["198.18.1.10"]
    assert "broken" not in table and "#" not in "".join(table)


def test_search_candidates_follow_ndots_5() -> None:
    search = ["default.svc.cluster.local", "svc.cluster.local"]
    assert workloads.search_candidates("helloworld", search) == [
        "helloworld.default.svc.cluster.local",
        "helloworld.svc.cluster.local",
        "helloworld",
    ]
    # Five dots or more: the name itself first, then the search list.
    assert workloads.search_candidates("a.b.c.d.e.f", search)[0] == "a.b.c.d.e.f"
    # A trailing dot makes the name absolute.
    assert workloads.search_candidates("helloworld.", search) == ["helloworld"]


@pytest.mark.parametrize(
    ("name", "search", "expected"),
    [
        ("helloworld", ["default.svc.cluster.local"], "198.18.1.10"),
        ("HelloWorld", ["default.svc.cluster.local"], "198.18.1.10"),
        ("helloworld", ["other.svc.cluster.local", "default.svc.cluster.local"], "198.18.7.7"),
        ("helloworld", ["nothing.local"], "198.18.8.8"),  # falls back to the bare name
        ("helloworld.default", ["svc.cluster.local"], "198.18.1.10"),
        ("v6only", ["default.svc.cluster.local"], "2001:2::5"),
        ("a.b.c.d.e.f", ["x"], "198.18.9.9"),
        ("198.19.0.10", [], "198.19.0.10"),
        ("[2001:2::1]", [], "2001:2::1"),
    ],
)
def test_resolve(name: str, search: list[str], expected: str) -> None:
    assert workloads.resolve(name, workloads.parse_hosts(HOSTS), search) == expected


def test_resolve_unknown_name() -> None:
    with pytest.raises(workloads.ResolveError, match="nosuch"):
        workloads.resolve("nosuch", workloads.parse_hosts(HOSTS), ["default.svc.cluster.local"])


def test_client_commands_never_crash(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("198.18.1.10 hw\n")
    assert "error" in workloads.handle_command("not json", str(hosts), [])
    assert "error" in workloads.handle_command("[1]", str(hosts), [])
    assert "error" in workloads.handle_command('{"op": "dance", "id": 3}', str(hosts), [])
    assert workloads.handle_command('{"op": "get"}', str(hosts), [])["error"].startswith("KeyError")
    assert workloads.handle_command('{"op": "quit", "id": 1}', None, []) == {
        "ok": True,
        "quit": True,
        "id": 1,
    }
    reply = workloads.handle_command('{"op": "get", "url": "http://nosuch/x"}', str(hosts), [])
    (result,) = reply["results"]
    assert (result["ok"], result["errno"]) == (False, "EAI_NONAME")


def test_parse_hello() -> None:
    assert workloads.parse_hello("Hello version: v1, instance: pod-a\n") == ("v1", "pod-a")
    assert workloads.parse_hello("not found\n") == (None, None)


def test_spawn_names_a_missing_cgroup() -> None:
    missing = "/nonexistent-kmesh-test/cgroup"
    with pytest.raises(procs.SpawnError, match=missing):
        procs.spawn(["true"], netns=None, cgroup=missing)


def test_cgroup2_root_parses_mountinfo(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "25 1 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n"
        "41 31 0:38 / /sys/fs/cgroup/my\\040unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert str(cgroup2_root(str(mountinfo))) == "/sys/fs/cgroup/my unified"
