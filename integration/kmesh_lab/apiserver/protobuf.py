"""Reading the Kubernetes protobuf encoding of the few objects kubectl sends that way.

kubectl 1.32 and later send the objects of their typed generators (``kubectl create
namespace``, ``create configmap``, ``create service``, ``create deployment``) as
``application/vnd.kubernetes.protobuf`` and do not fall back to JSON on a 415. This module
decodes the ``k8s\\x00`` envelope (runtime.Unknown) and those kinds into the JSON form the
rest of the server works on. The field numbers are those of k8s.io/api's generated.proto.

A field this table does not know is an error (the server answers 415 asking for JSON)
rather than silently lost, unless it holds its zero value, which the Go encoder writes for
every non-pointer field. Scalars at their zero value are left out, as the Go types'
``omitempty`` leaves them out of JSON. Responses are always JSON (every client that sends
protobuf also accepts JSON). Protobuf for other kinds, and for lists and watches, is left
out.
"""

from __future__ import annotations

import base64
import datetime
from typing import Any

MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    pass


# A field: (JSON name, kind, repeated). kind is "string", "bytes", "int", "bool", "time",
# "quantity", "intorstr", "map:<value kind>" or the name of a message in SCHEMAS.
Field = tuple[str, str, bool]
SCHEMAS: dict[str, dict[int, Field]] = {
    "Unknown": {1: ("typeMeta", "TypeMeta", False), 2: ("raw", "bytes", False),
                3: ("contentEncoding", "string", False), 4: ("contentType", "string", False)},
    "TypeMeta": {1: ("apiVersion", "string", False), 2: ("kind", "string", False)},
    "ObjectMeta": {
        1: ("name", "string", False), 2: ("generateName", "string", False),
        3: ("namespace", "string", False), 4: ("selfLink", "string", False),
        5: ("uid", "string", False), 6: ("resourceVersion", "string", False),
        7: ("generation", "int", False), 8: ("creationTimestamp", "time", False),
        9: ("deletionTimestamp", "time", False),
        10: ("deletionGracePeriodSeconds", "int", False),
        11: ("labels", "map:string", False), 12: ("annotations", "map:string", False),
        13: ("ownerReferences", "OwnerReference", True), 14: ("finalizers", "string", True),
    },
    "OwnerReference": {1: ("kind", "string", False), 3: ("name", "string", False),
                       4: ("uid", "string", False), 5: ("apiVersion", "string", False),
                       6: ("controller", "bool", False),
                       7: ("blockOwnerDeletion", "bool", False)},
    "LabelSelector": {1: ("matchLabels", "map:string", False),
                      2: ("matchExpressions", "LabelSelectorRequirement", True)},
    "LabelSelectorRequirement": {1: ("key", "string", False), 2: ("operator", "string", False),
                                 3: ("values", "string", True)},
    "Namespace": {1: ("metadata", "ObjectMeta", False), 2: ("spec", "NamespaceSpec", False),
                  3: ("status", "NamespaceStatus", False)},
    "NamespaceSpec": {1: ("finalizers", "string", True)},
    "NamespaceStatus": {1: ("phase", "string", False)},
    "ConfigMap": {1: ("metadata", "ObjectMeta", False), 2: ("data", "map:string", False),
                  3: ("binaryData", "map:bytes", False), 4: ("immutable", "bool", False)},
    "Service": {1: ("metadata", "ObjectMeta", False), 2: ("spec", "ServiceSpec", False),
                3: ("status", "ServiceStatus", False)},
    "ServiceSpec": {
        1: ("ports", "ServicePort", True), 2: ("selector", "map:string", False),
        3: ("clusterIP", "string", False), 4: ("type", "string", False),
        5: ("externalIPs", "string", True), 7: ("sessionAffinity", "string", False),
        10: ("externalName", "string", False), 11: ("externalTrafficPolicy", "string", False),
        13: ("publishNotReadyAddresses", "bool", False), 17: ("ipFamilyPolicy", "string", False),
        18: ("clusterIPs", "string", True), 19: ("ipFamilies", "string", True),
        22: ("internalTrafficPolicy", "string", False),
        23: ("trafficDistribution", "string", False),
    },
    "ServicePort": {1: ("name", "string", False), 2: ("protocol", "string", False),
                    3: ("port", "int", False), 4: ("targetPort", "intorstr", False),
                    5: ("nodePort", "int", False), 6: ("appProtocol", "string", False)},
    "ServiceStatus": {1: ("loadBalancer", "LoadBalancerStatus", False)},
    "LoadBalancerStatus": {},
    "Deployment": {1: ("metadata", "ObjectMeta", False), 2: ("spec", "DeploymentSpec", False),
                   3: ("status", "DeploymentStatus", False)},
    "DeploymentSpec": {1: ("replicas", "int", False), 2: ("selector", "LabelSelector", False),
                       3: ("template", "PodTemplateSpec", False),
                       4: ("strategy", "DeploymentStrategy", False),
                       5: ("minReadySeconds", "int", False),
                       6: ("revisionHistoryLimit", "int", False), 7: ("paused", "bool", False),
                       9: ("progressDeadlineSeconds", "int", False)},
    "DeploymentStrategy": {1: ("type", "string", False)},
    "DeploymentStatus": {},
    "PodTemplateSpec": {1: ("metadata", "ObjectMeta", False), 2: ("spec", "PodSpec", False)},
    "PodSpec": {2: ("containers", "Container", True), 3: ("restartPolicy", "string", False),
                7: ("nodeSelector", "map:string", False), 10: ("nodeName", "string", False),
                20: ("initContainers", "Container", True)},
    "Container": {1: ("name", "string", False), 2: ("image", "string", False),
                  3: ("command", "string", True), 4: ("args", "string", True),
                  5: ("workingDir", "string", False), 6: ("ports", "ContainerPort", True),
                  7: ("env", "EnvVar", True), 8: ("resources", "ResourceRequirements", False),
                  14: ("imagePullPolicy", "string", False)},
    "ContainerPort": {1: ("name", "string", False), 2: ("hostPort", "int", False),
                      3: ("containerPort", "int", False), 4: ("protocol", "string", False),
                      5: ("hostIP", "string", False)},
    "EnvVar": {1: ("name", "string", False), 2: ("value", "string", False)},
    "ResourceRequirements": {1: ("limits", "map:quantity", False),
                             2: ("requests", "map:quantity", False)},
}
KINDS = {("v1", "Namespace"): "Namespace", ("v1", "ConfigMap"): "ConfigMap",
         ("v1", "Service"): "Service", ("apps/v1", "Deployment"): "Deployment"}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ProtobufError("varint too long")


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value): ints for varints, bytes for the rest."""
    out: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ProtobufError("truncated field")
            value, pos = data[pos:pos + length], pos + length
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _scalar(kind: str, value: Any) -> Any:
    if kind == "string":
        return bytes(value).decode()
    if kind == "bytes":
        return base64.b64encode(bytes(value)).decode()  # JSON carries []byte as base64
    if kind == "int":
        return _signed(value)
    if kind == "bool":
        return bool(value)
    if kind == "quantity":
        parts = {n: v for n, _, v in _fields(value)}
        return bytes(parts.get(1, b"")).decode()
    if kind == "intorstr":
        parts = {n: v for n, _, v in _fields(value)}
        if parts.get(1, 0) == 0:
            return _signed(parts.get(2, 0))
        return bytes(parts.get(3, b"")).decode()
    if kind == "time":
        parts = {n: v for n, _, v in _fields(value)}
        seconds = _signed(parts.get(1, 0))
        if not seconds:
            return None
        stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
        return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    raise ProtobufError(f"unknown scalar kind {kind}")


def _message(name: str, data: bytes) -> dict[str, Any]:
    schema = SCHEMAS[name]
    result: dict[str, Any] = {}
    for number, _, value in _fields(data):
        field = schema.get(number)
        if field is None:
            if value in (0, b""):
                continue  # a zero value the Go encoder writes for every non-pointer field
            raise ProtobufError(f"field {number} of {name} is not known to this test server")
        json_name, kind, repeated = field
        if kind.startswith("map:"):
            entry = {n: v for n, _, v in _fields(value)}
            key = bytes(entry.get(1, b"")).decode()
            result.setdefault(json_name, {})[key] = _scalar(kind[4:], entry.get(2, b""))
            continue
        decoded = _message(kind, value) if kind in SCHEMAS else _scalar(kind, value)
        if repeated:
            result.setdefault(json_name, []).append(decoded)
        elif kind in SCHEMAS or decoded not in ("", 0, False, None):
            result[json_name] = decoded
    return result


def decode(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded object of a kind in :data:`KINDS`."""
    if not body.startswith(MAGIC):
        raise ProtobufError("not a Kubernetes protobuf body (no k8s\\0 prefix)")
    envelope = _message("Unknown", body[len(MAGIC):])
    type_meta = envelope.get("typeMeta") or {}
    api_version, kind = type_meta.get("apiVersion", ""), type_meta.get("kind", "")
    message = KINDS.get((api_version, kind))
    if message is None:
        raise ProtobufError(f"{api_version} {kind} in protobuf is not known to this test server")
    raw = _fields(body[len(MAGIC):])
    payload = next((bytes(v) for n, _, v in raw if n == 2), b"")
    obj = _message(message, payload)
    return {"apiVersion": api_version, "kind": kind, **obj}
