"""The Kubernetes objects the agent reads, parsed from API-server-shaped dicts.

Only the fields that matter for load balancing are kept. ``parse`` takes *any* JSON-like value
(from a manifest, the API server, a test) and either returns a parsed object or raises
``ManifestError`` naming the object (kind namespace/name when known) and the dotted field;
never another exception, so a bad object never half-applies and never kills the agent. Every
field is type-checked before use: a value of the wrong type, an integer out of range or a
non-scalar label value is refused with the field named, and error messages show values
bounded (never the repr of a huge or deep value).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from kmesh_plugin.errors import ManifestError
from kmesh_plugin.sources.decode import DecodeError, check_shape

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
KINDS = ("Node", "Namespace", "Service", "EndpointSlice")
# Kubernetes names are DNS subdomains or labels: at most 253 characters. Refusing longer ones
# keeps every message and status line that names an object short.
MAX_NAME = 253
# Integers a field may hold: what an int64 holds (Kubernetes has no wider integer).
INT_MIN = -(1 << 63)
INT_MAX = (1 << 63) - 1
# A value kept raw (spec.trafficDistribution) is compared and shown later: bounded here.
MAX_RAW_NODES = 1000
PROTOCOLS = ("TCP", "UDP", "SCTP")
SESSION_AFFINITIES = ("None", "ClientIP")
# sessionAffinityConfig.clientIP.timeoutSeconds: the API server's default and the range its
# validation allows (records.DEFAULT_AFFINITY_TIMEOUT is the same default on the datapath
# side; kept here too so that the model stays free of the kernel's modules).
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400


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
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)


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
    # sessionAffinity ClientIP: seconds a client stays with its endpoint after its last use
    # (spec.sessionAffinityConfig.clientIP.timeoutSeconds); 0 = sessionAffinity None.
    session_affinity_timeout: int = 0

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
    def is_serving(self) -> bool:
        # Unset means serving (SPEC.md section 5): kube-proxy reads it so, and the v1 API says
        # consumers should treat nil as true.
        return self.serving is not False

    @property
    def is_serving_terminating(self) -> bool:
        return self.serving is not False and self.terminating is True


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
_NO_CONDITIONS = Conditions()


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
    if type(value) is not str:
        return None
    family = socket.AF_INET6 if ":" in value else socket.AF_INET
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, value))
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None


def object_key(obj: Any, where: str = "") -> ObjectKey:
    """The kind, namespace and name of ``obj``; ManifestError if they are missing or bad."""
    prefix = f"{where}: " if where else ""
    meta = obj.get("metadata") if _is_mapping(obj) else None
    kind = obj.get("kind") if meta is not None else None
    if not isinstance(kind, str) or not kind or not _is_mapping(meta) or not meta.get("name"):
        raise ManifestError(f"{prefix}an object needs kind and metadata.name")
    # Kind, name and namespace name the object in every message: short and on one line.
    if not _is_name(kind):
        raise ManifestError(f"{prefix}kind: {_show(kind)} is not a Kubernetes kind")
    name = meta["name"]
    if type(name) is not str:
        raise ManifestError(f"{prefix}{kind}: metadata.name: must be a string, got {_show(name)}")
    if not _is_name(name):
        raise ManifestError(f"{prefix}{kind}: metadata.name: {_show(name)} is not a Kubernetes "
                            f"name (at most {MAX_NAME} printable characters)")
    if kind in ("Node", "Namespace"):
        return ObjectKey(kind, "", name)
    # A namespaced object without a namespace lives in "default", as kubectl applies it; the
    # key must say so too, or it disagrees with the parsed object (Service.namespace).
    namespace = meta.get("namespace") or "default"
    if type(namespace) is not str or not _is_name(namespace):
        raise ManifestError(f"{prefix}{kind} {name}: metadata.namespace: must be a name, got "
                            f"{_show(namespace)}")
    return ObjectKey(kind, namespace, name)


def _is_name(text: str) -> bool:
    return len(text) <= MAX_NAME and text.isprintable()


def parse(obj: Any, where: str = "") -> KubeObject:
    """Parse one object; ``where`` (a file name) prefixes every error."""
    try:
        key = object_key(obj, where)
        p = _Parser(obj, f"{where + ': ' if where else ''}{key}")
        match key.kind:
            case "Node":
                return Node(key.name, p.str_map("metadata.labels"))
            case "Namespace":
                return Namespace(key.name, p.str_map("metadata.annotations"),
                                 p.str_map("metadata.labels"))
            case "Service":
                return _service(p, key)
            case "EndpointSlice":
                return _endpoint_slice(p, key)
        raise ManifestError(f"{p.where}: kind {key.kind} is not one of {', '.join(KINDS)}")
    except ManifestError:
        raise
    except Exception as e:
        # Not reached by design: every field is checked before use. The boundary stays
        # closed regardless (a Mapping whose methods raise, a MemoryError, ...).
        prefix = f"{where}: " if where else ""
        raise ManifestError(f"{prefix}cannot parse: {type(e).__name__}: {_show(str(e))}") from None


def _service(p: _Parser, key: ObjectKey) -> Service:
    ips = p.str_list("spec.clusterIPs")
    single = p.opt_str("spec.clusterIP")
    from_list = bool(ips)
    if not ips and single:
        ips = (single,)
    if single and ips and single != ips[0]:
        p.fail("spec.clusterIP", f"{_show(single)} differs from spec.clusterIPs[0] "
                                 f"{_show(ips[0])}")
    ips = tuple(
        ip if ip == "None"
        else p.check_ip(f"spec.clusterIPs[{i}]" if from_list else "spec.clusterIP", ip)
        for i, ip in enumerate(ips)
    )
    ports = []
    for i, raw in enumerate(p.list("spec.ports")):
        where = f"spec.ports[{i}]"
        if not _is_mapping(raw):
            p.fail(where, f"must be a mapping, got {_show(raw)}")
        port = raw.get("port")
        if not _is_port(port):
            p.fail(f"{where}.port", f"must be a port number, got {_show(port)}")
        protocol = raw.get("protocol")
        if protocol is None:
            protocol = "TCP"  # the API server's default
        elif protocol not in PROTOCOLS or type(protocol) is not str:
            p.fail(f"{where}.protocol", f"must be TCP, UDP or SCTP, got {_show(protocol)}")
        target = raw.get("targetPort")
        if target is not None and type(target) is not str and not _is_port(target):
            p.fail(f"{where}.targetPort", f"must be a port number or a name, got {_show(target)}")
        ports.append(ServicePort(p.name_of(raw, f"{where}.name"), port, protocol, target))
    selector = p.get("spec.selector")
    publish = p.get("spec.publishNotReadyAddresses")
    if publish is not None and type(publish) is not bool:
        p.fail("spec.publishNotReadyAddresses", f"must be true or false, got {_show(publish)}")
    return Service(
        namespace=key.namespace or "default",
        name=key.name,
        cluster_ips=tuple(ips),
        ports=tuple(ports),
        type=p.opt_str("spec.type") or "ClusterIP",
        internal_traffic_policy=p.opt_str("spec.internalTrafficPolicy"),
        traffic_distribution=p.raw("spec.trafficDistribution"),
        publish_not_ready_addresses=bool(publish),
        selector=p.str_map("spec.selector") if selector is not None else None,
        annotations=p.str_map("metadata.annotations"),
        session_affinity_timeout=_affinity_timeout(p),
    )


def _affinity_timeout(p: _Parser) -> int:
    """spec.sessionAffinity as the seconds a client stays with its endpoint; 0 for None.

    As the API server does: unset (or "") is None, and with None the sessionAffinityConfig
    is ignored (its defaulting drops it); with ClientIP an unset timeout is the default."""
    affinity = p.get("spec.sessionAffinity")
    if affinity is not None and (type(affinity) is not str
                                 or affinity not in ("", *SESSION_AFFINITIES)):
        p.fail("spec.sessionAffinity", f"must be None or ClientIP, got {_show(affinity)}")
    if affinity != "ClientIP":
        return 0
    path = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    timeout = p.get(path)
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    # bool is an int in Python: YAML `true` is no number of seconds.
    if type(timeout) is not int or not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        p.fail(path, f"must be an integer of seconds in 1..{MAX_AFFINITY_TIMEOUT}, got "
                     f"{_show(timeout)}")
    return timeout


def _endpoint_slice(p: _Parser, key: ObjectKey) -> EndpointSlice:
    labels = p.str_map("metadata.labels")
    service = labels.get(SERVICE_NAME_LABEL, "")
    address_type = p.opt_str("addressType") or ""
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        p.fail("addressType", f"must be IPv4, IPv6 or FQDN, got {_show(address_type)}")
    ports = []
    for i, raw in enumerate(p.list("ports")):
        where = f"ports[{i}]"
        if not _is_mapping(raw):
            p.fail(where, f"must be a mapping, got {_show(raw)}")
        port = raw.get("port")
        if port is not None and not _is_port(port):
            p.fail(f"{where}.port", f"must be a port number, got {_show(port)}")
        protocol = raw.get("protocol")
        if protocol is None:
            protocol = "TCP"
        elif protocol not in PROTOCOLS or type(protocol) is not str:
            p.fail(f"{where}.protocol", f"must be TCP, UDP or SCTP, got {_show(protocol)}")
        ports.append(SlicePort(p.name_of(raw, f"{where}.name"), port, protocol))
    family = {"IPv4": socket.AF_INET, "IPv6": socket.AF_INET6}.get(address_type)
    # The hot loop of a large cluster (100,000 endpoints): locals, and exact-type checks
    # first (a decoded document holds only dicts, lists and scalars).
    pton, ntop, cache = socket.inet_pton, socket.inet_ntop, conditions
    endpoints = []
    for i, raw in enumerate(p.list("endpoints")):
        if type(raw) is not dict and not _is_mapping(raw):
            p.fail(f"endpoints[{i}]", f"must be a mapping, got {_show(raw)}")
        addresses = raw.get("addresses")
        if type(addresses) is not list or not addresses:
            p.fail(f"endpoints[{i}].addresses", f"must be a non-empty list, got "
                                                f"{_show(addresses)}")
        if family is None:  # FQDN: names, not checked as addresses
            for j, a in enumerate(addresses):
                if type(a) is not str:
                    p.fail(f"endpoints[{i}].addresses[{j}]", f"must be a string, got {_show(a)}")
            texts = tuple(addresses)
        else:
            try:
                texts = tuple([ntop(family, pton(family, a)) for a in addresses])
            except Exception:
                for j, a in enumerate(addresses):
                    p.check_ip(f"endpoints[{i}].addresses[{j}]", a,
                               4 if family == socket.AF_INET else 6)
                raise  # not reached: check_ip failed on one of them
        cond = raw.get("conditions")
        if cond is None:
            state = _NO_CONDITIONS
        else:
            if type(cond) is not dict and not _is_mapping(cond):
                p.fail(f"endpoints[{i}].conditions", f"must be a mapping, got {_show(cond)}")
            ready, serving, terminating = (
                cond.get("ready"), cond.get("serving"), cond.get("terminating"))
            for name, value in (("ready", ready), ("serving", serving),
                                ("terminating", terminating)):
                if value is not None and value is not True and value is not False:
                    p.fail(f"endpoints[{i}].conditions.{name}",
                           f"must be true, false or unset, got {_show(value)}")
            state = cache(ready, serving, terminating)
        node_name = raw.get("nodeName")
        if node_name is not None and type(node_name) is not str:
            p.fail(f"endpoints[{i}].nodeName", f"must be a string, got {_show(node_name)}")
        zone = raw.get("zone")
        if zone is not None and type(zone) is not str:
            p.fail(f"endpoints[{i}].zone", f"must be a string, got {_show(zone)}")
        target = raw.get("targetRef")
        target_name = None
        if target is not None:
            if not _is_mapping(target):
                p.fail(f"endpoints[{i}].targetRef", f"must be a mapping, got {_show(target)}")
            target_name = target.get("name")
            if target_name is not None and type(target_name) is not str:
                p.fail(f"endpoints[{i}].targetRef.name",
                       f"must be a string, got {_show(target_name)}")
        endpoints.append(SliceEndpoint(texts, state, node_name, zone, target_name))
    return EndpointSlice(
        namespace=key.namespace or "default",
        name=key.name,
        service_name=service,
        address_type=address_type,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
    )


def _is_mapping(value: Any) -> bool:
    return type(value) is dict or isinstance(value, Mapping)


def _is_port(value: Any) -> bool:
    # bool is an int in Python: YAML `true` is no port.
    return type(value) is int and 0 < value < 65536


def _show(value: Any, limit: int = 64) -> str:
    """A value for an error message, bounded: never the repr of a huge or deep value (the
    repr of a 5000-digit int raises, that of a 2000-deep list recurses)."""
    t = type(value)
    if value is None or t is bool or t is float:
        return repr(value)
    if t is int:
        return repr(value) if INT_MIN <= value <= INT_MAX else (
            f"an integer of {value.bit_length()} bits")
    if t is str:
        return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."
    if t is list or t is tuple:
        return f"a list of {len(value)} items"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {t.__name__}"


def _key_path(path: str, key: str) -> str:
    return f"{path}[{_show(key)}]"


class _Parser:
    """Typed access to dotted paths with errors that name the object and the field."""

    def __init__(self, obj: Mapping[str, Any], where: str) -> None:
        self.obj = obj
        self.where = where

    def fail(self, path: str, message: str) -> NoReturn:
        raise ManifestError(f"{self.where}: {path}: {message}")

    def get(self, path: str) -> Any:
        node: Any = self.obj
        for part in path.split("."):
            if node is None:
                return None
            if not _is_mapping(node):
                self.fail(path, f"{part!r} is inside a non-mapping")
            node = node.get(part)
        return node

    def opt_str(self, path: str) -> str | None:
        value = self.get(path)
        if value is not None and type(value) is not str:
            self.fail(path, f"must be a string, got {_show(value)}")
        return value

    def list(self, path: str) -> list[Any]:
        value = self.get(path)
        if value is None:
            return []
        if type(value) is not list:
            self.fail(path, f"must be a list, got {_show(value)}")
        return value

    def str_list(self, path: str) -> tuple[str, ...]:
        items = self.list(path)
        for i, item in enumerate(items):
            if type(item) is not str:
                self.fail(f"{path}[{i}]", f"must be a string, got {_show(item)}")
        return tuple(items)

    def name_of(self, raw: Mapping[str, Any], path: str) -> str:
        """An optional ``name`` string of a port ("" when unset)."""
        name = raw.get("name")
        if name is None:
            return ""
        if type(name) is not str:
            self.fail(path, f"must be a string, got {_show(name)}")
        return name

    def str_map(self, path: str) -> dict[str, str]:
        value = self.get(path)
        if value is None:
            return {}
        if not _is_mapping(value):
            self.fail(path, f"must be a mapping, got {_show(value)}")
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                self.fail(path, f"key {_show(k)} is not a string")
            t = type(v)
            if t is str:
                out[k] = v
            elif v is None:
                out[k] = ""
            # YAML turns `true` or `1` into non-strings; Kubernetes stores strings.
            elif t is bool or t is float or (t is int and INT_MIN <= v <= INT_MAX):
                out[k] = str(v)
            else:
                self.fail(_key_path(path, k), f"must be a string, got {_show(v)}")
        return out

    def raw(self, path: str) -> Any:
        """A value kept as given, after checking it is a bounded JSON-like value."""
        value = self.get(path)
        if value is None or type(value) is str:
            return value
        try:
            check_shape(value, "", max_nodes=MAX_RAW_NODES)
        except DecodeError as e:
            self.fail(path, e.problem)
        return value

    def check_ip(self, path: str, value: Any, version: int | None = None) -> str:
        """``value`` as canonical text (what inet_ntop prints), or a failure naming ``path``."""
        text = canonical_ip(value)
        if text is None:
            self.fail(path, f"{_show(value)} is not an IP address")
        if version is not None and (":" in text) != (version == 6):
            self.fail(path, f"{text} is not an IPv{version} address")
        return text
