"""Targets, the printed table, the JSON results and the plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

TARGETS_DOC = {
    "connect_ratio": "translated connect rate >= 0.97x direct at every N",
    "program_cost": "program cost <= 200 ns per connect (connect4/6, every mode and N)",
    "udp_rr_ratio": "UDP request/response via sendmsg/recvmsg >= 0.97x direct at every N",
    "affinity_connect_ratio": "connect rate with sessionAffinity ClientIP >= 0.95x without, "
                              "at every N",
    "api_sync_time": "API path: full sync of 10,000 Services x 10 endpoints, list to maps <= 3 s",
    "api_sync_rss": "API path: that full sync within 250 MB agent RSS",
    "api_change_p99": "API path: one endpoint change, watch event to live map entry: p99 <= 10 ms",
    "api_relist_failures": "API path: failed connects during a relist after 410 "
                           "(100,000 endpoints) = 0",
    "recompute_failures": "failed connects during a full recompute (own-node relabel) = 0",
}


ORDER = ["direct", "bpf", "iptables", "iptables-last", "nftables"]
LABELS = {
    "direct": "direct to pod IP",
    "bpf": "kmesh-plugin eBPF",
    "iptables": "kube-proxy iptables (Service mid-chain)",
    "iptables-last": "kube-proxy iptables (last Service)",
    "nftables": "kube-proxy nftables",
}


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "iptables": _version(["iptables-legacy", "--version"]),
        "nft": _version(["nft", "--version"]),
    }


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "not installed"


def by(rows: list[dict[str, Any]], n: int, path: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["n"] == n and r["path"] == path), None)


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value, pass or fail, and the margin."""
    out = []
    dp = results.get("datapath") or {}
    rows = dp.get("connect") or []

    def add(key: str, value: float | None, limit: float, higher_is_better: bool,
            unit: str, detail: str = "") -> None:
        if value is None:
            out.append({"target": key, "doc": TARGETS_DOC[key], "value": None, "pass": None,
                        "margin": "not measured", "detail": detail})
            return
        ok = value >= limit if higher_is_better else value <= limit
        if higher_is_better:
            margin = f"{(value / limit - 1) * 100:+.1f}% vs {limit:g}{unit}"
        else:
            margin = f"{(1 - value / limit) * 100:+.1f}% under {limit:g}{unit}" if limit else ""
        out.append({"target": key, "doc": TARGETS_DOC[key], "value": value, "unit": unit,
                    "pass": ok, "margin": margin, "detail": detail})

    ratios = [(r["ratio_to_direct"], r["n"]) for r in rows if r["path"] == "bpf"]
    worst = min(ratios) if ratios else None
    add("connect_ratio", worst[0] if worst else None, 0.97, True, "x",
        f"paired per round; worst at N={worst[1]}" if worst else "")
    costs = [c["ns_per_run"] for c in dp.get("program_cost") or [] if c["ns_per_run"]]
    add("program_cost", max(costs) if costs else None, 200.0, False, " ns",
        "the highest over connect4/connect6, modes and N")
    udp_rows = (results.get("udp") or {}).get("request") or []
    ratios = [(r["ratio_to_direct"], r["n"]) for r in udp_rows if r["path"] == "bpf"]
    worst = min(ratios) if ratios else None
    add("udp_rr_ratio", worst[0] if worst else None, 0.97, True, "x",
        f"median of paired blocks; worst at N={worst[1]}" if worst else "")
    aff = (results.get("affinity") or {}).get("connect") or []
    ratios = [(a["ratio_to_no_affinity"], a["n"]) for a in aff
              if a["ratio_to_no_affinity"] is not None]
    worst = min(ratios) if ratios else None
    add("affinity_connect_ratio", worst[0] if worst else None, 0.95, True, "x",
        f"same Service, paired per round; worst at N={worst[1]}" if worst else "")
    ctl = results.get("control") or {}
    api = ctl.get("api") or {}
    syncs = [s for s in api.get("full_sync") or [] if s["endpoints"] >= 100000]
    add("api_sync_time", max((s["list_to_maps_seconds"] for s in syncs), default=None), 3.0,
        False, " s", "from the agent's first list request to the maps holding it; slowest shape")
    add("api_sync_rss", max((s["peak_rss_mb"] for s in syncs), default=None), 250.0, False,
        " MB")
    change = api.get("single_change")
    add("api_change_p99", change["p99_ms"] if change else None, 10.0, False, " ms")
    relist = api.get("relist")
    add("api_relist_failures", relist["failed_connects"] if relist else None, 0, False, "",
        f"{relist['connects']} connects during the relist, {relist['relist_seconds']:.2f} s"
        if relist else "")
    relabel = ctl.get("relabel")
    add("recompute_failures", relabel["failed_connects"] if relabel else None, 0, False, "",
        f"{relabel['connects']} connects during the recompute" if relabel else "")
    return out


