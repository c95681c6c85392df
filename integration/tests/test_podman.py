"""Enrolment under a real container runtime: podman 4.3 runs the CNI chain bridge + host-local +
kmesh-cni (SPEC section 9, enrolment = "cni").

The agent (`kmesh-plugin run`, manifests source) attaches the datapath to the cgroup v2 root,
where podman's containers live, in enrolment mode "cni"; `kmesh-plugin cni install` puts
kmesh-cni at the end of network A's conflist. Then:

- a client container on network A is enrolled (its netns cookie is in kmesh_enrolled and a state
  record names it) and its connects to the ClusterIP reach the endpoint the agent programmed;
- a client on network B (bridge + host-local only) is not: at the same moment its connect to
  the same ClusterIP stays untranslated and fails with ENETUNREACH (no default route);
- `podman rm -f` of the A client runs the CNI DEL: its cookie and its record are gone.

Every answer names the server container that gave it. Skips without podman (fails instead
under KMESH_REQUIRE_BPF=1).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import missing
from kmesh_lab import podman as podman_mod
from kmesh_lab import procs
from kmesh_lab.podman import Network, Podman
from kmesh_plugin.datapath import records, syscall
from kmesh_plugin.datapath.loader import Datapath
from kmesh_plugin.datapath.records import Frontend
from kmesh_plugin.datapath.writer import read_table
from kmesh_plugin.sources.inotify import Inotify

NODE = "kmesh-test-node"
VIP = "198.19.91.10"
PORT = 5000
SUBNET_A = "198.18.91.0/24"  # network A: bridge + host-local + kmesh-cni
SUBNET_B = "198.18.92.0/24"  # network B: bridge + host-local only
WAIT = 60.0
SO_NETNS_COOKIE = 71
CLI = [sys.executable, "-m", "kmesh_plugin.cli"]

pytestmark = pytest.mark.kernel


@pytest.fixture
def podman_ok() -> None:
    reason = podman_mod.unavailable()
    if reason:
        missing(reason)


# -- the agent ---------------------------------------------------------------------------------


def write_config(tmp: Path, pin_dir: Path, build_dir: Path, pm: Podman, conflist: str) -> Path:
    config = tmp / "plugin.toml"
    (tmp / "manifests").mkdir()
    config.write_text("\n".join([
        "[node]", f'name = "{NODE}"',
        "[datapath]", 'cgroup = ""', f'pin_dir = "{pin_dir}"', f'build_dir = "{build_dir}"',
        "max_services = 64", "max_endpoints = 1024", 'enrolment = "cni"',
        "[cni]", f'conf_dir = "{pm.net_dir}"', f'conflist = "{conflist}"',
        f'bin_dir = "{pm.bin_dir}"', f'state_dir = "{tmp / "cni-state"}"',
        f'log_file = "{tmp / "kmesh-cni.log"}"',
        "[source]", 'kind = "manifests"', f'path = "{tmp / "manifests"}"',
        "[agent]", f'status_file = "{tmp / "status.json"}"', "metrics = false",
        'log_format = "json"',
    ]) + "\n")
    return config


def write_manifests(manifests: Path, revision: str, endpoints: list[str]) -> None:
    """The Node, and (with ``endpoints``) Service t/web at VIP:PORT with one EndpointSlice;
    .revision last, each file replaced atomically."""
    items: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": {}}}]
    if endpoints:
        items += [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "t"},
             "spec": {"clusterIP": VIP, "ports": [{"name": "http", "port": PORT}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "web-1", "namespace": "t",
                          "labels": {"kubernetes.io/service-name": "web"}},
             "addressType": "IPv4", "ports": [{"name": "http", "port": PORT}],
             "endpoints": [{"addresses": [a], "nodeName": NODE, "conditions": {"ready": True}}
                           for a in endpoints]},
        ]
    doc = {"apiVersion": "v1", "kind": "List", "items": items}
    for name, text in (("web.json", json.dumps(doc)), (".revision", revision)):
        fd, tmp = tempfile.mkstemp(dir=manifests.parent, prefix=".manifest-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, manifests / name)


_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_the_test() -> None:
    _libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: no agent outlives the test


class Agent:
    def __init__(self, config: Path, tmp: Path) -> None:
        self.status = tmp / "status.json"
        self.log = tmp / "agent.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*CLI, "run", "-c", str(config)], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True,
                                         preexec_fn=_die_with_the_test)

    def wait_revision(self, revision: str, timeout: float = WAIT) -> dict[str, Any]:
        """Until the status file says the agent applied manifest ``revision``."""
        deadline = time.monotonic() + timeout
        with Inotify() as watch:
            watch.watch(self.status.parent)  # the agent replaces the file by rename
            while True:
                with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                    st = json.loads(self.status.read_text())
                    if st.get("source_revision") == revision and st.get("synced"):
                        return st
                if self.proc.poll() is not None:
                    raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.tail()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"agent did not apply revision {revision}:\n"
                                         f"{self.tail()}")
                watch.wait(min(1.0, max(0.0, deadline - time.monotonic())))

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        procs.stop(self.proc, timeout=30)


def backends(pin_dir: Path) -> set[str]:
    """What a connect to VIP:PORT can reach now, read from the kernel maps."""
    dp = Datapath.open(pin_dir, read_only=True)
    try:
        table = read_table(dp)
    finally:
        dp.close()
    published = table.get(Frontend(ipaddress.ip_address(VIP), PORT))
    if published is None or published.backends is None:
        return set()
    return {str(b) for tier in published.backends.tiers for b in tier}


# -- enrolment -----------------------------------------------------------------------------


def netns_cookie(netns: str) -> int:
    """SO_NETNS_COOKIE read from a socket opened inside ``netns`` (only its network namespace
    is entered: nsenter --net)."""
    code = ("import socket, struct; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
            f"print(struct.unpack('=Q', s.getsockopt(socket.SOL_SOCKET, {SO_NETNS_COOKIE}, 8))"
            "[0])")
    out = subprocess.run(["nsenter", f"--net={netns}", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=30, check=True)
    return int(out.stdout)


def enrolled_cookies(pin_dir: Path) -> set[int]:
    with syscall.Map.open_pinned(pin_dir / "maps" / records.MAP_ENROLLED) as m:
        return {records.U64.unpack(k)[0] for k in m.keys()}


def state_records(state_dir: Path) -> list[dict[str, Any]]:
    """The contract's <stateDir>/pods/*.json, as written (temporaries and the lock skipped)."""
    out = []
    for path in sorted((state_dir / "pods").glob("*.json")):
        out.append(json.loads(path.read_text()))
    return out


