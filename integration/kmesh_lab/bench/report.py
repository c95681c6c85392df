"""Targets, verdicts with their uncertainty, the printed table, the JSON results and the plot.

Every paired ratio (translated / direct connect rate, UDP round trips, affinity on / off, our
program's cost / the empty program's) is reported with a 95% interval: a percentile bootstrap of
the median of the per-round ratios, with a fixed seed, so the same rounds give the same interval.
A target is judged by its interval: pass when the whole interval is on the right side of the
target, fail when the whole interval is on the wrong side, inconclusive when it straddles the
target (or fewer than MIN_ROUNDS rounds were measured). An inconclusive verdict makes its suite
measure more rounds for that N (settle), up to --settle-seconds, before the run settles.
A verdict names one N and uses only figures measured at that N.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CONNECT_TARGET = 0.97  # translated / direct
UDP_TARGET = 0.97
AFFINITY_TARGET = 0.95  # affinity on / off
FLOOR_TARGET = 2.5  # our program's ns per run / the empty program's, at most

TARGETS_DOC = {
    "connect_ratio": "translated connect rate >= 0.97x direct (95% interval) at every N",
    "program_cost": "connect4/6 cost <= 2.5x an empty program's on the same connects "
                    "(95% interval), every mode and N",
    "udp_rr_ratio": "UDP request/response via sendmsg/recvmsg >= 0.97x direct (95% interval) "
                    "at every N",
    "affinity_connect_ratio": "connect rate with sessionAffinity ClientIP >= 0.95x without "
                              "(95% interval), at every N",
    "api_sync_time": "API path: full sync of 10,000 Services x 10 endpoints, list to maps <= 3 s",
    "api_sync_rss": "API path: that full sync within 250 MB agent RSS",
    "api_change_p99": "API path: one endpoint change, watch event to live map entry: p99 <= 10 ms",
    "api_relist_failures": "API path: failed connects during a relist after 410 "
                           "(100,000 endpoints) = 0",
    "recompute_failures": "failed connects during a full recompute (own-node relabel) = 0",
    "cni_add_p99": "kmesh-cni ADD in a bridge + host-local chain: p99 <= 50 ms (95% interval)",
    "cni_del_p99": "kmesh-cni DEL in that chain: p99 <= 50 ms (95% interval)",
}
CNI_TARGET_MS = 50.0
VERDICTS = ("pass", "fail", "inconclusive")

# -- statistics -------------------------------------------------------------------------------

LEVEL = 0.95
RESAMPLES = 4000
SEED = 12
MIN_ROUNDS = 3  # fewer rounds than this: no verdict by interval yet (inconclusive)


def interval(ratios: Sequence[float], *, level: float = LEVEL, resamples: int = RESAMPLES,
             seed: int = SEED) -> dict[str, Any] | None:
    """The median of ``ratios`` (one per round) and its percentile-bootstrap interval.

    ``resamples`` resamples of the rounds with replacement, each one's median; the interval is
    the (1 - level) / 2 and (1 + level) / 2 percentiles of those medians. The seed is fixed: the
    same ratios always give the same interval. None without ratios."""
    values = [float(r) for r in ratios]
    if not values:
        return None
    med = statistics.median(values)
    if len(values) == 1:
        lo = hi = med
    else:
        import numpy as np

        arr = np.asarray(values)
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(values), size=(resamples, len(values)))
        medians = np.median(arr[idx], axis=1)
        q = (1 - level) / 2
        lo_, hi_ = np.quantile(medians, [q, 1 - q])
        # The sample median can sit a hair outside the percentiles of a tiny sample's medians.
        lo, hi = min(float(lo_), med), max(float(hi_), med)
    return {"median": med, "lo": lo, "hi": hi, "level": level, "rounds": len(values),
            "method": f"percentile bootstrap of the median, {resamples} resamples, seed {seed}"}


def quantile_of(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile as the bench's latency tables take it: the sample at rank
    round(q * (n - 1)) of the sorted values."""
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def quantile_interval(values: Sequence[float], q: float, *, level: float = LEVEL,
                      resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Any] | None:
    """The ``q`` quantile of ``values`` (one per sample, e.g. one CNI ADD each) and its
    percentile-bootstrap interval: as ``interval``, with that quantile in place of the median.
    "rounds" counts the samples. None without values."""
    xs = [float(v) for v in values]
    if not xs:
        return None
    import numpy as np

    arr = np.asarray(xs)
    rng = np.random.default_rng(seed)
    resampled = np.sort(arr[rng.integers(0, len(xs), size=(resamples, len(xs)))], axis=1)
    rank = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    lo_, hi_ = np.quantile(resampled[:, rank], [(1 - level) / 2, (1 + level) / 2])
    value = quantile_of(xs, q)
    return {"median": value, "lo": min(float(lo_), value), "hi": max(float(hi_), value),
            "level": level, "rounds": len(xs), "quantile": q,
            "method": f"percentile bootstrap of the p{q * 100:g}, {resamples} resamples, "
                      f"seed {seed}"}


