"""deploy/: the manifests, the Dockerfile and the capability table agree with the code.

Every check is a function of the parsed files (``Deploy``), run once on the real files and once
per entry of ``BREAKAGES`` on a copy broken on purpose, where it must fail: no check here can
pass whatever the files say.
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from kmesh_plugin import config as config_mod
from kmesh_plugin.errors import ConfigError

try:
    from kmesh_plugin.sources.kubernetes import WATCHED
except ImportError:  # that module is still being written; it re-exports this tuple
    from kmesh_plugin.sources.resources import WATCHED

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NAMESPACE = "kmesh-system"
READ_ONLY_VERBS = {"get", "list", "watch"}
CONFIG_KEY = "plugin.toml"
WHEEL_PROJECTS = (ROOT, ROOT / "hooks" / "local", ROOT / "hooks" / "prefer_close")

# kind -> (apiVersion, namespaced)
KINDS = {
    "Namespace": ("v1", False),
    "ServiceAccount": ("v1", True),
    "ConfigMap": ("v1", True),
    "ClusterRole": ("rbac.authorization.k8s.io/v1", False),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", False),
    "DaemonSet": ("apps/v1", True),
}


@dataclass
class Deploy:
    texts: dict[str, str]  # manifest file name -> its text
    docs: list[dict[str, Any]]
    readme: str  # deploy/README.md
    main_readme: str  # README.md (the measured RSS)
    dockerfile: str

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("kind") == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        return self.one("DaemonSet")["spec"]["template"]["spec"]

    @property
    def agent(self) -> dict[str, Any]:
        """The container that runs `kmesh-plugin run`."""
        found = [c for c in self.pod["containers"] if "run" in (c.get("command") or [])]
        assert len(found) == 1, "expected one container running `kmesh-plugin run`"
        return found[0]

    def plugin_toml(self) -> dict[str, Any]:
        return tomllib.loads(self.one("ConfigMap")["data"][CONFIG_KEY])


def load_deploy() -> Deploy:
    texts = {p.name: p.read_text() for p in sorted(DEPLOY.glob("*.y*ml"))}
    docs = [d for text in texts.values() for d in yaml.safe_load_all(text) if d is not None]
    return Deploy(texts, docs, (DEPLOY / "README.md").read_text(),
                  (ROOT / "README.md").read_text(), (DEPLOY / "Dockerfile").read_text())


REAL = load_deploy()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def volumes(d: Deploy) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in d.pod.get("volumes") or []}


def mount_of(d: Deploy, path: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The agent's volumeMount holding ``path`` (the deepest one), and its volume."""
    p = PurePosixPath(path)
    best = None
    for m in d.agent.get("volumeMounts") or []:
        mp = PurePosixPath(m["mountPath"])
        if (p == mp or mp in p.parents) and (
            best is None or len(mp.parts) > len(PurePosixPath(best["mountPath"]).parts)
        ):
            best = m
    if best is None:
        return None
    return best, volumes(d)[best["name"]]


def host_path(volume: dict[str, Any]) -> str | None:
    return (volume.get("hostPath") or {}).get("path")


def config_path(d: Deploy) -> str:
    """Where the agent container sees the ConfigMap's plugin.toml."""
    cm = d.one("ConfigMap")["metadata"]["name"]
    for m in d.agent.get("volumeMounts") or []:
        vol = volumes(d)[m["name"]]
        if (vol.get("configMap") or {}).get("name") == cm:
            items = vol["configMap"].get("items")
            name = next((i["path"] for i in items if i["key"] == CONFIG_KEY), None) if items \
                else CONFIG_KEY
            assert name, f"the ConfigMap volume does not project {CONFIG_KEY}"
            return str(PurePosixPath(m["mountPath"]) / name)
    raise AssertionError("the agent container does not mount the ConfigMap")