def record_of(state_dir: Path, container_id: str) -> dict[str, Any] | None:
    found = [r for r in state_records(state_dir) if r.get("containerId") == container_id]
    assert len(found) <= 1, found
    return found[0] if found else None


# -- connects ------------------------------------------------------------------------------


def wget(pm: Podman, container: str, url: str) -> subprocess.CompletedProcess[str]:
    """busybox wget in ``container``, bounded by busybox timeout (wget -T segfaults in
    busybox-static 1.35)."""
    return pm.exec(container, "/bin/busybox", "timeout", "20", "/bin/busybox", "wget", "-qO-",
                   url, timeout=60)


def answer(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout.strip()


def server(pm: Podman, name: str, network: Network) -> str:
    """An httpd container whose / names it; its IP, once it answers on it."""
    pm.run(name, network, "/bin/sh", "-c",
           f"echo {name} > /www/index.html && exec /bin/busybox httpd -f -p {PORT} -h /www")
    return pm.ip(name, network)


@contextlib.contextmanager
def cleanup(pm: Podman, config: Path, agent: list[Agent]) -> Iterator[None]:
    """At the end, also on failure: the containers (their DEL needs the pins), the agent, the
    datapath (`kmesh-plugin datapath remove`), then the rest of podman."""
    try:
        yield
    finally:
        problems = []
        with contextlib.suppress(Exception):
            pm.podman("rm", "-a", "-f", "-t", "0")
        for a in agent:
            a.stop()
        out = subprocess.run([*CLI, "datapath", "remove", "-c", str(config)],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            problems.append(f"datapath remove: {out.returncode}: {out.stderr}")
        try:
            pm.close()
        except podman_mod.PodmanError as e:
            problems.append(str(e))
        assert not problems, problems


def test_podman_runs_kmesh_cni_and_only_its_containers_are_translated(
    podman_ok: None, kernel: None, pin_dir: Path, build_dir: Path, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    pm = Podman()
    net_a = pm.add_network(SUBNET_A)
    net_b = pm.add_network(SUBNET_B)
    state_dir = tmp_path / "cni-state"
    config = write_config(tmp_path, pin_dir, build_dir, pm, net_a.conflist.name)
    started: list[Agent] = []
    with cleanup(pm, config, started):
        pm.import_busybox()

        # kmesh-cni into network A's chain only: the real install command.
        out = subprocess.run([*CLI, "cni", "install", "-c", str(config)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        chain_a = [p["type"] for p in net_a.read()["plugins"]]
        chain_b = [p["type"] for p in net_b.read()["plugins"]]
        assert chain_a == ["bridge", "kmesh-cni"], chain_a
        assert chain_b == ["bridge"], chain_b
        entry = net_a.read()["plugins"][-1]
        assert entry["pinDir"] == str(pin_dir) and entry["stateDir"] == str(state_dir), entry
        assert os.access(pm.bin_dir / "kmesh-cni", os.X_OK)
        print(f"\nconflist A: {chain_a} (+ host-local IPAM), conflist B: {chain_b}")

        # The agent first: kmesh-cni's ADD needs the pinned kmesh_enrolled map.
        write_manifests(tmp_path / "manifests", "1", [])
        started.append(agent := Agent(config, tmp_path))
        agent.wait_revision("1", timeout=120)  # the first start compiles the datapath
        dp = Datapath.open(pin_dir, read_only=True)
        try:
            assert dp.enrolment() == records.ENROL_CNI
        finally:
            dp.close()

        srv_a = server(pm, "srv-a", net_a)
        srv_b = server(pm, "srv-b", net_a)
        write_manifests(tmp_path / "manifests", "2", [srv_b])
        agent.wait_revision("2")
        assert backends(pin_dir) == {f"{srv_b}:{PORT}"}

        pm.run("cli-a", net_a, "/bin/busybox", "sleep", "600")
        pm.run("cli-b", net_b, "/bin/busybox", "sleep", "600")
        id_a = pm.inspect("cli-a")["Id"]
        id_b = pm.inspect("cli-b")["Id"]
        ip_a = pm.ip("cli-a", net_a)
        cookie_a = netns_cookie(pm.sandbox("cli-a"))
        cookie_b = netns_cookie(pm.sandbox("cli-b"))
        assert cookie_a != cookie_b

        # 1. cli-a is enrolled: its cookie in the map, a record naming it.
        cookies = enrolled_cookies(pin_dir)
        assert cookie_a in cookies, (cookie_a, cookies)
        assert cookie_b not in cookies, (cookie_b, cookies)
        rec = record_of(state_dir, id_a)
        assert rec is not None, state_records(state_dir)
        assert rec["netnsCookie"] == cookie_a and rec["ifname"] == "eth0", rec
        assert rec["netns"] == pm.sandbox("cli-a") and rec["podName"] == "cli-a", rec
        assert rec["ips"] == [ip_a] and rec["version"] == 1, rec
        assert record_of(state_dir, id_b) is None
        print(f"cli-a ({ip_a}, netns cookie {cookie_a}) enrolled: record {rec}")
        print(f"cli-b ({pm.ip('cli-b', net_b)}, netns cookie {cookie_b}) not enrolled")

        # The servers answer on their own IPs (no translation involved).
        assert answer(wget(pm, "cli-a", f"http://{srv_a}:{PORT}/")) == "srv-a"
        assert answer(wget(pm, "cli-a", f"http://{srv_b}:{PORT}/")) == "srv-b"

        # 3 (and 1). The same ClusterIP, from both clients at the same time.
        url = f"http://{VIP}:{PORT}/"
        with ThreadPoolExecutor(2) as pool:
            fut_a = pool.submit(wget, pm, "cli-a", url)
            fut_b = pool.submit(wget, pm, "cli-b", url)
            got_a, got_b = fut_a.result(), fut_b.result()
        assert answer(got_a) == "srv-b", "cli-a's connect to the ClusterIP reached " + got_a.stdout
        assert got_b.returncode != 0 and got_b.stdout == "", (got_b.returncode, got_b.stdout)
        assert "Network is unreachable" in got_b.stderr, got_b.stderr
        assert "refused" not in got_b.stderr, got_b.stderr
        print(f"{url} from cli-a (enrolled): answered by {got_a.stdout.strip()} ({srv_b})")
        print(f"{url} from cli-b (network B): {got_b.stderr.strip()}")

        # The agent moves the Service to srv-a: cli-a follows, cli-b still untouched.
        write_manifests(tmp_path / "manifests", "3", [srv_a])
        agent.wait_revision("3")
        assert backends(pin_dir) == {f"{srv_a}:{PORT}"}
        assert answer(wget(pm, "cli-a", url)) == "srv-a"
        again_b = wget(pm, "cli-b", url)
        assert again_b.returncode != 0 and "Network is unreachable" in again_b.stderr
        print(f"after the EndpointSlice moved to srv-a ({srv_a}): cli-a answered by srv-a, "
              f"cli-b: {again_b.stderr.strip()}")

        # 2. podman rm -f runs the DEL: the cookie and the record are gone.
        pm.rm("cli-a")
        assert cookie_a not in enrolled_cookies(pin_dir)
        assert record_of(state_dir, id_a) is None, state_records(state_dir)
        # The servers stay enrolled (they are on network A too).
        assert {r["podName"] for r in state_records(state_dir)} == {"srv-a", "srv-b"}
        print(f"podman rm -f cli-a: cookie {cookie_a} and its record removed; "
              f"records left: srv-a, srv-b")
        # The other containers' DELs leave nothing enrolled.
        pm.podman("rm", "-a", "-f", "-t", "0")
        assert enrolled_cookies(pin_dir) == set()
        assert state_records(state_dir) == []
        print(f"kmesh-cni log:\n{(tmp_path / 'kmesh-cni.log').read_text()[-1500:]}"
              if (tmp_path / "kmesh-cni.log").exists() else "no kmesh-cni log")
    print(f"test time {time.monotonic() - t0:.1f} s")
