"""Datapath benchmarks: new connections through each load balancer, and the program's cost.

For each number N of Services, every datapath is programmed with N Services (one endpoint
each; only the measured Service's endpoint is the real backend, at position N/2, the middle of
kube-proxy's KUBE-SERVICES chain). Then rounds of fixed-length runs go through the four paths
in a shuffled order each round, so machine noise falls on all of them alike, and the median
over rounds is reported.
"""

from __future__ import annotations

import ipaddress
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kmesh_lab import netns
from kmesh_lab.bench import kubeproxy
from kmesh_lab.bench.topology import SERVER_PORT, BenchNet, Pod
from kmesh_plugin.datapath import records
from kmesh_plugin.datapath.bpftool import Bpftool
from kmesh_plugin.datapath.records import Backend, BackendSet, Frontend

PATHS = ("direct", "bpf", "iptables", "iptables-last", "nftables")
# The pod (and cgroup) each path's client runs in.
CLIENT_OF = {"direct": "direct", "bpf": "bpf", "iptables": "iptables",
             "iptables-last": "iptables", "nftables": "nftables"}
# Each path's Services live in their own part of 198.19.0.0/16.
VIP_BASE = {"bpf": "198.19.0.0", "iptables": "198.19.64.0", "nftables": "198.19.128.0"}
VIP6 = "2001:2:0:ff::10"
PORTS_PER_VIP = 16
DUMMY_ENDPOINT_NET = "198.18.128.0"  # no pod holds these: never connected to

Log = Callable[[str], None]


