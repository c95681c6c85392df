"""`python -m kmesh_lab.bench`: every benchmark figure in one run (root; see README).

Writes results.json, summary.md and datapath.png to --out and prints the tables. --quick is a
small, fast run (also what the test suite runs) that exercises every measurement.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from kmesh_lab.bench import cni, control, datapath, report
from kmesh_lab.bench.topology import BenchNet, build_loadgen
from kmesh_plugin.datapath.build import Capacities

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kmesh_lab.bench", description=__doc__)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="small N, short windows, one round")
    p.add_argument("--ns", default="1,1000,10000,100000", help="numbers of Services")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--window", type=float, default=1.0, help="seconds per measured run")
    p.add_argument("--threads", type=int, default=0,
                   help="client threads (0: the fewest that saturate the direct path)")
    p.add_argument("--sync", default="10000x10,1000x100", help="full-sync shapes SxE")
    p.add_argument("--changes", type=int, default=200, help="single-change samples")
    p.add_argument("--relabel", default="10000x10", help="relabel shape SxE")
    p.add_argument("--skip", default="", help="comma list: datapath,control,cni")
    p.add_argument("--only", default="", help="comma list: run only these suites")
    p.add_argument("--cni-pods", type=int, default=200, help="pods of the CNI benchmark")
    p.add_argument("--build-dir", type=Path, default=Path("/var/cache/kmesh-plugin"))
    args = p.parse_args(argv)
    if args.quick:
        args.ns, args.rounds, args.window = "1,100", 1, 0.3
        args.sync, args.changes, args.relabel = "200x5", 20, "200x5"
        args.cni_pods = min(args.cni_pods, 20)
    return args


def shape(text: str) -> tuple[int, int]:
    s, e = text.lower().split("x")
    return int(s), int(e)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ns = [int(x) for x in args.ns.split(",") if x]
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    if only:
        skip |= {"datapath", "control", "cni"} - only
    results: dict[str, Any] = {
        "command": "python -m kmesh_lab.bench " + shlex.join(argv or sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": report.machine(),
        "settings": {"ns": ns, "rounds": args.rounds, "window": args.window},
    }
    if {"datapath", "control"} - skip:
        loadgen = build_loadgen(args.build_dir)
        caps = Capacities(max_services=max(1024, 2 * max(ns)),
                          max_endpoints=max(8192, 4 * max(ns)))
        with BenchNet(loadgen, args.build_dir, caps) as net:
            if "datapath" not in skip:
                results["datapath"] = run_datapath(net, args, ns)
            if "control" not in skip:
                results["control"] = run_control(net, args)
    if "cni" not in skip:
        results["cni"] = cni.run(args.cni_pods)
    results["targets"] = report.evaluate(results)
    report.save(results, args.out)
    print()
    print(report.table(results))
    print(f"\nresults: {args.out}/results.json, {args.out}/summary.md, {args.out}/datapath.png")
    return 0


def run_datapath(net: BenchNet, args: argparse.Namespace, ns: list[int]) -> dict[str, Any]:
    print("datapath: saturation of the direct path by client threads")
    sat = datapath.saturation(net, args.window)
    for s in sat:
        print(f"  {s['threads']} thread(s): {s['rate']:,.0f} conn/s")
    threads = args.threads or next(
        s["threads"] for s in sat if s["rate"] >= 0.95 * max(x["rate"] for x in sat))
    print(f"  measuring with {threads} client thread(s)")
    datapath.route_vips(net)
    out: dict[str, Any] = {"saturation": sat, "threads": threads, "connect": [], "request": [],
                           "program_cost": [], "programming_seconds": {}}
    for n in ns:
        print(f"datapath: N={n}")
        programmed = datapath.program(net, n)
        out["programming_seconds"][str(n)] = programmed.seconds
        for mode, key in (("cc", "connect"), ("rr", "request")):
            for r in datapath.measure(net, programmed, mode=mode, rounds=args.rounds,
                                      window=args.window, threads=threads):
                s = r.summary()
                out[key].append(s)
                print(f"  {mode} {r.path:<9} {s['rate']:>10,.0f} conn/s  p50 {s['p50_us']:7.1f} us"
                      f"  p99 {s['p99_us']:7.1f} us  errors {s['errors'] or '-'}")
        cost = datapath.program_cost(net, programmed, window=args.window, threads=1,
                                     repeats=1 if args.quick else 5)
        out["program_cost"] += cost
        for c in cost:
            print(f"  cost {c['program']} {c['mode']:<8} {c['ns_per_run']:.0f} ns/run "
                  f"({c['runs']} runs)")
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
    return out


if __name__ == "__main__":
    sys.exit(main())
