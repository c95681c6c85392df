"""The Kubernetes side of the lab, without any I/O: what the API server, the scheduler and the
EndpointSlice controller would make of the objects a scenario applies.

The lab keeps the objects as plain dicts shaped like the API server's, so what the agents read
from the manifest directory is what they would read from a real cluster.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kmesh_plugin.errors import KmeshError

SERVICE_CIDR = ipaddress.ip_network("198.19.0.0/16")  # benchmarking range, never routed
SERVICE_CIDR6 = ipaddress.ip_network("2001:2:0:ff::/64")  # benchmarking range, not the pods'
POD_CIDR6 = "2001:2::/64"
FIRST_CLUSTER_IP = 10
HOSTNAME_LABEL = "kubernetes.io/hostname"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
CLUSTER_DOMAIN = "cluster.local"

HELLOWORLD_IMAGE = "docker.io/istio/examples-helloworld-v1"
CURL_IMAGE = "curlimages/curl"
DNS_IMAGE = "registry.k8s.io/coredns/coredns"
SUPPORTED_KINDS = ("Namespace", "Service", "Deployment", "Pod", "EndpointSlice")


class LabError(KmeshError):
    """The lab cannot do what was asked; the message names the object."""


def image_kind(image: str, where: str) -> str:
    """'helloworld', 'curl' or 'dns' for the images the lab can run; anything else is an
    error."""
    name = image.split("@", 1)[0]  # drop a digest
    if ":" in name.rsplit("/", 1)[-1]:
        name = name[: name.rfind(":")]  # drop a tag (a ':' before the last '/' is a port)
    repo = name.removeprefix("docker.io/")
    if repo in ("istio/examples-helloworld-v1", "istio/examples-helloworld-v2"):
        return "helloworld"
    if repo == "curlimages/curl":
        return "curl"
    if repo in ("coredns/coredns", DNS_IMAGE):
        return "dns"
    raise LabError(
        f"{where}: image {image!r} cannot run in the lab; it runs {HELLOWORLD_IMAGE} "
        f"(a built-in server answering GET /hello), {CURL_IMAGE} (a client) and {DNS_IMAGE} "
        "(a built-in UDP server answering a DNS TXT query with its pod's name)"
    )


def object_ref(obj: Mapping[str, Any], namespace: str | None) -> tuple[str, str, str]:
    kind = obj.get("kind")
    meta = obj.get("metadata")
    if not isinstance(kind, str) or not isinstance(meta, Mapping) or not meta.get("name"):
        raise LabError(f"an object needs kind and metadata.name, got {dict(obj)!r:.200}")
    if kind not in SUPPORTED_KINDS:
        raise LabError(
            f"{kind} {meta['name']}: the lab does not handle this kind "
            f"(it handles {', '.join(SUPPORTED_KINDS)})"
        )
    ns = "" if kind == "Namespace" else str(meta.get("namespace") or namespace or "default")
    return kind, ns, str(meta["name"])


@dataclass
class Container:
    name: str
    kind: str  # helloworld | curl | dns
    env: dict[str, str]
    ports: list[dict[str, Any]]  # containerPort, name, protocol


@dataclass
class PodSpec:
    """A pod to start: what a Deployment's template or a bare Pod asks for."""

    namespace: str
    name: str
    owner: str | None  # Deployment name
    labels: dict[str, str]
    node_selector: dict[str, str]
    containers: list[Container]


def pod_specs(obj: Mapping[str, Any], namespace: str) -> list[PodSpec]:
    """The pods a Deployment (replicas, template) or a Pod stands for, with their names."""
    kind, _, name = object_ref(obj, namespace)
    where = f"{kind} {namespace}/{name}"
    if kind == "Pod":
        return [_pod_spec(obj, namespace, name, None, where)]
    spec = obj.get("spec") or {}
    template = spec.get("template") or {}
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or replicas < 0:
        raise LabError(f"{where}: spec.replicas must be a non-negative integer")
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        raise LabError(f"{where}: spec.selector.matchLabels must match the template's labels")
    template_hash = hashlib.sha256(repr(sorted(template.items())).encode()).hexdigest()[:10]
    pods = []
    for _ in range(replicas):
        # kube names replicas <deployment>-<template hash>-<5 random>
        pod_name = f"{name}-{template_hash}-{secrets.token_hex(3)[:5]}"
        pods.append(_pod_spec(template, namespace, pod_name, name, where))
    return pods


