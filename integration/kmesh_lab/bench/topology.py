"""The benchmark's network: one backend pod and one client pod per datapath, on the lab fabric.

    server   runs `loadgen server` on 198.18.1.x:8080 and [2001:2::x]:8080, TCP and UDP echo
    direct   connects to the server's pod IP: no load balancer at all (the limit)
    bpf      in the kmesh cgroup: connects to ClusterIPs the eBPF program translates
    iptables holds kube-proxy's iptables-mode nat rules (its own netns: its own conntrack)
    nftables holds kube-proxy's nftables-mode table
    agent    in the agent's cgroup: the control-plane benchmark's client

Every pod is a network namespace wired by the real CNI bridge + host-local plugins, like the
lab's. Everything carries the lab's prefix and is recorded in /run/kmesh-lab/<id>/lab.json, so
`kmesh-plugin lab down` also removes what a crashed benchmark left.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmesh_lab import cluster, cni, netns, procs
from kmesh_plugin.datapath import loader
from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.datapath.loader import Datapath
from kmesh_plugin.datapath.mounts import BPFFS_DEFAULT, cgroup2_root, ensure_bpffs
from kmesh_plugin.datapath.writer import MapWriter

CLIENTS = ("direct", "bpf", "iptables", "nftables", "agent")
SERVER_PORT = 8080
# Sysctls of every client: a wide ephemeral range, reuse of TIME_WAIT ports.
CLIENT_SYSCTLS = {
    "net.ipv4.ip_local_port_range": "1024 65000",
    "net.ipv4.tcp_tw_reuse": "1",
}


@dataclass
class Pod:
    name: str
    netns: str
    ipv4: str
    ipv6: str | None

    @property
    def netns_path(self) -> str:
        return netns.path(self.netns)


@dataclass
class BenchNet:
    loadgen: Path
    build_dir: Path
    capacities: Capacities
    id: str = field(default_factory=lambda: secrets.token_hex(2))
    pods: dict[str, Pod] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = f"{cluster.PREFIX}{self.id}"
        self.state = cluster.STATE_ROOT / self.id
        self.cgroup = cgroup2_root() / self.name
        self.pin_root = BPFFS_DEFAULT / self.name
        self.fabric = cni.Fabric(f"{self.name}-fabric", self.name, str(self.state),
                                 ipv6_subnet="2001:2::/64")
        self.dp: Datapath | None = None
        self.writer: MapWriter | None = None

    def cgroup_of(self, client: str) -> Path:
        return self.cgroup / client

    def __enter__(self) -> BenchNet:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.state.mkdir(parents=True)
        cluster.record_resources(self.state, self.id, self.name, self.pin_root, self.cgroup)
        ensure_bpffs(BPFFS_DEFAULT)
        # Every client in a cgroup of its own, side by side: only bpf's and agent's have a
        # program attached, so the paths differ in nothing but their load balancer.
        for client in CLIENTS:
            procs.make_cgroup(str(self.cgroup_of(client)))
        self.fabric.create()
        for i, name in enumerate(("server", *CLIENTS), start=1):
            ns = f"{self.name}-{name}"
            netns.add(ns)
            addr = self.fabric.add_pod(ns, ns, ip_range=(f"198.18.1.{i}", f"198.18.1.{i}"))
            self.pods[name] = Pod(name, ns, addr.ipv4, addr.ipv6)
            if name != "server":
                netns.sysctl(ns, CLIENT_SYSCTLS)
        server = procs.spawn(
            [str(self.loadgen), "server", str(SERVER_PORT), "2"],
            netns=self.pods["server"].netns_path, cgroup=None,
        )
        self.processes.append(server)
        procs.LineReader(server.stdout).expect("ready", 10)  # type: ignore[arg-type]
        self.dp = loader.attach(self.pin_root / "bpf", self.cgroup_of("bpf"), self.capacities,
                                self.build_dir)
        self.writer = MapWriter(self.dp)
        self.writer.recover()

    def close(self) -> None:
        for proc in self.processes:
            procs.stop(proc)
        if self.writer is not None:
            self.writer.close()
        if self.dp is not None:
            self.dp.close()
        problems = cluster.teardown(self.state, {
            "cgroup": str(self.cgroup), "pin_root": str(self.pin_root),
            "netns_prefix": self.name,
        })
        shutil.rmtree(self.state, ignore_errors=True)
        for p in problems:
            print(f"bench cleanup: {p}")

    def spawn_client(self, client: str, address: str, port: int, mode: str, seconds: float,
                     threads: int) -> subprocess.Popen[bytes]:
        """Start a loadgen client in ``client``'s pod and cgroup; it stops after ``seconds``."""
        proc = procs.spawn(
            [str(self.loadgen), "client", address, str(port), mode,
             str(max(1, int(seconds * 1000))), str(threads)],
            netns=self.pods[client].netns_path, cgroup=str(self.cgroup_of(client)),
        )
        self.processes.append(proc)
        return proc

    def client(self, client: str, address: str, port: int, mode: str, seconds: float,
               threads: int) -> dict[str, Any]:
        """One loadgen client run; its JSON report."""
        proc = self.spawn_client(client, address, port, mode, seconds, threads)
        out, _ = proc.communicate(timeout=seconds + 60)
        self.processes.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen client in {client}: exit {proc.returncode}")
        return json.loads(out)

    def pair(self, client_a: str, target_a: tuple[str, int], client_b: str,
             target_b: tuple[str, int], mode: str, seconds: float,
             block: float) -> dict[str, Any]:
        """One `loadgen pair` run: socket A in ``client_a``'s pod and cgroup, socket B in
        ``client_b``'s, alternating blocks of ``block`` seconds; its JSON report."""
        b = self.pods[client_b]
        proc = procs.spawn(
            [str(self.loadgen), "pair", mode, str(max(1, int(seconds * 1000))),
             str(max(1, int(block * 1000))), target_a[0], str(target_a[1]), target_b[0],
             str(target_b[1]), b.netns_path, str(self.cgroup_of(client_b))],
            netns=self.pods[client_a].netns_path, cgroup=str(self.cgroup_of(client_a)),
        )
        self.processes.append(proc)
        out, _ = proc.communicate(timeout=seconds + 60)
        self.processes.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen pair {client_a}/{client_b}: exit {proc.returncode}")
        return json.loads(out)

    def flush_conntrack(self, client: str) -> None:
        """Drop a client's conntrack entries: expiring tens of thousands of them later would
        spend CPU while the next path is being measured."""
        proc = procs.spawn(["conntrack", "-F"], netns=self.pods[client].netns_path, cgroup=None,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"conntrack -F in {client}: {err.decode(errors='replace')}")


def build_loadgen(build_dir: Path) -> Path:
    """Compile loadgen.c (gcc -O2) into build_dir, once per source version."""
    src = Path(__file__).with_name("loadgen.c")
    out = build_dir / f"loadgen-{hashlib.sha256(src.read_bytes()).hexdigest()[:12]}"
    if not out.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(tmp), str(src)],
                       check=True)
        tmp.rename(out)
    return out
