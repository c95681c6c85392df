"""Server-side printing: the ``meta.k8s.io/v1`` Table that ``kubectl get`` asks for.

kubectl sends ``Accept: application/json;as=Table;v=v1;g=meta.k8s.io,...,application/json``
on get and list; the real kube-apiserver answers a Table whose columns and cells come from
its printers (``pkg/printers/internalversion``), run with ``Wide: true`` (kubectl hides the
priority-1 columns unless ``-o wide``). This module is those printers for the kinds the lab
serves: Node, Pod, Service, Deployment, EndpointSlice, Namespace and ConfigMap, with the cells
computed as the Go code computes them (Node STATUS from the Ready condition, ROLES from the
``node-role.kubernetes.io/*`` labels, Pod READY/STATUS/RESTARTS from the container statuses,
Service PORT(S), AGE as ``duration.HumanDuration``). Any other kind gets the generic
convertor's NAME / CREATED AT table, as a resource without printers does.

The lab stores objects as written, without the real server's defaulting; a cell reads the
value the defaulting would have filled in where it is missing (Pod phase ``Pending``,
Service type ``ClusterIP``, port protocol ``TCP``, Deployment replicas 1).

Each row carries the object as the ``includeObject`` query parameter asks: ``Metadata``
(the default: a PartialObjectMetadata, from which kubectl reads the namespace for ``-A``
and the labels for ``--show-labels`` and ``-L``), ``Object`` or ``None``.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import errors
from .resources import ResourceType
from .selectors import format_label_selector

TABLE_GROUP = "meta.k8s.io"
TABLE_VERSIONS = ("v1", "v1beta1")
INCLUDE_OBJECT = ("", "Metadata", "Object", "None")

_NAME_DOC = ("Name must be unique within a namespace. Is required when creating resources, "
             "although some resources may allow a client to request the generation of an "
             "appropriate name automatically. Name is primarily intended for creation "
             "idempotence and configuration definition. Cannot be updated. More info: "
             "https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names")
_CREATED_DOC = ("CreationTimestamp is a timestamp representing the server time when this "
                "object was created. It is not guaranteed to be set in happens-before order "
                "across separate operations. Clients may not set this value. It is represented "
                "in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for "
                "lists. More info: https://git.k8s.io/community/contributors/devel/sig-"
                "architecture/api-conventions.md#metadata")

Row = dict[str, Any]
Printer = Callable[[Mapping[str, Any]], Row]


def table_version(accept: str) -> str | None:
    """The Table apiVersion an Accept header asks for (its first Table entry), else None."""
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() not in ("application/json", "application/yaml"):
            continue
        values = dict(p.partition("=")[::2] for p in params)
        if (values.get("as") == "Table" and values.get("g") == TABLE_GROUP
                and values.get("v") in TABLE_VERSIONS):
            return f"{TABLE_GROUP}/{values['v']}"
    return None


# --- cells ---------------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """apimachinery's ``duration.HumanDuration`` (seconds may be fractional)."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 60 * 2:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        years = hours // 24 // 365
        return f"{years}y" if days == 0 else f"{years}y{days}d"
    return f"{hours // 24 // 365}y"