def _pod_spec(
    obj: Mapping[str, Any], namespace: str, name: str, owner: str | None, where: str
) -> PodSpec:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    containers = []
    for i, c in enumerate(spec.get("containers") or []):
        cwhere = f"{where}: containers[{i}]"
        if not isinstance(c, Mapping) or not c.get("image"):
            raise LabError(f"{cwhere}: needs an image")
        env = {}
        for e in c.get("env") or []:
            if isinstance(e, Mapping) and "name" in e:
                env[str(e["name"])] = str(e.get("value", ""))
        ports = [dict(p) for p in c.get("ports") or [] if isinstance(p, Mapping)]
        containers.append(Container(str(c.get("name", f"c{i}")), image_kind(c["image"], cwhere),
                                    env, ports))
    if not containers:
        raise LabError(f"{where}: the pod has no containers")
    return PodSpec(
        namespace=namespace,
        name=name,
        owner=owner,
        labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
        node_selector={str(k): str(v) for k, v in (spec.get("nodeSelector") or {}).items()},
        containers=containers,
    )


def schedule(pod: PodSpec, nodes: Mapping[str, Mapping[str, str]], load: Mapping[str, int]) -> str:
    """The node for ``pod``: nodeSelector must match the node's labels; least loaded first."""
    fitting = [
        n for n, labels in nodes.items()
        if all(labels.get(k) == v for k, v in pod.node_selector.items())
    ]
    if not fitting:
        raise LabError(
            f"Pod {pod.namespace}/{pod.name}: no node matches nodeSelector {pod.node_selector} "
            f"(nodes: {', '.join(nodes)})"
        )
    return min(fitting, key=lambda n: (load.get(n, 0), list(nodes).index(n)))


@dataclass
class RunningPod:
    spec: PodSpec
    node: str
    ip: str
    ipv6: str | None = None
    ready: bool = False
    terminating: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # process handles, netns, ...

    def container_port(self, name: str) -> int | None:
        for c in self.spec.containers:
            for p in c.ports:
                if p.get("name") == name:
                    return int(p["containerPort"])
        return None


class ClusterIPs:
    """Allocates ClusterIPs, IPv4 from 198.19.0.0/16 and IPv6 from 2001:2:0:ff::/64, and refuses
    any other address (the network rules: the lab only uses benchmarking addresses).

    Families follow the API server: explicit ``spec.clusterIPs`` win; else ``spec.ipFamilies``;
    else ``ipFamilyPolicy`` PreferDualStack or RequireDualStack gives IPv4 and IPv6; else IPv4.
    """

    def __init__(self) -> None:
        self.used: dict[str, tuple[str, str]] = {}
        self._next = {4: FIRST_CLUSTER_IP, 6: FIRST_CLUSTER_IP}

    def assign(self, service: dict[str, Any], key: tuple[str, str]) -> None:
        spec = service.setdefault("spec", {})
        where = f"Service {key[0]}/{key[1]}"
        if spec.get("type") == "ExternalName":
            return
        wanted = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
        if wanted == ["None"]:
            spec["clusterIP"], spec["clusterIPs"] = "None", ["None"]
            return
        previous = {ipaddress.ip_address(ip).version: ip
                    for ip, owner in self.used.items() if owner == key}
        if not wanted:
            wanted = [previous.get(v) or self._allocate(v) for v in _families(spec, where)]
        for ip in wanted:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                raise LabError(f"{where}: spec.clusterIP {ip!r} is not an IP address") from None
            if addr not in (SERVICE_CIDR if addr.version == 4 else SERVICE_CIDR6):
                raise LabError(
                    f"{where}: spec.clusterIP {ip} is outside the lab's service ranges "
                    f"{SERVICE_CIDR} and {SERVICE_CIDR6} (the lab only uses benchmarking "
                    "addresses)"
                )
            owner = self.used.get(str(addr))
            if owner is not None and owner != key:
                raise LabError(f"{where}: clusterIP {ip} is taken by Service {owner[0]}/{owner[1]}")
        for ip in previous.values():
            if ip not in wanted:
                del self.used[ip]
        wanted = [str(ipaddress.ip_address(ip)) for ip in wanted]
        for ip in wanted:
            self.used[ip] = key
        spec["clusterIP"], spec["clusterIPs"] = wanted[0], list(wanted)
        spec["ipFamilies"] = [f"IPv{ipaddress.ip_address(ip).version}" for ip in wanted]

    def release(self, key: tuple[str, str]) -> None:
        for ip in [ip for ip, owner in self.used.items() if owner == key]:
            del self.used[ip]

    def _allocate(self, version: int) -> str:
        net = SERVICE_CIDR if version == 4 else SERVICE_CIDR6
        while True:
            ip = str(net.network_address + self._next[version])
            self._next[version] += 1
            if ip not in self.used:
                return ip


