"""The benchmark's statistics, without root: the bootstrap interval, the verdict by interval,
the settling of an inconclusive verdict, and verdicts that name one N and use only it."""

from __future__ import annotations

import random
from typing import Any

import pytest

from kmesh_lab.bench import report


def test_interval_is_reproducible_and_ordered() -> None:
    rng = random.Random(5)
    ratios = [0.97 + rng.gauss(0, 0.02) for _ in range(15)]
    a, b = report.interval(ratios), report.interval(list(ratios))
    assert a == b  # fixed seed: the same rounds, the same interval
    assert a is not None and a["rounds"] == 15 and a["level"] == 0.95
    assert a["lo"] <= a["median"] <= a["hi"]
    assert min(ratios) <= a["lo"] < a["hi"] <= max(ratios)
    # More rounds of the same spread: a narrower interval.
    many = report.interval([0.97 + rng.gauss(0, 0.02) for _ in range(200)])
    assert many is not None and many["hi"] - many["lo"] < a["hi"] - a["lo"]


def test_interval_edge_cases() -> None:
    assert report.interval([]) is None
    one = report.interval([0.9])
    assert one is not None and one["lo"] == one["median"] == one["hi"] == 0.9
    same = report.interval([1.0] * 7)
    assert same is not None and same["lo"] == same["hi"] == 1.0
    two = report.interval([0.9, 1.1])
    assert two is not None and 0.9 <= two["lo"] <= two["median"] == 1.0 <= two["hi"] <= 1.1


def iv(lo: float, median: float, hi: float, rounds: int = 7) -> dict[str, Any]:
    return {"lo": lo, "median": median, "hi": hi, "rounds": rounds}


def test_verdict_by_interval() -> None:
    assert report.verdict(iv(0.97, 0.98, 0.99), 0.97) == "pass"  # at the target counts
    assert report.verdict(iv(0.95, 0.96, 0.969), 0.97) == "fail"
    assert report.verdict(iv(0.96, 0.98, 0.99), 0.97) == "inconclusive"
    # Lower is better (program cost as a multiple of the floor).
    assert report.verdict(iv(2.0, 2.2, 2.5), 2.5, higher_is_better=False) == "pass"
    assert report.verdict(iv(2.6, 3.0, 3.2), 2.5, higher_is_better=False) == "fail"
    assert report.verdict(iv(2.4, 2.6, 2.7), 2.5, higher_is_better=False) == "inconclusive"
    # Too few rounds for an interval to mean anything, whatever it says.
    assert report.verdict(iv(1.2, 1.2, 1.2, rounds=1), 0.97) == "inconclusive"
    assert report.verdict(None, 0.97) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_rounds(values: list[float], clock: FakeClock, seconds_per_round: float):
    """A measurement that returns the next ratio of ``values`` each round, taking time."""
    ratios: list[float] = []
    source = iter(values)

    def more() -> None:
        clock.now += seconds_per_round
        ratios.append(next(source))

    return ratios, more


def test_settle_adds_rounds_until_conclusive() -> None:
    clock = FakeClock()
    ratios, more = fake_rounds([0.99, 1.0, 0.995, 1.01] * 50, clock, 2.0)
    ratios += [0.99]  # the suite's own round: too few to judge
    out = report.settle(lambda: ratios, more, 0.97, seconds=120, clock=clock)
    assert out["verdict"] == "pass"
    assert out["added_rounds"] == len(ratios) - 1 == report.MIN_ROUNDS - 1
    assert out["interval"]["rounds"] == len(ratios)
    assert out["seconds"] == pytest.approx(2.0 * out["added_rounds"])


def test_settle_stops_at_its_time_bound() -> None:
    clock = FakeClock()
    # Straddles the target forever: 0.95 and 0.99 alternate.
    ratios, more = fake_rounds([0.95, 0.99] * 500, clock, 3.0)
    out = report.settle(lambda: ratios, more, 0.97, seconds=30, clock=clock)
    assert out["verdict"] == "inconclusive"
    assert out["added_rounds"] == 10  # 30 s of 3 s rounds; it never starts one past the bound
    assert out["seconds"] <= 30 + 3.0 and out["bound_seconds"] == 30


