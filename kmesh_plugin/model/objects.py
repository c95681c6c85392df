"""The Kubernetes objects the agent reads, parsed from API-server-shaped dicts.

Only the fields that matter for load balancing are kept. A malformed object raises
``ManifestError`` naming the object and the field, so a bad manifest never half-applies.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kmesh_plugin.errors import ManifestError

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
KINDS = ("Node", "Namespace", "Service", "EndpointSlice")


@dataclass(frozen=True, order=True)
class ObjectKey:
    kind: str
    namespace: str  # "" for cluster-scoped kinds
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else (
            f"{self.kind} {self.name}"
        )


@dataclass(frozen=True, eq=True)
class Node:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, eq=True)
class Namespace:
    name: str
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    protocol: str = "TCP"
    target_port: int | str | None = None


@dataclass(frozen=True, eq=True)
class Service:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    type: str = "ClusterIP"
    internal_traffic_policy: str | None = None
    traffic_distribution: Any = None  # kept raw: a value outside the table falls through
    publish_not_ready_addresses: bool = False
    selector: Mapping[str, str] | None = field(default=None, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def headless(self) -> bool:
        return not self.cluster_ips or self.cluster_ips[0] == "None"

    @property
    def load_balanced(self) -> bool:
        """Headless and ExternalName Services are not load-balanced (SPEC.md section 5)."""
        return self.type != "ExternalName" and not self.headless


@dataclass(frozen=True, slots=True)
class Conditions:
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None

    @property
    def is_ready(self) -> bool:
        return self.ready is not False  # unset means ready

    @property
    def is_serving_terminating(self) -> bool:
        # "serving" unset follows "ready", as the EndpointSlice API documents.
        serving = self.serving if self.serving is not None else self.is_ready
        return bool(serving) and bool(self.terminating)


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    conditions: Conditions = Conditions()
    node_name: str | None = None
    zone: str | None = None
    target: str | None = None  # targetRef name, usually the pod


@dataclass(frozen=True)
class SlicePort:
    name: str
    port: int | None
    protocol: str = "TCP"


@dataclass(frozen=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str
    address_type: str
    ports: tuple[SlicePort, ...] = ()
    endpoints: tuple[SliceEndpoint, ...] = ()


KubeObject = Node | Namespace | Service | EndpointSlice

_CONDITIONS: dict[tuple[bool | None, bool | None, bool | None], Conditions] = {}


def conditions(ready: bool | None, serving: bool | None, terminating: bool | None) -> Conditions:
    """One shared, immutable Conditions per combination: a large slice holds thousands."""
    key = (ready, serving, terminating)
    found = _CONDITIONS.get(key)
    if found is None:
        found = _CONDITIONS[key] = Conditions(ready, serving, terminating)
    return found


def canonical_ip(value: Any) -> str | None:
    """The canonical text of an IP address (inet_ntop's), or None. Much faster than
    ipaddress for the hundred thousand endpoint addresses of a large cluster."""
    if not isinstance(value, str):
        return None
    family = socket.AF_INET6 if ":" in value else socket.AF_INET
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, value))
    except OSError:
        return None


def object_key(obj: Mapping[str, Any], where: str = "") -> ObjectKey:
    kind = obj.get("kind")
    meta = obj.get("metadata") or {}
    if not isinstance(kind, str) or not isinstance(meta, Mapping) or not meta.get("name"):
        raise ManifestError(f"{where}: an object needs kind and metadata.name")
    # A namespaced object without a namespace lives in "default", as kubectl applies it; the
    # key must say so too, or it disagrees with the parsed object (Service.namespace).
    namespace = meta.get("namespace") or "default"
    if kind in ("Node", "Namespace"):
        namespace = ""
    return ObjectKey(kind, str(namespace), str(meta["name"]))


def parse(obj: Mapping[str, Any], where: str = "") -> KubeObject:
    """Parse one object; ``where`` (a file name) prefixes every error."""
    key = object_key(obj, where)
    p = _Parser(obj, f"{where + ': ' if where else ''}{key}")
    match key.kind:
        case "Node":
            return Node(key.name, p.str_map("metadata.labels"))
        case "Namespace":
            return Namespace(key.name, p.str_map("metadata.annotations"))
        case "Service":
            return _service(p, key)
        case "EndpointSlice":
            return _endpoint_slice(p, key)
    raise ManifestError(f"{p.where}: kind {key.kind} is not one of {', '.join(KINDS)}")


def _service(p: _Parser, key: ObjectKey) -> Service:
    ips = p.str_list("spec.clusterIPs") or ()
    single = p.opt_str("spec.clusterIP")
    from_list = bool(ips)
    if not ips and single:
        ips = (single,)
    if single and ips and single != ips[0]:
        p.fail("spec.clusterIP", f"{single!r} differs from spec.clusterIPs[0] {ips[0]!r}")
    ips = tuple(
        ip if ip == "None"
        else p.check_ip(f"spec.clusterIPs[{i}]" if from_list else "spec.clusterIP", ip)
        for i, ip in enumerate(ips)
    )
    ports = []
    for i, raw in enumerate(p.list("spec.ports")):
        where = f"spec.ports[{i}]"
        if not isinstance(raw, Mapping):
            p.fail(where, "must be a mapping")
        port = raw.get("port")
        # bool is an int in Python: YAML `true` is no port.
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            p.fail(f"{where}.port", f"must be a port number, got {port!r}")
        protocol = raw.get("protocol", "TCP")
        if protocol not in ("TCP", "UDP", "SCTP"):
            p.fail(f"{where}.protocol", f"must be TCP, UDP or SCTP, got {protocol!r}")
        target = raw.get("targetPort")
        if target is not None and (not isinstance(target, int | str) or isinstance(target, bool)):
            p.fail(f"{where}.targetPort", "must be a number or a name")
        ports.append(ServicePort(str(raw.get("name") or ""), port, protocol, target))
    return Service(
        namespace=key.namespace or "default",
        name=key.name,
        cluster_ips=tuple(ips),
        ports=tuple(ports),
        type=p.opt_str("spec.type") or "ClusterIP",
        internal_traffic_policy=p.opt_str("spec.internalTrafficPolicy"),
        traffic_distribution=p.get("spec.trafficDistribution"),
        publish_not_ready_addresses=bool(p.get("spec.publishNotReadyAddresses")),
        selector=p.str_map("spec.selector") if p.get("spec.selector") is not None else None,
        annotations=p.str_map("metadata.annotations"),
    )


def _endpoint_slice(p: _Parser, key: ObjectKey) -> EndpointSlice:
    labels = p.str_map("metadata.labels")
    service = labels.get(SERVICE_NAME_LABEL, "")
    address_type = p.opt_str("addressType") or ""
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        p.fail("addressType", f"must be IPv4, IPv6 or FQDN, got {address_type!r}")
    ports = []
    for i, raw in enumerate(p.list("ports")):
        if not isinstance(raw, Mapping):
            p.fail(f"ports[{i}]", "must be a mapping")
        port = raw.get("port")
        if port is not None and (
            not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536
        ):
            p.fail(f"ports[{i}].port", f"must be a port number, got {port!r}")
        ports.append(SlicePort(str(raw.get("name") or ""), port, raw.get("protocol", "TCP")))
    endpoints = []
    for i, raw in enumerate(p.list("endpoints")):
        where = f"endpoints[{i}]"
        if not isinstance(raw, Mapping):
            p.fail(where, "must be a mapping")
        addresses = raw.get("addresses") or []
        if not isinstance(addresses, list) or not addresses:
            p.fail(f"{where}.addresses", "must be a non-empty list")
        if address_type != "FQDN":
            addresses = [
                p.check_ip(f"{where}.addresses[{j}]", a, 4 if address_type == "IPv4" else 6)
                for j, a in enumerate(addresses)
            ]
        cond = raw.get("conditions") or {}
        if not isinstance(cond, Mapping):
            p.fail(f"{where}.conditions", "must be a mapping")
        for c in ("ready", "serving", "terminating"):
            if cond.get(c) is not None and not isinstance(cond.get(c), bool):
                p.fail(f"{where}.conditions.{c}", "must be true, false or unset")
        target = raw.get("targetRef") or {}
        endpoints.append(
            SliceEndpoint(
                addresses=tuple(str(a) for a in addresses),
                conditions=conditions(cond.get("ready"), cond.get("serving"),
                                      cond.get("terminating")),
                node_name=raw.get("nodeName"),
                zone=raw.get("zone"),
                target=target.get("name") if isinstance(target, Mapping) else None,
            )
        )
    return EndpointSlice(
        namespace=key.namespace or "default",
        name=key.name,
        service_name=service,
        address_type=address_type,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
    )


class _Parser:
    """Typed access to dotted paths with errors that name the object and the field."""

    def __init__(self, obj: Mapping[str, Any], where: str) -> None:
        self.obj = obj
        self.where = where

    def fail(self, path: str, message: str) -> None:
        raise ManifestError(f"{self.where}: {path}: {message}")

    def get(self, path: str) -> Any:
        node: Any = self.obj
        for part in path.split("."):
            if node is None:
                return None
            if not isinstance(node, Mapping):
                self.fail(path, f"{part!r} is inside a non-mapping")
            node = node.get(part)
        return node

    def opt_str(self, path: str) -> str | None:
        value = self.get(path)
        if value is not None and not isinstance(value, str):
            self.fail(path, f"must be a string, got {value!r}")
        return value

    def list(self, path: str) -> list[Any]:
        value = self.get(path)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, "must be a list")
        return value

    def str_list(self, path: str) -> tuple[str, ...]:
        items = self.list(path)
        if not all(isinstance(i, str) for i in items):
            self.fail(path, "must be a list of strings")
        return tuple(items)

    def str_map(self, path: str) -> dict[str, str]:
        value = self.get(path)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, "must be a mapping")
        # YAML turns `true` or `1` into non-strings; Kubernetes stores strings.
        return {str(k): "" if v is None else str(v) for k, v in value.items()}

    def check_ip(self, path: str, value: Any, version: int | None = None) -> str:
        """``value`` as canonical text (what inet_ntop prints), or a failure naming ``path``."""
        text = canonical_ip(value)
        if text is None:
            self.fail(path, f"{value!r} is not an IP address")
            raise AssertionError  # fail() raised
        if version is not None and (":" in text) != (version == 6):
            self.fail(path, f"{value} is not an IPv{version} address")
        return text
