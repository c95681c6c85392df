"""Scenario files: `kmesh-plugin lab run FILE.yaml` and `kmesh-plugin lab seed`.

The format (README "Scenario files" documents it for users)::

    nodes:                      # node name -> its labels
      ambient-worker: {topology.kubernetes.io/region: region, ...}
    strategies:                 # optional: plugin.toml [strategies] for every agent
      enabled: [local, prefer_close]
    plugin_paths: [dir, ...]    # optional: put third-party plugins on the agents' sys.path
    steps:
      - apply: |                # manifests, multi-document, as kubectl takes them
          ...
        namespace: sample       # optional: for objects that name none
      - label: {node: N, labels: {key: value-or-null}}
      - delete: {kind: Deployment, namespace: sample, name: X}
      - request:
          from: {namespace: sample, deployment: sleep}   # or {namespace: .., pod: NAME}
          url: http://helloworld:5000/hello
          count: 20             # optional, default 1
          family: 6             # optional: resolve names to the IPv6 ClusterIP
        expect:                 # optional
          versions: [v1]        # every answer's version is in this set
          all_seen: true        # every listed version answered at least once
          min_share: 0.3        # every listed version got at least this share of answers
          refused: true         # every request refused fast (< 100 ms), none answered
      - restart_agent: {node: N, signal: KILL}   # kill a node's agent and start it again
      - explain: {service: S, namespace: sample, node: N}  # `kmesh-plugin explain` on node N
      - metrics: {node: N}      # the node's connect counters, from its metrics endpoint

Every step may carry ``title``. Each step waits for the agents to converge before the next.
"""

from __future__ import annotations

import collections
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kmesh_lab.cluster import Lab
from kmesh_lab.kube import LabError
from kmesh_plugin.errors import KmeshError
from kmesh_plugin.sources import decode

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_SCENARIO = 2
EXIT_EXPECTATION = 3
REFUSED_FAST_MS = 100.0
STEP_KINDS = ("apply", "label", "delete", "request", "restart_agent", "explain", "metrics")


class ScenarioError(KmeshError):
    """The scenario file is malformed; the message names the file and the key."""


class Unmet(KmeshError):
    """An expectation of a request step did not hold."""


@dataclass
class Step:
    index: int
    kind: str
    body: dict[str, Any]
    title: str | None = None
    expect: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scenario:
    path: Path
    nodes: dict[str, dict[str, str | None]]
    steps: list[Step]
    strategies: dict[str, Any] = field(default_factory=dict)
    plugin_paths: list[str] = field(default_factory=list)


MAX_SCENARIO_BYTES = 4 << 20  # a scenario embeds a few manifests: a few kB


def load(path: Path) -> Scenario:
    """Read a scenario file through the agent's own bounded decoder (regular files only,
    UTF-8, depth, integer and alias limits), so a hostile file is one line naming it."""
    try:
        data = decode.read_regular_file(path, max_bytes=MAX_SCENARIO_BYTES)
        docs = decode.load_yaml_documents(data, str(path), max_bytes=MAX_SCENARIO_BYTES)
    except KmeshError as e:
        raise ScenarioError(str(e) if str(e).startswith(f"{path}") else f"{path}: {e}") \
            from None
    if len(docs) != 1:
        raise ScenarioError(f"{path}: a scenario is one YAML document, found {len(docs)}")
    try:
        return parse(docs[0], path)
    except ScenarioError:
        raise
    except Exception as e:  # a parser bug must still name the file, never be a traceback
        raise ScenarioError(f"{path}: cannot read the scenario: {type(e).__name__}: {e}") \
            from None


