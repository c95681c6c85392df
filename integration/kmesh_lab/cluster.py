"""The lab: a multi-node Kubernetes-shaped cluster on one machine, with the real datapath.

* An **API server** (:mod:`kmesh_lab.apiserver`, real HTTP on 127.0.0.1) holds the cluster.
  Everything the lab does as a cluster component goes through it, as the real components do.
* Each **node** is a cgroup v2 subtree with its own agent process (`kmesh-plugin run`), its own
  pin dir and its own plugin.toml. With ``source="kubernetes"`` (the default) the agents
  watch the API server like agents on a real cluster; with ``source="manifests"`` they read
  a manifest directory that the lab mirrors from the API server after every change.
* Each **pod** is a network namespace wired by the real CNI bridge + host-local plugins into a
  fabric namespace, with its processes in a cgroup below its node's: the node's connect hook
  translates exactly that node's pods.
* **Enrolment** (``enrolment="cni"``, the default): each node's plugin.toml says
  ``[datapath] enrolment = "cni"`` and names a conf dir, bin dir and ``[cni] state_dir`` of its
  own below the lab's state dir. The lab writes the node's primary CNI config there (bridge +
  host-local, the node's address slice), and once the node's agent has attached its datapath
  it runs ``kmesh-plugin cni install`` for the node, which chains kmesh-cni (with that node's
  pinDir and stateDir) at the end and writes its launcher into the node's bin dir. The kubelet
  then runs, per pod and as containerd's CRI does, go-cni's loopback network on ``lo`` and the
  node's conflist on ``eth0``, with CNI_ARGS ``IgnoreUnknown=1;K8S_POD_NAMESPACE=..;
  K8S_POD_NAME=..;K8S_POD_INFRA_CONTAINER_ID=..;K8S_POD_UID=..`` and CNI_PATH ``<node bin
  dir>:/usr/lib/cni``: pods are enrolled only through the chain, before their first process
  starts. :meth:`Lab.add_unenrolled_pod` wires a pod by the bridge config alone (no
  kmesh-cni), which the datapath must leave untouched. ``enrolment="all"`` is the former lab:
  no kmesh-cni, every socket in the node's cgroup is translated.
* The lab plays the **Deployment controller** (Pods for a Deployment's replicas, garbage
  collection of orphans), the **scheduler** (nodeSelector, least loaded), the **kubelet** (starts
  the pod's processes, reports its IPs and readiness in the Pod's status, and on deletion
  turns it terminating before it stops it) and the **EndpointSlice controller** (slices from
  the Pods' status). :meth:`Lab.reconcile` runs them until nothing changes: level-triggered,
  so it is correct whoever changed the API server (a scenario step, or kubectl).

``kmesh-plugin lab up`` (:mod:`kmesh_lab.labd`) runs a lab in the background with the
controllers on a thread of their own, for kubectl: then :attr:`Lab.write_barrier` holds the
answer to kubectl's writes until they are acted on, and :meth:`Lab.exec_in_pod` runs
``kubectl exec``'s commands inside the pods.

After every change the lab waits until every agent's status reports that it applied the API
server's state (per resource, the resourceVersion of the last change): a condition, never a
sleep. Everything created is recorded in ``<state>/lab.json`` and removed on exit, on Ctrl-C,
and by ``kmesh-plugin lab down`` after a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from kmesh_lab import cni, kube, netns, procs
from kmesh_lab.apiserver import ApiError, ApiServer
from kmesh_lab.kind import ARCH
from kmesh_lab.kube import LabError, RunningPod
from kmesh_lab.kubeclient import USER_AGENT, ApiStatusError, KubeClient
from kmesh_plugin import config as config_mod
from kmesh_plugin.config import Config
from kmesh_plugin.datapath import loader, records
from kmesh_plugin.datapath.loader import Datapath
from kmesh_plugin.datapath.mounts import BPFFS_DEFAULT, cgroup2_root, ensure_bpffs
from kmesh_plugin.errors import KmeshError
from kmesh_plugin.ops.explain import Explanation, explain
from kmesh_plugin.plugins import Plugins
from kmesh_plugin.sources.inotify import Inotify
from kmesh_plugin.sources.resources import WATCHED

if TYPE_CHECKING:
    from kmesh_lab.apiserver.remotecommand import ExecRequest

STATE_ROOT = Path("/run/kmesh-lab")
PREFIX = "kmesh-lab-"
WORKLOADS = [sys.executable, "-m", "kmesh_lab.workloads"]
AGENT = [sys.executable, "-m", "kmesh_plugin.cli", "run", "--config"]
CONVERGE_TIMEOUT = 30.0
# `lab down`'s wait for a lab's runner to remove its own lab before it is SIGKILLed: longer
# than `lab up`'s daemon takes at worst (labd.STOP_JOIN for a controller pass in flight, then
# close(): each agent's SIGKILL waited <= 10 s, the cgroups <= 20 s).
RUNNER_STOP_TIMEOUT = 120.0
KUBELET_VERSION = "v1.31.0"  # the seed's kindest/node image; /version says 1.31 too
START_TIMEOUT = 30.0
KMESH_PLUGIN = [sys.executable, "-m", "kmesh_plugin.cli"]
DEFAULT_BUILD_DIR = Path("/var/cache/kmesh-plugin")
SOURCES = ("kubernetes", "manifests")
ENROLMENTS = ("cni", "all")
# The primary CNI's config in each node's conf dir; kmesh-plugin cni install chains onto it.
CONFLIST_NAME = "10-kmesh-lab.conflist"
KMESH_CNI = "kmesh-cni"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# The kinds the agents read, in the order a manifest mirror writes them.
AGENT_KINDS = ("Node", "Namespace", "Service", "EndpointSlice")
# Bookmarks keep an agent's resourceVersion current for collections whose changes its label
# selector filters out (a headless Service): the lab waits at most this long for those.
BOOKMARK_INTERVAL = 1.0

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
        source: str = "kubernetes",
        enrolment: str = "cni",
    ) -> None:
        if not nodes:
            raise LabError("a lab needs at least one node")
        if len(nodes) > 200:
            raise LabError("the lab gives each node a /24 of 198.18.0.0/16: at most 200 nodes")
        if source not in SOURCES:
            raise LabError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        if enrolment not in ENROLMENTS:
            raise LabError(f"enrolment must be one of {', '.join(ENROLMENTS)}, got "
                           f"{enrolment!r}")
        self.id = secrets.token_hex(2)
        self.name = f"{PREFIX}{self.id}"  # 14 bytes: also the bridge name (<= 15)
        self.state = STATE_ROOT / self.id
        self.manifests = self.state / "manifests"
        self.kubeconfig = self.state / "kubeconfig"
        self.source = source
        self.enrolment = enrolment
        self.initial_nodes: dict[str, dict[str, str]] = {}
        for node, labels in nodes.items():
            clean = {str(k): str(v) for k, v in (labels or {}).items() if v is not None}
            clean.setdefault(kube.HOSTNAME_LABEL, node)
            self.initial_nodes[node] = clean
        self.strategies = dict(strategies or {})
        self.plugin_paths = [str(Path(p).resolve()) for p in plugin_paths or []]
        self.build_dir = build_dir
        self.log_level = log_level
        self.print = printer or (lambda _line: None)
        self.cgroup = Path(cgroup2_root()) / self.name
        self.pin_root = BPFFS_DEFAULT / self.name
        self.fabric = cni.Fabric(f"{self.name}-fabric", self.name, str(self.state),
                                 ipv6_subnet=kube.POD_CIDR6)
        self.token = secrets.token_hex(16)
        # TLS: kubectl sends a bearer token only to an https server, and the agents then speak
        # to the lab as to a real cluster's API server.
        self.api = ApiServer(token=self.token, admission=[self._admit],
                             bookmark_interval=BOOKMARK_INTERVAL, tls=True,
                             exec_runner=self.exec_in_pod, after_write=self._after_write)
        # Set by a lab that runs its controllers in the background (``kmesh-plugin lab up``):
        # called with the revision of a write by anyone but the lab itself (kubectl), and
        # returns once the controllers and every agent acted on it.
        self.write_barrier: Callable[[int], None] | None = None
        self.execs: list[subprocess.Popen[bytes]] = []  # kubectl exec's processes
        self._execs_lock = threading.Lock()
        self.up = False  # `lab up`'s lab (lab.json says so: `lab status` finds it)
        self.kube: KubeClient | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.stopped_agents: set[str] = set()
        self.pods: dict[tuple[str, str], RunningPod] = {}  # the kubelets' running pods
        self.unenrolled: dict[str, RunningPod] = {}  # pods outside the chain, by name
        self.cluster_ips = kube.ClusterIPs()
        self._mirror_revision = 0
        self._pod_seq = 0

    @property
    def nodes(self) -> dict[str, dict[str, str]]:
        """Node name -> its labels, as the API server has them now."""
        if self.kube is None:
            return dict(self.initial_nodes)
        return {n["metadata"]["name"]: dict(n["metadata"].get("labels") or {})
                for n in self.client.list("Node")}

    @property
    def client(self) -> KubeClient:
        if self.kube is None:
            raise LabError("the lab is not started")
        return self.kube

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
        for node in self.initial_nodes:
            procs.make_cgroup(str(self.cgroup / node))
            self._write_primary_cni(node)
        self.fabric.create()
        self.api.start()
        self.api.write_kubeconfig(self.kubeconfig)
        self.kube = KubeClient(self.api.url, self.token, ca_pem=self.api.certificate_pem)
        self._record()
        for node, labels in self.initial_nodes.items():
            self.client.create({"apiVersion": "v1", "kind": "Node",
                                "metadata": {"name": node, "labels": labels}})
            self.client.patch("Node", None, node, {"status": self._node_status(node)},
                              subresource="status")
        self._write_hosts()
        self._mirror()
        for node in self.initial_nodes:
            self._start_agent(node)
        self.converge()
        if self.enrolment == "cni":
            # Only now: every agent has attached its datapath in cni mode (kmesh_config
            # written), so a pod the chain enrols is translated from its first connect.
            for node in self.initial_nodes:
                self._install_cni(node)
        self.print(f"lab {self.id}: nodes {', '.join(self.initial_nodes)} up ({self.source} "
                   f"source, {self.enrolment} enrolment), agents converged")

    def close(self) -> None:
        """Remove everything; keep going on errors and report them at the end."""
        with self._execs_lock:
            for proc in self.execs:
                procs.stop(proc)
        errors = teardown(self.state, self._resources())
        with contextlib.suppress(Exception):
            self.api.stop()
        for line in errors:
            print(f"lab {self.id} cleanup: {line}", file=sys.stderr)

    def _resources(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pid": os.getpid(),
            "pid_start": start_ticks(os.getpid()),
            "cgroup": str(self.cgroup),
            "pin_root": str(self.pin_root),
            "fabric": self.fabric.netns_name,
            "netns_prefix": self.name,
            "agents": {n: p.pid for n, p in self.agents.items()},
            "api": self.api.url if self.kube is not None else None,
            "kubeconfig": str(self.kubeconfig),
            "source": self.source,
            "enrolment": self.enrolment,
            "nodes": list(self.initial_nodes),
            "up": self.up,
        }

    def mark_up(self) -> None:
        """Record this lab as `lab up`'s (run in the background, driven by kubectl)."""
        self.up = True
        self._record()

    def _node_status(self, node: str) -> dict[str, Any]:
        """What a kubelet reports, for `kubectl get nodes` (STATUS, VERSION, -o wide)."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "kubelet is posting ready status",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            # Every node is this machine (its agent runs in the host's namespaces): its
            # address is the host's, as the pods' hostIP says.
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": node}],
            "nodeInfo": {"kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": KUBELET_VERSION,
                         "osImage": "kmesh-lab", "kernelVersion": os.uname().release,
                         "operatingSystem": "linux", "architecture": ARCH,
                         "containerRuntimeVersion": "kmesh-lab://0.1", "machineID": "",
                         "systemUUID": "", "bootID": ""},
        }

    def _record(self) -> None:
        _atomic_write(self.state / "lab.json", json.dumps(self._resources(), indent=1))

    # -- agents -----------------------------------------------------------------------------

    def _agent_config(self, node: str) -> Path:
        strategies = {"enabled": ["local", "prefer_close"], **self.strategies}
        if self.source == "kubernetes":
            source = ['kind = "kubernetes"', f"kubeconfig = {json.dumps(str(self.kubeconfig))}"]
        else:
            source = ['kind = "manifests"', f"path = {json.dumps(str(self.manifests))}"]
        lines = [
            "# generated by the lab",
            "[node]", f"name = {json.dumps(node)}",
            "[datapath]",
            f"cgroup = {json.dumps(str(self.cgroup / node))}",
            f"pin_dir = {json.dumps(str(self.pin_root / node))}",
            f"build_dir = {json.dumps(str(self.build_dir))}",
            "max_services = 1024", "max_endpoints = 8192",
            f"enrolment = {json.dumps(self.enrolment)}",
            # The node's own CNI dirs: nothing of the lab touches /etc/cni or /opt/cni.
            "[cni]",
            f"conf_dir = {json.dumps(str(self.cni_conf_dir(node)))}",
            f"conflist = {json.dumps(CONFLIST_NAME)}",
            f"bin_dir = {json.dumps(str(self.cni_bin_dir(node)))}",
            f"state_dir = {json.dumps(str(self.cni_state_dir(node)))}",
            f"log_file = {json.dumps(str(self.cni_log_path(node)))}",
            "[strategies]",
            *(f"{k} = {json.dumps(v)}" for k, v in strategies.items()),
            "[source]", *source,
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

    def node_dir(self, node: str) -> Path:
        return self.state / "nodes" / node

    def cni_conf_dir(self, node: str) -> Path:
        return self.node_dir(node) / "net.d"

    def cni_bin_dir(self, node: str) -> Path:
        return self.node_dir(node) / "bin"

    def cni_state_dir(self, node: str) -> Path:
        return self.node_dir(node) / "cni"

    def cni_log_path(self, node: str) -> Path:
        return self.state / "logs" / f"{node}.cni.log"

    def conflist_path(self, node: str) -> Path:
        return self.cni_conf_dir(node) / CONFLIST_NAME

    def cni_path(self, node: str) -> str:
        """CNI_PATH for the node's pods: its own bin dir (kmesh-cni), then Debian's plugins."""
        return os.pathsep.join([str(self.cni_bin_dir(node)), cni.DEFAULT_CNI_PATH])

    def _node_ranges(self, node: str) -> tuple[cni.IpRange, cni.IpRange]:
        index = list(self.initial_nodes).index(node) + 1
        return ((f"198.18.{index}.10", f"198.18.{index}.250"),
                (f"2001:2::{index:x}:10", f"2001:2::{index:x}:ffff"))

    def primary_cni_config(self, node: str) -> dict[str, Any]:
        """The node's cluster network as its primary CNI would configure it: bridge +
        host-local with the node's address slice, no kmesh-cni."""
        v4, v6 = self._node_ranges(node)
        return self.fabric.network_config(v4, v6)

    def _write_primary_cni(self, node: str) -> None:
        for path in (self.cni_conf_dir(node), self.cni_bin_dir(node), self.cni_state_dir(node)):
            path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.conflist_path(node),
                      json.dumps(self.primary_cni_config(node), indent=2) + "\n")

    def _install_cni(self, node: str) -> None:
        """`kmesh-plugin cni install` for the node, as its DaemonSet would once the agent is
        up; then check the chain is what the contract says and kmesh-cni can be found."""
        argv = [*KMESH_PLUGIN, "cni", "install", "--config", str(self.state / f"{node}.toml")]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        output = (done.stdout + done.stderr).strip()
        if done.returncode != 0:
            raise LabError(f"kmesh-plugin cni install for node {node} failed "
                           f"(exit {done.returncode}): {output}")
        plugins = cni.load_conflist(self.conflist_path(node))["plugins"]
        want = {"type": KMESH_CNI, "pinDir": str(self.pin_root / node),
                "stateDir": str(self.cni_state_dir(node))}
        last = plugins[-1]
        if [p["type"] for p in plugins] != ["bridge", KMESH_CNI] or any(
                last.get(k) != v for k, v in want.items()):
            raise LabError(f"after kmesh-plugin cni install, {self.conflist_path(node)} has "
                           f"plugins {json.dumps(plugins)}; expected bridge, then {want}")
        cni.find_plugin(KMESH_CNI, self.cni_path(node))  # in the node's bin dir, executable
        self.print(f"  node {node}: {output.splitlines()[-1] if output else 'cni installed'}")

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

    def _targets(self) -> dict[str, int]:
        """Per resource the agents read: the resourceVersion of its last change."""
        return {r.plural: self.api.last_change(r.plural) for r in WATCHED}

    def _applied(self, status: dict[str, Any] | None, targets: dict[str, int]) -> bool:
        if not status:
            return False
        revision = status.get("source_revision")
        if self.source == "manifests":
            return revision is not None and int(revision) >= self._mirror_revision
        if not isinstance(revision, dict):
            return False
        return all(int(revision.get(p) or 0) >= rv for p, rv in targets.items())

    def converge(self, timeout: float = CONVERGE_TIMEOUT) -> None:
        """Wait until every agent has applied the API server's current state to its maps."""
        targets = self._targets()
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
                    if not self._applied(_read_json(self.status_path(node)), targets):
                        lagging.append(node)
                if not lagging:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    want = self._mirror_revision if self.source == "manifests" else targets
                    raise LabError(
                        f"agents {', '.join(lagging)} did not reach {want} within "
                        f"{timeout:.0f} s; last log of {lagging[0]}:\n{self.agent_log(lagging[0])}"
                    )
                watch.wait(min(remaining, 1.0))  # status files are replaced by rename

    def settle(self) -> None:
        """Run the controllers until nothing changes, then wait for the agents."""
        self.reconcile()
        self.converge()

    # -- objects: what kubectl would do -----------------------------------------------------

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
        for doc, (kind, ns, _name) in zip(docs, refs, strict=True):
            if kind in ("Deployment", "Pod"):
                kube.pod_specs(doc, ns)  # images and containers: refused before anything runs
        done = []
        # Namespaces first, then Services, then workloads: the order kubectl users rely on.
        order = {"Namespace": 0, "Service": 1, "EndpointSlice": 2, "Deployment": 3, "Pod": 3}
        for doc, (kind, ns, name) in sorted(zip(docs, refs, strict=True),
                                            key=lambda t: order[t[1][0]]):
            if ns and self.client.get("Namespace", None, ns) is None:
                self.client.create({"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": ns}})
            doc = json.loads(json.dumps(doc))  # a private, plain copy
            if ns:
                doc["metadata"]["namespace"] = ns
            done.append(self._apply_one(doc, kind, ns, name))
        self.settle()
        self._check_scheduled()
        return done

    def _apply_one(self, doc: dict[str, Any], kind: str, ns: str, name: str) -> str:
        noun = {"Deployment": "deployment.apps", "EndpointSlice":
                "endpointslice.discovery.k8s.io"}.get(kind, kind.lower())
        current = self.client.get(kind, ns or None, name)
        try:
            if current is None:
                self.client.create(doc)
                return f"{noun}/{name} created"
            if kind == "Pod":
                # A Pod's spec cannot change: kubectl users delete and create it again.
                self._delete_and_wait("Pod", ns, name)
                self.client.create(doc)
                return f"{noun}/{name} configured"
            doc["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            self.client.replace(doc)
            return f"{noun}/{name} configured"
        except ApiStatusError as e:
            raise LabError(f"{kind} {ns + '/' if ns else ''}{name}: {e}") from None

    def delete(self, kind: str, namespace: str | None, name: str) -> str:
        ns = "" if kind == "Namespace" else (namespace or "default")
        if self.client.get(kind, ns or None, name) is None:
            raise LabError(f'{kind} "{name}" not found' + (f" in namespace {ns}" if ns else ""))
        if kind == "Namespace":
            # The namespace controller's job: everything in it goes first.
            for k in ("Deployment", "Pod", "Service", "EndpointSlice"):
                for obj in self.client.list(k, name):
                    self.client.delete(k, name, obj["metadata"]["name"])
        self.client.delete(kind, ns or None, name)
        self.settle()
        if kind == "Pod":
            self._wait_gone("Pod", ns, name)
        return f"{kind.lower()}/{name} deleted"

    def label(self, node: str, labels: Mapping[str, str | None]) -> str:
        """`kubectl label node --overwrite`: None removes a label."""
        current = self.client.get("Node", None, node)
        if current is None:
            raise LabError(f'node "{node}" not found (nodes: {", ".join(self.nodes)})')
        self.client.patch("Node", None, node, {"metadata": {"labels": {
            str(k): (None if v is None else str(v)) for k, v in labels.items()}}})
        self.settle()  # slices carry the node's zone
        return f"node/{node} labeled"

    def _delete_and_wait(self, kind: str, ns: str, name: str) -> None:
        self.client.delete(kind, ns, name)
        self.settle()
        self._wait_gone(kind, ns, name)

    def _wait_gone(self, kind: str, ns: str, name: str) -> None:
        deadline = time.monotonic() + CONVERGE_TIMEOUT
        while self.client.get(kind, ns, name) is not None:
            if time.monotonic() > deadline:
                raise LabError(f"{kind} {ns}/{name} was not removed within "
                               f"{CONVERGE_TIMEOUT:.0f} s")
            self.reconcile()

    def _check_scheduled(self) -> None:
        for pod in self.client.list("Pod"):
            for cond in (pod.get("status") or {}).get("conditions") or []:
                if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                    meta = pod["metadata"]
                    raise LabError(f"Pod {meta['namespace']}/{meta['name']}: "
                                   f"{cond.get('message')}")

    # -- admission: what the API server itself would do ------------------------------------

    def _admit(self, verb: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        if verb not in ("create", "update"):
            return
        try:
            if obj.get("kind") == "Service":
                self._admit_service(obj, old)
            elif obj.get("kind") in ("Deployment", "Pod"):
                # An image the lab cannot run is refused at once, with the images it can run,
                # rather than left as a pod that never starts (kubectl apply says why).
                kube.pod_specs(obj, obj["metadata"].get("namespace") or "default")
        except KmeshError as e:  # answered as the real API server refuses an invalid object
            raise ApiError(422, str(e), "Invalid") from None

    def _after_write(self, user_agent: str, revision: int) -> None:
        barrier = self.write_barrier  # once: the controllers' stop may clear it meanwhile
        if barrier is not None and not user_agent.startswith(USER_AGENT):
            barrier(revision)

    def _admit_service(self, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        from kmesh_plugin.model.objects import DEFAULT_AFFINITY_TIMEOUT, parse

        meta = obj["metadata"]
        spec = obj.setdefault("spec", {})
        if old is not None and not spec.get("clusterIPs") and not spec.get("clusterIP"):
            # Immutable once allocated: an update without them keeps the old ones.
            old_spec = old.get("spec") or {}
            for key in ("clusterIP", "clusterIPs", "ipFamilies"):
                if key in old_spec:
                    spec[key] = old_spec[key]
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
        spec.setdefault("type", "ClusterIP")
        # SetDefaults_Service: sessionAffinity None drops its config; ClientIP without a
        # timeout gets the default one (a config of the wrong shape is left for parse to
        # refuse, with the field named).
        if spec.get("sessionAffinity") in (None, ""):
            spec["sessionAffinity"] = "None"
        if spec["sessionAffinity"] == "None":
            spec.pop("sessionAffinityConfig", None)
        elif spec["sessionAffinity"] == "ClientIP":
            config = spec.get("sessionAffinityConfig")
            client_ip = config.get("clientIP") if isinstance(config, dict) else None
            if config is None or (isinstance(config, dict) and client_ip is None):
                spec["sessionAffinityConfig"] = {
                    "clientIP": {"timeoutSeconds": DEFAULT_AFFINITY_TIMEOUT}}
            elif isinstance(client_ip, dict) and client_ip.get("timeoutSeconds") is None:
                client_ip["timeoutSeconds"] = DEFAULT_AFFINITY_TIMEOUT
        self.cluster_ips.assign(obj, (meta["namespace"], meta["name"]))
        parse(obj, "lab")  # the agents will parse it too: reject it here with the same words

    # -- the controllers --------------------------------------------------------------------

    def reconcile(self, rounds: int = 20) -> None:
        """Run the Deployment controller, scheduler, kubelets and EndpointSlice controller
        until a round changes nothing."""
        for _ in range(rounds):
            changed = self._namespaces()
            changed |= self._deployments()
            changed |= self._schedule()
            changed |= self._kubelets()
            changed |= self._endpoint_slices()
            if not changed:
                break
        self._release_cluster_ips()
        self._write_hosts()
        self._mirror()

    def _namespaces(self) -> bool:
        """The namespace controller: what lives in a deleted Namespace goes too (kubectl
        delete namespace; Lab.delete does the same at once)."""
        changed = False
        existing = {ns["metadata"]["name"] for ns in self.client.list("Namespace")}
        for kind in ("Deployment", "Service", "Pod"):
            for obj in self.client.list(kind):
                meta = obj["metadata"]
                if meta["namespace"] not in existing and not (
                        kind == "Pod" and kube.pod_terminating(obj)):
                    self.client.delete(kind, meta["namespace"], meta["name"])
                    changed = True
        return changed

    def _deployments(self) -> bool:
        """Pods for each Deployment's replicas of its current template; orphans deleted."""
        changed = False
        pods = self.client.list("Pod")
        deployments = {d["metadata"]["uid"]: d for d in self.client.list("Deployment")}
        for uid, dep in deployments.items():
            meta, spec = dep["metadata"], dep.get("spec") or {}
            digest = kube.template_hash(spec.get("template") or {})
            owned = [p for p in pods if (kube.owner_of(p) or ("", ""))[1] == uid]
            live = [p for p in owned if not kube.pod_terminating(p)]
            current = [p for p in live
                       if (p["metadata"].get("labels") or {}).get(kube.TEMPLATE_HASH_LABEL)
                       == digest]
            replicas = spec.get("replicas", 1)
            stale = [p for p in live if p not in current]
            extra = sorted(current, key=lambda p: p["metadata"]["name"])[replicas:]
            for p in stale + extra:
                self.client.delete("Pod", meta["namespace"], p["metadata"]["name"])
                changed = True
            for _ in range(max(0, replicas - len(current))):
                self.client.create(kube.pod_for(dep))
                changed = True
            ready = sum(1 for p in current if kube.pod_ready(p))
            status = {
                "observedGeneration": meta.get("generation", 1),
                "replicas": len(owned), "updatedReplicas": len(current),
                "readyReplicas": ready, "availableReplicas": ready,
                "unavailableReplicas": max(0, replicas - ready),
                "conditions": [{"type": "Available",
                                "status": "True" if ready >= replicas else "False"}],
            }
            if (dep.get("status") or {}) != status:
                self.client.patch("Deployment", meta["namespace"], meta["name"],
                                  {"status": status}, subresource="status")
        # The garbage collector: pods whose Deployment is gone.
        for p in pods:
            owner = kube.owner_of(p)
            if owner and owner[1] not in deployments and not kube.pod_terminating(p):
                self.client.delete("Pod", p["metadata"]["namespace"], p["metadata"]["name"])
                changed = True
        return changed

    def _schedule(self) -> bool:
        """Bind each unscheduled pod to a node its nodeSelector fits, least loaded first."""
        changed = False
        nodes = self.nodes
        pods = self.client.list("Pod")
        load: dict[str, int] = {}
        for p in pods:
            node = (p.get("spec") or {}).get("nodeName")
            if node:
                load[node] = load.get(node, 0) + 1
        for p in pods:
            meta, spec = p["metadata"], p.get("spec") or {}
            if spec.get("nodeName") or kube.pod_terminating(p):
                continue
            try:
                node = kube.schedule(kube.pod_spec_of(p), nodes, load)
            except LabError as e:
                condition = {"type": "PodScheduled", "status": "False",
                             "reason": "Unschedulable", "message": str(e)}
                if condition not in ((p.get("status") or {}).get("conditions") or []):
                    self.client.patch("Pod", meta["namespace"], meta["name"],
                                      {"status": {"phase": "Pending",
                                                  "conditions": [condition]}},
                                      subresource="status")
                continue
            self.client.patch("Pod", meta["namespace"], meta["name"],
                              {"spec": {"nodeName": node}})
            load[node] = load.get(node, 0) + 1
            changed = True
        return changed

    def _kubelets(self) -> bool:
        """Start scheduled pods; a deleted pod turns terminating, the agents converge on
        that, then it stops and its object goes (graceful deletion)."""
        changed = False
        pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p
                for p in self.client.list("Pod")}
        for key, running in list(self.pods.items()):
            obj = pods.get(key)
            if obj is None or obj["metadata"].get("uid") != running.extra.get("uid"):
                self._stop_pod(running)  # removed without grace: stop at once
                del self.pods[key]
                changed = True
        for (ns, name), p in pods.items():
            if kube.pod_terminating(p) and (ns, name) not in self.pods:
                self.client.delete("Pod", ns, name, grace_seconds=0)  # it never ran here
                changed = True
        terminating = [self.pods[k] for k, p in pods.items()
                       if k in self.pods and kube.pod_terminating(p)]
        if terminating:
            for pod in terminating:
                pod.terminating = True
            # Endpoints turn serving+terminating and every agent applies that before the
            # processes stop: a connect in between never meets a dead endpoint.
            self._endpoint_slices()
            self._mirror()
            self.converge()
            for pod in terminating:
                self._stop_pod(pod)
                del self.pods[(pod.spec.namespace, pod.spec.name)]
                self.client.delete("Pod", pod.spec.namespace, pod.spec.name, grace_seconds=0)
                self.print(f"  pod {pod.spec.namespace}/{pod.spec.name} on {pod.node} deleted")
            changed = True
        for key, obj in pods.items():
            node = (obj.get("spec") or {}).get("nodeName")
            if key in self.pods or not node or kube.pod_terminating(obj):
                continue
            if node not in self.initial_nodes:
                continue  # a node without a kubelet in this lab
            self._start_pod(obj, node)
            changed = True
        return changed

    def _endpoint_slices(self) -> bool:
        """Every selector Service's EndpointSlices, from the Pods' status."""
        changed = False
        nodes = self.nodes
        zones = {n: labels.get("topology.kubernetes.io/zone", "") for n, labels in nodes.items()}
        pods = self.client.list("Pod")
        ours = {(s["metadata"]["namespace"], s["metadata"]["name"]): s
                for s in self.client.list("EndpointSlice",
                                          label_selector=f"{kube.MANAGED_BY_LABEL}=kmesh-lab")}
        want: dict[tuple[str, str], dict[str, Any]] = {}
        for svc in self.client.list("Service"):
            for s in kube.endpoint_slices(svc, pods, zones):
                want[(s["metadata"]["namespace"], s["metadata"]["name"])] = s
        for key, s in want.items():
            have = ours.get(key)
            if have is None:
                self.client.create(s)
                changed = True
            elif (have.get("endpoints"), have.get("ports")) != (s["endpoints"], s["ports"]):
                s["metadata"]["resourceVersion"] = have["metadata"]["resourceVersion"]
                self.client.replace(s)
                changed = True
        for key in ours.keys() - want.keys():
            self.client.delete("EndpointSlice", *key)
            changed = True
        return changed

    def _release_cluster_ips(self) -> None:
        existing = {(s["metadata"]["namespace"], s["metadata"]["name"])
                    for s in self.client.list("Service")}
        for key in {owner for owner in self.cluster_ips.used.values()} - existing:
            self.cluster_ips.release(key)

    def _mirror(self) -> None:
        """Manifests mode: write what the agents read into their directory, then .revision."""
        if self.source != "manifests":
            return
        revision = self.api.revision
        if revision == self._mirror_revision:
            return
        keep = set()
        for kind in AGENT_KINDS:
            for obj in self.client.list(kind):
                meta = obj["metadata"]
                name = f"{kind}_{meta.get('namespace') or '_'}_{meta['name']}.yaml"
                keep.add(name)
                path = self.manifests / name
                text = yaml.safe_dump(obj, sort_keys=False)
                if not path.exists() or path.read_text() != text:
                    _atomic_write(path, text)
        for path in self.manifests.glob("*.yaml"):
            if path.name not in keep:
                path.unlink()
        self._mirror_revision = revision
        _atomic_write(self.manifests / ".revision", str(revision))

    def _write_hosts(self) -> None:
        services = self.client.list("Service") if self.kube is not None else []
        _atomic_write(self.state / "hosts", kube.hosts_file(services))

    # -- pods -------------------------------------------------------------------------------

    def _sandbox(self, spec: kube.PodSpec, node: str, uid: str, *,
                 enrol: bool) -> RunningPod:
        """A pod's network namespace wired as the node's runtime does (see the module doc);
        ``enrol``: the node's conflist (with kmesh-cni in cni mode), else the primary CNI's
        config alone. Returns the pod, with its addresses, netns cookie and cgroup."""
        self._pod_seq += 1
        ns_name = f"{self.name}-p{self._pod_seq}"
        container_id = f"{self.name}-p{self._pod_seq}"  # the sandbox id
        netns.add(ns_name, lo_up=False)  # the loopback plugin brings lo up
        pod = RunningPod(spec, node, ip="", extra={"netns": ns_name, "cid": container_id,
                                                    "procs": [], "uid": uid,
                                                    "enrolled": False})
        if enrol and self.enrolment == "cni":
            # Enrolment precedes the pod's first connect only if the datapath is attached in
            # cni mode when the chain runs: refuse to start the pod otherwise.
            mode = self.enrolment_mode(node)
            if mode != "cni":
                raise LabError(f"node {node}'s datapath is in {mode} mode, not cni: "
                               f"pod {spec.namespace}/{spec.name} cannot be enrolled")
            config = cni.load_conflist(self.conflist_path(node))  # read per ADD, as runtimes do
        else:
            config = self.primary_cni_config(node)
        address = self.fabric.add_pod(
            ns_name, container_id, config=config, loopback=True, cni_path=self.cni_path(node),
            cni_args=cni.k8s_args(spec.namespace, spec.name, container_id, uid),
        )
        pod.ip, pod.ipv6 = address.ipv4, address.ipv6
        pod.extra["cookie"] = cookie = cni.netns_cookie(ns_name)
        if self.enrolment == "cni":
            enrolled = cookie in self.enrolled_cookies(node)
            if enrolled != enrol:
                raise LabError(f"pod {spec.namespace}/{spec.name} on {node}: its netns cookie "
                               f"{cookie} is {'not ' if enrol else ''}in kmesh_enrolled after "
                               f"CNI ADD{' through kmesh-cni' if enrol else ' without it'}")
            pod.extra["enrolled"] = enrolled
        return pod

    def _start_pod(self, obj: dict[str, Any], node: str) -> RunningPod:
        spec = kube.pod_spec_of(obj)
        pod = self._sandbox(spec, node, obj["metadata"]["uid"], enrol=True)
        self.pods[(spec.namespace, spec.name)] = pod
        self._start_containers(pod, self.cgroup / node / spec.name)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ips = [{"ip": pod.ip}] + ([{"ip": pod.ipv6}] if pod.ipv6 else [])
        conditions = [{"type": t, "status": "True", "lastTransitionTime": now}
                      for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
        self.client.patch("Pod", spec.namespace, spec.name, {"status": {
            "phase": "Running", "podIP": pod.ip, "podIPs": ips, "hostIP": "127.0.0.1",
            "startTime": now, "conditions": conditions,
            "containerStatuses": [
                {"name": c.get("name"), "ready": True, "started": True, "restartCount": 0,
                 "image": c.get("image"), "imageID": "",
                 "state": {"running": {"startedAt": now}}}
                for c in (obj.get("spec") or {}).get("containers") or []],
        }}, subresource="status")
        enrolled = " (enrolled)" if pod.extra["enrolled"] else ""
        self.print(f"  pod {spec.namespace}/{spec.name} running on {node} at {pod.ip}, "
                   f"{pod.ipv6}{enrolled}")
        return pod

    def _start_containers(self, pod: RunningPod, pod_cgroup: Path) -> None:
        """The pod's processes, in its netns and in a cgroup below its node's; returns once
        each reported ready (the kubelet's readiness probe)."""
        spec = pod.spec
        procs.make_cgroup(str(pod_cgroup))
        pod.extra["cgroup"] = str(pod_cgroup)
        for c in spec.containers:
            if c.kind == "helloworld":
                port = int(c.ports[0]["containerPort"]) if c.ports else 5000
                argv = [*WORKLOADS, "helloworld", "--port", str(port),
                        "--version", c.env.get("SERVICE_VERSION", "v1"), "--instance", spec.name]
                stdin = subprocess.DEVNULL
            elif c.kind == "dns":
                udp = [p for p in c.ports if str(p.get("protocol", "TCP")).upper() == "UDP"]
                port = int(udp[0]["containerPort"]) if udp else 53
                argv = [*WORKLOADS, "dns", "--port", str(port), "--instance", spec.name]
                stdin = subprocess.DEVNULL
            else:
                argv = [*WORKLOADS, "client", "--hosts", str(self.state / "hosts"),
                        "--search", kube.search_domains(spec.namespace)]
                stdin = subprocess.PIPE
            proc = procs.spawn(argv, netns=netns.path(pod.extra["netns"]),
                               cgroup=str(pod_cgroup), stdin=stdin)
            reader = procs.LineReader(proc.stdout)  # type: ignore[arg-type]
            pod.extra["procs"].append((c, proc, reader))
        for _c, _proc, reader in pod.extra["procs"]:
            reader.expect("ready", START_TIMEOUT)  # kubelet's readiness probe
        pod.ready = True

    def _stop_pod(self, pod: RunningPod) -> None:
        for _c, proc, _reader in pod.extra.get("procs", []):
            procs.stop(proc)
        try:
            self.fabric.del_pod(pod.extra["netns"], pod.extra["cid"])
        except Exception as e:  # the namespace still goes; say what the chain left behind
            print(f"lab {self.id}: CNI DEL of pod {pod.spec.namespace}/{pod.spec.name} on "
                  f"{pod.node}: {e}", file=sys.stderr)
        netns.delete(pod.extra["netns"])
        if "cgroup" in pod.extra:
            procs.remove_cgroup_tree(pod.extra["cgroup"])

    def add_unenrolled_pod(self, node: str, name: str = "outsider",
                           namespace: str = "default") -> RunningPod:
        """A curl pod on ``node`` that the node's runtime wired with the primary CNI's config
        alone (loopback, bridge + host-local; no kmesh-cni), as a second runtime or a network
        that does not chain kmesh-cni would. Its processes run in the node's cgroup subtree
        like any pod's; it is no API object (no controller knows it). Use it with
        :meth:`call`; :meth:`remove_unenrolled_pod` or the lab's end removes it.
        ``namespace`` only sets its DNS search list (and its K8S_POD_NAMESPACE)."""
        if node not in self.initial_nodes:
            raise LabError(f'node "{node}" not found (nodes: {", ".join(self.initial_nodes)})')
        if name in self.unenrolled or not _DNS_LABEL.match(name):
            raise LabError(f"an unenrolled pod needs a new DNS label as its name, not {name!r}")
        spec = kube.PodSpec(namespace=namespace, name=name, owner=None, labels={}, node_selector={},
                            containers=[kube.Container("client", "curl", {}, [])])
        pod = self._sandbox(spec, node, f"unenrolled-{secrets.token_hex(8)}", enrol=False)
        self.unenrolled[name] = pod
        # "_" cannot begin a Pod name: this cgroup never meets a Pod's.
        self._start_containers(pod, self.cgroup / node / f"_unenrolled-{name}")
        self.print(f"  unenrolled pod {name} running on {node} at {pod.ip}, {pod.ipv6}")
        return pod

    def remove_unenrolled_pod(self, name: str) -> None:
        """Stop an unenrolled pod and DEL its network (the same config it was added with)."""
        pod = self.unenrolled.pop(name, None)
        if pod is None:
            raise LabError(f"no unenrolled pod {name!r}")
        self._stop_pod(pod)

    def enrolment_mode(self, node: str) -> str:
        """"all" or "cni", as the node's datapath has it now (its kmesh_config map)."""
        dp = Datapath.open(self.pin_root / node)
        try:
            return records.ENROL_NAMES.get(dp.enrolment(), f"unknown ({dp.enrolment()})")
        finally:
            dp.close()

    def enrolled_cookies(self, node: str) -> set[int]:
        """The netns cookies in the node's kmesh_enrolled map."""
        dp = Datapath.open(self.pin_root / node)
        try:
            return set(dp.enrolled())
        finally:
            dp.close()

    def pods_on(self, node: str) -> list[RunningPod]:
        """The kubelet's running pods on ``node`` (not the unenrolled ones)."""
        return [p for p in self.pods.values() if p.node == node]

    # -- kubectl exec -----------------------------------------------------------------------

    def exec_in_pod(self, req: ExecRequest) -> subprocess.Popen[bytes]:
        """Start ``kubectl exec``'s command in a running pod: in its network namespace and
        its container's cgroup (so the node's datapath translates its connects), with the
        pod's /etc/hosts and resolv.conf bind-mounted in a mount namespace of its own and the
        container's env. The program itself is the host's (the lab pulls no images): curl,
        sh, cat, ... as installed here."""
        obj = self.api.get("Pod", req.namespace, req.pod)  # ApiError 404 as the server's
        names = [c.get("name") for c in (obj.get("spec") or {}).get("containers") or []]
        container = req.container or (names[0] if names else "")
        if container not in names:
            raise ApiError(400, f"container {container} is not valid for pod {req.pod}",
                           "BadRequest")
        pod = self.pods.get((req.namespace, req.pod))
        if pod is None or not pod.ready or pod.terminating:
            raise ApiError(400, f"pod {req.pod} is not running on a node of this lab (phase "
                           f"{(obj.get('status') or {}).get('phase', 'Pending')})", "BadRequest")
        if not req.command:
            raise ApiError(400, "you must specify at least one command for the container",
                           "BadRequest")
        spec = next((c for c in pod.spec.containers if c.name == container), None)
        etc = self.state / "exec" / req.namespace
        etc.mkdir(parents=True, exist_ok=True)
        services = self.api.list("Service")
        _atomic_write(etc / "hosts", kube.pod_hosts_file(services, req.namespace))
        _atomic_write(etc / "resolv.conf", kube.resolv_conf(req.namespace))
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/root", "HOSTNAME": req.pod, **(spec.env if spec else {})}
        try:
            proc = procs.spawn(
                req.command, netns=netns.path(pod.extra["netns"]), cgroup=pod.extra["cgroup"],
                env=env, cwd="/",
                stdin=subprocess.PIPE if req.stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if req.stdout else subprocess.DEVNULL,
                stderr=subprocess.PIPE if req.stderr else subprocess.DEVNULL,
                binds={"/etc/hosts": str(etc / "hosts"),
                       "/etc/resolv.conf": str(etc / "resolv.conf")},
            )
        except OSError as e:
            # What the kubelet answers when the runtime cannot start the command.
            raise ApiError(500, f"failed to exec in container: failed to start exec: "
                           f"{req.command[0]}: {e.strerror or e}", "InternalError") from None
        with self._execs_lock:
            self.execs = [p for p in self.execs if p.poll() is None] + [proc]
        return proc

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
                family: int | None = None, endpoint: bool = False) -> list[dict[str, Any]]:
        """``count`` GETs, each on a new connection. ``family`` 6 resolves names to the
        Service's IPv6 ClusterIP (default: the first, IPv4 for a dual-stack Service);
        ``endpoint``: each result names the endpoint the connection reached."""
        pod = self.client_pod(namespace, deployment, pod_name)
        command: dict[str, Any] = {"op": "get", "url": url, "count": count, "timeout": timeout,
                                   "endpoint": endpoint}
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
        for state in sorted(p for p in STATE_ROOT.iterdir() if p.is_dir()):
            record = _read_json(state / "lab.json") or {}
            pidfd = runner_pidfd(record)
            if pidfd is not None:
                try:
                    if (owner := int(record["pid"])) != os.getpid():
                        done.append(f"lab {state.name}: its runner (pid {owner}) is alive; "
                                    "stopping it")
                        done += stop_runner(pidfd, owner, RUNNER_STOP_TIMEOUT)
                finally:
                    os.close(pidfd)
            done.append(_remove_state(state, record))
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


def teardown_left_by(pid: int) -> list[str]:
    """Remove the labs whose runner was ``pid``, now killed before it could remove them."""
    if not STATE_ROOT.exists():
        return []
    return [_remove_state(state, record) for state in sorted(STATE_ROOT.iterdir())
            if state.is_dir() and (record := _read_json(state / "lab.json") or {}).get("pid")
            == pid]


def _remove_state(state: Path, record: Mapping[str, Any]) -> str:
    """teardown() of one state dir, with the names a lab derives from its id where the record
    lacks them (it may be cut short by a crash)."""
    problems = teardown(state, {
        "netns_prefix": f"{PREFIX}{state.name}",
        "cgroup": str(Path(cgroup2_root()) / f"{PREFIX}{state.name}"),
        "pin_root": str(BPFFS_DEFAULT / f"{PREFIX}{state.name}"),
        **record,
    })
    return f"lab {state.name}: removed" + (f" ({'; '.join(problems)})" if problems else "")


def stop_runner(pidfd: int, pid: int, timeout: float) -> list[str]:
    """SIGTERM a lab's runner and wait for it to remove its lab; after ``timeout``, SIGKILL it
    (its whole process group if it leads a session, as `lab up`'s daemon does) and leave the
    rest to teardown(). Returns what had to be done beyond the SIGTERM."""
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    if select.select([pidfd], [], [], timeout)[0]:
        return []
    with contextlib.suppress(ProcessLookupError):
        if os.getsid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    select.select([pidfd], [], [], 10)
    return [f"runner pid {pid}: still running after {timeout:.0f} s; killed"]


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (/proc/PID/stat field 22): with
    the pid it names one process, which a pid alone stops doing once the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def runner_pidfd(record: Mapping[str, Any]) -> int | None:
    """A pidfd of the process that wrote this lab record, while it runs; None once it ended,
    including when its pid now belongs to another process (whose start time differs). A
    record without ``pid_start`` (an older one) trusts the pid."""
    pid = int(record.get("pid") or 0)
    if pid <= 0:
        return None
    try:
        pidfd = os.pidfd_open(pid)  # pins the process: the check below is about this one
    except ProcessLookupError:
        return None
    if record.get("pid_start") is not None and start_ticks(pid) != record["pid_start"]:
        os.close(pidfd)
        return None
    return pidfd


def runner_alive(record: Mapping[str, Any]) -> bool:
    pidfd = runner_pidfd(record)
    if pidfd is None:
        return False
    os.close(pidfd)
    return True


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (0 and negatives: no)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_resources(state: Path, lab_id: str, name: str, pin_root: Path,
                     cgroup: Path | None = None) -> None:
    """The lab record (<state>/lab.json) of a bench that builds its own room: what `lab
    down` reads to remove it after a crash (its netns prefix, pin root and cgroup)."""
    record: dict[str, Any] = {"id": lab_id, "pid": os.getpid(),
                              "pid_start": start_ticks(os.getpid()), "pin_root": str(pin_root),
                              "netns_prefix": name, "agents": {}}
    if cgroup is not None:
        record["cgroup"] = str(cgroup)
    _atomic_write(state / "lab.json", json.dumps(record))


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
