"""`python -m kmesh_lab.bench`: every benchmark figure in one run (root; see README).

Writes results.json, summary.md and datapath.png to --out and prints the tables. --quick is a
small, fast run (also what the test suite runs) that exercises every measurement.

Every paired ratio carries a 95% bootstrap interval, and every target is judged per N by its
interval (pass, fail, or inconclusive, which adds rounds up to --settle-seconds).

Suites (--only/--skip): datapath (TCP connect and request/response through each load balancer
at --ns, connect4/6 cost), udp (UDP request/response through sendmsg/recvmsg vs direct at
--udp-ns, cost of sendmsg4/6, recvmsg4/6, getpeername4/6), affinity (connect rate of one Service
with sessionAffinity ClientIP vs without at --udp-ns, connect4 cost of both), control, cni.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from kmesh_lab.bench import cni, control, datapath, report, udp
from kmesh_lab.bench.topology import BenchNet, build_loadgen
from kmesh_plugin.datapath.build import Capacities

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SUITES = ("datapath", "udp", "affinity", "control", "cni")
NET_SUITES = {"datapath", "udp", "affinity", "control"}  # those that run in the BenchNet


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kmesh_lab.bench", description=__doc__)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="small N, short windows, one round")
    p.add_argument("--ns", default="1,1000,10000,100000",
                   help="numbers of Services (datapath suite)")
    p.add_argument("--udp-ns", default="1,10000",
                   help="numbers of Services (udp and affinity suites)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--window", type=float, default=1.0, help="seconds per measured run")
    p.add_argument("--settle-seconds", type=float, default=120.0,
                   help="an inconclusive verdict (its 95%% interval straddles the target) adds "
                        "rounds for its N and suite for up to this long (0: never)")
    p.add_argument("--threads", type=int, default=0,
                   help="client threads (0: the fewest that saturate the direct path)")
    p.add_argument("--sync", default="10000x10,1000x100", help="full-sync shapes SxE")
    p.add_argument("--changes", type=int, default=200, help="single-change samples")
    p.add_argument("--relabel", default="10000x10", help="relabel shape SxE")
    p.add_argument("--skip", default="", help="comma list: " + ",".join(SUITES))
    p.add_argument("--only", default="", help="comma list: run only these suites")
    p.add_argument("--cni-pods", type=int, default=200, help="pods of the CNI benchmark")
    p.add_argument("--build-dir", type=Path, default=Path("/var/cache/kmesh-plugin"))
    args = p.parse_args(argv)
    if args.quick:
        args.ns, args.rounds, args.window = "1,100", 1, 0.3
        args.udp_ns = "1,100"
        args.sync, args.changes, args.relabel = "200x5", 20, "200x5"
        args.cni_pods = min(args.cni_pods, 20)
        args.settle_seconds = min(args.settle_seconds, 1.0)
    return args


def shape(text: str) -> tuple[int, int]:
    s, e = text.lower().split("x")
    return int(s), int(e)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ns = [int(x) for x in args.ns.split(",") if x]
    udp_ns = [int(x) for x in args.udp_ns.split(",") if x]
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    unknown = (skip | only) - set(SUITES)
    if unknown:
        print(f"unknown suite(s): {', '.join(sorted(unknown))}; the suites: {', '.join(SUITES)}",
              file=sys.stderr)
        return 2
    if only:
        skip |= set(SUITES) - only
    results: dict[str, Any] = {
        "command": "python -m kmesh_lab.bench " + shlex.join(argv or sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": report.machine(),
        "settings": {"ns": ns, "udp_ns": udp_ns, "rounds": args.rounds, "window": args.window,
                     "settle_seconds": args.settle_seconds,
                     "interval": {"level": report.LEVEL, "resamples": report.RESAMPLES,
                                  "seed": report.SEED, "min_rounds": report.MIN_ROUNDS}},
    }
    if NET_SUITES - skip:
        loadgen = build_loadgen(args.build_dir)
        sizes = (ns if "datapath" not in skip else []) + (
            udp_ns if {"udp", "affinity"} - skip else []) or [1]
        caps = Capacities(max_services=max(1024, 2 * max(sizes)),
                          max_endpoints=max(8192, 4 * max(sizes)))
        with BenchNet(loadgen, args.build_dir, caps) as net:
            if "datapath" not in skip:
                results["datapath"] = run_datapath(net, args, ns)
            if "udp" not in skip:
                results["udp"] = run_udp(net, args, udp_ns)
            if "affinity" not in skip:
                threads = (results.get("datapath") or {}).get("threads") or args.threads or \
                    pick_threads(net, args)
                results["affinity"] = run_affinity(net, args, udp_ns, threads)
            if "control" not in skip:
                results["control"] = run_control(net, args)
    if "cni" not in skip:
        results["cni"] = cni.run(args.cni_pods, args.settle_seconds)
    results["targets"] = report.evaluate(results)
    report.save(results, args.out)
    print()
    print(report.table(results))
    print(f"\nresults: {args.out}/results.json, {args.out}/summary.md, {args.out}/datapath.png")
    return 0


def saturating(sat: list[dict[str, Any]]) -> int:
    """The fewest client threads within 5% of the best direct-path rate."""
    return next(s["threads"] for s in sat if s["rate"] >= 0.95 * max(x["rate"] for x in sat))


def pick_threads(net: BenchNet, args: argparse.Namespace) -> int:
    print("saturation of the direct path by client threads")
    sat = datapath.saturation(net, args.window)
    for s in sat:
        print(f"  {s['threads']} thread(s): {s['rate']:,.0f} conn/s")
    threads = saturating(sat)
    print(f"  measuring with {threads} client thread(s)")
    return threads


def run_datapath(net: BenchNet, args: argparse.Namespace, ns: list[int]) -> dict[str, Any]:
    print("datapath: saturation of the direct path by client threads")
    sat = datapath.saturation(net, args.window)
    for s in sat:
        print(f"  {s['threads']} thread(s): {s['rate']:,.0f} conn/s")
    threads = args.threads or saturating(sat)
    print(f"  measuring with {threads} client thread(s)")
    datapath.route_vips(net)
    out: dict[str, Any] = {"saturation": sat, "threads": threads, "connect": [], "request": [],
                           "program_cost": [], "programming_seconds": {}}
    for n in ns:
        print(f"datapath: N={n}")
        programmed = datapath.program(net, n)
        out["programming_seconds"][str(n)] = programmed.seconds
        for mode, key in (("cc", "connect"), ("rr", "request")):
            # The connect rate is a target: settle its verdict for this N.
            settle = datapath.Settle("bpf", "direct", report.CONNECT_TARGET,
                                     args.settle_seconds) if mode == "cc" else None
            for r in datapath.measure(net, programmed, mode=mode, rounds=args.rounds,
                                      window=args.window, threads=threads, settle=settle):
                s = r.summary()
                out[key].append(s)
                print(f"  {mode} {r.path:<13} {s['rate']:>10,.0f} conn/s  "
                      f"x{_interval(s['ratio_interval'])}  p50 {s['p50_us']:7.1f} us"
                      f"  p99 {s['p99_us']:7.1f} us  errors {s['errors'] or '-'}"
                      f"{_settled(s.get('settle'))}")
        cost = datapath.program_cost(net, programmed, window=args.window, threads=1,
                                     repeats=1 if args.quick else 5,
                                     settle_seconds=args.settle_seconds)
        out["program_cost"] += cost
        for c in cost:
            print(_cost_line(c))
    out["machine"] = report.machine()["id"]
    return out


def _interval(iv: dict[str, Any] | None) -> str:
    return "-" if not iv else f"{iv['median']:.3f} [{iv['lo']:.3f}, {iv['hi']:.3f}]"


def _settled(s: dict[str, Any] | None) -> str:
    if not s:
        return ""
    return (f"  -> {s['verdict']} (+{s['added_rounds']} rounds, {s['seconds']:.1f} s)"
            if s["added_rounds"] else f"  -> {s['verdict']}")


def _row(r: dict[str, Any], unit: str) -> str:
    return (f"{r['rate']:>10,.0f} {unit}  x{r['ratio_to_direct']:.3f}  p50 {r['p50_us']:7.1f} us"
            f"  p99 {r['p99_us']:7.1f} us  errors {r['errors'] or '-'}")


def _cost_line(c: dict[str, Any]) -> str:
    ns = f"{c['ns_per_run']:.0f}" if c["ns_per_run"] else "-"
    floor = ""
    if c.get("floor_ns_per_run"):
        floor = (f", floor {c['floor_ns_per_run']:.0f} ns, {c['difference_ns']:+.0f} ns, "
                 f"x{_interval(c.get('floor_interval'))}")
    return (f"  cost {c['program']:<12} {c['mode']:<16} {ns} ns/run{floor} ({c['runs']} runs"
            f"{', errors ' + str(c['errors']) if c['errors'] else ''}){_settled(c.get('settle'))}")


def run_udp(net: BenchNet, args: argparse.Namespace, ns: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"threads": 1, "block_s": udp.UDP_BLOCK, "request": [],
                           "program_cost": [], "programming_seconds": {}}
    for n in ns:
        print(f"udp: N={n} UDP Services")
        programmed = udp.program_udp(net, n)
        out["programming_seconds"][str(n)] = programmed.seconds
        for s in udp.measure_udp(net, programmed, rounds=args.rounds, window=args.window,
                                 settle_seconds=args.settle_seconds):
            out["request"].append(s)
            print(f"  udp {s['path']:<9} {_row(s, 'rr/s')}  (runs' totals "
                  f"x{s['ratio_of_rounds']:.3f}, {s['pairs']} block pairs; per run "
                  f"x{_interval(s['ratio_interval'])}){_settled(s.get('settle'))}")
        cost = udp.udp_program_cost(net, programmed, window=args.window, threads=1,
                                    repeats=1 if args.quick else 5)
        out["program_cost"] += cost
        for c in cost:
            print(_cost_line(c))
    out["machine"] = report.machine()["id"]
    return out


def run_affinity(net: BenchNet, args: argparse.Namespace, ns: list[int],
                 threads: int) -> dict[str, Any]:
    out: dict[str, Any] = {"threads": threads, "connect": [], "program_cost": []}
    for n in ns:
        print(f"affinity: N={n} TCP Services, {threads} client thread(s)")
        run = udp.program_affinity(net, n)
        m = udp.measure_affinity(net, run, rounds=args.rounds, window=args.window,
                                 threads=threads, settle_seconds=args.settle_seconds)
        out["connect"].append(m)
        for s in m["rows"]:
            print(f"  cc {s['path']:<11} {_row(s, 'conn/s')}")
        print(f"  affinity / no-affinity (paired): x{_interval(m['ratio_interval'])}"
              f"{_settled(m.get('settle'))}; entry {m['entry']}")
        cost = udp.affinity_program_cost(net, run, window=args.window, threads=1,
                                         repeats=1 if args.quick else 5)
        out["program_cost"] += cost
        for c in cost:
            print(_cost_line(c))
    out["machine"] = report.machine()["id"]
    return out


def run_control(net: BenchNet, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"full_sync": []}
    print("control plane")
    for text in args.sync.split(","):
        out["full_sync"].append(control.full_sync(net, *shape(text)))
    s, e = shape(args.sync.split(",")[0])
    out["single_change"] = control.single_changes(net, s, e, args.changes)
    out["relabel"] = control.relabel_under_load(net, *shape(args.relabel))
    print("control plane through the Kubernetes API")
    api: dict[str, Any] = {"full_sync": []}
    for text in args.sync.split(","):
        api["full_sync"].append(control.api_full_sync(net, *shape(text)))
    api["single_change"] = control.api_single_changes(net, s, e, args.changes)
    api["relist"] = control.api_relist_under_load(net, *shape(args.relabel))
    out["api"] = api
    out["machine"] = report.machine()["id"]
    return out


if __name__ == "__main__":
    sys.exit(main())