def parse_time(value: Any) -> float | None:
    """An RFC 3339 timestamp (``2024-01-01T00:00:00Z``, fractions and offsets allowed)."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    offset = 0
    if text.endswith(("Z", "z")):
        text = text[:-1]
    elif len(text) > 6 and text[-6] in "+-" and text[-3] == ":":
        sign = 1 if text[-6] == "+" else -1
        offset = sign * (int(text[-5:-3]) * 3600 + int(text[-2:]) * 60)
        text = text[:-6]
    whole, _, fraction = text.partition(".")
    try:
        parsed = time.strptime(whole, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
    seconds = calendar.timegm(parsed) - offset
    if fraction.isdigit():
        seconds += float(f"0.{fraction}")
    return float(seconds)


def age(timestamp: Any, now: float | None = None) -> str:
    """``translateTimestampSince``: ``<unknown>`` without a timestamp."""
    at = parse_time(timestamp)
    if at is None:
        return "<unknown>"
    return human_duration((time.time() if now is None else now) - at)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _dict(obj: Mapping[str, Any], *path: str) -> Mapping[str, Any]:
    value: Any = obj
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _list(obj: Mapping[str, Any], *path: str) -> list[Any]:
    value = _dict(obj, *path[:-1]).get(path[-1])
    return value if isinstance(value, list) else []


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _column(name: str, description: str, priority: int = 0, type_: str = "string",
            format_: str = "") -> dict[str, Any]:
    return {"name": name, "type": type_, "format": format_, "description": description,
            "priority": priority}


NAME = _column("Name", _NAME_DOC, format_="name")
AGE = _column("Age", _CREATED_DOC)


# --- printers (pkg/printers/internalversion/printers.go) -----------------------------------

NODE_COLUMNS = [
    NAME,
    _column("Status", "The status of the node"),
    _column("Roles", "The roles of the node"),
    AGE,
    _column("Version", "Kubelet Version reported by the node."),
    _column("Internal-IP", "List of addresses reachable to the node. Queried from cloud "
                           "provider, if available.", 1),
    _column("External-IP", "List of addresses reachable to the node. Queried from cloud "
                           "provider, if available.", 1),
    _column("OS-Image", "OS Image reported by the node from /etc/os-release (e.g. Debian "
                        "GNU/Linux 7 (wheezy)).", 1),
    _column("Kernel-Version", "Kernel Version reported by the node from 'uname -r' (e.g. "
                              "3.16.0-0.bpo.4-amd64).", 1),
    _column("Container-Runtime", "ContainerRuntime Version reported by the node through "
                                 "runtime remote API (e.g. containerd://1.4.2).", 1),
]


def node_roles(labels: Mapping[str, Any]) -> list[str]:
    roles: set[str] = set()
    for key, value in labels.items():
        if key.startswith("node-role.kubernetes.io/"):
            role = key[len("node-role.kubernetes.io/"):]
            if role:
                roles.add(role)
        elif key == "kubernetes.io/role" and value:
            roles.add(str(value))
    return sorted(roles)


def _node_address(obj: Mapping[str, Any], kind: str) -> str:
    for address in _list(obj, "status", "addresses"):
        if isinstance(address, Mapping) and address.get("type") == kind:
            return str(address.get("address", ""))
    return "<none>"


def print_node(obj: Mapping[str, Any]) -> Row:
    status: list[str] = []
    for cond in _list(obj, "status", "conditions"):
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            status = ["Ready" if cond.get("status") == "True" else "NotReady"]
    if not status:
        status = ["Unknown"]
    if _dict(obj, "spec").get("unschedulable"):
        status.append("SchedulingDisabled")
    roles = ",".join(node_roles(_meta(obj).get("labels") or {})) or "<none>"
    info = _dict(obj, "status", "nodeInfo")
    return {"cells": [
        _meta(obj).get("name", ""), ",".join(status), roles,
        age(_meta(obj).get("creationTimestamp")), info.get("kubeletVersion", ""),
        _node_address(obj, "InternalIP"), _node_address(obj, "ExternalIP"),
        info.get("osImage") or "<unknown>", info.get("kernelVersion") or "<unknown>",
        info.get("containerRuntimeVersion") or "<unknown>",
    ]}


POD_COLUMNS = [
    NAME,
    _column("Ready", "The aggregate readiness state of this pod for accepting traffic."),
    _column("Status", "The aggregate status of the containers in this pod."),
    _column("Restarts", "The number of times the containers in this pod have been restarted "
                        "and when the last container in this pod has restarted."),
    AGE,
    _column("IP", "podIP address allocated to the pod. Routable at least within the cluster. "
                  "Empty if not yet allocated.", 1),
    _column("Node", "NodeName indicates in which node this pod is scheduled.", 1),
    _column("Nominated Node", "nominatedNodeName is set only when this pod preempts other "
                              "pods on the node, but it cannot be scheduled right away as "
                              "preemption victims receive their graceful termination "
                              "periods.", 1),
    _column("Readiness Gates", "If specified, all readiness gates will be evaluated for pod "
                               "readiness.", 1),
]
_POD_SUCCEEDED = [{"type": "Completed", "status": "True", "reason": "Succeeded",
                   "message": "The pod has completed successfully."}]
_POD_FAILED = [{"type": "Completed", "status": "True", "reason": "Failed",
                "message": "The pod failed."}]


def _terminated_reason(state: Mapping[str, Any], prefix: str = "") -> str:
    if state.get("reason"):
        return prefix + str(state["reason"])
    if _int(state.get("signal")):
        return f"{prefix}Signal:{_int(state.get('signal'))}"
    return f"{prefix}ExitCode:{_int(state.get('exitCode'))}"


def _condition_true(conditions: list[Any], kind: str) -> bool:
    return any(isinstance(c, Mapping) and c.get("type") == kind and c.get("status") == "True"
               for c in conditions)


def pod_cells(obj: Mapping[str, Any], now: float | None = None) -> tuple[list[Any], str]:
    """The Pod row's cells (wide) and its phase, as ``printPod`` computes them."""
    spec, status, meta = _dict(obj, "spec"), _dict(obj, "status"), _meta(obj)
    containers = _list(obj, "spec", "containers")
    init_specs = {c.get("name"): c for c in _list(obj, "spec", "initContainers")
                  if isinstance(c, Mapping)}

    def restartable(name: Any) -> bool:
        return (init_specs.get(name) or {}).get("restartPolicy") == "Always"

    total = len(containers) + sum(1 for name in init_specs if restartable(name))
    ready = restarts = sidecar_restarts = 0
    last_restart = sidecar_last_restart = 0.0
    phase = str(status.get("phase") or "Pending")
    reason = str(status.get("reason") or phase)
    conditions = _list(obj, "status", "conditions")
    for cond in conditions:
        if (isinstance(cond, Mapping) and cond.get("type") == "PodScheduled"
                and cond.get("reason") == "SchedulingGated"):
            reason = "SchedulingGated"

    def finished_at(container: Mapping[str, Any]) -> float:
        last = _dict(container, "lastState", "terminated")
        return parse_time(last.get("finishedAt")) or 0.0 if last else 0.0

    initializing = False
    init_statuses = [c for c in _list(obj, "status", "initContainerStatuses")
                     if isinstance(c, Mapping)]
    for i, container in enumerate(init_statuses):
        restarts += _int(container.get("restartCount"))
        last_restart = max(last_restart, finished_at(container))
        sidecar = restartable(container.get("name"))
        if sidecar:
            sidecar_restarts += _int(container.get("restartCount"))
            sidecar_last_restart = max(sidecar_last_restart, finished_at(container))
        state = _dict(container, "state")
        terminated, waiting = _dict(state, "terminated"), _dict(state, "waiting")
        if terminated and _int(terminated.get("exitCode")) == 0:
            continue
        if sidecar and container.get("started"):
            if container.get("ready"):
                ready += 1
            continue
        if terminated:
            reason = _terminated_reason(terminated, "Init:")
        elif waiting.get("reason") and waiting.get("reason") != "PodInitializing":
            reason = f"Init:{waiting['reason']}"
        else:
            reason = f"Init:{i}/{len(init_specs)}"
        initializing = True
        break

    if not initializing or _condition_true(conditions, "Initialized"):
        restarts, last_restart = sidecar_restarts, sidecar_last_restart
        has_running = False
        for container in reversed([c for c in _list(obj, "status", "containerStatuses")
                                   if isinstance(c, Mapping)]):
            restarts += _int(container.get("restartCount"))
            last_restart = max(last_restart, finished_at(container))
            state = _dict(container, "state")
            terminated, waiting = _dict(state, "terminated"), _dict(state, "waiting")
            if waiting.get("reason"):
                reason = str(waiting["reason"])
            elif terminated:
                reason = _terminated_reason(terminated)
            elif container.get("ready") and "running" in state:
                has_running = True
                ready += 1
        if reason == "Completed" and has_running:
            reason = "Running" if _condition_true(conditions, "Ready") else "NotReady"

    if meta.get("deletionTimestamp"):
        if status.get("reason") == "NodeLost":
            reason = "Unknown"
        elif phase not in ("Succeeded", "Failed"):
            reason = "Terminating"

    restarts_cell = str(restarts)
    if restarts and last_restart:
        restarts_cell = f"{restarts} ({human_duration((now or time.time()) - last_restart)} ago)"
    pod_ips = [p.get("ip") for p in _list(obj, "status", "podIPs") if isinstance(p, Mapping)]
    gates = [g.get("conditionType") for g in _list(obj, "spec", "readinessGates")
             if isinstance(g, Mapping)]
    gates_cell = "<none>"
    if gates:
        true = 0
        for gate in gates:
            for cond in conditions:
                if isinstance(cond, Mapping) and cond.get("type") == gate:
                    true += cond.get("status") == "True"
                    break
        gates_cell = f"{true}/{len(gates)}"
    cells = [meta.get("name", ""), f"{ready}/{total}", reason, restarts_cell,
             age(meta.get("creationTimestamp"), now),
             (pod_ips[0] if pod_ips else "") or "<none>", spec.get("nodeName") or "<none>",
             status.get("nominatedNodeName") or "<none>", gates_cell]
    return cells, phase


