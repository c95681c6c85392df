"""The lab: a multi-node Kubernetes-shaped cluster on one machine, with the real datapath.

* Each **node** is a cgroup v2 subtree with its own agent process (`kmesh-plugin run`), its own
  pin dir and its own plugin.toml. The agents read one shared manifest directory: the lab's
  "API server".
* Each **pod** is a network namespace wired by the real CNI bridge + host-local plugins into a
  fabric namespace, with its processes in a cgroup below its node's: the node's connect hook
  translates exactly that node's pods.
* The lab plays **kubelet** (starts pod processes, reports readiness), the **scheduler**
  (nodeSelector) and the **EndpointSlice controller** (ready pods -> slices).

After every change the lab bumps the manifest directory's ``.revision`` and waits until every
agent's status file reports that revision: a condition, never a sleep. Everything created is
recorded in ``<state>/lab.json`` and removed on exit, on Ctrl-C, and by ``kmesh-plugin lab down``
after a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from kmesh_lab import cni, kube, netns, procs
from kmesh_lab.kube import LabError, RunningPod
from kmesh_plugin import config as config_mod
from kmesh_plugin.config import Config
from kmesh_plugin.datapath import loader
from kmesh_plugin.datapath.mounts import BPFFS_DEFAULT, cgroup2_root, ensure_bpffs
from kmesh_plugin.ops.explain import Explanation, explain
from kmesh_plugin.plugins import Plugins
from kmesh_plugin.sources.inotify import Inotify

STATE_ROOT = Path("/run/kmesh-lab")
PREFIX = "kmesh-lab-"
WORKLOADS = [sys.executable, "-m", "kmesh_lab.workloads"]
AGENT = [sys.executable, "-m", "kmesh_plugin.cli", "run", "--config"]
CONVERGE_TIMEOUT = 30.0
START_TIMEOUT = 30.0
DEFAULT_BUILD_DIR = Path("/var/cache/kmesh-plugin")

Printer = Callable[[str], None]


class Lab:
    """A running lab. Use as a context manager: ``with Lab(nodes) as lab: ...``."""

    def __init__(
        self,
        nodes: Mapping[str, Mapping[str, str | None]],
        *,
        strategies: Mapping[str, Any] | None = None,
        plugin_paths: list[str] | None = None,
        build_dir: Path = DEFAULT_BUILD_DIR,
        log_level: str = "info",
        printer: Printer | None = None,
    ) -> None:
        if not nodes:
            raise LabError("a lab needs at least one node")
        if len(nodes) > 200:
            raise LabError("the lab gives each node a /24 of 198.18.0.0/16: at most 200 nodes")
        self.id = secrets.token_hex(2)
        self.name = f"{PREFIX}{self.id}"  # 14 bytes: also the bridge name (<= 15)
        self.state = STATE_ROOT / self.id
        self.manifests = self.state / "manifests"
        self.nodes: dict[str, dict[str, str]] = {}
        for node, labels in nodes.items():
            clean = {str(k): str(v) for k, v in (labels or {}).items() if v is not None}
            clean.setdefault(kube.HOSTNAME_LABEL, node)
            self.nodes[node] = clean
        self.strategies = dict(strategies or {})
        self.plugin_paths = [str(Path(p).resolve()) for p in plugin_paths or []]
        self.build_dir = build_dir
        self.log_level = log_level
        self.print = printer or (lambda _line: None)
        self.cgroup = Path(cgroup2_root()) / self.name
        self.pin_root = BPFFS_DEFAULT / self.name
        self.fabric = cni.Fabric(f"{self.name}-fabric", self.name, str(self.state),
                                 ipv6_subnet=kube.POD_CIDR6)
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.stopped_agents: set[str] = set()
        self.pods: dict[tuple[str, str], RunningPod] = {}  # (namespace, pod name)
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, ns, name)
        self.cluster_ips = kube.ClusterIPs()
        self.revision = 0
        self._pod_seq = 0

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Lab:
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
        self.manifests.mkdir()
        (self.state / "status").mkdir()
        (self.state / "logs").mkdir()
        self._record()
        ensure_bpffs(BPFFS_DEFAULT)
        procs.make_cgroup(str(self.cgroup))
        for node in self.nodes:
            procs.make_cgroup(str(self.cgroup / node))
        self.fabric.create()
        self._write_hosts()
        for node in self.nodes:
            self._put({"apiVersion": "v1", "kind": "Node",
                       "metadata": {"name": node, "labels": self.nodes[node]}})
        self._bump()
        for node in self.nodes:
            self._start_agent(node)
        self.converge()
        self.print(f"lab {self.id}: nodes {', '.join(self.nodes)} up, agents converged")

    def close(self) -> None:
        """Remove everything; keep going on errors and report them at the end."""
        errors = teardown(self.state, self._resources())
        for line in errors:
            print(f"lab {self.id} cleanup: {line}", file=sys.stderr)

    def _resources(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pid": os.getpid(),
            "cgroup": str(self.cgroup),
            "pin_root": str(self.pin_root),
            "fabric": self.fabric.netns_name,
            "netns_prefix": self.name,
            "agents": {n: p.pid for n, p in self.agents.items()},
        }

    def _record(self) -> None:
        _atomic_write(self.state / "lab.json", json.dumps(self._resources(), indent=1))

    # -- agents -----------------------------------------------------------------------------

    def _agent_config(self, node: str) -> Path:
        strategies = {"enabled": ["local", "prefer_close"], **self.strategies}
        lines = [
            "# generated by the lab",
            "[node]", f"name = {json.dumps(node)}",
            "[datapath]",
            f"cgroup = {json.dumps(str(self.cgroup / node))}",
            f"pin_dir = {json.dumps(str(self.pin_root / node))}",
            f"build_dir = {json.dumps(str(self.build_dir))}",
            "max_services = 1024", "max_endpoints = 8192",
            "[strategies]",
            *(f"{k} = {json.dumps(v)}" for k, v in strategies.items()),
            "[source]", 'kind = "manifests"', f"path = {json.dumps(str(self.manifests))}",
            "[agent]",
            f"status_file = {json.dumps(str(self.status_path(node)))}",
            f"log_level = {json.dumps(self.log_level)}",
            "metrics_port = 0",  # every agent on a free port; its status file names it
        ]
        path = self.state / f"{node}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def status_path(self, node: str) -> Path:
        return self.state / "status" / f"{node}.json"

    def log_path(self, node: str) -> Path:
        return self.state / "logs" / f"{node}.log"

    def _start_agent(self, node: str) -> None:
        env = dict(os.environ)
        if self.plugin_paths:
            env["PYTHONPATH"] = os.pathsep.join(
                [*self.plugin_paths, *filter(None, [env.get("PYTHONPATH")])]
            )
        with open(self.log_path(node), "ab") as log:
            # The agent stays in the host's namespaces and root cgroup, as a node agent does.
            self.agents[node] = subprocess.Popen(
                [*AGENT, str(self._agent_config(node))],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )
        self._record()

    def restart_agent(self, node: str, sig: int = signal.SIGKILL) -> None:
        """Kill a node's agent (SIGKILL by default) and start it again; wait until it converged.

        The datapath stays attached throughout: the pinned links keep translating.
        """
        self.stop_agent(node, sig)
        self.status_path(node).unlink(missing_ok=True)
        self._start_agent(node)
        self.converge()

    def stop_agent(self, node: str, sig: int = signal.SIGKILL) -> None:
        """Stop a node's agent and leave it stopped (its datapath stays attached).

        Until ``start_agent``, the lab converges without it: its maps keep their last state.
        """
        proc = self.agents.pop(node)
        proc.send_signal(sig)
        proc.wait(timeout=30)
        self.stopped_agents.add(node)
        self._record()

    def start_agent(self, node: str) -> None:
        self.stopped_agents.discard(node)
        self.status_path(node).unlink(missing_ok=True)
        self._start_agent(node)
        self.converge()

    def agent_log(self, node: str, lines: int = 30) -> str:
        try:
            text = self.log_path(node).read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- convergence ------------------------------------------------------------------------

    def _bump(self) -> None:
        self.revision += 1
        _atomic_write(self.manifests / ".revision", str(self.revision))

    def converge(self, timeout: float = CONVERGE_TIMEOUT) -> None:
        """Wait until every agent has applied the current revision to its maps."""
        want = self.revision
        deadline = time.monotonic() + timeout
        with Inotify() as watch:
            watch.watch(self.state / "status")
            while True:
                lagging = []
                for node, proc in self.agents.items():
                    if proc.poll() is not None:
                        raise LabError(
                            f"agent of node {node} exited with {proc.returncode}:\n"
                            + self.agent_log(node)
                        )
                    status = _read_json(self.status_path(node))
                    rev = (status or {}).get("source_revision")
                    if rev is None or int(rev) < want:
                        lagging.append(node)
                if not lagging:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LabError(
                        f"agents {', '.join(lagging)} did not reach revision {want} within "
                        f"{timeout:.0f} s; last log of {lagging[0]}:\n{self.agent_log(lagging[0])}"
                    )
                watch.wait(min(remaining, 1.0))  # status files are replaced by rename

    # -- objects ----------------------------------------------------------------------------

    def _manifest_name(self, kind: str, ns: str, name: str) -> str:
        return f"{kind}_{ns or '_'}_{name}.yaml".replace("/", "_")

    def _put(self, obj: dict[str, Any]) -> None:
        kind, ns, name = kube.object_ref(obj, None) if obj["kind"] != "Node" else (
            "Node", "", obj["metadata"]["name"])
        if ns:
            obj["metadata"]["namespace"] = ns
        _atomic_write(self.manifests / self._manifest_name(kind, ns, name),
                      yaml.safe_dump(obj, sort_keys=False))

    def _drop(self, kind: str, ns: str, name: str) -> None:
        (self.manifests / self._manifest_name(kind, ns, name)).unlink(missing_ok=True)

    def apply(self, text: str, namespace: str | None = None) -> list[str]:
        """Apply multi-document YAML as `kubectl apply` would; returns what it did."""
        docs = []
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise LabError(f"a manifest document must be a mapping, got {doc!r:.100}")
            docs.extend(doc.get("items") or [] if doc.get("kind") == "List" else [doc])
        refs = [kube.object_ref(d, namespace) for d in docs]  # validate all before acting
        done = []
        # Namespaces first, then Services, then workloads: the order kubectl users rely on.
        order = {"Namespace": 0, "Service": 1, "EndpointSlice": 2, "Deployment": 3, "Pod": 3}
        for doc, (kind, ns, name) in sorted(zip(docs, refs, strict=True),
                                            key=lambda t: order[t[1][0]]):
            if ns and ("Namespace", "", ns) not in self.objects:
                self._ensure_namespace(ns)
            doc = json.loads(json.dumps(doc))  # a private, plain copy
            if ns:
                doc["metadata"]["namespace"] = ns
            done.append(getattr(self, f"_apply_{kind.lower()}")(doc, ns, name))
        self._sync_endpoints()
        self._write_hosts()
        self._bump()
        self.converge()
        return done

    def _ensure_namespace(self, ns: str) -> None:
        self._apply_namespace({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": ns}}, "", ns)

    def _apply_namespace(self, doc: dict[str, Any], _ns: str, name: str) -> str:
        existed = ("Namespace", "", name) in self.objects
        self.objects[("Namespace", "", name)] = doc
        self._put(doc)
        return f"namespace/{name} {'configured' if existed else 'created'}"

    def _apply_service(self, doc: dict[str, Any], ns: str, name: str) -> str:
        from kmesh_plugin.model.objects import parse

        existed = ("Service", ns, name) in self.objects
        self.cluster_ips.assign(doc, (ns, name))
        parse(doc, "lab")  # the agents will parse it too: reject it here with the same words
        self.objects[("Service", ns, name)] = doc
        self._put(doc)
        return f"service/{name} {'configured' if existed else 'created'}"

    def _apply_endpointslice(self, doc: dict[str, Any], ns: str, name: str) -> str:
        from kmesh_plugin.model.objects import parse

        parse(doc, "lab")
        self.objects[("EndpointSlice", ns, name)] = doc
        self._put(doc)
        return f"endpointslice.discovery.k8s.io/{name} configured"

    def _apply_deployment(self, doc: dict[str, Any], ns: str, name: str) -> str:
        existed = ("Deployment", ns, name) in self.objects
        if existed:
            self._delete_pods([p for p in self.pods.values()
                               if p.spec.namespace == ns and p.spec.owner == name])
        specs = kube.pod_specs(doc, ns)
        self.objects[("Deployment", ns, name)] = doc
        for spec in specs:
            self._start_pod(spec)
        return f"deployment.apps/{name} {'configured' if existed else 'created'}"

    def _apply_pod(self, doc: dict[str, Any], ns: str, name: str) -> str:
        if (ns, name) in self.pods:
            self._delete_pods([self.pods[(ns, name)]])
        (spec,) = kube.pod_specs(doc, ns)
        self.objects[("Pod", ns, name)] = doc
        self._start_pod(spec)
        return f"pod/{name} created"

    def delete(self, kind: str, namespace: str | None, name: str) -> str:
        ns = "" if kind == "Namespace" else (namespace or "default")
        if (kind, ns, name) not in self.objects:
            raise LabError(f'{kind} "{name}" not found' + (f" in namespace {ns}" if ns else ""))
        if kind == "Namespace":
            for k, o_ns, o_name in sorted(self.objects):
                if o_ns == name:
                    self.delete(k, o_ns, o_name)
        elif kind in ("Deployment", "Pod"):
            owned = [p for p in self.pods.values() if p.spec.namespace == ns and (
                p.spec.owner == name if kind == "Deployment" else p.spec.name == name)]
            self._delete_pods(owned)
        elif kind == "Service":
            self.cluster_ips.release((ns, name))
            for slice_name in self._slices_of(ns, name):
                self._drop("EndpointSlice", ns, slice_name)
        del self.objects[(kind, ns, name)]
        if kind not in ("Deployment", "Pod"):
            self._drop(kind, ns, name)
        self._write_hosts()
        self._bump()
        self.converge()
        return f"{kind.lower()}/{name} deleted"

    def label(self, node: str, labels: Mapping[str, str | None]) -> str:
        """`kubectl label node --overwrite`: None removes a label."""
        if node not in self.nodes:
            raise LabError(f'node "{node}" not found (nodes: {", ".join(self.nodes)})')
        for key, value in labels.items():
            if value is None:
                self.nodes[node].pop(key, None)
            else:
                self.nodes[node][str(key)] = str(value)
        self._put({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": node, "labels": self.nodes[node]}})
        self._sync_endpoints()  # slices carry the node's zone
        self._bump()
        self.converge()
        return f"node/{node} labeled"

    # -- pods -------------------------------------------------------------------------------

    def _start_pod(self, spec: kube.PodSpec) -> RunningPod:
        load: dict[str, int] = {}
        for p in self.pods.values():
            load[p.node] = load.get(p.node, 0) + 1
        node = kube.schedule(spec, self.nodes, load)
        self._pod_seq += 1
        ns_name = f"{self.name}-p{self._pod_seq}"
        container_id = f"{self.name}-p{self._pod_seq}"
        node_index = list(self.nodes).index(node) + 1
        netns.add(ns_name)
        pod = RunningPod(spec, node, ip="", extra={"netns": ns_name, "cid": container_id,
                                                    "procs": []})
        self.pods[(spec.namespace, spec.name)] = pod
        address = self.fabric.add_pod(
            ns_name, container_id,
            ip_range=(f"198.18.{node_index}.10", f"198.18.{node_index}.250"),
            ipv6_range=(f"2001:2::{node_index:x}:10", f"2001:2::{node_index:x}:ffff"),
        )
        pod.ip, pod.ipv6 = address.ipv4, address.ipv6
        pod_cgroup = self.cgroup / node / spec.name
        procs.make_cgroup(str(pod_cgroup))
        pod.extra["cgroup"] = str(pod_cgroup)
        for c in spec.containers:
            if c.kind == "helloworld":
                port = int(c.ports[0]["containerPort"]) if c.ports else 5000
                argv = [*WORKLOADS, "helloworld", "--port", str(port),
                        "--version", c.env.get("SERVICE_VERSION", "v1"), "--instance", spec.name]
                stdin = subprocess.DEVNULL
            else:
                argv = [*WORKLOADS, "client", "--hosts", str(self.state / "hosts"),
                        "--search", kube.search_domains(spec.namespace)]
                stdin = subprocess.PIPE
            proc = procs.spawn(argv, netns=netns.path(ns_name), cgroup=str(pod_cgroup),
                               stdin=stdin)
            reader = procs.LineReader(proc.stdout)  # type: ignore[arg-type]
            pod.extra["procs"].append((c, proc, reader))
        for _c, _proc, reader in pod.extra["procs"]:
            reader.expect("ready", START_TIMEOUT)  # kubelet's readiness probe
        pod.ready = True
        self.print(f"  pod {spec.namespace}/{spec.name} running on {node} at {pod.ip}, "
                   f"{pod.ipv6}")
        return pod

    def _delete_pods(self, pods: list[RunningPod]) -> None:
        """Graceful, as the kubelet and the slice controller do it: the endpoints turn
        terminating, the agents converge, then the processes stop and the endpoints go."""
        if not pods:
            return
        for pod in pods:
            pod.terminating = True
        self._sync_endpoints()
        self._bump()
        self.converge()
        for pod in pods:
            self._stop_pod(pod)
            del self.pods[(pod.spec.namespace, pod.spec.name)]
            self.print(f"  pod {pod.spec.namespace}/{pod.spec.name} on {pod.node} deleted")
        self._sync_endpoints()

    def _stop_pod(self, pod: RunningPod) -> None:
        for _c, proc, _reader in pod.extra.get("procs", []):
            procs.stop(proc)
        with contextlib.suppress(Exception):
            self.fabric.del_pod(pod.extra["netns"], pod.extra["cid"])
        netns.delete(pod.extra["netns"])
        if "cgroup" in pod.extra:
            procs.remove_cgroup_tree(pod.extra["cgroup"])

    def _slices_of(self, ns: str, service: str) -> list[str]:
        prefix = f"EndpointSlice_{ns}_{service}-"
        return [p.name[len("EndpointSlice_" + ns + "_"):-len(".yaml")]
                for p in self.manifests.glob(f"{prefix}*.yaml")]

    def _sync_endpoints(self) -> None:
        """Rewrite every selector Service's EndpointSlices from the running pods."""
        zones = {n: labels.get("topology.kubernetes.io/zone", "") for n, labels in
                 self.nodes.items()}
        for (kind, ns, name), svc in list(self.objects.items()):
            if kind != "Service" or not (svc.get("spec") or {}).get("selector"):
                continue
            slices = kube.endpoint_slices(svc, self.pods.values(), zones)
            keep = {s["metadata"]["name"] for s in slices}
            for old in self._slices_of(ns, name):
                if old not in keep:
                    self._drop("EndpointSlice", ns, old)
            for s in slices:
                path = self.manifests / self._manifest_name("EndpointSlice", ns,
                                                            s["metadata"]["name"])
                text = yaml.safe_dump(s, sort_keys=False)
                if not path.exists() or path.read_text() != text:
                    _atomic_write(path, text)

    def _write_hosts(self) -> None:
        services = [o for (k, _, _), o in self.objects.items() if k == "Service"]
        _atomic_write(self.state / "hosts", kube.hosts_file(services))

    # -- traffic ----------------------------------------------------------------------------

    def client_pod(self, namespace: str, deployment: str | None = None,
                   pod: str | None = None) -> RunningPod:
        """The first running curl pod of a Deployment, or the pod of that name."""
        for candidate in sorted(self.pods.values(), key=lambda p: p.spec.name):
            spec = candidate.spec
            if spec.namespace != namespace or not candidate.ready:
                continue
            if (pod is not None and spec.name != pod) or (
                deployment is not None and spec.owner != deployment
            ):
                continue
            if any(c.kind == "curl" for c, _, _ in candidate.extra["procs"]):
                return candidate
        what = f"Deployment {namespace}/{deployment}" if deployment else f"pod {namespace}/{pod}"
        raise LabError(f"no running curl pod of {what}")

    def call(
        self, pod: RunningPod, command: dict[str, Any], timeout: float = 600
    ) -> dict[str, Any]:
        """Send one JSON command to a curl pod's client and return its reply."""
        for c, proc, reader in pod.extra["procs"]:
            if c.kind == "curl":
                proc.stdin.write((json.dumps(command) + "\n").encode())  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
                reply = json.loads(reader.readline(timeout))
                if "error" in reply:
                    raise LabError(f"client in {pod.spec.name}: {reply['error']}")
                return reply
        raise LabError(f"pod {pod.spec.name} has no curl container")

    def request(self, namespace: str, deployment: str | None, url: str, count: int = 1,
                timeout: float = 2.0, pod_name: str | None = None,
                family: int | None = None) -> list[dict[str, Any]]:
        """``count`` GETs, each on a new connection. ``family`` 6 resolves names to the
        Service's IPv6 ClusterIP (default: the first, IPv4 for a dual-stack Service)."""
        pod = self.client_pod(namespace, deployment, pod_name)
        command: dict[str, Any] = {"op": "get", "url": url, "count": count, "timeout": timeout}
        if family is not None:
            command["family"] = family
        return self.call(pod, command)["results"]

    # -- inspection -------------------------------------------------------------------------

    def node_config(self, node: str) -> Config:
        if node not in self.nodes:
            raise LabError(f'node "{node}" not found (nodes: {", ".join(self.nodes)})')
        return config_mod.load(self.state / f"{node}.toml")

    def explain(self, service: str, namespace: str = "default",
                node: str | None = None) -> Explanation:
        cfg = self.node_config(node or next(iter(self.nodes)))
        sys.path[:0] = self.plugin_paths  # the agents' third-party plugins, as on the node
        try:
            plugins = Plugins.load(cfg.enabled)
        finally:
            del sys.path[: len(self.plugin_paths)]
        return explain(cfg, plugins, namespace, service)

    def metrics_text(self, node: str) -> str:
        status = _read_json(self.status_path(node)) or {}
        url = status.get("metrics")
        if not url:
            raise LabError(f"the agent of {node} reports no metrics endpoint")
        with urllib.request.urlopen(url, timeout=10) as response:  # loopback only
            return response.read().decode()

    def connect_counters(self, node: str) -> dict[str, Any]:
        """kmesh_connects_total and refusals of a node's agent, per Service and tier."""
        services: dict[tuple[str, ...], dict[str, Any]] = {}
        for family in text_string_to_metric_families(self.metrics_text(node)):
            for sample in family.samples:
                if sample.name not in ("kmesh_connects_total", "kmesh_connect_refusals_total"):
                    continue
                lb = sample.labels
                key = (lb["namespace"], lb["service"], lb["port"], lb["family"])
                svc = services.setdefault(key, {
                    "namespace": key[0], "service": key[1], "port": key[2], "family": key[3],
                    "tiers": {}, "refused": 0,
                })
                if sample.name == "kmesh_connects_total":
                    svc["tiers"][int(lb["tier"])] = int(sample.value)
                else:
                    svc["refused"] = int(sample.value)
        return {"node": node, "services": [services[k] for k in sorted(services)]}