def _printable(text: str) -> str:
    """One line, whatever names a user gave: control characters shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def parse(raw: Any, path: Path) -> Scenario:
    def fail(key: str, message: str) -> ScenarioError:
        return ScenarioError(f"{path}: {_printable(key)}: {_printable(message)}")

    if not isinstance(raw, dict):
        raise fail("(top)", "a scenario is a mapping with nodes and steps")
    unknown = set(raw) - {"nodes", "steps", "strategies", "plugin_paths"}
    if unknown:
        raise fail(sorted(unknown)[0], "unknown key (known: nodes, steps, strategies, "
                   "plugin_paths)")
    nodes = raw.get("nodes")
    if not isinstance(nodes, dict) or not nodes:
        raise fail("nodes", "must map node names to their labels")
    for name, labels in nodes.items():
        if labels is not None and not isinstance(labels, dict):
            raise fail(f"nodes.{name}", "labels must be a mapping")
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise fail("steps", "must be a non-empty list")
    steps = [_parse_step(i, s, fail) for i, s in enumerate(steps_raw)]
    strategies = raw.get("strategies") or {}
    if not isinstance(strategies, dict):
        raise fail("strategies", "must be a mapping of plugin.toml [strategies] keys")
    plugin_paths = raw.get("plugin_paths") or []
    if not isinstance(plugin_paths, list) or not all(isinstance(p, str) for p in plugin_paths):
        raise fail("plugin_paths", "must be a list of directories")
    resolved = [str((path.parent / p).resolve()) for p in plugin_paths]
    for p in resolved:
        if not Path(p).is_dir():
            raise fail("plugin_paths", f"{p} is not a directory")
    return Scenario(path, {str(n): dict(v or {}) for n, v in nodes.items()}, steps,
                    strategies, resolved)


def _parse_step(i: int, raw: Any, fail: Callable[[str, str], ScenarioError]) -> Step:
    where = f"steps[{i}]"
    if not isinstance(raw, dict):
        raise fail(where, "must be a mapping")
    kinds = [k for k in STEP_KINDS if k in raw]
    if len(kinds) != 1:
        raise fail(where, f"needs exactly one of {', '.join(STEP_KINDS)}")
    kind = kinds[0]
    allowed = {kind, "title", "namespace"} if kind == "apply" else {kind, "title", "expect"}
    extra = set(raw) - allowed
    if extra:
        raise fail(f"{where}.{sorted(extra)[0]}", f"unknown key for a {kind} step")
    body = raw[kind]
    if kind == "apply":
        if not isinstance(body, str):
            raise fail(f"{where}.apply", "must be YAML text (use `apply: |`)")
        ns = raw.get("namespace")
        if ns is not None and not isinstance(ns, str):
            raise fail(f"{where}.namespace", "must be a string")
        return Step(i, kind, {"text": body, "namespace": ns}, raw.get("title"))
    if not isinstance(body, dict):
        raise fail(f"{where}.{kind}", "must be a mapping")
    need = {
        "label": {"node": str, "labels": dict},
        "delete": {"kind": str, "name": str},
        "request": {"from": dict, "url": str},
        "restart_agent": {"node": str},
        "explain": {"service": str},
        "metrics": {"node": str},
    }[kind]
    for key, typ in need.items():
        if not isinstance(body.get(key), typ):
            raise fail(f"{where}.{kind}.{key}", f"is required and must be a {typ.__name__}")
    if kind == "request":
        src = body["from"]
        if not isinstance(src.get("namespace"), str):
            raise fail(f"{where}.request.from.namespace", "is required and must be a string")
        if sum(isinstance(src.get(k), str) for k in ("deployment", "pod")) != 1:
            raise fail(f"{where}.request.from", "needs a deployment or a pod (a name)")
        count = body.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 10000:
            raise fail(f"{where}.request.count", "must be an integer from 1 to 10000")
        if body.get("family", 4) not in (4, 6):
            raise fail(f"{where}.request.family", "must be 4 or 6")
        extra = set(body) - {"from", "url", "count", "family"}
        if extra:
            raise fail(f"{where}.request.{sorted(extra)[0]}", "unknown key")
    if kind == "restart_agent" and body.get("signal", "KILL") not in ("KILL", "TERM"):
        raise fail(f"{where}.restart_agent.signal", "must be KILL or TERM")
    expect = raw.get("expect") or {}
    if expect and kind != "request":
        raise fail(f"{where}.expect", "only request steps have expectations")
    if not isinstance(expect, dict):
        raise fail(f"{where}.expect", "must be a mapping")
    bad = set(expect) - {"versions", "all_seen", "refused", "min_share"}
    if bad:
        raise fail(f"{where}.expect.{sorted(bad)[0]}", "unknown expectation")
    if "versions" in expect and not (
        isinstance(expect["versions"], list) and all(isinstance(v, str) for v in expect["versions"])
    ):
        raise fail(f"{where}.expect.versions", "must be a list of strings")
    if (expect.get("all_seen") or "min_share" in expect) and "versions" not in expect:
        raise fail(f"{where}.expect", "all_seen and min_share need versions")
    if expect.get("refused") and "versions" in expect:
        raise fail(f"{where}.expect", "refused and versions exclude each other")
    return Step(i, kind, body, raw.get("title"), expect)


# -- running ----------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """What one step did, for `lab run --json`."""

    index: int
    kind: str
    title: str
    output: list[str] = field(default_factory=list)
    versions: dict[str, int] | None = None  # request steps: answers by version
    answers: dict[str, int] | None = None  # request steps: by full answer (or error)
    expect: dict[str, Any] | None = None
    unmet: str | None = None
    data: Any = None  # explain and metrics steps: their JSON


class Runner:
    def __init__(self, scenario: Scenario, out: Callable[[str], None] = print) -> None:
        self.scenario = scenario
        self.out = out
        self.unmet: list[str] = []
        self.records: list[StepRecord] = []

    def run(self, lab: Lab, keep_going: bool = False) -> None:
        total = len(self.scenario.steps)
        for step in self.scenario.steps:
            header = step.title or describe(step)
            self.out(f"[{step.index + 1}/{total}] {header}")
            record = StepRecord(step.index + 1, step.kind, header,
                                expect=step.expect or None)
            self.records.append(record)
            try:
                self.run_step(lab, step, record)
            except Unmet as e:
                record.unmet = str(e)
                self.unmet.append(f"step {step.index + 1} ({header}): {e}")
                self.out(f"  UNMET: {e}")
                if not keep_going:
                    raise

    def say(self, record: StepRecord, line: str) -> None:
        record.output.append(line)
        self.out(f"  {line}")

    def run_step(self, lab: Lab, step: Step, record: StepRecord) -> None:
        b = step.body
        if step.kind == "apply":
            for line in lab.apply(b["text"], b["namespace"]):
                self.say(record, line)
        elif step.kind == "label":
            self.say(record, lab.label(b["node"], b["labels"]))
        elif step.kind == "delete":
            self.say(record, lab.delete(b["kind"], b.get("namespace"), b["name"]))
        elif step.kind == "restart_agent":
            sig = signal.SIGKILL if b.get("signal", "KILL") == "KILL" else signal.SIGTERM
            lab.restart_agent(b["node"], sig)
            self.say(record, f"agent of {b['node']} restarted after SIG{b.get('signal', 'KILL')}")
        elif step.kind == "explain":
            result = lab.explain(b["service"], b.get("namespace") or "default", b.get("node"))
            record.data = result.to_json()
            from kmesh_plugin.ops.explain import render

            for line in render(result).splitlines():
                self.say(record, line)
        elif step.kind == "metrics":
            counters = lab.connect_counters(b["node"])
            record.data = counters
            for line in render_counters(counters) or ["no connects counted yet"]:
                self.say(record, line)
        elif step.kind == "request":
            src = b["from"]
            results = lab.request(src["namespace"], src.get("deployment"), b["url"],
                                  b.get("count", 1), pod_name=src.get("pod"),
                                  family=b.get("family"))
            record.versions = by_version(results)
            record.answers = dict(collections.Counter(answer_text(r) for r in results))
            for line in chart(record.versions, len(results)) + tally(results):
                self.say(record, line)
            check(step.expect, results)
            if step.expect:
                self.say(record, "expectations met")


def answer_text(r: dict[str, Any]) -> str:
    return r["body"].strip() if r["ok"] else f"error: {r['errno'] or r['error']}"


def by_version(results: list[dict[str, Any]]) -> dict[str, int]:
    counts = collections.Counter(
        r["version"] if r["ok"] else f"error {r['errno'] or r['error']}" for r in results
    )
    return dict(counts.most_common())


BAR_WIDTH = 30
EIGHTHS = " ▏▎▍▌▋▊▉"


def chart(versions: dict[str, int], total: int) -> list[str]:
    """A bar per version (or error), scaled to the request count: shares at a glance."""
    if not total:
        return []
    width = max(len(v) for v in versions)
    lines = []
    for version, n in versions.items():
        eighths = round(n / total * BAR_WIDTH * 8)
        bar = "█" * (eighths // 8) + (EIGHTHS[eighths % 8] if eighths % 8 else "")
        lines.append(f"{version:<{width}}  {bar:<{BAR_WIDTH}} {n:4d} {n / total:5.0%}")
    return lines


def render_counters(counters: dict[str, Any]) -> list[str]:
    lines = []
    for svc in counters["services"]:
        tiers = ", ".join(f"tier {t}: {n}" for t, n in sorted(svc["tiers"].items()))
        refused = f", refused: {svc['refused']}" if svc["refused"] else ""
        lines.append(f"{svc['namespace']}/{svc['service']} port {svc['port']} {svc['family']}: "
                     f"{tiers or 'no connects'}{refused}")
    return lines


def describe(step: Step) -> str:
    b = step.body
    if step.kind == "apply":
        return "apply" + (f" (namespace {b['namespace']})" if b["namespace"] else "")
    if step.kind == "label":
        return f"label node {b['node']} " + " ".join(
            f"{k}={v}" if v is not None else f"{k}-" for k, v in b["labels"].items())
    if step.kind == "delete":
        return f"delete {b['kind']} {b.get('namespace') or 'default'}/{b['name']}"
    if step.kind == "restart_agent":
        return f"restart the agent of {b['node']}"
    if step.kind == "explain":
        return f"explain {b.get('namespace') or 'default'}/{b['service']} from {b.get('node')}"
    if step.kind == "metrics":
        return f"connect counters of {b['node']}"
    src = b["from"]
    who = src.get("deployment") or f"pod {src.get('pod')}"
    return f"request {b['url']} x{b.get('count', 1)} from {src['namespace']}/{who}"


def tally(results: list[dict[str, Any]]) -> list[str]:
    """One line per distinct answer (or error), most frequent first, like the seed's output."""
    counts = collections.Counter(answer_text(r) for r in results)
    return [f"{n:4d} x {text}" for text, n in counts.most_common()]