def readme_capabilities(readme: str) -> set[str]:
    """The capability table of deploy/README.md: the rows whose last column says yes."""
    section = readme.split("## Capabilities", 1)
    assert len(section) == 2, "deploy/README.md has no '## Capabilities' section"
    caps = set()
    for line in section[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`?CAP_([A-Z_]+)`?", cells[0]) if line.startswith("|") else None
        if m and cells[-1].lower().startswith("yes"):
            caps.add(m.group(1))
    return caps


def quantity(value: str) -> float:
    """A Kubernetes memory quantity in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|K|M|G)?", str(value))
    assert m, f"not a memory quantity: {value}"
    scale = {None: 1, "K": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return float(m.group(1)) * scale[m.group(2)]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                out.append((word.upper(), rest))
            current = ""
    return out


# --------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------


def check_parse(d: Deploy) -> None:
    assert d.texts, "no manifest in deploy/"
    for name, text in d.texts.items():
        try:
            docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
        except yaml.YAMLError as e:
            raise AssertionError(f"{name}: {e}") from None
        assert docs, f"{name}: no document"
        for doc in docs:
            assert isinstance(doc, dict), f"{name}: a document is not a mapping"


def check_required_fields(d: Deploy) -> None:
    seen = set()
    for doc in d.docs:
        kind = doc.get("kind")
        assert kind in KINDS, f"unexpected kind {kind!r}"
        api_version, namespaced = KINDS[kind]
        meta = doc.get("metadata") or {}
        assert doc.get("apiVersion") == api_version, f"{kind}: apiVersion {api_version}"
        assert meta.get("name"), f"{kind}: metadata.name"
        if namespaced:
            assert meta.get("namespace") == NAMESPACE, f"{kind} {meta['name']}: namespace"
        else:
            assert "namespace" not in meta, f"{kind} {meta['name']} is cluster-scoped"
        assert (kind, meta["name"]) not in seen, f"{kind} {meta['name']} twice"
        seen.add((kind, meta["name"]))
    kinds = {k for k, _ in seen}
    assert kinds == set(KINDS), f"missing kinds {sorted(set(KINDS) - kinds)}"
    assert d.one("Namespace")["metadata"]["name"] == NAMESPACE

    cm = d.one("ConfigMap")
    assert isinstance(cm.get("data"), dict) and all(
        isinstance(v, str) for v in cm["data"].values()), "ConfigMap data: strings"
    crb = d.one("ClusterRoleBinding")
    assert set(crb.get("roleRef") or {}) >= {"apiGroup", "kind", "name"}, "roleRef fields"
    for s in crb.get("subjects") or []:
        assert s.get("kind") and s.get("name"), "subject kind and name"
    for rule in d.one("ClusterRole").get("rules") or []:
        assert rule.get("verbs"), "a rule without verbs"

    ds = d.one("DaemonSet")["spec"]
    selector = ds["selector"]["matchLabels"]
    labels = ds["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items(), "selector must match the template"
    pod = ds["template"]["spec"]
    assert pod.get("containers"), "DaemonSet: containers"
    vols = volumes(d)
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        assert c.get("name") and c.get("image"), "container name and image"
        for m in c.get("volumeMounts") or []:
            assert m["name"] in vols, f"{c['name']}: volumeMount {m['name']} has no volume"
            assert m["mountPath"].startswith("/"), f"{c['name']}: mountPath absolute"
        names = [e["name"] for e in c.get("env") or []]
        assert len(names) == len(set(names)), f"{c['name']}: env twice"


def check_rbac(d: Deploy) -> None:
    want = {(r.group, r.plural, verb) for r in WATCHED for verb in ("list", "watch")}
    role = d.one("ClusterRole")
    got = set()
    for rule in role.get("rules") or []:
        assert not rule.get("nonResourceURLs"), "nonResourceURLs granted"
        assert not rule.get("resourceNames"), "resourceNames: the agent reads whole collections"
        for verb in rule["verbs"]:
            assert verb in READ_ONLY_VERBS, f"verb {verb!r} is not read-only"
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    assert "*" not in (verb, group, resource), "wildcard in the ClusterRole"
                    got.add((group, resource, verb))
    assert got == want, f"missing {sorted(want - got)}, beyond WATCHED {sorted(got - want)}"
    assert not role.get("aggregationRule"), "an aggregated role grants what others add"


def check_binding(d: Deploy) -> None:
    sa = d.one("ServiceAccount")["metadata"]
    role = d.one("ClusterRole")["metadata"]["name"]
    crb = d.one("ClusterRoleBinding")
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                              "name": role}, "the binding names the ClusterRole"
    assert {"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]} in (
        crb.get("subjects") or []), "the binding names the ServiceAccount"
    assert d.pod.get("serviceAccountName") == sa["name"], "the DaemonSet runs as the SA"
    assert d.pod.get("automountServiceAccountToken", True), "in-cluster config needs the token"


def check_configmap_schema(d: Deploy) -> None:
    """Everything but [source] against config.py's schema (see check_configmap_source)."""
    raw = d.plugin_toml()
    raw.pop("source", None)
    try:
        config_mod._validate(Path(f"ConfigMap:{CONFIG_KEY}"), raw)
    except ConfigError as e:
        raise AssertionError(str(e)) from None
    assert raw["node"]["name"] == "", "one file for every node: the name comes from $NODE_NAME"


def check_configmap_source(d: Deploy) -> None:
    source = d.plugin_toml().get("source") or {}
    assert source.get("kind") == "kubernetes", "[source] kind = kubernetes"
    assert source.get("kubeconfig") == "", "[source] kubeconfig = '' (in-cluster config)"
    if "kubeconfig" not in config_mod.SCHEMA["source"]:
        pytest.skip("kmesh_plugin/config.py does not know [source] kind = kubernetes yet")
    try:
        config_mod._validate(Path(f"ConfigMap:{CONFIG_KEY}"), {"source": source})
    except ConfigError as e:
        raise AssertionError(str(e)) from None


def check_config_paths(d: Deploy) -> None:
    """Every path of the ConfigMap's plugin.toml lies under one of the agent's volumeMounts,
    on the volume it needs."""
    dp = d.plugin_toml()["datapath"]
    agent = d.plugin_toml()["agent"]
    assert dp.get("cgroup"), ("datapath.cgroup must be set: auto-detection in a container "
                              "finds the pod's own cgroup namespace root")
    wants = {
        "datapath.pin_dir": (dp["pin_dir"], {"/sys/fs/bpf"}),
        "datapath.cgroup": (dp["cgroup"], {"/sys/fs/cgroup", "/sys/fs/cgroup/unified"}),
        "datapath.build_dir": (dp["build_dir"], None),
        "agent.status_file": (str(PurePosixPath(agent["status_file"]).parent), None),
    }
    for key, (path, host) in wants.items():
        found = mount_of(d, path)
        assert found is not None, f"{key} = {path} is under no volumeMount of the agent"
        mount, volume = found
        assert host_path(volume), f"{key}: {mount['mountPath']} must be a hostPath (node state)"
        if host is not None:
            assert host_path(volume) in host, f"{key}: hostPath must be one of {sorted(host)}"
    bpffs = mount_of(d, dp["pin_dir"])
    assert bpffs is not None and bpffs[0].get("mountPropagation") in (
        "HostToContainer", "Bidirectional"), "bpffs needs mountPropagation"
    cgroup = mount_of(d, dp["cgroup"])
    assert cgroup is not None and cgroup[0].get("readOnly"), "the cgroup is opened read-only"
    assert mount_of(d, config_path(d)) is not None


def check_node_name(d: Deploy) -> None:
    env = {e["name"]: e for e in d.agent.get("env") or []}
    assert "NODE_NAME" in env, "NODE_NAME is not set"
    ref = (env["NODE_NAME"].get("valueFrom") or {}).get("fieldRef") or {}
    assert ref.get("fieldPath") == "spec.nodeName", "NODE_NAME must come from spec.nodeName"


def check_capabilities(d: Deploy) -> None:
    table = readme_capabilities(d.readme)
    assert table, "deploy/README.md's capability table derives nothing"
    sc = d.agent.get("securityContext") or {}
    caps = sc.get("capabilities") or {}
    add = [c.removeprefix("CAP_") for c in caps.get("add") or []]
    assert len(add) == len(set(add)), "a capability is added twice"
    assert set(add) == table, f"capabilities.add {sorted(add)} != the README's {sorted(table)}"
    assert caps.get("drop") == ["ALL"], "drop ALL, then add exactly the table's"
    assert sc.get("privileged") is False, "the agent runs with privileged: false"
    assert "SYS_ADMIN" not in add, "CAP_SYS_ADMIN stands in for every other capability"
    assert sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation: false"
    for c in d.pod.get("initContainers") or []:
        assert "run" not in (c.get("command") or []), "the agent runs only in its container"


def check_probes(d: Deploy) -> None:
    path = config_path(d)
    # Liveness needs a live agent; readiness also its first sync with the API server.
    wants = {"livenessProbe": ["kmesh-plugin", "status", "--config", path],
             "readinessProbe": ["kmesh-plugin", "status", "--ready", "--config", path]}
    for probe, want in wants.items():
        command = ((d.agent.get(probe) or {}).get("exec") or {}).get("command")
        assert command == want, f"{probe} must run {' '.join(want)}, runs {command}"
    assert d.agent["command"] == ["kmesh-plugin", "run", "--config", path]
    assert CONFIG_KEY in d.one("ConfigMap")["data"]


def check_pod_shape(d: Deploy) -> None:
    pod, spec = d.pod, d.one("DaemonSet")["spec"]
    assert pod.get("hostNetwork") is True, "hostNetwork"
    assert not pod.get("hostPID"), "hostPID is not needed"
    strategy = spec.get("updateStrategy") or {}
    assert strategy.get("type") == "RollingUpdate"
    assert (strategy.get("rollingUpdate") or {}).get("maxUnavailable") == 1
    assert {"operator": "Exists"} in (pod.get("tolerations") or []), "tolerate every taint"
    hosts = {host_path(v): v for v in volumes(d).values() if host_path(v)}
    for cni in ("/etc/cni/net.d", "/opt/cni/bin"):
        assert cni in hosts, f"hostPath {cni} for the chained CNI plugin"
        name = hosts[cni]["name"]
        mounts = [m for m in d.agent.get("volumeMounts") or [] if m["name"] == name]
        assert mounts and not mounts[0].get("readOnly"), f"{cni} mounted writable"
    port = d.plugin_toml()["agent"]["metrics_port"]
    assert port in [p["containerPort"] for p in d.agent.get("ports") or []], "metrics port"


def check_resources(d: Deploy) -> None:
    m = re.search(r"agent RSS \|(?:\s*-\s*\|)?\s*([\d.]+)\s*MB", d.main_readme)  # the N column: -
    assert m, "README.md no longer states the measured agent RSS"
    rss = float(m.group(1)) * 1e6
    res = d.agent.get("resources") or {}
    request = quantity((res.get("requests") or {}).get("memory", "0"))
    limit = quantity((res.get("limits") or {}).get("memory", "0"))
    assert request >= rss, f"memory request {request:.0f} B below the measured RSS {rss:.0f} B"
    assert limit >= request + 100 * 2**20, "the limit leaves room for clang at start-up"


def check_dockerfile(d: Deploy) -> None:
    instructions = dockerfile_instructions(d.dockerfile)
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert len(froms) >= 2, "multi-stage: a wheel stage and a runtime stage"
    runtime = instructions[max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM"):]
    runs = " ".join(args for ins, args in runtime if ins == "RUN")
    for package in ("python3", "clang", "bpftool", "libbpf-dev"):
        assert re.search(rf"\binstall\b.*\s{re.escape(package)}(\s|$)", runs), (
            f"the runtime stage installs {package}")
    for project in WHEEL_PROJECTS:
        name = tomllib.loads((project / "pyproject.toml").read_text())["project"]["name"]
        wheel = re.sub(r"[-_.]+", "_", name).lower()
        assert re.search(rf"pip install[^&]*/{wheel}-\*\.whl", runs), (
            f"the runtime stage does not pip install the {name} wheel")
        rel = project.relative_to(ROOT).as_posix()
        src = "/src" if rel == "." else f"/src/{rel}"
        assert any(re.search(rf"pip wheel[^&]*\s{re.escape(src)}(\s|$)", args)
                   for ins, args in instructions if ins == "RUN"), f"no wheel built from {rel}"


CHECKS: dict[str, Callable[[Deploy], None]] = {
    "parse": check_parse,
    "required_fields": check_required_fields,
    "rbac": check_rbac,
    "binding": check_binding,
    "configmap_schema": check_configmap_schema,
    "configmap_source": check_configmap_source,
    "config_paths": check_config_paths,
    "node_name": check_node_name,
    "capabilities": check_capabilities,
    "probes": check_probes,
    "pod_shape": check_pod_shape,
    "resources": check_resources,
    "dockerfile": check_dockerfile,
}


@pytest.mark.parametrize("name", CHECKS)
def test_deploy(name: str) -> None:
    CHECKS[name](REAL)


# --------------------------------------------------------------------------------------------
# every check fails on a copy broken on purpose
# --------------------------------------------------------------------------------------------


def _set_toml(d: Deploy, section: str, key: str, value: Any) -> None:
    raw = d.plugin_toml()
    raw.setdefault(section, {})[key] = value
    lines = []
    for sec, table in raw.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    d.one("ConfigMap")["data"][CONFIG_KEY] = "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(i) for i in v) + "]"
    return str(v)


def _mount(d: Deploy, name: str) -> dict[str, Any]:
    return next(m for m in d.agent["volumeMounts"] if m["name"] == name)


def _caps(d: Deploy) -> dict[str, Any]:
    return d.agent["securityContext"]["capabilities"]


def _role_rules(d: Deploy) -> list[dict[str, Any]]:
    return d.one("ClusterRole")["rules"]


BREAKAGES: list[tuple[str, str, Callable[[Deploy], None]]] = [
    ("parse", "unclosed flow sequence",
     lambda d: d.texts.update({"kmesh-plugin.yaml": "kind: [Namespace\n"})),
    ("parse", "a document that is a list", lambda d: d.texts.update({"x.yaml": "- a\n- b\n"})),
    ("required_fields", "no metadata.name",
     lambda d: d.one("ServiceAccount")["metadata"].pop("name")),
    ("required_fields", "wrong namespace",
     lambda d: d.one("ConfigMap")["metadata"].update(namespace="default")),
    ("required_fields", "selector does not match the template",
     lambda d: d.one("DaemonSet")["spec"]["selector"]["matchLabels"].update(app="other")),
    ("required_fields", "a mount without a volume",
     lambda d: d.agent["volumeMounts"].append({"name": "ghost", "mountPath": "/ghost"})),
    ("required_fields", "wrong apiVersion",
     lambda d: d.one("DaemonSet").update(apiVersion="extensions/v1beta1")),
    ("rbac", "a missing resource (endpointslices)", lambda d: _role_rules(d).pop()),
    ("rbac", "get beyond list and watch", lambda d: _role_rules(d)[0]["verbs"].append("get")),
    ("rbac", "a write verb", lambda d: _role_rules(d)[0]["verbs"].append("patch")),
    ("rbac", "a resource the agent does not read",
     lambda d: _role_rules(d)[0]["resources"].append("pods")),
    ("rbac", "a wildcard", lambda d: _role_rules(d).append(
        {"apiGroups": ["*"], "resources": ["*"], "verbs": ["list"]})),
    ("rbac", "watch missing", lambda d: _role_rules(d)[1]["verbs"].remove("watch")),
    ("binding", "the DaemonSet runs as another account",
     lambda d: d.pod.update(serviceAccountName="default")),
    ("binding", "the binding names another account",
     lambda d: d.one("ClusterRoleBinding")["subjects"][0].update(name="other")),
    ("binding", "the binding names another role",
     lambda d: d.one("ClusterRoleBinding")["roleRef"].update(name="view")),
    ("configmap_schema", "an unknown key", lambda d: _set_toml(d, "datapath", "colour", "red")),
    ("configmap_schema", "a wrong type",
     lambda d: _set_toml(d, "datapath", "max_endpoints", "131072")),
    ("configmap_schema", "a relative path", lambda d: _set_toml(d, "datapath", "pin_dir", "x")),
    ("configmap_schema", "a fixed node name", lambda d: _set_toml(d, "node", "name", "worker")),
    ("configmap_source", "the manifests source",
     lambda d: _set_toml(d, "source", "kind", "manifests")),
    ("configmap_source", "a kubeconfig file",
     lambda d: _set_toml(d, "source", "kubeconfig", "/root/.kube/config")),
    ("config_paths", "pin_dir off the bpffs mount",
     lambda d: _set_toml(d, "datapath", "pin_dir", "/var/lib/kmesh/pins")),
    ("config_paths", "status file under no mount",
     lambda d: _set_toml(d, "agent", "status_file", "/var/run/other/status.json")),
    ("config_paths", "cgroup left to auto-detection", lambda d: _set_toml(d, "datapath",
                                                                          "cgroup", "")),
    ("config_paths", "cgroup under no mount",
     lambda d: _set_toml(d, "datapath", "cgroup", "/sys/fs/cgroup")),
    ("config_paths", "build cache on the container's filesystem",
     lambda d: _set_toml(d, "datapath", "build_dir", "/tmp/build")),
    ("config_paths", "bpffs without mountPropagation",
     lambda d: _mount(d, "bpffs").pop("mountPropagation")),
    ("config_paths", "cgroup mounted writable", lambda d: _mount(d, "cgroup").pop("readOnly")),
    ("node_name", "NODE_NAME from metadata.name", lambda d: d.agent["env"][0].update(
        valueFrom={"fieldRef": {"fieldPath": "metadata.name"}})),
    ("node_name", "no NODE_NAME", lambda d: d.agent["env"].pop(0)),
    ("capabilities", "a capability missing", lambda d: _caps(d)["add"].remove("PERFMON")),
    ("capabilities", "a capability beyond the table", lambda d: _caps(d)["add"].append(
        "SYS_RESOURCE")),
    ("capabilities", "the README's table changed", lambda d: setattr(
        d, "readme", d.readme.replace("| yes |", "| no |", 1))),
    ("capabilities", "no drop ALL", lambda d: _caps(d).pop("drop")),
    ("capabilities", "privileged", lambda d: d.agent["securityContext"].update(privileged=True)),
    ("probes", "liveness runs something else", lambda d: d.agent["livenessProbe"].update(
        exec={"command": ["true"]})),
    ("probes", "readiness reads another config", lambda d: d.agent["readinessProbe"]["exec"]
     .update(command=["kmesh-plugin", "status", "--config", "/plugin.toml"])),
    ("probes", "the ConfigMap mounted elsewhere",
     lambda d: _mount(d, "config").update(mountPath="/config")),
    ("pod_shape", "pod network", lambda d: d.pod.update(hostNetwork=False)),
    ("pod_shape", "hostPID", lambda d: d.pod.update(hostPID=True)),
    ("pod_shape", "maxUnavailable 2", lambda d: d.one("DaemonSet")["spec"]["updateStrategy"]
     ["rollingUpdate"].update(maxUnavailable=2)),
    ("pod_shape", "no toleration", lambda d: d.pod.update(tolerations=[])),
    ("pod_shape", "no CNI bin directory", lambda d: volumes(d)["cni-bin"]["hostPath"].update(
        path="/usr/lib/cni")),
    ("pod_shape", "metrics port differs",
     lambda d: d.agent["ports"][0].update(containerPort=9000)),
    ("resources", "request below the measured RSS", lambda d: d.agent["resources"]["requests"]
     .update(memory="100Mi")),
    ("resources", "no limit", lambda d: d.agent["resources"].pop("limits")),
    ("dockerfile", "a wheel not installed", lambda d: setattr(d, "dockerfile", re.sub(
        r"(pip install[^&]*?)/wheels/kmesh_strategy_local-\*\.whl", r"\1", d.dockerfile))),
    ("dockerfile", "a wheel not built", lambda d: setattr(
        d, "dockerfile", d.dockerfile.replace(" /src/hooks/prefer_close", "", 1))),
    ("dockerfile", "one stage", lambda d: setattr(
        d, "dockerfile", d.dockerfile.replace("FROM ${DEBIAN} AS wheels", "", 1))),
    ("dockerfile", "no bpftool", lambda d: setattr(
        d, "dockerfile", d.dockerfile.replace("linux-libc-dev bpftool", "linux-libc-dev"))),
]


def test_every_check_is_broken_at_least_once() -> None:
    assert {check for check, _, _ in BREAKAGES} == set(CHECKS)


@pytest.mark.parametrize(("check", "mutate"), [(c, m) for c, _, m in BREAKAGES],
                         ids=[f"{c}: {why}" for c, why, _ in BREAKAGES])
def test_check_fails_on_broken_copy(check: str, mutate: Callable[[Deploy], None]) -> None:
    broken = copy.deepcopy(REAL)
    mutate(broken)
    with pytest.raises(AssertionError):
        CHECKS[check](broken)
