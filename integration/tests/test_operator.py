"""Operator tools on a live lab: explain, metrics, status, dump, and the lab's JSON output.

The seed's steps are replayed and, at each request step, `explain` must show exactly the tiers
the product spec gives, the kernel's pickable set must hold the instances that answered, and
the agent's per-tier connect counters must grow by exactly the answers the client received.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kmesh_lab import scenario
from kmesh_lab.cluster import Lab
from kmesh_plugin.datapath import loader

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
URL = "http://helloworld:5000/hello"
CLIENT = "ambient-worker"


@pytest.fixture
def seed_lab(kernel: None, cni_plugins: None) -> Iterator[tuple[Lab, list[scenario.Step]]]:
    seed = scenario.load(scenario.seed_path())
    lab = Lab(seed.nodes)
    with lab:
        yield lab, seed.steps


def tiers_by_version(expl: dict[str, Any]) -> dict[str, int | None]:
    """The tier explain gives each instance, keyed by its version (the pod name's prefix)."""
    (group,) = expl["groups"]
    out = {}
    for ep in group["endpoints"]:
        version = ep["pod"].removeprefix("helloworld-").rsplit("-", 2)[0]
        out[version] = ep["tier"]
    return out


def counters(lab: Lab) -> dict[int, int]:
    (svc,) = lab.connect_counters(CLIENT)["services"]
    assert (svc["namespace"], svc["service"], svc["port"], svc["family"]) == (
        "sample", "helloworld", "http", "IPv4")
    return svc["tiers"]


def test_explain_and_metrics_follow_the_seed_step_by_step(
    seed_lab: tuple[Lab, list[scenario.Step]],
) -> None:
    lab, steps = seed_lab
    # What the product spec (section 7) says each request step must see from worker1:
    # version -> tier, and which tier connects pick from.
    want = [
        ({"region.zone1.subzone1": 0, "region.zone1.subzone2": 1, "region.zone2.subzone3": 2},
         0),
        ({"region.zone1.subzone2": 1, "region.zone2.subzone3": 2}, 1),
        ({"region.zone1.subzone2": 1, "region.zone1.subzone2-worker3": 1}, 1),
    ]
    runner = scenario.Runner(scenario.Scenario(Path("seed"), lab.nodes, steps), out=lambda _: None)
    seen_counters: dict[int, int] = {}
    for step in steps:
        record = scenario.StepRecord(step.index + 1, step.kind, "")
        if step.kind != "request":
            runner.run_step(lab, step, record)
            continue
        tiers, pick_tier = want.pop(0)
        results = lab.request("sample", "sleep", URL, step.body["count"], endpoint=True)
        assert all(r["ok"] for r in results)

        expl = lab.explain("helloworld", "sample", CLIENT).to_json()
        assert expl["strategy"] == "PreferClose"
        assert expl["preference"] == ["NETWORK", "REGION", "ZONE", "SUBZONE"]
        assert expl["mode"] == "failover"
        assert expl["claimed_by"] == "prefer_close"
        assert tiers_by_version(expl) == tiers
        (group,) = expl["groups"]
        kernel = group["kernel"]
        assert kernel["pick_tier"] == pick_tier
        answered = {f"{r['endpoint']} ({r['instance']})" for r in results}
        assert answered <= set(kernel["pickable"])  # only pickable instances answered
        assert len(answered) == len(kernel["pickable"])  # and every one of them did
        assert expl["warnings"] == []  # maps and intent agree

        # The per-tier counters grew by exactly the answers, each at its instance's tier.
        by_tier = collections.Counter(tiers[r["version"]] for r in results)
        now = counters(lab)
        delta = {t: n - seen_counters.get(t, 0) for t, n in now.items()
                 if n != seen_counters.get(t, 0)}
        assert delta == dict(by_tier)
        seen_counters = now
    assert want == []


def test_explain_warns_when_the_maps_lag_behind_the_intent(
    seed_lab: tuple[Lab, list[scenario.Step]],
) -> None:
    lab, steps = seed_lab
    runner = scenario.Runner(scenario.Scenario(Path("seed"), lab.nodes, steps), out=lambda _: None)
    for step in steps[:6]:  # namespace, Service, three instances, client
        runner.run_step(lab, step, scenario.StepRecord(0, step.kind, ""))
    lab.stop_agent(CLIENT, signal.SIGKILL)
    lab.delete("Deployment", "sample", "helloworld-region.zone1.subzone1")
    expl = lab.explain("helloworld", "sample", CLIENT)
    text = "\n".join(expl.warnings)
    assert "the maps differ from the intent" in text
    (group,) = expl.groups
    assert group.kernel is not None and group.kernel.pick_tier == 0  # still the old state
    # Status says what is wrong, and that the datapath (which outlives the agent) is attached.
    cfg = str(lab.state / f"{CLIENT}.toml")
    proc = subprocess.run([sys.executable, "-m", "kmesh_plugin.cli", "status", "-c", cfg,
                           "-o", "json"], capture_output=True, text=True)
    assert proc.returncode == 1
    st = json.loads(proc.stdout)
    assert st["agent"]["running"] is False
    assert any("is not running" in p for p in st["agent"]["problems"])
    assert st["datapath"]["attached"] is True
    lab.start_agent(CLIENT)
    assert lab.explain("helloworld", "sample", CLIENT).warnings == []


def test_status_and_dump_of_a_healthy_node(seed_lab: tuple[Lab, list[scenario.Step]]) -> None:
    lab, steps = seed_lab
    runner = scenario.Runner(scenario.Scenario(Path("seed"), lab.nodes, steps), out=lambda _: None)
    for step in steps[:6]:
        runner.run_step(lab, step, scenario.StepRecord(0, step.kind, ""))
    lab.request("sample", "sleep", URL, 7)
    cfg = str(lab.state / f"{CLIENT}.toml")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kmesh_plugin.cli", *args, "-c", cfg],
                              capture_output=True, text=True)

    status = cli("status", "-o", "json")
    assert status.returncode == 0, status.stdout + status.stderr
    st = json.loads(status.stdout)
    assert st["agent"]["healthy"] and st["agent"]["synced"]
    assert st["agent"]["last_reconcile"]["seconds"] > 0
    source = st["agent"]["source"]
    assert source["kind"] == "kubernetes" and source["server"] == lab.api.url
    assert set(source["resources"]) == {"nodes", "namespaces", "services", "endpointslices"}
    assert all(r["state"] == "watching" and r["synced"] for r in source["resources"].values())
    assert st["agent"]["warnings"] == []
    assert [link["name"] for link in st["datapath"]["links"]] == list(loader.PROGRAMS)
    # The kernel keeps 15 characters of a program's name.
    assert all(link["prog_name"] == link["name"][:15] for link in st["datapath"]["links"])
    maps = st["datapath"]["maps"]
    assert maps["kmesh_frontends"]["entries"] == 1  # one Service port, one family
    assert maps["kmesh_slots"]["capacity"] == 8192
    # Three endpoints; sets switched away from are deleted a grace period later, when idle.
    deadline = time.monotonic() + 10
    while (slots := json.loads(cli("status", "-o", "json").stdout)["datapath"]["maps"]
           ["kmesh_slots"]["entries"]) != 3 and time.monotonic() < deadline:
        pass
    assert slots == 3
    assert "agent: pid" in cli("status").stdout

    dump = cli("dump", "-o", "json")
    assert dump.returncode == 0, dump.stderr
    (fe,) = json.loads(dump.stdout)["frontends"]
    assert fe["frontend"].endswith(":5000/TCP") and fe["mode"] == "failover"
    assert [len(t) for t in fe["tiers"]] == [1, 1, 1, 0, 0]
    assert fe["counters"] == {"0": {"connects": 7, "refused": 0}}
    text = cli("dump").stdout
    assert "tier 0: 198.18.1." in text and "counters tier 0: 7 connects" in text

    explain = cli("explain", "helloworld", "-n", "sample")
    assert explain.returncode == 0, explain.stderr
    assert "a connect from ambient-worker now picks, uniformly, from tier 0" in explain.stdout
    missing = cli("explain", "nope", "-n", "sample")
    assert missing.returncode == 1
    assert "Service sample/nope is not in" in missing.stderr and "sample/helloworld" in \
        missing.stderr