def table(results: dict[str, Any]) -> str:
    """Markdown: targets, then the datapath rates per N and path."""
    lines = ["| target | measured | result | margin |", "|---|---|---|---|"]
    for t in results["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3g}{t.get('unit', '')}"
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        detail = f" ({t['detail']})" if t.get("detail") else ""
        lines.append(f"| {t['doc']} | {value}{detail} | {verdict} | {t['margin']} |")
    dp = results.get("datapath") or {}
    for kind, title in (("connect", "TCP connect + close"), ("request", "connect + request/"
                                                                        "response + close")):
        rows = dp.get(kind) or []
        if not rows:
            continue
        lines += ["", f"**{title}** (median of {rows[0]['rounds']} interleaved rounds)", "",
                  "| N Services | path | conn/s | vs direct (paired) | p50 us | p99 us | errors |",
                  "|---:|---|---:|---:|---:|---:|---|"]
        for r in sorted(rows, key=lambda r: (r["n"], ORDER.index(r["path"]))):
            ratio = r["ratio_to_direct"]
            errors = ", ".join(f"{k}:{v}" for k, v in r["errors"].items()) or "-"
            lines.append(f"| {r['n']} | {r['path']} | {r['rate']:,.0f} | {ratio:.3f} | "
                         f"{r['p50_us']:.1f} | {r['p99_us']:.1f} | {errors} |")
    costs = dp.get("program_cost") or []
    if costs:
        lines += ["", "**eBPF program cost** (kernel.bpf_stats_enabled: run_time_ns / run_cnt)",
                  "", "| N Services | mode | connect4 ns | connect6 ns |", "|---:|---|---:|---:|"]
        keys = sorted({(c["n"], c["mode"]) for c in costs})
        for n, mode in keys:
            cells = []
            for prog in ("connect4", "connect6"):
                c = next((c for c in costs if (c["n"], c["mode"], c["program"]) ==
                          (n, mode, prog)), None)
                cells.append(f"{c['ns_per_run']:.0f}" if c and c["ns_per_run"] else "-")
            lines.append(f"| {n} | {mode} | {cells[0]} | {cells[1]} |")
    lines += udp_tables(results)
    ctl = results.get("control") or {}
    api = ctl.get("api") or {}
    if api.get("full_sync"):
        lines += ["", "**Control plane through the Kubernetes API** (in-test API server, real "
                  "HTTP; the agent's kubernetes source)", "",
                  "| full sync | list to maps s | list requests | reconcile s | ready s | "
                  "peak RSS MB |", "|---|---:|---:|---:|---:|---:|"]
        for s in api["full_sync"]:
            lines.append(f"| {s['services']:,} x {s['endpoints_per_service']} | "
                         f"{s['list_to_maps_seconds']:.2f} | {s['list_requests']} | "
                         f"{s['reconcile_seconds']:.2f} | {s['ready_seconds']:.2f} | "
                         f"{s['peak_rss_mb']:.0f} |")
        change, relist = api.get("single_change"), api.get("relist")
        if change:
            lines.append(f"\nOne endpoint change, watch event to live map entry "
                         f"({change['changes']} samples on {change['services']:,} Services): p50 "
                         f"{change['p50_ms']:.2f} ms, p99 {change['p99_ms']:.2f} ms, max "
                         f"{change['max_ms']:.2f} ms.")
        if relist:
            lines.append(f"Relist after 410 with {relist['endpoints']:,} endpoints: "
                         f"{relist['relist_seconds']:.2f} s until every resource was listed "
                         f"and diffed, {relist['connects']:,} connects meanwhile, "
                         f"{relist['failed_connects']} failed.")
    if ctl.get("full_sync"):
        lines += ["", "**Control plane from a manifest directory**", "",
                  "| full sync | reconcile s | ready s | map ops/s | peak RSS MB |",
                  "|---|---:|---:|---:|---:|"]
        for s in ctl["full_sync"]:
            lines.append(f"| {s['services']:,} x {s['endpoints_per_service']} | "
                         f"{s['reconcile_seconds']:.2f} | {s['ready_seconds']:.2f} | "
                         f"{s['map_ops_per_second']:,.0f} | {s['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}:{v}" for k, v in errors.items()) or "-"


def udp_tables(results: dict[str, Any]) -> list[str]:
    """Markdown of the udp and affinity suites: rates, ratios, program cost."""
    lines: list[str] = []
    settings = results.get("settings") or {}
    u = results.get("udp") or {}
    rows = u.get("request") or []
    if rows:
        block_ms = (u.get("block_s") or 0) * 1000
        lines += ["", f"**UDP request/response**: unconnected sendto(ClusterIP) + recvfrom vs "
                  f"sendto(pod IP), one thread alternating {block_ms:.0f} ms blocks between a "
                  f"socket of each pod ({rows[0]['rounds']} runs of "
                  f"{settings.get('window', '?')} s; rates: median of the runs)", "",
                  "| N Services | path | round trips/s | vs direct (median of block pairs) | "
                  "vs direct (median of runs) | p50 us | p99 us | errors |",
                  "|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in sorted(rows, key=lambda r: (r["n"], ORDER.index(r["path"]))):
            runs = r.get("ratio_of_rounds")
            lines.append(f"| {r['n']} | {r['path']} | {r['rate']:,.0f} | "
                         f"{r['ratio_to_direct']:.3f} | "
                         f"{'-' if runs is None else f'{runs:.3f}'} | {r['p50_us']:.1f} | "
                         f"{r['p99_us']:.1f} | {_errors(r['errors'])} |")
    a = results.get("affinity") or {}
    runs = a.get("connect") or []
    if runs:
        rounds = runs[0]["rows"][0]["rounds"]
        lines += ["", f"**sessionAffinity**: TCP connect + close to one Service published with "
                  f"affinity=10800 s and with affinity=0, {a['threads']} client thread(s) "
                  f"(median of {rounds} interleaved rounds)", "",
                  "| N Services | path | conn/s | vs direct (paired) | vs no-affinity (paired) "
                  "| p50 us | p99 us | errors |", "|---:|---|---:|---:|---:|---:|---:|---|"]
        for run in runs:
            for r in run["rows"]:
                versus = (f"{run['ratio_to_no_affinity']:.3f}" if r["path"] == "affinity"
                          else "1.000" if r["path"] == "no-affinity" else "")
                lines.append(f"| {run['n']} | {r['path']} | {r['rate']:,.0f} | "
                             f"{r['ratio_to_direct']:.3f} | {versus} | {r['p50_us']:.1f} | "
                             f"{r['p99_us']:.1f} | {_errors(r['errors'])} |")
    costs = (u.get("program_cost") or []) + (a.get("program_cost") or [])
    if costs:
        lines += ["", "**eBPF program cost, UDP, getpeername and affinity** "
                  "(kernel.bpf_stats_enabled: run_time_ns / run_cnt, median of the windows)", "",
                  "| N Services | program | Service | load | ns/run | runs |",
                  "|---:|---|---|---|---:|---:|"]
        for c in sorted(costs, key=lambda c: (c["n"], c["program"], c["mode"])):
            ns = f"{c['ns_per_run']:.0f}" if c["ns_per_run"] else "-"
            lines.append(f"| {c['n']} | {c['program']} | {c['mode']} | {LOADS[c['load']]} | "
                         f"{ns} | {c['runs']:,} |")
    return lines


LOADS = {"udp": "sendto + recvfrom", "peer": "getpeername() of a connected socket",
         "cc": "connect + close"}


def plot(results: dict[str, Any], path: Path) -> None:
    """Left: each path's new-connection rate relative to the direct path (paired per round).
    Right: p99 of connect + close, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (results.get("datapath") or {}).get("connect") or []
    if not rows:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p, style in (("direct", "k--"), ("bpf", "C0-o"), ("iptables", "C3-s"),
                     ("iptables-last", "C3:x"), ("nftables", "C2-^")):
        pts = sorted((r["n"], r["ratio_to_direct"], r["p99_us"]) for r in rows if r["path"] == p)
        if not pts:
            continue
        left.plot([x[0] for x in pts], [x[1] for x in pts], style, label=LABELS[p])
        right.plot([x[0] for x in pts], [x[2] for x in pts], style, label=LABELS[p])
    left.axhline(0.97, color="C0", linewidth=0.8, alpha=0.5)
    left.annotate("target 0.97x", (1, 0.97), xytext=(2, -12), textcoords="offset points",
                  fontsize=8, color="C0")
    left.set_ylabel("new TCP connections/s, relative to direct")
    left.set_ylim(0, 1.15)
    right.set_ylabel("p99 connect + close (us)")
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("Services programmed (N)")
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8, loc="lower left")
    fig.suptitle("New connections through each load balancer (medians of interleaved rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "summary.md").write_text(table(results) + "\n")
    plot(results, out / "datapath.png")