# -- teardown ---------------------------------------------------------------------------------


def teardown(state: Path, record: Mapping[str, Any]) -> list[str]:
    """Remove one lab's agents, pods, cgroups, pins, namespaces and state. Returns problems."""
    problems: list[str] = []

    def attempt(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as e:  # keep removing the rest
            problems.append(f"{what}: {e}")

    for node, pid in (record.get("agents") or {}).items():
        attempt(f"agent {node}", lambda pid=pid: _kill_agent(int(pid)))
    if record.get("cgroup"):
        attempt("cgroups", lambda: procs.remove_cgroup_tree(record["cgroup"], timeout=20))
    pin_root = Path(record.get("pin_root") or "")
    if record.get("pin_root") and pin_root.exists():
        for node_dir in sorted(pin_root.iterdir()):
            attempt(f"pins {node_dir}", lambda d=node_dir: loader.remove(d))
        attempt("pin root", lambda: shutil.rmtree(pin_root))
    prefix = record.get("netns_prefix")
    if prefix:
        for name in netns.list_names(prefix):
            attempt(f"netns {name}", lambda n=name: netns.delete(n))
    attempt("state", lambda: shutil.rmtree(state, ignore_errors=True))
    return problems


def _kill_agent(pid: int) -> None:
    """SIGKILL an agent of ours and wait until it is gone; never a reused pid."""
    try:
        pidfd = os.pidfd_open(pid)  # pins the process: the pid cannot be reused under us
    except ProcessLookupError:
        return
    try:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return
        if b"kmesh_plugin.cli" not in cmdline:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        select.select([pidfd], [], [], 10)  # readable once the process has exited
    finally:
        os.close(pidfd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def teardown_all() -> list[str]:
    """`kmesh-plugin lab down`: remove every lab on this machine, recorded or orphaned."""
    done: list[str] = []
    if STATE_ROOT.exists():
        for state in sorted(STATE_ROOT.iterdir()):
            record = _read_json(state / "lab.json") or {}
            owner = record.get("pid")
            if owner and _alive(int(owner)) and int(owner) != os.getpid():
                done.append(f"lab {state.name}: its runner (pid {owner}) is alive; stopping it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(owner), signal.SIGTERM)
                _wait_gone(int(owner), 20)
            problems = teardown(state, {
                "netns_prefix": f"{PREFIX}{state.name}",
                "cgroup": str(Path(cgroup2_root()) / f"{PREFIX}{state.name}"),
                "pin_root": str(BPFFS_DEFAULT / f"{PREFIX}{state.name}"),
                **record,
            })
            done.append(f"lab {state.name}: removed" + (f" ({'; '.join(problems)})"
                                                       if problems else ""))
    # Orphans whose state directory is gone (a crash before lab.json was written).
    for name in netns.list_names(PREFIX):
        netns.delete(name)
        done.append(f"netns {name}: removed")
    cg_root = Path(cgroup2_root())
    for path in sorted(cg_root.glob(f"{PREFIX}*")):
        procs.remove_cgroup_tree(str(path), timeout=20)
        done.append(f"cgroup {path}: removed")
    if BPFFS_DEFAULT.exists():
        for path in sorted(BPFFS_DEFAULT.glob(f"{PREFIX}*")):
            for node_dir in sorted(p for p in path.iterdir() if p.is_dir()):
                loader.remove(node_dir)
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"pins {path}: removed")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pid: int, timeout: float) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    """Readers (the agents) see the old file or the new one, never a half-written one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent.parent if path.parent.name == "manifests"
                               else path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
