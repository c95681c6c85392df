"""Control-plane benchmarks with the real agent process (`kmesh-plugin run`).

* full sync of S Services x E endpoints from a manifest directory: reconcile time (the agent's
  own measure, from its source's complete batch to the maps holding it), time to ready from
  process start, map operations per second, peak RSS;
* one endpoint change: from the manifest file's rename into the directory to the new set being
  live in the kernel (the group's generation moves), p50 / p99;
* a relabel of the agent's own node with 100,000 endpoints: every group is recomputed; the
  recompute time, and connects failed meanwhile by a client of a Service whose closest
  endpoint moves (must be zero).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmesh_lab import procs
from kmesh_lab.apiserver import ApiServer
from kmesh_lab.bench.topology import SERVER_PORT, BenchNet
from kmesh_plugin.datapath import loader, records
from kmesh_plugin.datapath.inspect import read_stats
from kmesh_plugin.datapath.loader import Datapath
from kmesh_plugin.datapath.records import Frontend
from kmesh_plugin.sources.inotify import Inotify

NODE = "bench-node"
ZONE = "topology.kubernetes.io/zone"
REGION = "topology.kubernetes.io/region"
VIP_BASE = int(ipaddress.ip_address("198.19.192.0"))
PORTS_PER_VIP = 16
TARGET = "target"


def service_vip(i: int) -> tuple[str, int]:
    return str(ipaddress.ip_address(VIP_BASE + i // PORTS_PER_VIP)), 2000 + i % PORTS_PER_VIP


def endpoint_ip(i: int) -> str:
    return str(ipaddress.ip_address(int(ipaddress.ip_address("198.18.64.0")) + i % 60000))


def node_objects(own_zone: str) -> dict[str, Any]:
    nodes = [(NODE, own_zone), ("n2", "a"), ("n3", "b")]
    return {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Node",
         "metadata": {"name": name, "labels": {REGION: "r", ZONE: zone}}}
        for name, zone in nodes
    ]}


def service_file(i: int, endpoints: int, version: int = 0) -> dict[str, Any]:
    """Service i with its EndpointSlice; ``version`` moves one endpoint to a new address."""
    ip, port = service_vip(i)
    name = f"svc-{i}"
    addresses = [endpoint_ip(i * endpoints + e + version * 7919) for e in range(endpoints)]
    return {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": "bench"},
         "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": port, "targetPort": 8080}],
                  "trafficDistribution": "PreferClose"}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-1", "namespace": "bench",
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
         "endpoints": [{"addresses": [a], "nodeName": ("n2", "n3", NODE)[e % 3],
                        "conditions": {"ready": True}} for e, a in enumerate(addresses)]},
    ]}


def target_file(server_ip: str) -> dict[str, Any]:
    """A Service whose closest endpoint moves when the agent's node changes zone: port 8080
    of the server sits on n2 (zone a), port 8081 on n3 (zone b)."""
    return {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": TARGET, "namespace": "bench"},
         "spec": {"clusterIP": "198.19.191.1", "ports": [{"name": "http", "port": 80}],
                  "trafficDistribution": "PreferClose"}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{TARGET}-a", "namespace": "bench",
                      "labels": {"kubernetes.io/service-name": TARGET}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": SERVER_PORT}],
         "endpoints": [{"addresses": [server_ip], "nodeName": "n2"}]},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{TARGET}-b", "namespace": "bench",
                      "labels": {"kubernetes.io/service-name": TARGET}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": SERVER_PORT + 1}],
         "endpoints": [{"addresses": [server_ip], "nodeName": "n3"}]},
    ]}


def write(path: Path, doc: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent.parent, prefix=".bench-")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)  # atomic, as the source documents


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    config: Path
    status: Path
    pin_dir: Path
    started: float

    def read_status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def wait(self, revision: str, timeout: float = 300.0) -> dict[str, Any]:
        """Block until the agent reports ``revision`` (inotify on the status directory)."""
        deadline = time.monotonic() + timeout
        with Inotify() as watch:
            watch.watch(self.status.parent)
            while True:
                st = self.read_status()
                if st and st.get("source_revision") == revision and st.get("last_reconcile"):
                    return st
                if self.proc.poll() is not None:
                    raise RuntimeError(f"agent exited {self.proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"agent did not reach revision {revision}")
                watch.wait(min(1.0, deadline - time.monotonic()))

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        """Stop the agent and remove its datapath: the agents of one run share a cgroup, and a
        stopped agent's programs would keep translating (and counting) there."""
        self.proc.terminate()
        self.proc.wait(timeout=60)
        loader.remove(self.pin_dir)