def test_settle_measures_nothing_when_already_conclusive_or_unbounded() -> None:
    clock = FakeClock()
    ratios, more = fake_rounds([0.5] * 10, clock, 1.0)
    ratios += [0.80, 0.81, 0.79, 0.80]
    out = report.settle(lambda: ratios, more, 0.97, seconds=120, clock=clock)
    assert out["verdict"] == "fail" and out["added_rounds"] == 0
    ratios2, more2 = fake_rounds([1.0] * 10, clock, 1.0)
    ratios2 += [1.0]
    out = report.settle(lambda: ratios2, more2, 0.97, seconds=0, clock=clock)
    assert out["verdict"] == "inconclusive" and out["added_rounds"] == 0


def test_settle_stops_when_a_round_gives_no_ratio() -> None:
    clock = FakeClock()
    calls = []
    out = report.settle(lambda: [1.0], lambda: calls.append(1), 0.97, seconds=60, clock=clock)
    assert out["verdict"] == "inconclusive" and len(calls) == 1


def connect_row(path: str, n: int, ratios: list[float]) -> dict[str, Any]:
    return {"path": path, "n": n, "mode": "cc", "rate": 1000.0, "ratio_to_direct": ratios[0],
            "p50_us": 1.0, "p99_us": 2.0, "errors": {}, "rounds": len(ratios),
            "ratios": ratios}


def test_one_verdict_per_target_and_n_never_from_another_n() -> None:
    good = [1.0, 0.99, 1.01, 1.0, 0.995]
    results = {
        "settings": {"ns": [1, 10000], "udp_ns": [1, 10000]},
        "machine": {"id": "abc"},
        "datapath": {"connect": [connect_row("direct", 1, [1.0] * 5),
                                 connect_row("bpf", 1, good),
                                 # At N=10000 only iptables was measured, and well.
                                 connect_row("iptables", 10000, good)],
                     "program_cost": []},
    }
    rows = [t for t in report.evaluate(results) if t["target"] == "connect_ratio"]
    assert [t["name"] for t in rows] == ["connect_ratio N=1", "connect_ratio N=10000"]
    assert rows[0]["verdict"] == "pass" and rows[0]["machine"] == "abc"
    assert rows[0]["interval"]["lo"] <= rows[0]["value"] <= rows[0]["interval"]["hi"]
    # N=10000: not measured, even though N=1 passed and another path ran at N=10000.
    assert rows[1]["verdict"] is None and rows[1]["margin"] == "not measured"
    assert rows[1]["value"] is None
    # The other suites did not run: one row each, not measured, naming no N.
    udp = [t for t in report.evaluate(results) if t["target"] == "udp_rr_ratio"]
    assert len(udp) == 1 and udp[0]["n"] is None and udp[0]["verdict"] is None


def cost_row(n: int, mode: str, program: str, ratios: list[float]) -> dict[str, Any]:
    return {"n": n, "mode": mode, "program": program, "load": "cc", "runs": 1000,
            "ns_per_run": 200.0, "floor_ns_per_run": 100.0, "difference_ns": 100.0,
            "samples": [200.0] * len(ratios), "floor_ratios": ratios, "errors": {}}


def test_program_cost_verdict_per_n_covers_every_mode() -> None:
    results = {
        "settings": {"ns": [1, 10000]},
        "datapath": {"connect": [], "program_cost": [
            cost_row(1, "random", "connect4", [2.0, 2.1, 2.05, 2.0, 2.1]),
            cost_row(1, "failover", "connect6", [2.2, 2.3, 2.25, 2.2, 2.3]),
            cost_row(10000, "random", "connect4", [2.0, 2.1, 2.05, 2.0, 2.1]),
            cost_row(10000, "strict", "connect6", [2.4, 2.6, 2.5, 2.45, 2.55]),
            # Not a connect program: not part of this target.
            cost_row(10000, "random", "sendmsg4", [9.0, 9.0, 9.0]),
        ]},
    }
    rows = {t["n"]: t for t in report.evaluate(results) if t["target"] == "program_cost"}
    assert set(rows) == {1, 10000}
    assert rows[1]["verdict"] == "pass" and "connect6 failover" in rows[1]["detail"]
    assert rows[10000]["verdict"] == "inconclusive"
    assert rows[10000]["value"] == pytest.approx(2.5)


