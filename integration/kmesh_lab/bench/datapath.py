"""Datapath benchmarks: new connections through each load balancer, and the program's cost.

For each number N of Services, every datapath is programmed with N Services (one endpoint
each; only the measured Service's endpoint is the real backend, at position N/2, the middle of
kube-proxy's KUBE-SERVICES chain). Then rounds of fixed-length runs go through the four paths
in a shuffled order each round, so machine noise falls on all of them alike, and the median
over rounds is reported, each path's rate over direct's paired per round, with a 95% interval
(report.interval). While the translated/direct verdict of an N is inconclusive, more rounds of
direct and bpf are measured for that N, up to a time bound (report.settle).

The program's cost is measured against its floor: an empty program (floor.c, `return 1`) on
each hook, attached with a bpf_link to the same cgroup as ours for the cost windows only, so
both run on the same connects; kernel.bpf_stats give each one's run_time_ns / run_cnt over the
same windows, and ours / the floor's is the machine-independent figure.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmesh_lab import netns
from kmesh_lab.bench import kubeproxy, report
from kmesh_lab.bench.topology import SERVER_PORT, BenchNet, Pod
from kmesh_plugin.datapath import build, records, syscall
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
    settle: dict[str, Any] | None = None  # report.settle's account, on the judged path

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
            "ratio_interval": report.interval(self.ratios),
            "rates": self.rates, "ratios": self.ratios, "settle": self.settle,
        }


@dataclass
class Settle:
    """Judge ``path`` / ``baseline`` (paired per round) against ``target``; while inconclusive,
    measure more rounds of ``paths`` for up to ``seconds``."""
    path: str
    baseline: str
    target: float
    seconds: float
    paths: Sequence[str] = ()  # default: direct, path and baseline


def measure(net: BenchNet, programmed: Programmed, *, mode: str, rounds: int, window: float,
            threads: int, seed: int = 1, paths: Sequence[str] | None = None,
            client_of: Mapping[str, str] | None = None,
            prepare: Callable[[str], None] | None = None,
            settle: Settle | None = None,
            into: Mapping[str, PathResult] | None = None) -> list[PathResult]:
    """Interleaved rounds over the programmed paths; the order is shuffled every round.

    ``paths`` (default: those of PATHS that are programmed) must include "direct", the
    baseline; ``client_of`` adds paths' client pods to CLIENT_OF; ``prepare(path)`` runs
    before each run of a path, outside its window (udp.py republishes a Service there).
    ``into``: add the rounds to these results (a settle's extra rounds). ``settle``: after the
    rounds, more rounds while the verdict on settle.path / settle.baseline is inconclusive."""
    rng = random.Random(seed)
    paths = list(paths) if paths is not None else [p for p in PATHS if p in programmed.targets]
    clients = {**CLIENT_OF, **(client_of or {})}
    results = dict(into) if into is not None else {
        p: PathResult(p, programmed.n, mode) for p in paths}
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
    if settle is not None:
        num, den = results[settle.path], results[settle.baseline]
        extra = list(settle.paths) or list(dict.fromkeys(["direct", settle.path,
                                                          settle.baseline]))
        seeds = iter(range(seed * 1000 + 1, seed * 1000 + 100000))

        def ratios() -> list[float]:
            # Only the rounds that measured both paths (settle rounds measure both).
            return [a / b for a, b in zip(num.rates, den.rates, strict=False) if b]

        def more() -> None:
            measure(net, programmed, mode=mode, rounds=1, window=window, threads=threads,
                    seed=next(seeds), paths=extra, client_of=client_of, prepare=prepare,
                    into=results)

        num.settle = report.settle(ratios, more, settle.target, seconds=settle.seconds)
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


# The floor's programs (floor.c: floor_<hook>) and the hook each attaches to.
FLOOR_HOOKS = {
    "connect4": syscall.BPF_CGROUP_INET4_CONNECT,
    "connect6": syscall.BPF_CGROUP_INET6_CONNECT,
    "sendmsg4": syscall.BPF_CGROUP_UDP4_SENDMSG,
    "sendmsg6": syscall.BPF_CGROUP_UDP6_SENDMSG,
    "recvmsg4": syscall.BPF_CGROUP_UDP4_RECVMSG,
    "recvmsg6": syscall.BPF_CGROUP_UDP6_RECVMSG,
    "getpeername4": syscall.BPF_CGROUP_INET4_GETPEERNAME,
    "getpeername6": syscall.BPF_CGROUP_INET6_GETPEERNAME,
}


def build_floor(build_dir: Path, clang: str = "clang") -> Path:
    """Compile floor.c (clang -target bpf) into build_dir, once per source version."""
    src = Path(__file__).with_name("floor.c")
    out = build_dir / f"kmesh-floor-{hashlib.sha256(src.read_bytes()).hexdigest()[:12]}.o"
    if not out.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
                        *build.multiarch_include(), "-c", str(src), "-o", str(tmp)], check=True)
        tmp.rename(out)
    return out


@contextlib.contextmanager
def floor_attached(net: BenchNet, hooks: Sequence[str]) -> Iterator[dict[str, str]]:
    """The empty programs of ``hooks``, each on a bpf_link on the bpf client's cgroup, beside
    ours (a cgroup's links all run, in attach order), for the block only: closing a link's
    only fd detaches it. Yields hook -> the program's id (for `bpftool prog show id`)."""
    obj = build_floor(net.build_dir)
    tmp = net.pin_root / f"floor-{os.getpid()}"
    prog_fds: dict[str, int] = {}
    link_fds: list[int] = []
    try:
        try:
            Bpftool().prog_loadall(obj, tmp)
            for hook in hooks:
                prog_fds[hook] = syscall.obj_get(tmp / f"floor_{hook}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the fds hold the programs
        cg_fd = os.open(net.cgroup_of("bpf"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook in hooks:
                link_fds.append(syscall.link_create(prog_fds[hook], cg_fd, FLOOR_HOOKS[hook]))
        finally:
            os.close(cg_fd)
        yield {hook: str(syscall.prog_info(fd).id) for hook, fd in prog_fds.items()}
    finally:
        for fd in [*link_fds, *prog_fds.values()]:
            os.close(fd)


def prog_counters(tool: Bpftool, ours: Mapping[str, Path], floors: Mapping[str, str]
                  ) -> dict[str, tuple[int, int]]:
    """(run_cnt, run_time_ns) of our pinned programs and of the floor's (by id)."""
    out = {}
    for name, pin in ours.items():
        show = tool.prog_show(pin)
        out[name] = (show.get("run_cnt", 0), show.get("run_time_ns", 0))
    for name, prog_id in floors.items():
        show = tool.run("prog", "show", "id", prog_id)
        out[f"floor:{name}"] = (show.get("run_cnt", 0), show.get("run_time_ns", 0))
    return out


class FloorCost:
    """One program's windows, ours and the floor's over the same windows."""

    def __init__(self, n: int, mode: str, program: str, load: str = "cc") -> None:
        self.n, self.mode, self.program, self.load = n, mode, program, load
        self.samples: list[float] = []  # ours, ns per run, per window
        self.floor: list[float] = []  # the floor's, the same windows
        self.runs = 0
        self.floor_runs = 0
        self.errors: dict[str, int] = {}
        self.settle: dict[str, Any] | None = None
        self.cached: bool | None = None  # the frontend had a kmesh_frontend_cache line

    def add(self, delta: tuple[int, int], floor: tuple[int, int] | None,
            errors: Mapping[str, Any]) -> None:
        runs, ns = delta
        self.runs += runs
        for k, v in errors.items():
            self.errors[k] = self.errors.get(k, 0) + int(v)
        if floor is not None:
            self.floor_runs += floor[0]
        if not runs:
            return
        if floor is None:
            self.samples.append(ns / runs)
        elif floor[0]:
            self.samples.append(ns / runs)
            self.floor.append(floor[1] / floor[0])

    def ratios(self) -> list[float]:
        return [o / f for o, f in zip(self.samples, self.floor, strict=False) if f > 0]

    def summary(self) -> dict[str, Any]:
        ratios = self.ratios()
        iv = report.interval(ratios) if ratios else None
        diffs = [o - f for o, f in zip(self.samples, self.floor, strict=False)]
        return {"n": self.n, "mode": self.mode, "program": self.program, "load": self.load,
                "runs": self.runs,
                "ns_per_run": statistics.median(self.samples) if self.samples else None,
                "samples": self.samples,
                "floor_ns_per_run": statistics.median(self.floor) if self.floor else None,
                "floor_samples": self.floor, "floor_runs": self.floor_runs,
                "difference_ns": statistics.median(diffs) if diffs else None,
                "floor_ratios": ratios, "floor_interval": iv,
                "ratio_to_floor": iv["median"] if iv else None,
                "settle": self.settle, "errors": self.errors, "cached": self.cached}


def has_cache_line(net: BenchNet, frontend: Frontend) -> bool:
    """Whether the kernel's kmesh_frontend_cache holds a line the program would use for
    ``frontend`` (else its connects take the kmesh_frontends hash, and cost more)."""
    assert net.dp is not None
    cache = net.dp[records.MAP_FRONTEND_CACHE]
    for line in records.frontend_candidates(frontend.pack(), cache.max_entries):
        value = cache.lookup(records.U32.pack(line))
        if value is not None and (found := records.read_frontend_line(value)) is not None \
                and found[0] == frontend.pack():
            return True
    return False


def program_cost(net: BenchNet, programmed: Programmed, *, window: float,
                 threads: int, repeats: int = 5,
                 settle_seconds: float = 0.0) -> list[dict[str, Any]]:
    """Nanoseconds per run of connect4 and connect6 per strategy mode (kernel.bpf_stats), ours
    and an empty program's on the same cgroup over the same ``repeats`` windows: the medians,
    their difference, and ours / the floor's with its 95% interval over the windows. While that
    verdict (<= report.FLOOR_TARGET) is inconclusive, more windows, up to ``settle_seconds``."""
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
        with floor_attached(net, ["connect4", "connect6"]) as floors:
            for mode, (kernel_mode, tier, ntiers) in STRATEGY_SHAPES.items():
                for family, front in fronts.items():
                    tiers: list[tuple[Backend, ...]] = [() for _ in range(ntiers)]
                    tiers[tier] = (Backend(ipaddress.ip_address(backends[family]),
                                           SERVER_PORT),)
                    net.writer.publish({front: BackendSet(kernel_mode, tuple(tiers))})
                    name = f"connect{family}"
                    pin = {name: net.dp.pins.progs / f"kmesh_{name}"}
                    floor = {name: floors[name]}
                    cost = FloorCost(programmed.n, mode, name)
                    cost.cached = has_cache_line(net, front)

                    def window_once(front: Frontend = front, name: str = name,
                                    pin: dict[str, Path] = pin, floor: dict[str, str] = floor,
                                    cost: FloorCost = cost) -> None:
                        before = prog_counters(tool, pin, floor)
                        run = net.client("bpf", str(front.ip), front.port, "cc", window,
                                         threads)
                        after = prog_counters(tool, pin, floor)
                        d = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1])
                             for k in after}
                        cost.add(d[name], d[f"floor:{name}"], run["errors"])

                    for _ in range(repeats):
                        window_once()
                    # The N's verdict covers every mode and family: each gets its share.
                    cost.settle = report.settle(
                        cost.ratios, window_once, report.FLOOR_TARGET, higher_is_better=False,
                        seconds=settle_seconds / (len(STRATEGY_SHAPES) * len(fronts)))
                    out.append(cost.summary())
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