def verdict(iv: dict[str, Any] | None, target: float, higher_is_better: bool = True,
            min_rounds: int = MIN_ROUNDS) -> str | None:
    """pass / fail / inconclusive by the interval; None when nothing was measured."""
    if iv is None:
        return None
    if iv["rounds"] < min_rounds:
        return "inconclusive"
    lo, hi = iv["lo"], iv["hi"]
    if higher_is_better:
        return "pass" if lo >= target else "fail" if hi < target else "inconclusive"
    return "pass" if hi <= target else "fail" if lo > target else "inconclusive"


def settle(ratios: Callable[[], Sequence[float]], more: Callable[[], None], target: float, *,
           higher_is_better: bool = True, seconds: float,
           clock: Callable[[], float] = time.monotonic, max_added: int = 1000) -> dict[str, Any]:
    """While the verdict on ``ratios()`` is inconclusive (or nothing is measured yet) and fewer
    than ``seconds`` have passed, ``more()`` measures one more round (the last one may run past
    the bound by its length).
    Returns the settled verdict, its interval, the rounds added and the seconds spent."""
    started = clock()
    added = 0
    while True:
        iv = interval(ratios())
        v = verdict(iv, target, higher_is_better)
        spent = clock() - started
        if v not in ("inconclusive", None) or spent >= seconds or added >= max_added:
            break
        before = len(ratios())
        more()
        added += 1
        if len(ratios()) == before:  # the round gave no ratio (e.g. no runs): stop
            iv = interval(ratios())
            v = verdict(iv, target, higher_is_better)
            spent = clock() - started
            break
    return {"verdict": v, "interval": iv, "added_rounds": added, "seconds": round(spent, 3),
            "bound_seconds": seconds, "target": target}


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
    out = {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "iptables": _version(["iptables-legacy", "--version"]),
        "nft": _version(["nft", "--version"]),
    }
    # Which machine a figure came from: every target row and suite carries this id.
    key = json.dumps([platform.node(), out["kernel"], out["cpu"], out["cpus"], out["memory_gb"]])
    out["id"] = hashlib.sha256(key.encode()).hexdigest()[:12]
    out["host"] = platform.node()
    return out


def machine_label(results: dict[str, Any]) -> str:
    """Which machine and run a figure came from, for its caption."""
    m = results.get("machine") or {}
    return (f"{m.get('cpu') or 'unknown CPU'}, {m.get('cpus', '?')} CPUs, "
            f"{m.get('memory_gb', '?')} GB, kernel {m.get('kernel', '?')} "
            f"(machine {m.get('id', '?')}), {results.get('started', '')}").strip(", ")


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "not installed"


def by(rows: list[dict[str, Any]], n: int, path: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["n"] == n and r["path"] == path), None)