def print_pod(obj: Mapping[str, Any]) -> Row:
    cells, phase = pod_cells(obj)
    row: Row = {"cells": cells}
    if phase == "Succeeded":
        row["conditions"] = _POD_SUCCEEDED
    elif phase == "Failed":
        row["conditions"] = _POD_FAILED
    return row


SERVICE_COLUMNS = [
    NAME,
    _column("Type", "type determines how the Service is exposed. Defaults to ClusterIP."),
    _column("Cluster-IP", "clusterIP is the IP address of the service and is usually "
                          "assigned randomly."),
    _column("External-IP", "externalIPs is a list of IP addresses for which nodes in the "
                           "cluster will also accept traffic for this service."),
    _column("Port(s)", "The list of ports that are exposed by this service."),
    AGE,
    _column("Selector", "Route service traffic to pods with label keys and values matching "
                        "this selector.", 1),
]


def _service_external_ip(obj: Mapping[str, Any]) -> str:
    spec = _dict(obj, "spec")
    kind = spec.get("type") or "ClusterIP"
    external = [str(ip) for ip in _list(obj, "spec", "externalIPs")]
    if kind in ("ClusterIP", "NodePort"):
        return ",".join(external) or "<none>"
    if kind == "LoadBalancer":
        ingress = set()
        for entry in _list(obj, "status", "loadBalancer", "ingress"):
            if isinstance(entry, Mapping) and (entry.get("ip") or entry.get("hostname")):
                ingress.add(str(entry.get("ip") or entry.get("hostname")))
        lb = ",".join(sorted(ingress))  # wide: never shortened
        if external:
            return ",".join([*(lb.split(",") if lb else []), *external])
        return lb or "<pending>"
    if kind == "ExternalName":
        return str(spec.get("externalName", ""))
    return "<unknown>"