def check(expect: dict[str, Any], results: list[dict[str, Any]]) -> None:
    answered = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    if expect.get("refused"):
        if answered:
            raise Unmet(f"{len(answered)} of {len(results)} requests were answered "
                        f"(by {sorted({r['version'] for r in answered})}), expected refusals")
        slow = [r for r in failed if r["errno"] != "ECONNREFUSED"
                or (r["connect_ms"] or 0) >= REFUSED_FAST_MS]
        if slow:
            r = slow[0]
            raise Unmet(f"{len(slow)} requests were not refused fast: e.g. {r['errno']} after "
                        f"{r['connect_ms']:.1f} ms")
        return
    if "versions" not in expect:
        return
    allowed = set(expect["versions"])
    if failed:
        errors = collections.Counter(r["errno"] or r["error"] for r in failed)
        raise Unmet(f"{len(failed)} of {len(results)} requests failed: {dict(errors)}")
    seen = collections.Counter(r["version"] for r in answered)
    stray = {v: n for v, n in seen.items() if v not in allowed}
    if stray:
        raise Unmet(f"answers from versions outside {sorted(allowed)}: {stray}")
    if expect.get("all_seen"):
        missing = sorted(allowed - set(seen))
        if missing:
            raise Unmet(f"versions never answered: {missing} (answers: {dict(seen)})")
    if "min_share" in expect:
        floor = float(expect["min_share"]) * len(results)
        short = {v: seen.get(v, 0) for v in allowed if seen.get(v, 0) < floor}
        if short:
            raise Unmet(f"versions below {expect['min_share']:.0%} of the answers: {short} "
                        f"(answers: {dict(seen)})")