def vip(path: str, i: int) -> tuple[str, int]:
    base = int(ipaddress.ip_address(VIP_BASE[path]))
    return str(ipaddress.ip_address(base + i // PORTS_PER_VIP)), 1000 + i % PORTS_PER_VIP


def dummy_endpoint(i: int) -> str:
    return str(ipaddress.ip_address(int(ipaddress.ip_address(DUMMY_ENDPOINT_NET)) + i % 30000))


@dataclass
class Programmed:
    n: int
    targets: dict[str, tuple[str, int]] = field(default_factory=dict)  # path -> address, port
    seconds: dict[str, float] = field(default_factory=dict)  # how long programming took


def route_vips(net: BenchNet) -> None:
    """kube-proxy nodes have a default route, so connect() to a ClusterIP finds a route and
    the nat OUTPUT hook can DNAT it. The iptables and nftables clients get that route for the
    ClusterIP range only, onto the lab fabric, which nothing outside the benchmark reaches."""
    for path in ("iptables", "nftables"):
        netns.run_in(net.pods[path].netns,
                     ["ip", "route", "replace", "198.19.0.0/16", "dev", "eth0"])


def program(net: BenchNet, n: int, *, skip: frozenset[str] = frozenset(),
            log: Log = print) -> Programmed:
    """Program N Services into every path; return each path's target address.

    The measured Service is number N/2: the middle of kube-proxy's KUBE-SERVICES chain, the
    average case. "iptables-last" measures the last Service of that chain, its worst case.
    """
    server = net.pods["server"].ipv4
    out = Programmed(n)
    target = n // 2
    last = n - 1
    out.targets["direct"] = (server, SERVER_PORT)

    started = time.perf_counter()
    table = {}
    for i in range(n):
        address, port = vip("bpf", i)
        endpoint = server if i == target else dummy_endpoint(i)
        table[Frontend(ipaddress.ip_address(address), port)] = BackendSet(
            records.MODE_RANDOM, ((Backend(ipaddress.ip_address(endpoint), SERVER_PORT),),))
    assert net.writer is not None
    net.writer.sync(table)
    net.writer.settle()
    out.seconds["bpf"] = time.perf_counter() - started
    out.targets["bpf"] = vip("bpf", target)

    for path in ("iptables", "nftables"):
        if path in skip:
            continue
        real = {target, last}
        services = [
            kubeproxy.ServicePort("bench", f"svc-{i}", "http", *vip(path, i),
                                  ((server if i in real else dummy_endpoint(i),
                                    SERVER_PORT),))
            for i in range(n)
        ]
        started = time.perf_counter()
        if path == "iptables":
            kubeproxy.load_iptables(net.pods[path].netns, services)
        else:
            kubeproxy.load_nft(net.pods[path].netns, services,
                               numgen_for={services[target].ref, services[last].ref})
        out.seconds[path] = time.perf_counter() - started
        out.targets[path] = vip(path, target)
        if path == "iptables":
            out.targets["iptables-last"] = vip(path, last)
        log(f"  N={n}: {path} rules loaded in {out.seconds[path]:.1f} s")
    return out


@dataclass
class PathResult:
    path: str
    n: int
    mode: str
    rates: list[float] = field(default_factory=list)
    p50_us: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # to the direct run of the same round
    errors: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path, "n": self.n, "mode": self.mode,
            "rate": statistics.median(self.rates),
            "rate_min": min(self.rates), "rate_max": max(self.rates),
            # Paired: each round's rate over the direct rate of that round, then the median.
            # Rounds drift with the machine; pairs measured seconds apart mostly do not.
            "ratio_to_direct": statistics.median(self.ratios) if self.ratios else None,
            "p50_us": statistics.median(self.p50_us),
            "p99_us": statistics.median(self.p99_us),
            "errors": self.errors, "rounds": len(self.rates),
            "rates": self.rates, "ratios": self.ratios,
        }


def measure(net: BenchNet, programmed: Programmed, *, mode: str, rounds: int, window: float,
            threads: int, seed: int = 1, paths: Sequence[str] | None = None,
            client_of: Mapping[str, str] | None = None,
            prepare: Callable[[str], None] | None = None) -> list[PathResult]:
    """Interleaved rounds over the programmed paths; the order is shuffled every round.

    ``paths`` (default: those of PATHS that are programmed) must include "direct", the
    baseline; ``client_of`` adds paths' client pods to CLIENT_OF; ``prepare(path)`` runs
    before each run of a path, outside its window (udp.py republishes a Service there)."""
    rng = random.Random(seed)
    paths = list(paths) if paths is not None else [p for p in PATHS if p in programmed.targets]
    clients = {**CLIENT_OF, **(client_of or {})}
    results = {p: PathResult(p, programmed.n, mode) for p in paths}
    for _ in range(rounds):
        order = paths[:]
        rng.shuffle(order)
        this_round = {}
        for path in order:
            address, port = programmed.targets[path]
            client = clients[path]
            if prepare is not None:
                prepare(path)
            run = net.client(client, address, port, mode, window, threads)
            if client in ("iptables", "nftables"):
                net.flush_conntrack(client)
            r = results[path]
            r.rates.append(float(run["rate"]))
            r.p50_us.append(float(run["p50_us"]))
            r.p99_us.append(float(run["p99_us"]))
            this_round[path] = float(run["rate"])
            for err, count in run["errors"].items():
                r.errors[err] = r.errors.get(err, 0) + int(count)
        for path, rate in this_round.items():
            results[path].ratios.append(rate / this_round["direct"])
    return [results[p] for p in paths]


def saturation(net: BenchNet, window: float, max_threads: int = 4) -> list[dict[str, Any]]:
    """Direct-path rate by client threads: once it stops growing, the load generator has
    saturated what the machine can do, and more client threads only add contention."""
    server = net.pods["server"].ipv4
    out = []
    for threads in range(1, max_threads + 1):
        rates = [float(net.client("direct", server, SERVER_PORT, "cc", window, threads)["rate"])
                 for _ in range(3)]
        out.append({"threads": threads, "rate": statistics.median(rates)})
    return out


# -- program cost -----------------------------------------------------------------------------

# mode -> (kernel mode, tier holding the endpoint, tiers): where the program finds it.
STRATEGY_SHAPES = {
    "random": (records.MODE_RANDOM, 0, 1),
    "failover": (records.MODE_FAILOVER, 4, 5),  # PreferClose's worst case: the last of 5 tiers
    "strict": (records.MODE_STRICT, 0, 1),
}


def program_cost(net: BenchNet, programmed: Programmed, *, window: float,
                 threads: int, repeats: int = 5) -> list[dict[str, Any]]:
    """Nanoseconds per run of connect4 and connect6 per strategy mode (kernel.bpf_stats):
    the median of ``repeats`` windows, each run_time_ns / run_cnt over the window."""
    assert net.writer is not None and net.dp is not None
    server: Pod = net.pods["server"]
    tool = Bpftool()
    out = []
    previous = _sysctl("kernel.bpf_stats_enabled")
    _sysctl("kernel.bpf_stats_enabled", "1")
    address, port = programmed.targets["bpf"]
    fronts = {4: Frontend(ipaddress.ip_address(address), port),
              6: Frontend(ipaddress.ip_address(VIP6), 80)}
    backends = {4: server.ipv4, 6: server.ipv6}
    try:
        for mode, (kernel_mode, tier, ntiers) in STRATEGY_SHAPES.items():
            for family, front in fronts.items():
                tiers: list[tuple[Backend, ...]] = [() for _ in range(ntiers)]
                tiers[tier] = (Backend(ipaddress.ip_address(backends[family]), SERVER_PORT),)
                net.writer.publish({front: BackendSet(kernel_mode, tuple(tiers))})
                prog = net.dp.pins.progs / f"kmesh_connect{family}"
                samples, total_runs, errors = [], 0, {}
                for _ in range(repeats):
                    before = tool.prog_show(prog)
                    run = net.client("bpf", str(front.ip), front.port, "cc", window, threads)
                    after = tool.prog_show(prog)
                    runs = after.get("run_cnt", 0) - before.get("run_cnt", 0)
                    ns = after.get("run_time_ns", 0) - before.get("run_time_ns", 0)
                    if runs:
                        samples.append(ns / runs)
                    total_runs += runs
                    errors.update(run["errors"])
                out.append({
                    "n": programmed.n, "mode": mode, "program": f"connect{family}",
                    "runs": total_runs,
                    "ns_per_run": statistics.median(samples) if samples else None,
                    "samples": samples, "errors": errors,
                })
    finally:
        _sysctl("kernel.bpf_stats_enabled", previous)
        # Back to the measured shape for the next N.
        net.writer.publish({
            fronts[6]: None,
            fronts[4]: BackendSet(records.MODE_RANDOM, (
                (Backend(ipaddress.ip_address(server.ipv4), SERVER_PORT),),)),
        })
    return out


def _sysctl(key: str, value: str | None = None) -> str:
    path = "/proc/sys/" + key.replace(".", "/")
    if value is None:
        with open(path) as f:
            return f.read().strip()
    subprocess.run(["sysctl", "-q", "-w", f"{key}={value}"], check=True)
    return value
