"""UDP through sendmsg/recvmsg, getpeername, and sessionAffinity: the programs of layout 4.

udp suite, for each N (1 and 10,000 by default):
    N UDP Services are programmed (one endpoint each; the measured one, number N/2, is the UDP
    echo server of the server pod, the rest dummy endpoints). Round trips of unconnected
    ``sendto(ClusterIP:port)`` + ``recvfrom`` from a socket of the bpf pod (sendmsg4 translates
    each datagram, recvmsg4 shows the echo as coming from the ClusterIP, which the client
    checks) against ``sendto(pod IP)`` from a socket of the direct pod (no programs): one
    `loadgen pair` thread alternates 10 ms blocks between the two sockets, so the machine's
    noise (here: the round trip flips between ~20 and ~75 us as the two vCPUs idle or not)
    falls on both alike; the ratio is the median over every block pair. Then the cost of
    sendmsg4/6 and recvmsg4/6 (loadgen mode udp, bpf pod only, against a v4 and a v6
    ClusterIP) and of getpeername4/6 (loadgen mode peer: getpeername() in a loop on a UDP
    socket connect()ed to the ClusterIP), from the kernel's BPF stats, like
    datapath.program_cost: each against its floor, an empty program on the same hook and
    cgroup, over the same windows. The verdict goes by the 95% interval of each run's median
    block pair (report.interval); while inconclusive, more runs (report.settle).

affinity suite, for each N:
    N TCP Services are programmed (datapath.program, eBPF only). The measured Service is
    published with sessionAffinity ClientIP (BackendSet affinity=10800) before each of its
    "affinity" runs and without it (affinity=0) before each of its "no-affinity" runs, and the
    new-connection rate (connect + close) of the two, with direct as a third path, is measured
    in interleaved, shuffled rounds. The ratio is each round's affinity rate over that round's
    no-affinity rate, median over rounds. With affinity every connect of the bpf pod after its
    first finds its entry in kmesh_affinity (one client: one netns) and takes the sticky path;
    the run checks that the entry exists and was used during the run. The verdict goes by the
    95% interval of the per-round ratios; while inconclusive, more rounds of the three paths.
    Then connect4's cost with and without affinity.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from kmesh_lab import cni
from kmesh_lab.bench import datapath, report
from kmesh_lab.bench.datapath import Programmed
from kmesh_lab.bench.topology import SERVER_PORT, BenchNet
from kmesh_plugin.datapath import records
from kmesh_plugin.datapath.bpftool import Bpftool
from kmesh_plugin.datapath.records import Backend, BackendSet, Frontend

UDP = socket.IPPROTO_UDP
UDP_VIP_BASE = "198.19.192.0"  # a part of 198.19.0.0/16 no other path's Services use
UDP_VIP6 = "2001:2:0:ff::53"
AFFINITY = records.DEFAULT_AFFINITY_TIMEOUT  # 10800 s, Kubernetes' default

Log = Callable[[str], None]


def udp_vip(i: int) -> tuple[str, int]:
    base = int(ipaddress.ip_address(UDP_VIP_BASE))
    per = datapath.PORTS_PER_VIP
    return str(ipaddress.ip_address(base + i // per)), 1000 + i % per


def _one(ip: str, backends: Sequence[str] = (), affinity: int = 0) -> BackendSet:
    return BackendSet(records.MODE_RANDOM,
                      (tuple(Backend(ipaddress.ip_address(b), SERVER_PORT) for b in backends),),
                      affinity=affinity)


def program_udp(net: BenchNet, n: int) -> Programmed:
    """N UDP Services in the eBPF datapath (replacing whatever it held); the measured one is
    number N/2, whose endpoint is the server pod's UDP echo server."""
    assert net.writer is not None
    server = net.pods["server"].ipv4
    target = n // 2
    started = time.perf_counter()
    table = {}
    for i in range(n):
        address, port = udp_vip(i)
        table[Frontend(ipaddress.ip_address(address), port, UDP)] = _one(
            address, [server if i == target else datapath.dummy_endpoint(i)])
    net.writer.sync(table)
    net.writer.settle()
    out = Programmed(n)
    out.seconds["bpf"] = time.perf_counter() - started
    out.targets["direct"] = (server, SERVER_PORT)
    out.targets["bpf"] = udp_vip(target)
    return out


