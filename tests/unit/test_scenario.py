"""Scenario files: parsing errors name the key; expectations judge results exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kmesh_lab import scenario
from kmesh_lab.scenario import ScenarioError, Unmet, check, tally

LAB = Path(__file__).resolve().parents[2] / "integration" / "kmesh_lab"
SHIPPED = sorted((LAB / "scenarios").glob("*.yaml"))
REQUEST = {"request": {"from": {"namespace": "s", "deployment": "d"}, "url": "http://x/"}}


def parse(doc: dict[str, Any]) -> scenario.Scenario:
    return scenario.parse(doc, Path("/tmp/s.yaml"))


def base(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"nodes": {"n1": {"topology.kubernetes.io/zone": "a"}}, "steps": list(steps)}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_scenarios_parse(path: Path) -> None:
    s = scenario.load(path)
    assert s.nodes and s.steps
    assert any(step.kind == "request" and step.expect for step in s.steps)


def test_seed_steps_follow_the_seed_document() -> None:
    s = scenario.load(scenario.seed_path())
    kinds = [step.kind for step in s.steps]
    assert kinds == ["apply"] * 6 + ["request", "delete", "request", "label", "delete",
                                     "apply", "request"]
    assert s.steps[-1].expect == {
        "versions": ["region.zone1.subzone2", "region.zone1.subzone2-worker3"],
        "all_seen": True,
        "min_share": 0.3,
    }


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"steps": [REQUEST]}, "nodes"),
        ({"nodes": {"n": {}}, "steps": []}, "steps"),
        ({**base(REQUEST), "extra": 1}, "extra"),
        (base({"frobnicate": {}}), "steps[0]"),
        (base({"apply": {"not": "text"}}), "steps[0].apply"),
        (base({"label": {"node": "n1"}}), "steps[0].label.labels"),
        (base({"delete": {"kind": "Deployment"}}), "steps[0].delete.name"),
        (base({"request": {"url": "http://x/"}}), "steps[0].request.from"),
        (base({"request": {"from": {"namespace": "s"}, "url": "http://x/"}}),
         "steps[0].request.from"),
        (base({**REQUEST, "request": {**REQUEST["request"], "count": 0}}),
         "steps[0].request.count"),
        (base({**REQUEST, "expect": {"versions": "v1"}}), "steps[0].expect.versions"),
        (base({**REQUEST, "expect": {"sometimes": True}}), "steps[0].expect.sometimes"),
        (base({**REQUEST, "expect": {"refused": True, "versions": ["a"]}}), "steps[0].expect"),
        (base({**REQUEST, "expect": {"all_seen": True}}), "steps[0].expect"),
        (base({"label": {"node": "n1", "labels": {}}, "expect": {"refused": True}}),
         "steps[0].expect"),
        (base({"restart_agent": {"node": "n1", "signal": "HUP"}}),
         "steps[0].restart_agent.signal"),
        ({**base(REQUEST), "plugin_paths": ["/nonexistent-kmesh-dir"]}, "plugin_paths"),
    ],
)
def test_malformed_scenarios_name_the_key(doc: dict[str, Any], key: str) -> None:
    with pytest.raises(ScenarioError) as e:
        parse(doc)
    assert str(e.value).startswith(f"/tmp/s.yaml: {key}: "), str(e.value)


def test_run_file_exits_2_on_a_malformed_file(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base({"request": {"url": "http://x/"}})))
    assert scenario.run_file(path) == scenario.EXIT_SCENARIO
    assert f"{path}: steps[0].request.from" in capsys.readouterr().err


def ok(version: str) -> dict[str, Any]:
    body = f"Hello version: {version}, instance: {version}-pod\n"
    return {"ok": True, "version": version, "body": body, "errno": None, "connect_ms": 0.3}


def refused(ms: float = 0.2, err: str = "ECONNREFUSED") -> dict[str, Any]:
    return {"ok": False, "version": None, "body": "", "errno": err, "error": err,
            "connect_ms": ms}


def test_tally_counts_answers_and_errors_most_frequent_first() -> None:
    lines = tally([ok("a"), ok("b"), ok("a"), refused()])
    assert lines == [
        "   2 x Hello version: a, instance: a-pod",
        "   1 x Hello version: b, instance: b-pod",
        "   1 x error: ECONNREFUSED",
    ]


def test_versions_expectation() -> None:
    check({"versions": ["a"]}, [ok("a")] * 3)
    with pytest.raises(Unmet, match=r"outside \['a'\]: \{'b': 1\}"):
        check({"versions": ["a"]}, [ok("a"), ok("b")])
    with pytest.raises(Unmet, match="1 of 2 requests failed"):
        check({"versions": ["a"]}, [ok("a"), refused()])


def test_all_seen_and_min_share() -> None:
    check({"versions": ["a", "b"], "all_seen": True}, [ok("a"), ok("b")])
    with pytest.raises(Unmet, match=r"never answered: \['b'\]"):
        check({"versions": ["a", "b"], "all_seen": True}, [ok("a")] * 4)
    check({"versions": ["a", "b"], "min_share": 0.3}, [ok("a")] * 6 + [ok("b")] * 4)
    with pytest.raises(Unmet, match="below 30%"):
        check({"versions": ["a", "b"], "min_share": 0.3}, [ok("a")] * 8 + [ok("b")] * 2)


def test_refused_expectation_wants_fast_econnrefused_only() -> None:
    check({"refused": True}, [refused()] * 3)
    with pytest.raises(Unmet, match="were answered"):
        check({"refused": True}, [refused(), ok("a")])
    with pytest.raises(Unmet, match="not refused fast"):
        check({"refused": True}, [refused(ms=150.0)])
    with pytest.raises(Unmet, match="ENETUNREACH"):
        check({"refused": True}, [refused(err="ENETUNREACH")])


def test_chart_scales_bars_to_the_request_count() -> None:
    lines = scenario.chart({"a": 57, "bb": 43}, 100)
    assert lines[0].startswith("a   ") and lines[1].startswith("bb  ")
    bar_a = lines[0][4:].split()[0]
    bar_b = lines[1][4:].split()[0]
    assert bar_a == "█" * 17 + "▏"  # 57% of 30 cells = 17.1 cells
    assert bar_b == "█" * 12 + "▉"  # 43% of 30 = 12.9
    assert lines[0].endswith("  57   57%") and lines[1].endswith("  43   43%")
    assert scenario.chart({"all": 20}, 20)[0].split()[1] == "█" * 30


def test_by_version_counts_errors_apart() -> None:
    assert scenario.by_version([ok("a"), refused(), ok("a")]) == {"a": 2, "error ECONNREFUSED": 1}