def execute(scenario: Scenario, *, keep_going: bool = False, verbose: bool = False,
            out: Callable[[str], None] = print, json_path: Path | None = None,
            source: str = "kubernetes", enrolment: str = "cni") -> int:
    """Run a scenario in a fresh lab; the exit code of `kmesh-plugin lab run`. ``source``:
    how the agents read the cluster, "kubernetes" (the API server) or "manifests".
    ``enrolment``: "cni" (pods enrolled by the kmesh-cni chain) or "all" (every socket)."""
    runner = Runner(scenario, out)
    try:
        return _execute(scenario, runner, keep_going, verbose, out, source, enrolment)
    finally:
        if json_path is not None:
            write_json(json_path, scenario, runner)


def write_json(path: Path, scenario: Scenario, runner: Runner) -> None:
    """Every step's record, for scripts (written also when the run fails)."""
    doc = {
        "scenario": str(scenario.path),
        "passed": not runner.unmet and len(runner.records) == len(scenario.steps),
        "unmet": runner.unmet,
        "steps": [vars(r) for r in runner.records],
    }
    text = json.dumps(doc, indent=1, default=str)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
    else:
        path.write_text(text + "\n")


def _execute(scenario: Scenario, runner: Runner, keep_going: bool, verbose: bool,
             out: Callable[[str], None], source: str, enrolment: str) -> int:
    previous = signal.signal(signal.SIGTERM, _terminate)
    lab = None
    try:
        lab = Lab(scenario.nodes, strategies=scenario.strategies,
                  plugin_paths=scenario.plugin_paths, printer=out if verbose else None,
                  log_level="debug" if verbose else "info", source=source,
                  enrolment=enrolment)
        with lab:
            runner.run(lab, keep_going)
    except Unmet:
        pass
    except (LabError, KmeshError) as e:
        out(f"lab failed: {e}")
        return EXIT_FAILURE
    finally:
        signal.signal(signal.SIGTERM, previous)
    if runner.unmet:
        out(f"{len(runner.unmet)} expectation(s) unmet:")
        for line in runner.unmet:
            out(f"  {line}")
        return EXIT_EXPECTATION
    out(f"scenario {scenario.path.name}: every step passed")
    return EXIT_OK


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_file(path: Path, *, keep_going: bool = False, verbose: bool = False,
             json_path: Path | None = None, source: str = "kubernetes",
             enrolment: str = "cni") -> int:
    try:
        scenario = load(path)
    except ScenarioError as e:
        print(f"kmesh-plugin: {e}", file=sys.stderr)
        return EXIT_SCENARIO
    # With --json -, the JSON owns stdout and the running commentary goes to stderr.
    out = _to_stdout if str(json_path) != "-" else _to_stderr
    return execute(scenario, keep_going=keep_going, verbose=verbose, out=out,
                   json_path=json_path, source=source, enrolment=enrolment)


def _to_stdout(line: str) -> None:
    # Flushed per line: whoever reads the progress through a pipe sees each step as it starts.
    print(line, flush=True)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def seed_path(local: bool = False) -> Path:
    name = "seed-local.yaml" if local else "seed.yaml"
    return Path(str(resources.files("kmesh_lab") / "scenarios" / name))


def run_seed(*, local: bool = False, keep_going: bool = False, verbose: bool = False,
             json_path: Path | None = None, source: str = "kubernetes",
             enrolment: str = "cni") -> int:
    return run_file(seed_path(local), keep_going=keep_going, verbose=verbose,
                    json_path=json_path, source=source, enrolment=enrolment)