def _families(spec: Mapping[str, Any], where: str) -> list[int]:
    families = spec.get("ipFamilies")
    if families:
        if not isinstance(families, list) or not set(families) <= {"IPv4", "IPv6"}:
            raise LabError(f"{where}: spec.ipFamilies must list IPv4 and/or IPv6")
        return [4 if f == "IPv4" else 6 for f in families]
    policy = spec.get("ipFamilyPolicy", "SingleStack")
    if policy in ("PreferDualStack", "RequireDualStack"):
        return [4, 6]
    if policy != "SingleStack":
        raise LabError(f"{where}: spec.ipFamilyPolicy {policy!r} is not a policy")
    return [4]


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's Ready condition, as its kubelet reported it."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def pod_terminating(pod: Mapping[str, Any]) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def pod_ips(pod: Mapping[str, Any]) -> dict[str, str]:
    """The pod's addresses by family ("IPv4", "IPv6") from status.podIPs."""
    out: dict[str, str] = {}
    for entry in (pod.get("status") or {}).get("podIPs") or []:
        ip = entry.get("ip") if isinstance(entry, Mapping) else None
        if isinstance(ip, str):
            out.setdefault("IPv6" if ":" in ip else "IPv4", ip)
    return out


def container_port(pod: Mapping[str, Any], name: str) -> int | None:
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == name and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return None


def endpoint_slices(
    service: Mapping[str, Any], pods: Iterable[Mapping[str, Any]], node_zone: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The EndpointSlices the controller would publish for a Service with a selector, from the
    Pod objects (their status as the kubelet wrote it).

    One set of slices per IP family of the Service (addressType IPv4 / IPv6, the pods'
    address of that family). Pods are grouped by their resolved target ports (a named
    targetPort can differ per pod). As the real controller: serving is the pod's Ready
    condition, terminating is its deletionTimestamp, ready is serving and not terminating;
    pods neither ready nor terminating (starting up) are left out.
    """
    meta = service["metadata"]
    spec = service.get("spec") or {}
    selector = spec.get("selector")
    if not selector:
        return []  # selectorless: the user supplies EndpointSlices
    ns, name = meta["namespace"], meta["name"]
    groups: dict[tuple[tuple[str, int, str], ...], list[Mapping[str, Any]]] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        pmeta = pod["metadata"]
        if pmeta.get("namespace") != ns or not pod_ips(pod):
            continue
        if not (pod_ready(pod) or pod_terminating(pod)):
            continue
        labels = pmeta.get("labels") or {}
        if any(labels.get(k) != v for k, v in selector.items()):
            continue
        ports = []
        for sp in spec.get("ports") or []:
            target = sp.get("targetPort", sp.get("port"))
            if isinstance(target, str):
                resolved = container_port(pod, target)
                if resolved is None:
                    continue  # this pod does not serve the named port
                target = resolved
            ports.append((str(sp.get("name") or ""), int(target), sp.get("protocol", "TCP")))
        groups.setdefault(tuple(ports), []).append(pod)
    slices = []
    families = spec.get("ipFamilies") or ["IPv4"]
    for family, (ports, members) in ((f, g) for f in families for g in sorted(groups.items())):
        members = [p for p in members if family in pod_ips(p)]
        if not members:
            continue
        digest = hashlib.sha256(repr(ports).encode()).hexdigest()[:5]
        suffix = "" if family == "IPv4" else "-v6"
        endpoints = []
        for pod in members:
            node = (pod.get("spec") or {}).get("nodeName") or ""
            serving, terminating = pod_ready(pod), pod_terminating(pod)
            endpoints.append({
                "addresses": [pod_ips(pod)[family]],
                "conditions": {"ready": serving and not terminating, "serving": serving,
                               "terminating": terminating},
                "nodeName": node,
                **({"zone": node_zone[node]} if node_zone.get(node) else {}),
                "targetRef": {"kind": "Pod", "namespace": ns, "name": pod["metadata"]["name"],
                              "uid": pod["metadata"].get("uid", "")},
            })
        slices.append({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-{digest}{suffix}",
                "namespace": ns,
                "labels": {SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: "kmesh-lab"},
            },
            "addressType": family,
            "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
            "endpoints": endpoints,
        })
    return slices


TEMPLATE_HASH_LABEL = "pod-template-hash"


def template_hash(template: Mapping[str, Any]) -> str:
    """A Deployment template's hash (pod names and the pod-template-hash label carry it)."""
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def pod_for(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """A new Pod object for one replica of ``deployment``, as its ReplicaSet would create it
    (the lab has no ReplicaSets: the pods are owned by the Deployment itself)."""
    meta = deployment["metadata"]
    template = (deployment.get("spec") or {}).get("template") or {}
    digest = template_hash(template)
    labels = {**((template.get("metadata") or {}).get("labels") or {}),
              TEMPLATE_HASH_LABEL: digest}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            # kube names replicas <deployment>-<template hash>-<5 random>
            "name": f"{meta['name']}-{digest}-{secrets.token_hex(3)[:5]}",
            "namespace": meta["namespace"],
            "labels": labels,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
                "uid": meta.get("uid", ""), "controller": True,
            }],
        },
        "spec": json.loads(json.dumps(template.get("spec") or {})),
    }