UDP_BLOCK = 0.01  # s: one block of `loadgen pair`; 100 to 400 round trips here


class UdpRounds:
    """The runs of measure_udp, to which a settle adds more."""

    def __init__(self, n: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.results = {p: datapath.PathResult(p, n, "udp") for p in ("direct", "bpf")}
        self.round_ratios: list[float] = []  # each run's totals, bpf over direct
        self.pair_ratios: list[float] = []  # each run's median block pair, bpf over direct

    def run(self, net: BenchNet, programmed: Programmed, window: float, block: float) -> None:
        results = self.results
        first, second = ("direct", "bpf") if self.rng.random() < 0.5 else ("bpf", "direct")
        run = net.pair(first, programmed.targets[first], second, programmed.targets[second],
                       "udp", window, block)
        sides = {first: run["a"], second: run["b"]}
        for path, side in sides.items():
            r = results[path]
            r.rates.append(float(side["rate"]))
            r.p50_us.append(float(side["p50_us"]))
            r.p99_us.append(float(side["p99_us"]))
            for err, count in side["errors"].items():
                r.errors[err] = r.errors.get(err, 0) + int(count)
        pairs = [(a, b) if first == "direct" else (b, a) for a, b in run["pairs"]]
        mine = [b / d for d, b in pairs if d > 0]
        results["bpf"].ratios += mine
        results["direct"].ratios += [1.0] * len(pairs)
        if mine:
            self.pair_ratios.append(statistics.median(mine))
        if sides["direct"]["rate"]:
            self.round_ratios.append(sides["bpf"]["rate"] / sides["direct"]["rate"])

    def summaries(self) -> list[dict[str, Any]]:
        out = []
        for path, r in self.results.items():
            s = r.summary()
            del s["ratios"]  # one per block pair: hundreds
            del s["ratio_interval"]  # over block pairs, not runs: see round_pair_ratios
            s["pairs"] = len(r.ratios)
            bpf = path == "bpf"
            s["round_ratios"] = self.round_ratios if bpf else [1.0] * len(self.round_ratios)
            s["ratio_of_rounds"] = statistics.median(s["round_ratios"]) \
                if self.round_ratios else None
            s["round_pair_ratios"] = self.pair_ratios if bpf else [1.0] * len(self.pair_ratios)
            s["ratio_interval"] = report.interval(s["round_pair_ratios"])
            out.append(s)
        return out


def measure_udp(net: BenchNet, programmed: Programmed, *, rounds: int, window: float,
                block: float = UDP_BLOCK, seed: int = 1,
                settle_seconds: float = 0.0) -> list[dict[str, Any]]:
    """Direct and bpf UDP round trips side by side: ``rounds`` runs of `loadgen pair` of
    ``window`` s, one thread alternating blocks between a socket of the direct pod (to the
    server's pod IP) and one of the bpf pod (to the ClusterIP). Which pod the process starts
    in is shuffled per round. The bpf ratio (ratio_to_direct) is the median over every block
    pair of bpf's rate over direct's; ratio_of_rounds the median of each run's totals';
    round_pair_ratios each run's median block pair, over which the 95% interval and the
    verdict go. While that verdict is inconclusive, more runs, up to ``settle_seconds``."""
    state = UdpRounds(programmed.n, seed)
    for _ in range(rounds):
        state.run(net, programmed, window, block)
    state.results["bpf"].settle = report.settle(
        lambda: state.pair_ratios, lambda: state.run(net, programmed, window, block),
        report.UDP_TARGET, seconds=settle_seconds)
    return state.summaries()


# -- kernel BPF stats ---------------------------------------------------------------------------

@contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled=1 for the block, then as it was."""
    previous = datapath._sysctl("kernel.bpf_stats_enabled")
    datapath._sysctl("kernel.bpf_stats_enabled", "1")
    try:
        yield
    finally:
        datapath._sysctl("kernel.bpf_stats_enabled", previous)


def stats_delta(net: BenchNet, programs: Sequence[str], run: Callable[[], dict[str, Any]],
                tool: Bpftool | None = None, floors: Mapping[str, str] | None = None
                ) -> tuple[dict[str, tuple[int, int]], dict[str, Any]]:
    """(program -> (runs, run_time_ns) during ``run()``, run()'s loadgen report); with
    ``floors`` (hook -> the floor program's id) also "floor:<hook>" for each."""
    assert net.dp is not None
    tool = tool or Bpftool()
    pins = {p: net.dp.pins.progs / f"kmesh_{p}" for p in programs}
    before = datapath.prog_counters(tool, pins, floors or {})
    outcome = run()
    after = datapath.prog_counters(tool, pins, floors or {})
    return {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}, outcome


@dataclass
class CostSamples:
    n: int
    mode: str
    program: str
    load: str  # the loadgen mode that ran the program

    def __post_init__(self) -> None:
        self.samples: list[float] = []
        self.runs = 0
        self.errors: dict[str, int] = {}

    def add(self, runs: int, ns: int, errors: dict[str, Any]) -> None:
        if runs:
            self.samples.append(ns / runs)
        self.runs += runs
        for k, v in errors.items():
            self.errors[k] = self.errors.get(k, 0) + int(v)

    def summary(self) -> dict[str, Any]:
        return {"n": self.n, "mode": self.mode, "program": self.program, "load": self.load,
                "runs": self.runs,
                "ns_per_run": statistics.median(self.samples) if self.samples else None,
                "samples": self.samples, "errors": self.errors}


def udp_program_cost(net: BenchNet, programmed: Programmed, *, window: float, threads: int,
                     repeats: int = 5, seed: int = 1) -> list[dict[str, Any]]:
    """Nanoseconds per run of sendmsg4/6 and recvmsg4/6 (udp round trips to a v4 and a v6
    ClusterIP) and of getpeername4/6 (getpeername() on a socket connect()ed to one), the
    median of ``repeats`` windows each; the four loads in a shuffled order per repeat."""
    assert net.writer is not None
    server = net.pods["server"]
    address, port = programmed.targets["bpf"]
    front6 = Frontend(ipaddress.ip_address(UDP_VIP6), 53, UDP)
    assert server.ipv6 is not None
    net.writer.publish({front6: _one(UDP_VIP6, [server.ipv6])})
    targets = {4: (address, port), 6: (UDP_VIP6, 53)}
    loads = [(family, load) for family in (4, 6) for load in ("udp", "peer")]
    progs = {"udp": ("sendmsg", "recvmsg"), "peer": ("getpeername",)}
    cost = {(f"{p}{family}"): datapath.FloorCost(programmed.n, "random", f"{p}{family}", load)
            for family, load in loads for p in progs[load]}
    rng = random.Random(seed)
    tool = Bpftool()
    try:
        with bpf_stats(), datapath.floor_attached(net, list(cost)) as floors:
            for _ in range(repeats):
                order = loads[:]
                rng.shuffle(order)
                for family, load in order:
                    host, p = targets[family]
                    names = [f"{prog}{family}" for prog in progs[load]]
                    deltas, outcome = stats_delta(
                        net, names, partial(net.client, "bpf", host, p, load, window, threads),
                        tool, {name: floors[name] for name in names})
                    for name in names:
                        cost[name].add(deltas[name], deltas[f"floor:{name}"], outcome["errors"])
    finally:
        net.writer.publish({front6: None})
    return [c.summary() for c in cost.values()]


# -- sessionAffinity ----------------------------------------------------------------------------

AFFINITY_PATHS = ("direct", "no-affinity", "affinity")


@dataclass
class AffinityRun:
    programmed: Programmed
    frontend: Frontend
    off: BackendSet
    on: BackendSet


def program_affinity(net: BenchNet, n: int, log: Log = print) -> AffinityRun:
    """N TCP Services in the eBPF datapath (datapath.program); the measured one can be
    republished with and without affinity."""
    programmed = datapath.program(net, n, skip=frozenset({"iptables", "nftables"}), log=log)
    programmed.targets["no-affinity"] = programmed.targets["affinity"] = \
        programmed.targets["bpf"]
    address, port = programmed.targets["bpf"]
    server = net.pods["server"].ipv4
    return AffinityRun(programmed, Frontend(ipaddress.ip_address(address), port),
                       _one(address, [server]), _one(address, [server], AFFINITY))


def set_affinity(net: BenchNet, run: AffinityRun, on: bool) -> None:
    assert net.writer is not None
    stats = net.writer.publish({run.frontend: run.on if on else run.off})
    if stats.left_out:
        raise RuntimeError(f"affinity bench: {run.frontend} left out: {stats.left_out}")


def measure_affinity(net: BenchNet, run: AffinityRun, *, rounds: int, window: float,
                     threads: int, seed: int = 1, settle_seconds: float = 0.0
                     ) -> dict[str, Any]:
    """Interleaved rounds of direct, no-affinity and affinity connect + close runs."""

    def prepare(path: str) -> None:
        if path != "direct":
            set_affinity(net, run, path == "affinity")

    results = datapath.measure(net, run.programmed, mode="cc", rounds=rounds, window=window,
                               threads=threads, seed=seed, paths=AFFINITY_PATHS,
                               client_of={"no-affinity": "bpf", "affinity": "bpf"},
                               prepare=prepare,
                               settle=datapath.Settle("affinity", "no-affinity",
                                                      report.AFFINITY_TARGET, settle_seconds))
    by_path = {r.path: r for r in results}
    on, off = by_path["affinity"], by_path["no-affinity"]
    # Paired per round, like the ratio to direct.
    pairs = [a / b for a, b in zip(on.rates, off.rates, strict=True) if b]
    entry = affinity_entry(net, run.frontend)
    set_affinity(net, run, False)
    return {"n": run.programmed.n, "rows": [r.summary() for r in results],
            "ratio_to_no_affinity": statistics.median(pairs) if pairs else None,
            "ratio_interval": report.interval(pairs), "ratios": pairs,
            "settle": on.settle, "entry": entry}


def affinity_entry(net: BenchNet, frontend: Frontend) -> dict[str, Any] | None:
    """The bpf pod's kmesh_affinity entry for ``frontend``: proof that the affinity runs took
    the sticky path (age_s: seconds since its last use, now)."""
    assert net.dp is not None
    cookie = cni.netns_cookie(net.pods["bpf"].netns)
    key = records.AFFINITY_KEY.pack({"netns_cookie": cookie, "frontend": frontend.pack(),
                                     "pad": 0})
    raw = net.dp[records.MAP_AFFINITY].lookup(key)
    if raw is None:
        return None
    value = records.AFFINITY.unpack(raw)
    return {"endpoint": str(Backend.unpack(value["endpoint"])), "tier": value["tier"],
            "index": value["index"],
            "age_s": (time.monotonic_ns() - value["last_used"]) / 1e9}


def affinity_program_cost(net: BenchNet, run: AffinityRun, *, window: float, threads: int,
                          repeats: int = 5) -> list[dict[str, Any]]:
    """connect4's ns per run on the measured Service without and with affinity (alternating
    windows), and sock_release's (kmesh_release: each closed socket drops its translation)."""
    progs = ("connect4", "release")
    cost = {(on, prog): CostSamples(run.programmed.n, "random+affinity" if on else "random",
                                    prog, "cc") for on in (False, True) for prog in progs}
    address, port = run.programmed.targets["bpf"]
    tool = Bpftool()
    try:
        with bpf_stats():
            for i in range(repeats):
                for on in (False, True) if i % 2 == 0 else (True, False):
                    set_affinity(net, run, on)
                    deltas, outcome = stats_delta(
                        net, list(progs),
                        partial(net.client, "bpf", address, port, "cc", window, threads), tool)
                    for prog in progs:
                        cost[(on, prog)].add(*deltas[prog], outcome["errors"])
    finally:
        set_affinity(net, run, False)
    return [c.summary() for c in cost.values()]