def service_ports(ports: Iterable[Any]) -> str:
    pieces = []
    for port in ports:
        if not isinstance(port, Mapping):
            continue
        protocol = port.get("protocol") or "TCP"
        if _int(port.get("nodePort")) > 0:
            pieces.append(f"{port.get('port')}:{port.get('nodePort')}/{protocol}")
        else:
            pieces.append(f"{port.get('port')}/{protocol}")
    return ",".join(pieces)


def format_labels(labels: Mapping[str, Any] | None) -> str:
    """``labels.FormatLabels``: sorted ``k=v`` pairs, ``<none>`` when empty."""
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or "<none>"


def print_service(obj: Mapping[str, Any]) -> Row:
    spec, meta = _dict(obj, "spec"), _meta(obj)
    cluster_ips = _list(obj, "spec", "clusterIPs")
    cluster_ip = (cluster_ips[0] if cluster_ips else spec.get("clusterIP")) or "<none>"
    return {"cells": [
        meta.get("name", ""), spec.get("type") or "ClusterIP", cluster_ip,
        _service_external_ip(obj), service_ports(_list(obj, "spec", "ports")) or "<none>",
        age(meta.get("creationTimestamp")), format_labels(spec.get("selector")),
    ]}


DEPLOYMENT_COLUMNS = [
    NAME,
    _column("Ready", "Number of the pod with ready state"),
    _column("Up-to-date", "Total number of non-terminated pods targeted by this deployment "
                          "that have the desired template spec."),
    _column("Available", "Total number of available pods (ready for at least "
                         "minReadySeconds) targeted by this deployment."),
    AGE,
    _column("Containers", "Names of each container in the template.", 1),
    _column("Images", "Images referenced by each container in the template.", 1),
    _column("Selector", "Label selector for pods. Existing ReplicaSets whose pods are "
                        "selected by this will be the ones affected by this deployment.", 1),
]


def print_deployment(obj: Mapping[str, Any]) -> Row:
    spec, status, meta = _dict(obj, "spec"), _dict(obj, "status"), _meta(obj)
    replicas = _int(spec.get("replicas"), 1) if spec.get("replicas") is not None else 1
    containers = [c for c in _list(obj, "spec", "template", "spec", "containers")
                  if isinstance(c, Mapping)]
    selector = spec.get("selector")
    try:
        selector_cell = format_label_selector(selector if isinstance(selector, Mapping) else None)
    except ValueError:
        selector_cell = "<invalid>"
    return {"cells": [
        meta.get("name", ""),
        f"{_int(status.get('readyReplicas'))}/{replicas}",
        _int(status.get("updatedReplicas")), _int(status.get("availableReplicas")),
        age(meta.get("creationTimestamp")),
        ",".join(str(c.get("name", "")) for c in containers),
        ",".join(str(c.get("image", "")) for c in containers),
        selector_cell,
    ]}


