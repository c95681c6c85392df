"""The benchmark suite runs end to end (its --quick mode): every figure is produced, every
path actually carried connections, and the targets are judged.

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
    costs = dp["program_cost"]
    assert {(c["mode"], c["program"]) for c in costs} == {
        (m, p) for m in ("random", "failover", "strict") for p in ("connect4", "connect6")}
    assert all(c["ns_per_run"] and 20 < c["ns_per_run"] < 5000 and not c["errors"]
               for c in costs), costs

    u = results["udp"]
    assert {(r["n"], r["path"]) for r in u["request"]} == {
        (n, p) for n in (1, 100) for p in ("direct", "bpf")}
    for r in u["request"]:
        # No "wrong_peer": every echo through the ClusterIP came back from the ClusterIP.
        assert r["rate"] > 500 and r["errors"] == {}, r
    assert {(c["n"], c["program"]) for c in u["program_cost"]} == {
        (n, f"{p}{f}") for n in (1, 100) for p in ("sendmsg", "recvmsg", "getpeername")
        for f in (4, 6)}
    assert all(c["ns_per_run"] and 10 < c["ns_per_run"] < 20000 and not c["errors"]
               for c in u["program_cost"]), u["program_cost"]
    aff = results["affinity"]
    assert [a["n"] for a in aff["connect"]] == [1, 100]
    for a in aff["connect"]:
        assert {r["path"] for r in a["rows"]} == {"direct", "no-affinity", "affinity"}
        assert all(r["rate"] > 1000 and r["errors"] == {} for r in a["rows"]), a
        # The affinity runs kept the bpf pod on its endpoint: its entry was used just now.
        assert a["entry"]["endpoint"].endswith(":8080") and a["entry"]["age_s"] < 30, a
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

    targets = {t["target"]: t for t in results["targets"]}
    assert set(targets) == {"connect_ratio", "program_cost", "udp_rr_ratio",
                            "affinity_connect_ratio", "api_sync_time", "api_sync_rss",
                            "api_change_p99", "api_relist_failures", "recompute_failures"}
    assert targets["udp_rr_ratio"]["value"] and targets["affinity_connect_ratio"]["value"]
    assert targets["recompute_failures"]["pass"] is True
    assert targets["api_relist_failures"]["pass"] is True
    # The quick run has no 100,000-endpoint sync: that target is not judged on a smaller one.
    assert targets["api_sync_time"]["value"] is None
    summary = (out / "summary.md").read_text()
    assert "| translated connect rate >= 0.97x direct at every N |" in summary
    assert "**UDP request/response**" in summary and "**sessionAffinity**" in summary
    assert (out / "datapath.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