def owner_of(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(name, uid) of the Deployment that owns ``pod``, if one does."""
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Deployment" and ref.get("controller"):
            return str(ref.get("name")), str(ref.get("uid"))
    return None


def pod_spec_of(pod: Mapping[str, Any]) -> PodSpec:
    """What the lab's kubelet runs for a Pod object (images checked)."""
    meta = pod["metadata"]
    owner = owner_of(pod)
    return _pod_spec(pod, meta["namespace"], meta["name"], owner[0] if owner else None,
                     f"Pod {meta['namespace']}/{meta['name']}")


def hosts_file(services: Iterable[Mapping[str, Any]]) -> str:
    """/etc/hosts lines for every Service's ClusterIPs under its cluster DNS name."""
    lines = ["127.0.0.1 localhost"]
    for svc in services:
        meta, spec = svc["metadata"], svc.get("spec") or {}
        for ip in spec.get("clusterIPs") or []:
            if ip != "None":
                lines.append(f"{ip} {meta['name']}.{meta['namespace']}.svc.{CLUSTER_DOMAIN}")
    return "\n".join(lines) + "\n"


def pod_hosts_file(services: Iterable[Mapping[str, Any]], namespace: str) -> str:
    """The /etc/hosts of a pod in ``namespace`` for programs that resolve through glibc (what
    ``kubectl exec`` runs): glibc applies the resolv.conf search list to DNS only, never to
    /etc/hosts, so each name the search list would find is written out (``svc`` for the pod's
    own namespace, ``svc.ns``, ``svc.ns.svc``, the full name)."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    for svc in services:
        meta, spec = svc["metadata"], svc.get("spec") or {}
        name, ns = meta["name"], meta["namespace"]
        names = [f"{name}.{ns}.svc.{CLUSTER_DOMAIN}", f"{name}.{ns}.svc", f"{name}.{ns}"]
        if ns == namespace:
            names.append(name)
        for ip in spec.get("clusterIPs") or []:
            if ip != "None":
                lines.append(f"{ip} {' '.join(names)}")
    return "\n".join(lines) + "\n"


def resolv_conf(namespace: str) -> str:
    """A pod's resolv.conf as the kubelet writes it (ClusterFirst), without a nameserver: the
    lab has no cluster DNS Service, names resolve through the pod's hosts file."""
    return f"search {search_domains(namespace)}\noptions ndots:5\n"


def search_domains(namespace: str) -> str:
    """A pod's resolv.conf search list: short names resolve in its own namespace first."""
    return f"{namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}"