ENDPOINT_SLICE_COLUMNS = [
    NAME,
    _column("AddressType", "addressType specifies the type of address carried by this "
                           "EndpointSlice."),
    _column("Ports", "ports specifies the list of network ports exposed by each endpoint in "
                     "this slice."),
    _column("Endpoints", "endpoints is a list of unique endpoints in this slice."),
    AGE,
]


def _with_more(items: list[str], count: int, limit: int = 3) -> str:
    text = ",".join(items[:limit])
    if count > limit:
        return f"{text} + {count - limit} more..."
    return text or "<unset>"


def print_endpoint_slice(obj: Mapping[str, Any]) -> Row:
    ports = []
    for port in _list(obj, "ports"):
        if not isinstance(port, Mapping):
            continue
        if port.get("port") is not None:
            ports.append(str(port["port"]))
        elif port.get("name") is not None:
            ports.append(str(port["name"]))
        else:
            ports.append("*")
    addresses = [str(a) for e in _list(obj, "endpoints") if isinstance(e, Mapping)
                 for a in (e.get("addresses") or [])]
    meta = _meta(obj)
    return {"cells": [meta.get("name", ""), obj.get("addressType", ""),
                      _with_more(ports, len(ports)), _with_more(addresses, len(addresses)),
                      age(meta.get("creationTimestamp"))]}


NAMESPACE_COLUMNS = [
    NAME,
    _column("Status", "The status of the namespace"),
    AGE,
]


def print_namespace(obj: Mapping[str, Any]) -> Row:
    meta = _meta(obj)
    return {"cells": [meta.get("name", ""), _dict(obj, "status").get("phase", ""),
                      age(meta.get("creationTimestamp"))]}


CONFIGMAP_COLUMNS = [
    NAME,
    _column("Data", "Data contains the configuration data."),
    AGE,
]


def print_configmap(obj: Mapping[str, Any]) -> Row:
    meta = _meta(obj)
    size = len(_dict(obj, "data")) + len(_dict(obj, "binaryData"))
    return {"cells": [meta.get("name", ""), size, age(meta.get("creationTimestamp"))]}


DEFAULT_COLUMNS = [NAME, _column("Created At", _CREATED_DOC, type_="date")]


def print_default(obj: Mapping[str, Any]) -> Row:
    """The generic convertor (``rest.NewDefaultTableConvertor``): name and creation time."""
    at = parse_time(_meta(obj).get("creationTimestamp"))
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)) if at is not None else None
    return {"cells": [_meta(obj).get("name", ""), created]}


PRINTERS: dict[tuple[str, str], tuple[list[dict[str, Any]], Printer]] = {
    ("", "Node"): (NODE_COLUMNS, print_node),
    ("", "Pod"): (POD_COLUMNS, print_pod),
    ("", "Service"): (SERVICE_COLUMNS, print_service),
    ("", "Namespace"): (NAMESPACE_COLUMNS, print_namespace),
    ("", "ConfigMap"): (CONFIGMAP_COLUMNS, print_configmap),
    ("apps", "Deployment"): (DEPLOYMENT_COLUMNS, print_deployment),
    ("discovery.k8s.io", "EndpointSlice"): (ENDPOINT_SLICE_COLUMNS, print_endpoint_slice),
}


def _row_object(obj: dict[str, Any], include: str, api_version: str) -> Any:
    if include == "None":
        return None
    if include == "Object":
        return obj
    return {"kind": "PartialObjectMetadata", "apiVersion": api_version,
            "metadata": obj.get("metadata") or {}}


def to_table(rtype: ResourceType, objects: Iterable[dict[str, Any]],
             list_meta: Mapping[str, Any], api_version: str = f"{TABLE_GROUP}/v1",
             include_object: str = "") -> dict[str, Any]:
    """A Table of ``objects`` (one for a GET, the page for a list); ``list_meta`` becomes
    the Table's metadata (resourceVersion, continue, remainingItemCount)."""
    if include_object not in INCLUDE_OBJECT:
        raise errors.bad_request(f'unrecognized includeObject value: "{include_object}"')
    columns, printer = PRINTERS.get((rtype.group, rtype.kind), (DEFAULT_COLUMNS, print_default))
    rows = []
    for obj in objects:
        row = printer(obj)
        row["object"] = _row_object(obj, include_object, api_version)
        rows.append(row)
    return {"kind": "Table", "apiVersion": api_version, "metadata": dict(list_meta),
            "columnDefinitions": columns, "rows": rows}