def test_every_verdict_is_a_known_value() -> None:
    results = {
        "settings": {"ns": [1], "udp_ns": [1]},
        "datapath": {"connect": [connect_row("bpf", 1, [0.9, 0.91, 0.9])],
                     "program_cost": [cost_row(1, "random", "connect4", [3.0, 3.1, 3.2])]},
        "udp": {"request": [{**connect_row("bpf", 1, [1.0]), "round_pair_ratios": [0.99, 1.0]}]},
        "affinity": {"connect": [{"n": 1, "ratios": [1.0, 1.0, 0.99, 1.01],
                                  "ratio_to_no_affinity": 1.0}]},
    }
    rows = report.evaluate(results)
    by = {t["name"]: t["verdict"] for t in rows}
    assert by["connect_ratio N=1"] == "fail" and by["program_cost N=1"] == "fail"
    assert by["udp_rr_ratio N=1"] == "inconclusive"  # two runs only
    assert by["affinity_connect_ratio N=1"] == "pass"
    assert all(t["verdict"] in (*report.VERDICTS, None) for t in rows)


def test_a_figure_names_the_machine_and_the_run_it_came_from() -> None:
    label = report.machine_label({
        "started": "2026-12-03T13:30:00Z",
        "machine": {"cpu": "AMD EPYC", "cpus": 2, "memory_gb": 7.8, "kernel": "6.18.44",
                    "id": "0123456789ab"}})
    assert label == ("AMD EPYC, 2 CPUs, 7.8 GB, kernel 6.18.44 (machine 0123456789ab), "
                     "2026-12-03T13:30:00Z")
    assert report.machine_label({}).startswith("unknown CPU")


def test_a_p99_is_judged_by_its_bootstrap_interval() -> None:
    """The CNI targets: a p99 of one sample per pod, judged like every other target."""
    steady = [30.0 + (i % 10) for i in range(200)]  # p99 39 ms, far under 50
    iv = report.quantile_interval(steady, 0.99)
    assert iv is not None and iv["median"] == report.quantile_of(steady, 0.99) == 39.0
    assert iv["lo"] <= 39.0 <= iv["hi"] <= 39.0 and iv["rounds"] == 200
    assert report.verdict(iv, 50.0, higher_is_better=False) == "pass"
    # Three slow ADDs of 200: the p99 is one of them or their neighbour; the interval spans
    # both sides of 50, so the verdict waits for more pods instead of flipping.
    tail = [*steady[:197], 52.0, 53.0, 54.0]
    iv = report.quantile_interval(tail, 0.99)
    assert iv is not None and iv["lo"] < 50.0 < iv["hi"]
    assert report.verdict(iv, 50.0, higher_is_better=False) == "inconclusive"
    slow = [s + 20.0 for s in steady]  # every ADD over 50
    assert report.verdict(report.quantile_interval(slow, 0.99), 50.0, False) == "fail"
    assert report.quantile_interval([], 0.99) is None


def test_cni_targets_come_from_the_samples_of_the_run() -> None:
    samples = {"ours_add": [30.0 + (i % 10) for i in range(200)],
               "ours_del": [60.0] * 200}
    rows = {t["name"]: t for t in report.evaluate(
        {"cni": {"samples_ms": samples, "settle": {"added_rounds": 40, "seconds": 12.0}}})}
    assert rows["cni_add_p99"]["verdict"] == "pass" and rows["cni_add_p99"]["value"] == 39.0
    assert rows["cni_del_p99"]["verdict"] == "fail"
    assert rows["cni_add_p99"]["detail"] == "200 pods, 40 added to settle in 12 s"
    unmeasured = {t["name"]: t for t in report.evaluate({})}
    assert unmeasured["cni_add_p99"]["verdict"] is None