def test_metrics_endpoint_exports_reconciles_sources_and_maps(
    seed_lab: tuple[Lab, list[scenario.Step]],
) -> None:
    lab, steps = seed_lab
    runner = scenario.Runner(scenario.Scenario(Path("seed"), lab.nodes, steps), out=lambda _: None)
    for step in steps[:6]:
        runner.run_step(lab, step, scenario.StepRecord(0, step.kind, ""))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(lab.metrics_text(CLIENT))
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("kmesh_source_synced") == 1
    assert value("kmesh_reconcile_duration_seconds_count", kind="full") >= 1
    assert value("kmesh_reconciles_total", kind="partial", result="ok") >= 1
    assert value("kmesh_source_events_total", kind="Service", action="upsert") == 1
    assert value("kmesh_source_events_total", kind="Node", action="upsert") == 3
    assert value("kmesh_map_entries", map="kmesh_frontends") == 1
    assert value("kmesh_map_capacity", map="kmesh_slots") == 8192
    assert value("kmesh_agent_info", node=CLIENT, version="0.1.0") == 1


def test_lab_json_records_every_steps_tallies(kernel: None, cni_plugins: None,
                                             tmp_path: Path) -> None:
    out = tmp_path / "seed.json"
    lines: list[str] = []
    code = scenario.execute(scenario.load(scenario.seed_path(local=True)), out=lines.append,
                            json_path=out)
    assert code == scenario.EXIT_OK, "\n".join(lines)
    doc = json.loads(out.read_text())
    assert doc["passed"] is True and doc["unmet"] == []
    requests = [s for s in doc["steps"] if s["kind"] == "request"]
    assert [r["versions"] for r in requests] == [
        {"region.zone1.subzone1": 20}, {"error ECONNREFUSED": 20}]
    assert requests[1]["answers"] == {"error: ECONNREFUSED": 20}
    assert len(doc["steps"]) == 9
    # The human output has a bar per version.
    assert any(line.strip().startswith("region.zone1.subzone1  ███") for line in lines)


def test_scenario_explain_and_metrics_steps(kernel: None, cni_plugins: None,
                                           tmp_path: Path) -> None:
    seed = yaml.safe_load(scenario.seed_path().read_text())
    seed["steps"] = [
        *seed["steps"][:7],
        {"explain": {"service": "helloworld", "namespace": "sample", "node": CLIENT}},
        {"metrics": {"node": CLIENT}},
    ]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(seed))
    lines: list[str] = []
    out = tmp_path / "s.json"
    assert scenario.execute(scenario.load(path), out=lines.append, json_path=out) == 0
    text = "\n".join(lines)
    assert "a connect from ambient-worker now picks, uniformly, from tier 0" in text
    assert "sample/helloworld port http IPv4: tier 0: 20" in text
    doc = json.loads(out.read_text())
    assert doc["steps"][-1]["data"]["services"][0]["tiers"] == {"0": 20}