def start_agent(net: BenchNet, manifests: Path, name: str, services: int) -> Agent:
    state = net.state / name
    state.mkdir(parents=True, exist_ok=True)
    pin_dir = net.pin_root / name
    config = state / "plugin.toml"
    config.write_text("\n".join([
        "[node]", f'name = "{NODE}"',
        "[datapath]", f'cgroup = "{net.cgroup_of("agent")}"', f'pin_dir = "{pin_dir}"',
        f'build_dir = "{net.build_dir}"',
        f"max_services = {max(1024, services * 2)}", "max_endpoints = 262144",
        "[source]", f'path = "{manifests}"',
        "[agent]", f'status_file = "{state / "status.json"}"', "metrics = false",
        'log_level = "warning"',
    ]) + "\n")
    log = open(state / "agent.log", "ab")  # noqa: SIM115 - owned by the agent process
    proc = subprocess.Popen([sys.executable, "-m", "kmesh_plugin.cli", "run", "-c", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Agent(proc, config, state / "status.json", pin_dir, time.perf_counter())


def populate(manifests: Path, services: int, endpoints: int, revision: str,
             own_zone: str = "a") -> None:
    manifests.mkdir(parents=True, exist_ok=True)
    write(manifests / "nodes.json", node_objects(own_zone))
    for i in range(services):
        write(manifests / f"svc-{i}.json", service_file(i, endpoints))
    (manifests / ".revision").write_text(revision)


def full_sync(net: BenchNet, services: int, endpoints: int, log: Any = print) -> dict[str, Any]:
    manifests = net.state / f"manifests-{services}x{endpoints}"
    populate(manifests, services, endpoints, "1")
    agent = start_agent(net, manifests, f"agent-{services}x{endpoints}", services)
    try:
        st = agent.wait("1")
        ready = time.perf_counter() - agent.started
        last = st["last_reconcile"]
        ops = last["slot_writes"] + 3 * last["added"]  # slots; record, active, frontend per group
        result = {
            "services": services, "endpoints_per_service": endpoints,
            "endpoints": services * endpoints,
            "reconcile_seconds": last["seconds"],
            "ready_seconds": ready,
            "map_ops": ops, "map_ops_per_second": ops / last["seconds"],
            "syscalls": last["syscalls"],
            "peak_rss_mb": agent.peak_rss_mb(),
            "groups": st["datapath"]["groups"],
        }
        log(f"  full sync {services}x{endpoints}: reconcile {last['seconds']:.2f} s, ready "
            f"{ready:.2f} s, {result['peak_rss_mb']:.0f} MB peak RSS")
        return result
    finally:
        agent.stop()


def single_changes(net: BenchNet, services: int, endpoints: int, changes: int,
                   log: Any = print) -> dict[str, Any]:
    """Event to live map entry for one endpoint change, ``changes`` times."""
    manifests = net.state / f"manifests-change-{services}x{endpoints}"
    populate(manifests, services, endpoints, "1")
    agent = start_agent(net, manifests, "agent-change", services)
    try:
        agent.wait("1")
        dp = Datapath.open(agent.pin_dir)
        try:
            latencies = _changes(dp, manifests, services, endpoints, changes)
        finally:
            dp.close()
    finally:
        agent.stop()
    lat = sorted(latencies)
    result = {
        "services": services, "changes": len(lat),
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
        "max_ms": lat[-1] * 1000,
    }
    log(f"  single change on {services} Services: p50 {result['p50_ms']:.2f} ms, "
        f"p99 {result['p99_ms']:.2f} ms")
    return result


def _changes(dp: Datapath, manifests: Path, services: int, endpoints: int,
             changes: int) -> list[float]:
    rng = random.Random(7)
    frontends = dp[records.MAP_FRONTENDS]
    latencies = []
    for k in range(1, changes + 1):
        i = rng.randrange(services)
        ip, port = service_vip(i)
        raw = frontends.lookup(Frontend(ipaddress.ip_address(ip), port).pack())
        assert raw is not None, f"no frontend for svc-{i}"
        sid = records.FRONTEND.unpack(raw)["sid"]
        before = _generation(dp, sid)
        doc = service_file(i, endpoints, version=k)
        started = time.perf_counter()
        write(manifests / f"svc-{i}.json", doc)
        # Busy-wait on the kernel map (yielding the CPU): this *is* the measured condition.
        deadline = started + 10
        while _generation(dp, sid) == before:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"svc-{i}: no new generation within 10 s")
            os.sched_yield()
        latencies.append(time.perf_counter() - started)
    return latencies


def _await_connects(pin_dir: Path, count: int, timeout: float = 10.0) -> None:
    """Until the datapath has translated ``count`` connects to the target."""
    dp = Datapath.open(pin_dir)
    try:
        raw = dp[records.MAP_FRONTENDS].lookup(
            Frontend(ipaddress.ip_address("198.19.191.1"), 80).pack())
        assert raw is not None, "the target Service has no frontend"
        sid = records.FRONTEND.unpack(raw)["sid"]
        deadline = time.monotonic() + timeout
        while sum(s.hits for s in read_stats(dp, [sid]).get(sid, {}).values()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} connects within {timeout} s")
            os.sched_yield()
    finally:
        dp.close()


def _generation(dp: Datapath, sid: int) -> int:
    raw = dp[records.MAP_ACTIVE].lookup(records.U32.pack(sid))
    active = records.U32.unpack(raw)[0] & 1 if raw else 0
    rec = dp[records.MAP_RECORDS].lookup(records.record_index(sid, active))
    return records.RECORD.unpack(rec)["generation"] if rec else -1


def relabel_under_load(net: BenchNet, services: int, endpoints: int,
                       log: Any = print) -> dict[str, Any]:
    """Relabel the agent's own node (zone a -> b): every group is recomputed while a client in
    the agent's cgroup connects to a Service whose closest endpoint moves."""
    manifests = net.state / "manifests-relabel"
    populate(manifests, services, endpoints, "1")
    server = net.pods["server"].ipv4
    write(manifests / "target.json", target_file(server))
    (manifests / ".revision").write_text("2")
    agent = start_agent(net, manifests, "agent-relabel", services)
    extra = None
    try:
        agent.wait("2")
        # A second server port, so the target's two endpoints are distinct backends.
        extra = procs.spawn([str(net.loadgen), "server", str(SERVER_PORT + 1), "1"],
                            netns=net.pods["server"].netns_path, cgroup=None)
        procs.LineReader(extra.stdout).expect("ready", 10)  # type: ignore[arg-type]
        duration = 6.0
        client = net.spawn_client("agent", "198.19.191.1", 80, "cc", duration, 1)
        _await_connects(agent.pin_dir, 1000)  # relabel once the client is well under way
        write(manifests / "nodes.json", node_objects("b"))
        (manifests / ".revision").write_text("3")
        st = agent.wait("3")
        out, _ = client.communicate(timeout=duration + 30)
        run = json.loads(out)
        last = st["last_reconcile"]
        result = {
            "endpoints": services * endpoints, "full": last["full"],
            "recompute_seconds": last["seconds"], "updated_groups": last["updated"],
            "connects": run["connections"], "failed_connects": sum(run["errors"].values()),
            "errors": run["errors"],
        }
        log(f"  relabel with {services * endpoints} endpoints: recompute "
            f"{last['seconds']:.2f} s, {run['connections']} connects, "
            f"{result['failed_connects']} failed")
        return result
    finally:
        if extra is not None:
            procs.stop(extra)
        agent.stop()


# -- through the Kubernetes API ----------------------------------------------------------------
#
# The same shapes, served by the in-test API server (kmesh_lab.apiserver, in this process, real
# HTTP on 127.0.0.1) to an agent with the kubernetes source: list, watch and relist as on a
# real cluster.


def api_server(services: int, endpoints: int, own_zone: str = "a",
               target_server: str | None = None) -> ApiServer:
    server = ApiServer(token="kmesh-bench", bookmark_interval=60.0).start()
    for item in node_objects(own_zone)["items"]:
        server.create(item)
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}})
    for i in range(services):
        for item in service_file(i, endpoints)["items"]:
            server.create(item)
    if target_server is not None:
        for item in target_file(target_server)["items"]:
            server.create(item)
    return server