def _ns(results: dict[str, Any], suite: str, setting: str, rows: list[dict[str, Any]]
        ) -> list[int | None]:
    """The Ns a suite's verdicts name: those it was asked for and those it measured. A suite
    that did not run has one verdict, not measured, naming no N."""
    if suite not in results:
        return [None]
    asked = (results.get("settings") or {}).get(setting) or []
    return sorted({int(n) for n in asked} | {int(r["n"]) for r in rows}) or [None]


def _margin(iv: dict[str, Any], limit: float, unit: str) -> str:
    lo, hi = ((iv["lo"] / limit - 1) * 100, (iv["hi"] / limit - 1) * 100) if limit else (0, 0)
    return f"{lo:+.1f}% .. {hi:+.1f}% vs {limit:g}{unit}"


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target and N: the measured median, its 95% interval, the verdict by the
    interval, and the margin of the interval's ends to the target. A row uses only figures
    measured at the N it names; an N asked for but not measured is "not measured"."""
    out: list[dict[str, Any]] = []
    machine_id = (results.get("machine") or {}).get("id")
    dp = results.get("datapath") or {}

    def judged(key: str, n: int | None, iv: dict[str, Any] | None, limit: float,
               higher_is_better: bool, unit: str, detail: str = "",
               settled: dict[str, Any] | None = None) -> None:
        name = key if n is None else f"{key} N={n}"
        v = verdict(iv, limit, higher_is_better)
        out.append({"target": key, "n": n, "name": name, "doc": TARGETS_DOC[key],
                    "value": iv["median"] if iv else None, "interval": iv, "limit": limit,
                    "unit": unit, "verdict": v,
                    "pass": {"pass": True, "fail": False}.get(v or ""),
                    "margin": _margin(iv, limit, unit) if iv else "not measured",
                    "detail": detail, "settle": settled, "machine": machine_id})

    def valued(key: str, value: float | None, limit: float, unit: str, detail: str = "") -> None:
        """A target with no rounds (control plane): lower is better, judged on the value."""
        if value is None:
            v, margin = None, "not measured"
        else:
            v = "pass" if value <= limit else "fail"
            margin = f"{(1 - value / limit) * 100:+.1f}% under {limit:g}{unit}" if limit else ""
        out.append({"target": key, "n": None, "name": key, "doc": TARGETS_DOC[key],
                    "value": value, "interval": None, "limit": limit, "unit": unit,
                    "verdict": v, "pass": {"pass": True, "fail": False}.get(v or ""),
                    "margin": margin, "detail": detail, "settle": None, "machine": machine_id})

    def rounds_detail(settled: dict[str, Any] | None, rounds: int, what: str) -> str:
        extra = ""
        if settled and settled.get("added_rounds"):
            extra = f", {settled['added_rounds']} added to settle in {settled['seconds']:.0f} s"
        return f"{rounds} {what}{extra}"

    rows = dp.get("connect") or []
    for n in _ns(results, "datapath", "ns", rows):
        r = by(rows, n, "bpf") if n is not None else None
        iv = interval(r.get("ratios") or []) if r else None
        judged("connect_ratio", n, iv, CONNECT_TARGET, True, "x",
               rounds_detail(r.get("settle"), len(r.get("ratios") or []),
                             "paired rounds") if iv and r else "", r.get("settle") if r else None)

    costs = [c for c in dp.get("program_cost") or []
             if c["program"] in ("connect4", "connect6")]
    for n in _ns(results, "datapath", "ns", costs):
        mine = [c for c in costs if c["n"] == n and c.get("floor_ratios")]
        judged_rows = [(interval(c["floor_ratios"]), c) for c in mine]
        if not judged_rows:
            judged("program_cost", n, None, FLOOR_TARGET, False, "x floor")
            continue
        verdicts = [verdict(iv, FLOOR_TARGET, False) for iv, _ in judged_rows]
        worst_iv, worst = max(judged_rows, key=lambda x: x[0]["median"] if x[0] else 0)
        combined = "fail" if "fail" in verdicts else \
            "pass" if all(v == "pass" for v in verdicts) else "inconclusive"
        judged("program_cost", n, worst_iv, FLOOR_TARGET, False, "x floor",
               f"highest of {len(mine)}: {worst['program']} {worst['mode']}, "
               f"{worst['ns_per_run']:.0f} ns vs floor {worst['floor_ns_per_run']:.0f} ns; "
               f"{len(worst['floor_ratios'])} windows", worst.get("settle"))
        # The N's verdict covers every mode and program, not only the highest median.
        out[-1]["verdict"] = combined
        out[-1]["pass"] = {"pass": True, "fail": False}.get(combined)

    udp_rows = (results.get("udp") or {}).get("request") or []
    for n in _ns(results, "udp", "udp_ns", udp_rows):
        r = by(udp_rows, n, "bpf") if n is not None else None
        ratios = (r.get("round_pair_ratios") or []) if r else []
        iv = interval(ratios) if ratios else None
        judged("udp_rr_ratio", n, iv, UDP_TARGET, True, "x",
               rounds_detail(r.get("settle") if r else None, len(ratios),
                             "runs (each: median of its block pairs)") if iv else "",
               r.get("settle") if r else None)

    aff = (results.get("affinity") or {}).get("connect") or []
    for n in _ns(results, "affinity", "udp_ns", aff):
        a = next((a for a in aff if a["n"] == n), None)
        iv = interval(a.get("ratios") or []) if a else None
        judged("affinity_connect_ratio", n, iv, AFFINITY_TARGET, True, "x",
               rounds_detail(a.get("settle"), len(a.get("ratios") or []),
                             "paired rounds, same Service") if iv and a else "",
               a.get("settle") if a else None)

    ctl = results.get("control") or {}
    api = ctl.get("api") or {}
    syncs = [s for s in api.get("full_sync") or [] if s["endpoints"] >= 100000]
    valued("api_sync_time", max((s["list_to_maps_seconds"] for s in syncs), default=None), 3.0,
           " s", "from the agent's first list request to the maps holding it; slowest shape")
    valued("api_sync_rss", max((s["peak_rss_mb"] for s in syncs), default=None), 250.0, " MB")
    change = api.get("single_change")
    valued("api_change_p99", change["p99_ms"] if change else None, 10.0, " ms")
    relist = api.get("relist")
    valued("api_relist_failures", relist["failed_connects"] if relist else None, 0, "",
           f"{relist['connects']} connects during the relist, {relist['relist_seconds']:.2f} s"
           if relist else "")
    relabel = ctl.get("relabel")
    valued("recompute_failures", relabel["failed_connects"] if relabel else None, 0, "",
           f"{relabel['connects']} connects during the recompute" if relabel else "")

    cni = results.get("cni") or {}
    for key, step in (("cni_add_p99", "ours_add"), ("cni_del_p99", "ours_del")):
        samples = (cni.get("samples_ms") or {}).get(step) or []
        iv = quantile_interval(samples, 0.99) if samples else None
        settled = cni.get("settle")
        judged(key, None, iv, CNI_TARGET_MS, False, " ms",
               rounds_detail(settled, len(samples), "pods") if iv else "", settled)
    return out


def _iv(iv: dict[str, Any] | None, fmt: str = ".3f") -> str:
    if not iv:
        return "-"
    return f"{iv['median']:{fmt}} [{iv['lo']:{fmt}}, {iv['hi']:{fmt}}]"


def table(results: dict[str, Any]) -> str:
    """Markdown: targets, then the datapath rates per N and path."""
    lines = ["| target | N | measured: median [95% interval] | result | margin of the interval |",
             "|---|---:|---|---|---|"]
    for t in results["targets"]:
        unit = t.get("unit", "")
        if t["value"] is None:
            value = "-"
        elif t.get("interval"):
            iv = t["interval"]
            value = f"{iv['median']:.3g}{unit} [{iv['lo']:.3g}, {iv['hi']:.3g}]"
        else:
            value = f"{t['value']:.3g}{unit}"
        result = (t.get("verdict") or "not measured").upper() if t.get("verdict") else "n/a"
        detail = f" ({t['detail']})" if t.get("detail") else ""
        n = "-" if t.get("n") is None else f"{t['n']}"
        lines.append(f"| {t['doc']} | {n} | {value}{detail} | {result} | {t['margin']} |")
    dp = results.get("datapath") or {}
    for kind, title in (("connect", "TCP connect + close"), ("request", "connect + request/"
                                                                        "response + close")):
        rows = dp.get(kind) or []
        if not rows:
            continue
        lines += ["", f"**{title}** (median of interleaved rounds; ratios paired per round, with "
                  "their 95% bootstrap interval)", "",
                  "| N Services | path | rounds | conn/s | vs direct (paired) [95% interval] | "
                  "p50 us | p99 us | errors |",
                  "|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in sorted(rows, key=lambda r: (r["n"], ORDER.index(r["path"]))):
            iv = r.get("ratio_interval") or interval(r.get("ratios") or [])
            ratio = _iv(iv) if iv else f"{r['ratio_to_direct']:.3f}"
            lines.append(f"| {r['n']} | {r['path']} | {r['rounds']} | {r['rate']:,.0f} | "
                         f"{ratio} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | "
                         f"{_errors(r['errors'])} |")
    costs = dp.get("program_cost") or []
    if costs:
        lines += ["", "**eBPF program cost against its floor** (kernel.bpf_stats_enabled: "
                  "run_time_ns / run_cnt of ours and of an empty program on the same cgroup, "
                  "over the same windows; medians of the windows)", "",
                  "| N Services | mode | program | ours ns | floor ns | difference ns | "
                  "ours / floor [95% interval] | windows |",
                  "|---:|---|---|---:|---:|---:|---:|---:|"]
        lines += _cost_rows(sorted(costs, key=lambda c: (c["n"], c["mode"], c["program"])),
                            with_load=False)
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


def _ns_cell(value: float | None) -> str:
    return f"{value:.0f}" if value else "-"


def _cost_rows(costs: list[dict[str, Any]], with_load: bool) -> list[str]:
    lines = []
    for c in costs:
        ratios = c.get("floor_ratios") or []
        iv = c.get("floor_interval") or (interval(ratios) if ratios else None)
        diff = c.get("difference_ns")
        cells = [f"{c['n']}"]
        # A frontend without a kmesh_frontend_cache line costs a hash lookup more: say so.
        program = c["program"] + (" (frontend by hash)" if c.get("cached") is False else "")
        if with_load:
            cells += [program, c["mode"], LOADS[c["load"]]]
        else:
            cells += [c["mode"], program]
        cells += [_ns_cell(c["ns_per_run"]), _ns_cell(c.get("floor_ns_per_run")),
                  "-" if diff is None else f"{diff:+.0f}", _iv(iv, ".2f") if iv else "-"]
        cells.append(f"{c['runs']:,}" if with_load else f"{len(c.get('samples') or [])}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def udp_tables(results: dict[str, Any]) -> list[str]:
    """Markdown of the udp and affinity suites: rates, ratios with intervals, program cost."""
    lines: list[str] = []
    settings = results.get("settings") or {}
    u = results.get("udp") or {}
    rows = u.get("request") or []
    if rows:
        block_ms = (u.get("block_s") or 0) * 1000
        lines += ["", f"**UDP request/response**: unconnected sendto(ClusterIP) + recvfrom vs "
                  f"sendto(pod IP), one thread alternating {block_ms:.0f} ms blocks between a "
                  f"socket of each pod (runs of {settings.get('window', '?')} s; rates: median "
                  f"of the runs; interval: bootstrap over the runs of each run's median block "
                  f"pair)", "",
                  "| N Services | path | runs | round trips/s | vs direct (median of block pairs) "
                  "| per run [95% interval] | vs direct (median of runs) | p50 us | p99 us | "
                  "errors |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted(rows, key=lambda r: (r["n"], ORDER.index(r["path"]))):
            runs = r.get("ratio_of_rounds")
            pr = r.get("round_pair_ratios") or []
            lines.append(f"| {r['n']} | {r['path']} | {r['rounds']} | {r['rate']:,.0f} | "
                         f"{r['ratio_to_direct']:.3f} | {_iv(interval(pr)) if pr else '-'} | "
                         f"{'-' if runs is None else f'{runs:.3f}'} | {r['p50_us']:.1f} | "
                         f"{r['p99_us']:.1f} | {_errors(r['errors'])} |")
    a = results.get("affinity") or {}
    runs = a.get("connect") or []
    if runs:
        lines += ["", f"**sessionAffinity**: TCP connect + close to one Service published with "
                  f"affinity=10800 s and with affinity=0, {a['threads']} client thread(s) "
                  f"(medians of interleaved rounds; paired ratios with their 95% interval)", "",
                  "| N Services | path | rounds | conn/s | vs direct (paired) | vs no-affinity "
                  "(paired) [95% interval] | p50 us | p99 us | errors |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for run in runs:
            for r in run["rows"]:
                if r["path"] == "affinity":
                    iv = interval(run.get("ratios") or [])
                    versus = _iv(iv) if iv else f"{run['ratio_to_no_affinity']:.3f}"
                else:
                    versus = "1.000" if r["path"] == "no-affinity" else ""
                lines.append(f"| {run['n']} | {r['path']} | {r['rounds']} | {r['rate']:,.0f} | "
                             f"{r['ratio_to_direct']:.3f} | {versus} | {r['p50_us']:.1f} | "
                             f"{r['p99_us']:.1f} | {_errors(r['errors'])} |")
    costs = (u.get("program_cost") or []) + (a.get("program_cost") or [])
    if costs:
        lines += ["", "**eBPF program cost, UDP, getpeername and affinity** "
                  "(kernel.bpf_stats_enabled: run_time_ns / run_cnt, median of the windows; "
                  "floor: an empty program on the same hook and cgroup, same windows)", "",
                  "| N Services | program | Service | load | ns/run | floor ns | difference ns "
                  "| ours / floor [95% interval] | runs |",
                  "|---:|---|---|---|---:|---:|---:|---:|---:|"]
        lines += _cost_rows(sorted(costs, key=lambda c: (c["n"], c["program"], c["mode"])),
                            with_load=True)
    return lines


LOADS = {"udp": "sendto + recvfrom", "peer": "getpeername() of a connected socket",
         "cc": "connect + close"}


def plot(results: dict[str, Any], path: Path) -> None:
    """Left: each path's new-connection rate relative to the direct path (paired per round),
    with its 95% interval as error bars. Right: p99 of connect + close, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (results.get("datapath") or {}).get("connect") or []
    if not rows:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p, style in (("direct", "k--"), ("bpf", "C0-o"), ("iptables", "C3-s"),
                     ("iptables-last", "C3:x"), ("nftables", "C2-^")):
        pts = []
        for r in rows:
            if r["path"] != p:
                continue
            iv = r.get("ratio_interval") or interval(r.get("ratios") or []) or {
                "median": r["ratio_to_direct"], "lo": r["ratio_to_direct"],
                "hi": r["ratio_to_direct"]}
            pts.append((r["n"], iv["median"], iv["lo"], iv["hi"], r["p99_us"]))
        pts.sort()
        if not pts:
            continue
        left.errorbar([x[0] for x in pts], [x[1] for x in pts],
                      yerr=[[x[1] - x[2] for x in pts], [x[3] - x[1] for x in pts]],
                      fmt=style, capsize=3, label=LABELS[p])
        right.plot([x[0] for x in pts], [x[4] for x in pts], style, label=LABELS[p])
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
    fig.suptitle("New connections through each load balancer (medians of interleaved rounds, "
                 "95% bootstrap intervals)\n" + machine_label(results), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "summary.md").write_text(table(results) + "\n")
    plot(results, out / "datapath.png")
