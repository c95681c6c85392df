"""The benchmark suite runs end to end (its --quick mode): every figure is produced, every
path actually carried connections, every paired ratio carries its interval, the program's cost
is measured against an empty program's, and the targets are judged, one verdict per N.

The real figures come from `integration/run.sh bench` (README "Performance"); this test makes
sure that command keeps working, not that a noisy CI machine meets the targets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kmesh_lab.bench.__main__ import main

pytestmark = pytest.mark.lab


def ordered(iv: dict | None) -> bool:
    return iv is not None and iv["lo"] <= iv["median"] <= iv["hi"] and iv["rounds"] >= 1


def test_quick_benchmark_produces_every_figure(kernel: None, cni_plugins: None,
                                               tmp_path: Path) -> None:
    for tool in ("gcc", "iptables-legacy-restore", "nft"):
        if shutil.which(tool) is None:
            from conftest import missing

            missing(f"{tool} is not installed (integration/run.sh installs it)")
    out = tmp_path / "results"
    assert main(["--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())

    dp = results["datapath"]
    assert [s["threads"] for s in dp["saturation"]] == [1, 2, 3, 4]
    for kind in ("connect", "request"):
        rows = dp[kind]
        assert {(r["n"], r["path"]) for r in rows} == {
            (n, p) for n in (1, 100)
            for p in ("direct", "bpf", "iptables", "iptables-last", "nftables")}
        for r in rows:
            # Every path carried connections, so each load balancer really translated: an
            # untranslated ClusterIP is unreachable from these pods.
            assert r["rate"] > 1000 and r["errors"] == {}, r
            assert ordered(r["ratio_interval"]) and r["ratio_interval"]["rounds"] == r["rounds"]
    # The judged ratio settled: the bpf connect rows have the rounds the settle added.
    for r in dp["connect"]:
        if r["path"] == "bpf":
            assert r["settle"]["verdict"] in ("pass", "fail", "inconclusive"), r["settle"]
            assert r["rounds"] == 1 + r["settle"]["added_rounds"]
    costs = dp["program_cost"]
    assert {(c["n"], c["mode"], c["program"]) for c in costs} == {
        (n, m, p) for n in (1, 100) for m in ("random", "failover", "strict")
        for p in ("connect4", "connect6")}
    assert all(c["ns_per_run"] and 20 < c["ns_per_run"] < 5000 and not c["errors"]
               for c in costs), costs
    for c in costs:
        # The empty program ran on the same connects, in the same windows, for less.
        assert c["floor_ns_per_run"] > 0 and c["floor_runs"] > 0, c
        assert len(c["floor_samples"]) == len(c["samples"]) >= 1, c
        assert c["difference_ns"] is not None and ordered(c["floor_interval"]), c
        assert c["ratio_to_floor"] == c["floor_interval"]["median"] > 0, c

    u = results["udp"]
    assert {(r["n"], r["path"]) for r in u["request"]} == {
        (n, p) for n in (1, 100) for p in ("direct", "bpf")}
    for r in u["request"]:
        # No "wrong_peer": every echo through the ClusterIP came back from the ClusterIP.
        assert r["rate"] > 500 and r["errors"] == {}, r
        assert ordered(r["ratio_interval"]), r
    assert {(c["n"], c["program"]) for c in u["program_cost"]} == {
        (n, f"{p}{f}") for n in (1, 100) for p in ("sendmsg", "recvmsg", "getpeername")
        for f in (4, 6)}
    assert all(c["ns_per_run"] and 10 < c["ns_per_run"] < 20000 and not c["errors"]
               for c in u["program_cost"]), u["program_cost"]
    assert all(c["floor_ns_per_run"] and ordered(c["floor_interval"])
               for c in u["program_cost"]), u["program_cost"]
    aff = results["affinity"]
    assert [a["n"] for a in aff["connect"]] == [1, 100]
    for a in aff["connect"]:
        assert {r["path"] for r in a["rows"]} == {"direct", "no-affinity", "affinity"}
        assert all(r["rate"] > 1000 and r["errors"] == {} for r in a["rows"]), a
        # The affinity runs kept the bpf pod on its endpoint: its entry was used just now.
        assert a["entry"]["endpoint"].endswith(":8080") and a["entry"]["age_s"] < 30, a
        assert ordered(a["ratio_interval"]), a
    assert {(c["n"], c["mode"], c["program"]) for c in aff["program_cost"]} == {
        (n, m, p) for n in (1, 100) for m in ("random", "random+affinity")
        for p in ("connect4", "release")}
    assert all(c["ns_per_run"] and 10 < c["ns_per_run"] < 20000 for c in aff["program_cost"])

    ctl = results["control"]
    (sync,) = ctl["full_sync"]
    assert sync["groups"] == 200 and sync["endpoints"] == 1000
    assert ctl["single_change"]["changes"] == 20 and ctl["single_change"]["p99_ms"] > 0
    assert ctl["relabel"]["full"] is True and ctl["relabel"]["failed_connects"] == 0
    assert ctl["relabel"]["connects"] > 1000

    api = ctl["api"]
    (sync,) = api["full_sync"]
    assert sync["groups"] == 200 and sync["endpoints"] == 1000 and sync["list_requests"] >= 4
    assert 0 < sync["list_to_maps_seconds"] < 60
    assert api["single_change"]["changes"] == 20 and api["single_change"]["p99_ms"] > 0
    assert api["relist"]["failed_connects"] == 0 and api["relist"]["connects"] > 1000

    machine = results["machine"]["id"]
    assert machine and all(results[k]["machine"] == machine
                           for k in ("datapath", "udp", "affinity", "control"))
    rows = results["targets"]
    assert all(t["machine"] == machine for t in rows)
    names = [t["name"] for t in rows]
    assert len(names) == len(set(names))  # one verdict per target and N
    per_n = {"connect_ratio", "program_cost", "udp_rr_ratio", "affinity_connect_ratio"}
    assert set(names) == {f"{k} N={n}" for k in per_n for n in (1, 100)} | {
        "api_sync_time", "api_sync_rss", "api_change_p99", "api_relist_failures",
        "recompute_failures", "cni_add_p99", "cni_del_p99"}
    for t in rows:
        if t["target"] in per_n or t["target"].startswith("cni_"):
            # Measured at every N, judged by an interval of figures of that N only.
            assert t["verdict"] in ("pass", "fail", "inconclusive"), t
            assert ordered(t["interval"]) and t["value"] == t["interval"]["median"], t
            assert t["pass"] == {"pass": True, "fail": False}.get(t["verdict"]), t
    targets = {t["name"]: t for t in rows}
    for n in (1, 100):
        (bpf,) = [r for r in dp["connect"] if r["n"] == n and r["path"] == "bpf"]
        assert targets[f"connect_ratio N={n}"]["interval"]["rounds"] == bpf["rounds"]
    assert targets["recompute_failures"]["verdict"] == "pass"
    assert targets["api_relist_failures"]["verdict"] == "pass"
    # The CNI p99s are judged on one sample per pod, the pods the settle step added included.
    cni = results["cni"]
    assert len(cni["samples_ms"]["ours_add"]) == cni["pods"] == 20 + cni["settle"]["added_rounds"]
    assert targets["cni_add_p99"]["interval"]["rounds"] == cni["pods"]
    # The quick run has no 100,000-endpoint sync: that target is not judged on a smaller one.
    assert targets["api_sync_time"]["value"] is None
    assert targets["api_sync_time"]["verdict"] is None
    summary = (out / "summary.md").read_text()
    assert "| translated connect rate >= 0.97x direct (95% interval) at every N | 100 |" in summary
    assert "**eBPF program cost against its floor**" in summary
    assert "**UDP request/response**" in summary and "**sessionAffinity**" in summary
    assert (out / "datapath.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