def start_api_agent(net: BenchNet, server: ApiServer, name: str, services: int) -> Agent:
    state = net.state / name
    state.mkdir(parents=True, exist_ok=True)
    kubeconfig = server.write_kubeconfig(state / "kubeconfig")
    pin_dir = net.pin_root / name
    config = state / "plugin.toml"
    config.write_text("\n".join([
        "[node]", f'name = "{NODE}"',
        "[datapath]", f'cgroup = "{net.cgroup_of("agent")}"', f'pin_dir = "{pin_dir}"',
        f'build_dir = "{net.build_dir}"',
        f"max_services = {max(1024, services * 2)}", "max_endpoints = 262144",
        "[source]", 'kind = "kubernetes"', f'kubeconfig = "{kubeconfig}"',
        "[agent]", f'status_file = "{state / "status.json"}"', "metrics = false",
        'log_level = "warning"',
    ]) + "\n")
    log = open(state / "agent.log", "ab")  # noqa: SIM115 - owned by the agent process
    proc = subprocess.Popen([sys.executable, "-m", "kmesh_plugin.cli", "run", "-c", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Agent(proc, config, state / "status.json", pin_dir, time.perf_counter())


def wait_applied(agent: Agent, server: ApiServer, timeout: float = 300.0) -> dict[str, Any]:
    """Until the agent reports the server's last change of every resource as applied."""
    from kmesh_plugin.sources.resources import WATCHED

    targets = {r.plural: server.last_change(r.plural) for r in WATCHED}
    deadline = time.monotonic() + timeout
    with Inotify() as watch:
        watch.watch(agent.status.parent)
        while True:
            st = agent.read_status()
            revision = (st or {}).get("source_revision")
            if st and st.get("last_reconcile") and isinstance(revision, dict) and all(
                int(revision.get(p) or 0) >= rv for p, rv in targets.items()
            ):
                return st
            if agent.proc.poll() is not None:
                raise RuntimeError(f"agent exited {agent.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent did not apply {targets}")
            watch.wait(min(1.0, deadline - time.monotonic()))


def api_full_sync(net: BenchNet, services: int, endpoints: int,
                  log: Any = print) -> dict[str, Any]:
    """From the agent's first list request to the maps holding everything it listed."""
    server = api_server(services, endpoints)
    agent = start_api_agent(net, server, f"api-agent-{services}x{endpoints}", services)
    try:
        st = wait_applied(agent, server)
        done = time.monotonic()
        lists = [r for r in server.requests if "watch" not in r.query]
        first_list = min(r.at for r in lists)  # time.monotonic() is one clock for the host
        ready = time.perf_counter() - agent.started
        last = st["last_reconcile"]
        result = {
            "services": services, "endpoints_per_service": endpoints,
            "endpoints": services * endpoints,
            "list_to_maps_seconds": done - first_list,
            "reconcile_seconds": last["seconds"],
            "ready_seconds": ready,
            "list_requests": len(lists),
            "peak_rss_mb": agent.peak_rss_mb(),
            "groups": st["datapath"]["groups"],
        }
        log(f"  API full sync {services}x{endpoints}: list to maps "
            f"{result['list_to_maps_seconds']:.2f} s ({len(lists)} list requests, reconcile "
            f"{last['seconds']:.2f} s), ready {ready:.2f} s, {result['peak_rss_mb']:.0f} MB")
        return result
    finally:
        agent.stop()
        server.stop()


def api_single_changes(net: BenchNet, services: int, endpoints: int, changes: int,
                       log: Any = print) -> dict[str, Any]:
    """From the API write (the watch event leaves the server) to the new set being live."""
    server = api_server(services, endpoints)
    agent = start_api_agent(net, server, "api-agent-change", services)
    try:
        wait_applied(agent, server)
        dp = Datapath.open(agent.pin_dir)
        # The API server is a thread of this process and the wait below spins in another:
        # with the default 5 ms GIL switch interval the spin could hold back the server's
        # watch event by up to that much, a delay of the harness, not of the agent.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)
        try:
            rng = random.Random(11)
            latencies = []
            for k in range(1, changes + 1):
                i = rng.randrange(services)
                ip, port = service_vip(i)
                raw = dp[records.MAP_FRONTENDS].lookup(
                    Frontend(ipaddress.ip_address(ip), port).pack())
                assert raw is not None, f"no frontend for svc-{i}"
                sid = records.FRONTEND.unpack(raw)["sid"]
                before = _generation(dp, sid)
                slice_ = service_file(i, endpoints, version=k)["items"][1]
                started = time.perf_counter()
                server.update(slice_)
                deadline = started + 10
                while _generation(dp, sid) == before:  # the measured condition itself
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"svc-{i}: no new generation within 10 s")
                    os.sched_yield()
                latencies.append(time.perf_counter() - started)
        finally:
            sys.setswitchinterval(interval)
            dp.close()
    finally:
        agent.stop()
        server.stop()
    lat = sorted(latencies)
    result = {
        "services": services, "changes": len(lat),
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
        "max_ms": lat[-1] * 1000,
    }
    log(f"  API single change on {services} Services: p50 {result['p50_ms']:.2f} ms, "
        f"p99 {result['p99_ms']:.2f} ms")
    return result


def api_relist_under_load(net: BenchNet, services: int, endpoints: int,
                          log: Any = print) -> dict[str, Any]:
    """Compact the history and cut the watches: every reflector lists again (410) and the
    agent diffs 100,000 endpoints against what it has, while a client connects."""
    server = api_server(services, endpoints, target_server=net.pods["server"].ipv4)
    agent = start_api_agent(net, server, "api-agent-relist", services)
    try:
        wait_applied(agent, server)
        before = {p: r["relists"] for p, r in agent.read_status()["source"]["resources"].items()}
        duration = 6.0
        client = net.spawn_client("agent", "198.19.191.1", 80, "cc", duration, 1)
        _await_connects(agent.pin_dir, 1000)
        started = time.monotonic()
        floor = server.faults.compact()
        server.faults.drop_watches()
        deadline = started + 60
        with Inotify() as watch:
            watch.watch(agent.status.parent)
            while True:
                # Listed again (410) and applied: every resource at a version past the floor.
                st = agent.read_status() or {}
                revision = st.get("source_revision") or {}
                resources = st.get("source", {}).get("resources", {})
                if resources and all(r["relists"] > before[p] for p, r in resources.items()) \
                        and all(int(revision.get(p) or 0) >= floor for p in resources):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no relist of every resource: {resources}")
                watch.wait(1.0)
        relist_seconds = time.monotonic() - started
        out, _ = client.communicate(timeout=duration + 30)
        run = json.loads(out)
        result = {
            "endpoints": services * endpoints, "relist_seconds": relist_seconds,
            "connects": run["connections"], "failed_connects": sum(run["errors"].values()),
            "errors": run["errors"],
            "updated_groups": st["last_reconcile"]["updated"],
        }
        log(f"  API relist after 410 with {services * endpoints} endpoints: every resource "
            f"listed and diffed in {relist_seconds:.2f} s, {run['connections']} connects, "
            f"{result['failed_connects']} failed")
        return result
    finally:
        agent.stop()
        server.stop()
