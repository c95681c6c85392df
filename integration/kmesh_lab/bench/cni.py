"""kmesh-cni's cost in a pod's CNI chain: ADD and DEL latency alone and as the chain's added share.

For each of N pods (network namespaces made here) the chain runs as a runtime runs it (CNI spec
1.0.0): ADD executes Debian's ``bridge`` (which delegates to ``host-local``) without a
prevResult, then ``kmesh-cni`` with bridge's result as prevResult; DEL runs them in reverse
with the ADD's result. Every plugin is a new process started in a fabric namespace (the
bridge and the host ends of the veths live there, not on the host), timed from spawn to exit.
kmesh-cni enrols into a pinned map of kmesh_enrolled's exact shape (loader.map_specs): its work
is the production work; no program needs to be attached for it.

The same run measures the Python start-up floor, interleaved with the pods so that it sees the
same machine: ``python -c pass`` (with site and this venv's editable-install finders) and
``python -S -c pass`` (neither), and ``kmesh-cni`` VERSION (start-up plus our imports, no
work). A what-if row runs kmesh-cni with the package ``kmesh_plugin`` registered bare (its
``__init__``, which loads pluggy and the model for the agent, skipped), to show what a lazy
package ``__init__`` would save. One extra pod's ADD runs under ``python -X importtime``.

Target: kmesh-cni adds <= 50 ms p99 to the chain (its own ADD and DEL p99), judged on the p99's
95% bootstrap interval; an inconclusive one adds pods up to a time bound. Everything carries
the lab prefix and is recorded like a lab (`kmesh-plugin lab down` removes a crashed run's
leftovers); the run is bounded by the pod count and a timeout per plugin.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kmesh_lab import cluster, netns, procs
from kmesh_lab.bench import report
from kmesh_plugin.cni import conflist
from kmesh_plugin.datapath import loader, records, syscall
from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.datapath.mounts import BPFFS_DEFAULT, ensure_bpffs

TARGET_MS = 50.0
CNI_VERSION = "1.0.0"
SUBNET = "198.18.128.0/20"  # 4094 pod addresses in the benchmarking range
BRIDGE = "kmcni0"
DEBIAN_CNI = "/usr/lib/cni"
PLUGIN_TIMEOUT = 30.0
# For comparison: the pip console script (site, and here the editable installs' finders).
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "kmesh-cni")
_IMPORTTIME = "import sys; from kmesh_plugin.cni.main import main; sys.exit(main())"


class ChainError(RuntimeError):
    pass


class Bench:
    """The fabric namespace, the pod namespaces, a pinned kmesh_enrolled and the conf."""

    def __init__(self) -> None:
        self.id = secrets.token_hex(2)
        self.name = f"{cluster.PREFIX}{self.id}"
        self.state = cluster.STATE_ROOT / self.id
        self.pin_root = BPFFS_DEFAULT / self.name
        self.pin_dir = self.pin_root / "node"
        self.fabric = f"{self.name}-fabric"
        self.pods: list[str] = []

    def __enter__(self) -> Bench:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.state.mkdir(parents=True)
        cluster.record_resources(self.state, self.id, self.name, self.pin_root)
        ensure_bpffs(BPFFS_DEFAULT)
        (self.pin_dir / "maps").mkdir(parents=True)
        spec = loader.map_specs(Capacities(64, 1024))[records.MAP_ENROLLED]
        with syscall.Map.create(spec.map_type, spec.key_size, spec.value_size, spec.max_entries,
                                flags=spec.flags, name=records.MAP_ENROLLED) as m:
            m.pin(self.pin_dir / "maps" / records.MAP_ENROLLED)
        netns.add(self.fabric)

    def launcher(self) -> str:
        """The launcher `kmesh-plugin cni install` writes (python -IS, explicit sys.path)."""
        path = self.state / "bin" / "kmesh-cni"
        path.parent.mkdir()
        path.write_text(conflist.launcher_text())
        path.chmod(0o755)
        return str(path)

    def pod(self, i: int) -> str:
        name = f"{self.name}-p{i:03d}"
        netns.add(name)
        self.pods.append(name)
        return name

    def drop(self, name: str) -> None:
        netns.delete(name)
        self.pods.remove(name)

    def bridge_conf(self) -> dict[str, Any]:
        return {"cniVersion": CNI_VERSION, "name": "benchnet", "type": "bridge",
                "bridge": BRIDGE, "isGateway": False, "ipMasq": False,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                         "dataDir": str(self.state / "ipam")}}

    def kmesh_conf(self) -> dict[str, Any]:
        return {"cniVersion": CNI_VERSION, "name": "benchnet", "type": "kmesh-cni",
                "pinDir": str(self.pin_dir), "stateDir": str(self.state / "kmesh-cni")}

    def run(self, argv: list[str], env: dict[str, str], stdin: bytes) -> tuple[float, bytes,
                                                                              bytes]:
        """Run one plugin in the fabric namespace: (milliseconds, stdout, stderr)."""
        start = time.perf_counter()
        proc = procs.spawn(argv, netns=netns.path(self.fabric), cgroup=None, env=env,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(stdin, timeout=PLUGIN_TIMEOUT)
        finally:
            procs.stop(proc, timeout=5.0)
        ms = (time.perf_counter() - start) * 1000
        if proc.returncode != 0:
            raise ChainError(f"{argv[-1]} {env.get('CNI_COMMAND')} exited {proc.returncode}: "
                             f"{out[:500]!r} {err[:500]!r}")
        return ms, out, err

    def env(self, command: str, pod: str) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
                "CNI_CONTAINERID": pod, "CNI_NETNS": netns.path(pod), "CNI_IFNAME": "eth0",
                "CNI_PATH": f"{DEBIAN_CNI}:{self.state / 'bin'}",
                "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={pod};"
                            f"K8S_POD_UID=uid-{pod}"}

    def close(self) -> None:
        for name in list(self.pods):
            netns.delete(name)
        problems = cluster.teardown(self.state, {"pin_root": str(self.pin_root),
                                                 "netns_prefix": self.name})
        shutil.rmtree(self.state, ignore_errors=True)
        for p in problems:
            print(f"  cleanup: {p}")


def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[k]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": percentile(values, 0.5),
            "p99_ms": percentile(values, 0.99), "max_ms": max(values, default=float("nan"))}


def run(pods: int = 200, settle_seconds: float = 120.0) -> dict[str, Any]:
    """The whole CNI benchmark; prints its table and returns the figures. While the verdict on
    the ADD or DEL p99 (by its 95% interval) is inconclusive, more pods, in batches of
    SETTLE_BATCH, up to ``settle_seconds``."""
    print(f"cni: kmesh-cni in a bridge + host-local chain, {pods} pods")
    samples: dict[str, list[float]] = {k: [] for k in (
        "bridge_add", "ours_add", "chain_add", "share_add", "bridge_del", "ours_del",
        "chain_del", "share_del", "floor_site", "floor_nosite", "ours_version",
        "script_add", "script_del")}
    py = sys.executable
    with Bench() as bench:
        kmesh = bench.kmesh_conf()
        ours = bench.launcher()  # what a runtime runs: the launcher `cni install` writes

        def one_pod(i: int) -> None:
            pod = bench.pod(i)
            env_add, env_del = bench.env("ADD", pod), bench.env("DEL", pod)
            ms_b, out, _ = bench.run([f"{DEBIAN_CNI}/bridge"], env_add,
                                     json.dumps(bench.bridge_conf()).encode())
            prev = json.loads(out)
            ms_k, out, _ = bench.run([ours], env_add,
                                     json.dumps({**kmesh, "prevResult": prev}).encode())
            result = json.loads(out)
            if result != prev:
                raise ChainError(f"kmesh-cni changed the result: {result} != {prev}")
            samples["bridge_add"].append(ms_b)
            samples["ours_add"].append(ms_k)
            samples["chain_add"].append(ms_b + ms_k)
            samples["share_add"].append(ms_k / (ms_b + ms_k))
            # The floor, interleaved: same machine, same moment.
            samples["floor_site"].append(bench.run([py, "-c", "pass"], env_add, b"")[0])
            samples["floor_nosite"].append(bench.run([py, "-S", "-c", "pass"], env_add, b"")[0])
            samples["ours_version"].append(bench.run([ours], {
                **env_add, "CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}')[0])
            # DEL in reverse order, prevResult = the ADD's result.
            del_ours = json.dumps({**kmesh, "prevResult": result}).encode()
            ms_k = bench.run([ours], env_del, del_ours)[0]
            # The console script instead of the launcher: the same attachment again.
            samples["script_add"].append(bench.run([CONSOLE_SCRIPT], env_add, del_ours)[0])
            samples["script_del"].append(bench.run([CONSOLE_SCRIPT], env_del, del_ours)[0])
            ms_b = bench.run([f"{DEBIAN_CNI}/bridge"], env_del, json.dumps(
                {**bench.bridge_conf(), "prevResult": result}).encode())[0]
            samples["ours_del"].append(ms_k)
            samples["bridge_del"].append(ms_b)
            samples["chain_del"].append(ms_b + ms_k)
            samples["share_del"].append(ms_k / (ms_b + ms_k))
            bench.drop(pod)

        importtime = _importtime_add(bench, kmesh)
        for i in range(pods):
            one_pod(i)
            if (i + 1) % 50 == 0:
                print(f"  {i + 1} pods done")
        settle = _settle(samples, one_pod, pods, settle_seconds)
        left = os.listdir(bench.state / "kmesh-cni" / "pods") if (
            bench.state / "kmesh-cni" / "pods").exists() else []
        with syscall.Map.open_pinned(bench.pin_dir / "maps" / records.MAP_ENROLLED) as m:
            enrolled_left = len(list(m.keys()))
    out = _report(samples, importtime, pods + settle["added_rounds"], len(left), enrolled_left)
    out["settle"] = settle
    return out


SETTLE_BATCH = 20  # pods added at a time while a p99 verdict is inconclusive


def _verdicts(samples: dict[str, list[float]]) -> dict[str, str | None]:
    return {step: report.verdict(report.quantile_interval(samples[step], 0.99), TARGET_MS,
                                 higher_is_better=False)
            for step in ("ours_add", "ours_del")}


def _settle(samples: dict[str, list[float]], one_pod: Callable[[int], None], first: int,
            seconds: float) -> dict[str, Any]:
    """More pods while the ADD or the DEL p99 verdict is inconclusive, up to ``seconds`` (the
    last batch may run past the bound by its length)."""
    started = time.monotonic()
    added = 0
    while "inconclusive" in _verdicts(samples).values() and \
            time.monotonic() - started < seconds:
        for _ in range(SETTLE_BATCH):
            one_pod(first + added)
            added += 1
    spent = time.monotonic() - started
    if added:
        print(f"  {added} pods added to settle the p99 verdicts in {spent:.0f} s")
    return {"verdicts": _verdicts(samples), "added_rounds": added, "seconds": round(spent, 3),
            "bound_seconds": seconds, "target": TARGET_MS}


def _importtime_add(bench: Bench, kmesh: dict[str, Any]) -> dict[str, Any]:
    """One ADD under ``python -X importtime``: top-level import costs grouped by origin."""
    pod = bench.pod(999)
    env_add, env_del = bench.env("ADD", pod), bench.env("DEL", pod)
    _, out, _ = bench.run([f"{DEBIAN_CNI}/bridge"], env_add,
                          json.dumps(bench.bridge_conf()).encode())
    prev = json.loads(out)
    conf = json.dumps({**kmesh, "prevResult": prev}).encode()
    _, _, err = bench.run([sys.executable, "-X", "importtime", "-c", _IMPORTTIME], env_add, conf)
    bench.run([CONSOLE_SCRIPT], env_del, conf)
    bench.run([f"{DEBIAN_CNI}/bridge"], env_del,
              json.dumps({**bench.bridge_conf(), "prevResult": prev}).encode())
    bench.drop(pod)
    return group_importtime(err.decode(errors="replace"))


_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def group_importtime(text: str) -> dict[str, Any]:
    """Cumulative microseconds of the top-level imports, by origin: the interpreter's start-up
    (site), the package kmesh_plugin's __init__, kmesh_plugin.cni, pyroute2 and the standard
    library modules they pull in."""
    groups = {"startup (site)": 0, "kmesh_plugin/__init__": 0, "kmesh_plugin.cni": 0,
              "pyroute2.netns (lean)": 0, "stdlib for the above": 0}
    top: list[tuple[str, int]] = []
    package_init = 0
    for line in text.splitlines():
        m = _IMPORT_LINE.match(line)
        if not m:
            continue
        name, cumulative = m.group(4), int(m.group(2))
        if name == "kmesh_plugin":  # imported as the parent of kmesh_plugin.cni: nested in it
            package_init = cumulative
        if len(m.group(3)) == 1:  # top level: one space after the bar
            top.append((name, cumulative))
    seen_site = False
    for name, us in top:
        if not seen_site:
            groups["startup (site)"] += us
            seen_site = name == "site"
            continue
        if name == "kmesh_plugin":
            groups["kmesh_plugin/__init__"] += us
        elif name.startswith("kmesh_plugin.cni"):
            groups["kmesh_plugin.cni"] += us - package_init
            groups["kmesh_plugin/__init__"] += package_init
            package_init = 0
        elif name.startswith("pyroute2"):
            groups["pyroute2.netns (lean)"] += us
        else:
            groups["stdlib for the above"] += us
    return {"microseconds": groups, "top_level": top}


def _report(samples: dict[str, list[float]], importtime: dict[str, Any], pods: int,
            records_left: int, cookies_left: int) -> dict[str, Any]:
    rows = {k: summary(v) for k, v in samples.items() if not k.startswith("share")}
    shares = {k: {"p50": percentile(v, 0.5), "p99": percentile(v, 0.99)}
              for k, v in samples.items() if k.startswith("share")}
    floor = rows["floor_site"]["p50_ms"]
    targets = []
    for step, label in (("ours_add", "ADD"), ("ours_del", "DEL")):
        iv = report.quantile_interval(samples[step], 0.99)
        targets.append({"target": f"kmesh-cni {label} adds <= 50 ms p99 to the chain",
                        "value": rows[step]["p99_ms"], "interval": iv,
                        "verdict": report.verdict(iv, TARGET_MS, higher_is_better=False)})
    labels = [
        ("bridge_add", "bridge + host-local ADD"), ("ours_add", "kmesh-cni ADD"),
        ("chain_add", "chain ADD (both)"), ("bridge_del", "bridge + host-local DEL"),
        ("ours_del", "kmesh-cni DEL"), ("chain_del", "chain DEL (both)"),
        ("floor_site", "floor: python -c pass"), ("floor_nosite", "floor: python -S -c pass"),
        ("ours_version", "kmesh-cni VERSION (start-up + imports)"),
        ("script_add", "ADD through the pip console script (with site)"),
        ("script_del", "DEL through the pip console script (with site)"),
    ]
    print("\n| step | p50 ms | p99 ms | max ms | p50 above the site floor |")
    print("|---|---:|---:|---:|---:|")
    for key, label in labels:
        r = rows[key]
        python = not key.startswith(("floor", "bridge", "chain"))
        above = f"{r['p50_ms'] - floor:.1f}" if python else ""
        print(f"| {label} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | "
              f"{above} |")
    for key, label in (("share_add", "ADD"), ("share_del", "DEL")):
        print(f"kmesh-cni's share of the chain's {label}: p50 {shares[key]['p50']:.0%}, "
              f"p99 {shares[key]['p99']:.0%}")
    us = importtime["microseconds"]
    print("one ADD under -X importtime (cumulative ms of top-level imports): " + ", ".join(
        f"{k} {v / 1000:.1f}" for k, v in us.items()))
    for t in targets:
        iv = t["interval"]
        print(f"target: {t['target']}: {t['value']:.1f} ms [{iv['lo']:.1f}, {iv['hi']:.1f}] "
              f"{(t['verdict'] or 'not measured').upper()}")
    print(f"left behind: {records_left} state records, {cookies_left} enrolled cookies")
    return {"pods": pods, "latency": rows, "share_of_chain": shares, "importtime": importtime,
            "targets": targets, "records_left": records_left, "cookies_left": cookies_left,
            # What the verdicts are judged on (report.evaluate), one per pod.
            "samples_ms": {step: samples[step] for step in ("ours_add", "ours_del")}}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kmesh_lab.bench.cni",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(run(args.pods)["latency"], indent=1))
