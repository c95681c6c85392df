"""The benchmark's report of the udp and affinity suites, without running them: targets judged
per N by their intervals from the rows, the markdown tables, and the suite selection of the
command line."""

from __future__ import annotations

from typing import Any

from kmesh_lab.bench import report
from kmesh_lab.bench.__main__ import main, parse_args, saturating


def row(path: str, n: int, rate: float, ratio: float, mode: str = "udp",
        errors: dict[str, int] | None = None) -> dict[str, Any]:
    return {"path": path, "n": n, "mode": mode, "rate": rate, "rate_min": rate,
            "rate_max": rate, "ratio_to_direct": ratio, "p50_us": 20.0, "p99_us": 50.0,
            "errors": errors or {}, "rounds": 7}


def cost(program: str, n: int, ns: float | None, mode: str = "random",
         load: str = "udp") -> dict[str, Any]:
    return {"n": n, "mode": mode, "program": program, "load": load, "runs": 1000,
            "ns_per_run": ns, "samples": [ns] if ns else [], "errors": {}}


def results() -> dict[str, Any]:
    return {
        "settings": {"window": 1.0, "udp_ns": [1, 10000]},
        "udp": {
            "threads": 1, "block_s": 0.025,
            "request": [row("direct", 1, 40000, 1.0), {**row("bpf", 1, 39500, 0.99),
                                                       "round_pair_ratios": [0.99, 0.985, 1.0]},
                        row("direct", 10000, 41000, 1.0),
                        {**row("bpf", 10000, 39000, 0.96, errors={"wrong_peer": 2}),
                         "ratio_of_rounds": 0.955,
                         "round_pair_ratios": [0.96, 0.95, 0.955, 0.96, 0.965]}],
            "program_cost": [cost("sendmsg4", 1, 120.0), cost("recvmsg4", 1, 80.0),
                             cost("getpeername4", 1, 40.0, load="peer"),
                             cost("sendmsg6", 1, None)],
        },
        "affinity": {
            "threads": 3,
            "connect": [
                {"n": 1, "ratio_to_no_affinity": 0.99, "ratios": [0.99, 0.98, 1.0],
                 "entry": None,
                 "rows": [row("direct", 1, 80000, 1.0, "cc"),
                          row("no-affinity", 1, 78000, 0.975, "cc"),
                          row("affinity", 1, 77000, 0.96, "cc")]},
                {"n": 10000, "ratio_to_no_affinity": 0.97, "ratios": [0.97, 0.94, 0.99],
                 "entry": None,
                 "rows": [row("direct", 10000, 80000, 1.0, "cc"),
                          row("no-affinity", 10000, 78000, 0.975, "cc"),
                          row("affinity", 10000, 76000, 0.95, "cc")]},
            ],
            "program_cost": [cost("connect4", 1, 150.0, load="cc"),
                             cost("connect4", 1, 190.0, "random+affinity", "cc")],
        },
    }


def test_targets_judged_per_n_by_interval() -> None:
    r = results()
    targets = {t["name"]: t for t in report.evaluate(r)}
    udp = targets["udp_rr_ratio N=10000"]
    assert udp["value"] == 0.96 and udp["verdict"] == "fail" and udp["pass"] is False
    assert udp["interval"]["hi"] < 0.97 and udp["n"] == 10000
    assert targets["udp_rr_ratio N=1"]["verdict"] == "pass"
    aff = targets["affinity_connect_ratio N=10000"]
    assert aff["value"] == 0.97 and aff["verdict"] == "inconclusive" and aff["pass"] is None
    assert targets["affinity_connect_ratio N=1"]["verdict"] == "pass"
    # The connect targets of the datapath suite are not judged from these suites' rows.
    assert targets["connect_ratio"]["value"] is None
    assert targets["program_cost"]["value"] is None


def test_targets_not_measured_without_the_suites() -> None:
    targets = {t["target"]: t for t in report.evaluate({})}
    for key in ("udp_rr_ratio", "affinity_connect_ratio"):
        assert targets[key]["pass"] is None and targets[key]["margin"] == "not measured"


def test_tables_show_rates_ratios_and_costs() -> None:
    r = results()
    r["targets"] = report.evaluate(r)
    text = report.table(r)
    assert ("| UDP request/response via sendmsg/recvmsg >= 0.97x direct (95% interval) at every "
            "N | 10000 | 0.96x [0.95, 0.965] (5 runs (each: median of its block pairs)) | FAIL | "
            "-2.1% .. -0.5% vs 0.97x |") in text
    assert "| 1 | 0.99x [0.985, 1] (3 runs (each: median of its block pairs)) | PASS |" in text
    assert "| 10000 | 0.97x [0.94, 0.99] (3 paired rounds, same Service) | INCONCLUSIVE |" in text
    assert ("| 10000 | bpf | 7 | 39,000 | 0.960 | 0.960 [0.950, 0.965] | 0.955 | 20.0 | 50.0 | "
            "wrong_peer:2 |") in text
    assert "| 1 | bpf | 7 | 39,500 | 0.990 | 0.990 [0.985, 1.000] | - | 20.0 |" in text
    assert "alternating 25 ms blocks" in text
    assert "| 1 | affinity | 7 | 77,000 | 0.960 | 0.990 [0.980, 1.000] | 20.0 | 50.0 | - |" in text
    assert "| 1 | no-affinity | 7 | 78,000 | 0.975 | 1.000 |" in text
    assert ("| 1 | getpeername4 | random | getpeername() of a connected socket | 40 | - | - | - "
            "| 1,000 |" in text)
    assert "| 1 | connect4 | random+affinity | connect + close | 190 | - | - | - | 1,000 |" in text
    assert "| 1 | sendmsg6 | random | sendto + recvfrom | - | - | - | - | 1,000 |" in text


def test_cost_rows_against_the_floor() -> None:
    r = results()
    r["udp"]["program_cost"] = [{**cost("sendmsg4", 1, 300.0), "floor_ns_per_run": 80.0,
                                 "difference_ns": 220.0, "floor_ratios": [3.7, 3.8, 3.75]}]
    r["datapath"] = {"connect": [], "program_cost": [
        {**cost("connect4", 1, 250.0, load="cc"), "floor_ns_per_run": 100.0,
         "difference_ns": 150.0, "samples": [250.0] * 3, "floor_ratios": [2.4, 2.5, 2.6]}]}
    r["targets"] = report.evaluate(r)
    text = report.table(r)
    assert "| 1 | sendmsg4 | random | sendto + recvfrom | 300 | 80 | +220 | 3.75 [3.70, 3.80] |" \
        in text
    assert "| 1 | random | connect4 | 250 | 100 | +150 | 2.50 [2.40, 2.60] | 3 |" in text
    (pc,) = [t for t in r["targets"] if t["target"] == "program_cost"]
    assert pc["verdict"] == "inconclusive" and pc["value"] == 2.5


def test_suite_selection() -> None:
    assert main(["--only", "udpp"]) == 2
    assert main(["--skip", "datapath,nope"]) == 2
    args = parse_args(["--quick"])
    assert args.udp_ns == "1,100"
    assert parse_args([]).udp_ns == "1,10000"


def test_saturating_threads() -> None:
    sat = [{"threads": 1, "rate": 60.0}, {"threads": 2, "rate": 97.0},
           {"threads": 3, "rate": 100.0}, {"threads": 4, "rate": 90.0}]
    assert saturating(sat) == 2
