"""``/openapi/v3``: the OpenAPI v3 discovery root and one document per group version, built
from the resource table.

What kubectl reads from them:

* ``apply`` / ``create -f`` / ``replace`` with the default ``--validate=true`` (strict) ask
  whether the server does field validation itself (cli-runtime's ``QueryParamVerifierV3``):
  the group version's document must hold a PATCH operation tagged with the kind's
  ``x-kubernetes-group-version-kind`` whose parameters include ``fieldValidation``. Then
  kubectl sends ``?fieldValidation=Strict`` and validates nothing on its own (without it,
  kubectl wants the full ``/openapi/v2`` schema and fails).
* ``apply`` of an existing object looks for ``application/strategic-merge-patch+json`` among
  the PATCH operation's request content types; when it is there it computes the patch from
  the document's schemas. The schemas here are shallow (``spec`` and ``status`` are open
  objects), so the PATCH operations list only the JSON, merge and apply patch types: kubectl
  then falls back (past ``/openapi/v2``, which answers 406/404) to the strategic merge
  metadata compiled into it, which for the built-in kinds is what the real schema says. The
  server still accepts strategic merge patches.

The root lists ``paths["apis/apps/v1"].serverRelativeURL`` with a ``hash`` query, as the
real server does; any hash (or none) gets the current document. Documents are built once per
table and cached.

kubectl 1.27 asks ``/openapi/v2`` instead (protobuf only: gnostic's ``openapi_v2.Document``)
for the same ``fieldValidation`` question. ``/openapi/v2`` serves just that: the paths and
their operations with kind, parameters and patch types, encoded here by hand, and no
definitions (so kubectl falls back to its compiled-in strategic merge metadata, and
``kubectl explain`` finds nothing). It is JSON when the client asks for JSON.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

from .resources import ResourceTable, ResourceType

META = "io.k8s.apimachinery.pkg.apis.meta.v1"
OBJECT_META = f"{META}.ObjectMeta"
LIST_META = f"{META}.ListMeta"
STATUS = f"{META}.Status"
PATCH = f"{META}.Patch"
DELETE_OPTIONS = f"{META}.DeleteOptions"
SCALE = "io.k8s.api.autoscaling.v1.Scale"
PATCH_CONTENT_TYPES = ("application/apply-patch+yaml", "application/json-patch+json",
                       "application/merge-patch+json")
_PACKAGES = {"": "core", "apps": "apps", "discovery.k8s.io": "discovery"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def schema_name(rtype: ResourceType) -> str:
    package = _PACKAGES.get(rtype.group, rtype.group.split(".")[0])
    prefix = "io.k8s.api" if rtype.group in _PACKAGES else "io.lab.api"
    return f"{prefix}.{package}.{rtype.version}.{rtype.kind}"


def _gvk(group: str, version: str, kind: str) -> dict[str, str]:
    return {"group": group, "kind": kind, "version": version}


def _query(name: str, description: str, type_: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description,
            "schema": {"type": type_, "uniqueItems": True}}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "description": description, "required": True,
            "schema": {"type": "string", "uniqueItems": True}}


DRY_RUN = _query("dryRun", "When present, indicates that modifications should not be "
                           "persisted. Valid values are: - All: all dry run stages will be "
                           "processed")
FIELD_MANAGER = _query("fieldManager", "fieldManager is a name associated with the actor or "
                                       "entity that is making these changes.")
FIELD_VALIDATION = _query(
    "fieldValidation", "fieldValidation instructs the server on how to handle objects in the "
    "request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - "
    "Ignore: This will ignore any unknown fields that are silently dropped from the object, "
    "and will ignore all but the last duplicate field that the decoder encounters. - Warn: "
    "This will send a warning via the standard warning response header for each unknown "
    "field that is dropped from the object, and for each duplicate field that is "
    "encountered. This is the default. - Strict: This will fail the request with a "
    "BadRequest error if any unknown fields would be dropped from the object, or if any "
    "duplicate fields are present.")
FORCE = _query("force", "Force is going to \"force\" Apply requests.", "boolean")
PRETTY = _query("pretty", "If 'true', then the output is pretty printed.")
LIST_PARAMS = [_query(name, name) for name in (
    "allowWatchBookmarks", "continue", "fieldSelector", "labelSelector", "limit",
    "resourceVersion", "resourceVersionMatch", "sendInitialEvents", "timeoutSeconds", "watch")]


def _operation_id(verb: str, rtype: ResourceType, suffix: str = "",
                  all_namespaces: bool = False) -> str:
    group = (_PACKAGES.get(rtype.group) or rtype.group.split(".")[0]).capitalize()
    scope = "Namespaced" if rtype.namespaced and not all_namespaces else ""
    tail = "ForAllNamespaces" if all_namespaces else ""
    return f"{verb}{group}{rtype.version.capitalize()}{scope}{rtype.kind}{suffix}{tail}"


def _responses(schema: str, *codes: str) -> dict[str, Any]:
    content = {media: {"schema": _ref(schema)} for media in (
        "application/json", "application/yaml", "application/vnd.kubernetes.protobuf")}
    out = {code: {"description": {"200": "OK", "201": "Created",
                                  "202": "Accepted"}[code], "content": content}
           for code in codes}
    out["401"] = {"description": "Unauthorized"}
    return out


def _body(schema: str, types: tuple[str, ...] = ("*/*",)) -> dict[str, Any]:
    return {"content": {t: {"schema": _ref(schema)} for t in types}, "required": True}


def _op(verb: str, action: str, rtype: ResourceType, gvk: dict[str, str], schema: str,
        suffix: str = "", params: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None, codes: tuple[str, ...] = ("200",),
        all_namespaces: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "tags": [f"{_PACKAGES.get(rtype.group, rtype.group)}_{rtype.version}"],
        "description": f"{action} {rtype.kind}{suffix}",
        "operationId": _operation_id(verb, rtype, suffix, all_namespaces),
        "parameters": params or [],
        "responses": _responses(schema, *codes),
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk,
    }
    if body is not None:
        op["requestBody"] = body
    return op


def _write_params(patch: bool = False) -> list[dict[str, Any]]:
    params = [DRY_RUN, FIELD_MANAGER, FIELD_VALIDATION]
    return [*params, FORCE] if patch else params


def _item_ops(rtype: ResourceType, gvk: dict[str, str], schema: str,
              suffix: str = "") -> dict[str, Any]:
    patch_body = _body(PATCH, PATCH_CONTENT_TYPES)
    return {
        "get": _op("read", "get", rtype, gvk, schema, suffix),
        "put": _op("replace", "put", rtype, gvk, schema, suffix, _write_params(),
                   _body(schema), ("200", "201")),
        "patch": _op("patch", "patch", rtype, gvk, schema, suffix, _write_params(True),
                     patch_body, ("200", "201")),
    }


def _paths(rtype: ResourceType) -> dict[str, Any]:
    gvk = _gvk(rtype.group, rtype.version, rtype.kind)
    schema, list_schema = schema_name(rtype), f"{schema_name(rtype)}List"
    base = rtype.base_path()
    prefix = f"{base}/namespaces/{{namespace}}" if rtype.namespaced else base
    common = [_path_param("name", f"name of the {rtype.kind}")]
    if rtype.namespaced:
        common.append(_path_param("namespace", "object name and auth scope, such as for "
                                               "teams and projects"))
    common.append(PRETTY)
    collection: dict[str, Any] = {"parameters": [c for c in common if c["name"] != "name"]}
    item: dict[str, Any] = {"parameters": common}
    verbs = set(rtype.verbs)
    if "list" in verbs:
        collection["get"] = _op("list", "list", rtype, gvk, list_schema, params=LIST_PARAMS)
    if "create" in verbs:
        collection["post"] = _op("create", "post", rtype, gvk, schema, "", _write_params(),
                                 _body(schema), ("200", "201", "202"))
    if "deletecollection" in verbs:
        collection["delete"] = _op("deletecollection", "deletecollection", rtype, gvk, STATUS,
                                   params=[DRY_RUN, *LIST_PARAMS], body=_body(DELETE_OPTIONS))
    item.update({k: v for k, v in _item_ops(rtype, gvk, schema).items()
                 if {"get": "get", "put": "update", "patch": "patch"}[k] in verbs})
    if "delete" in verbs:
        item["delete"] = _op("delete", "delete", rtype, gvk, STATUS, params=[DRY_RUN],
                             body=_body(DELETE_OPTIONS), codes=("200", "202"))
    paths = {f"{prefix}/{rtype.plural}": collection, f"{prefix}/{rtype.plural}/{{name}}": item}
    if rtype.namespaced and "list" in verbs:
        paths[f"{base}/{rtype.plural}"] = {
            "parameters": [PRETTY],
            "get": _op("list", "list", rtype, gvk, list_schema, params=LIST_PARAMS,
                       all_namespaces=True)}
    for sub in rtype.subresources:
        if sub == "status":
            ops = _item_ops(rtype, gvk, schema, "Status")
        elif sub == "scale":
            ops = _item_ops(rtype, _gvk("autoscaling", "v1", "Scale"), SCALE, "Scale")
        else:
            continue
        paths[f"{prefix}/{rtype.plural}/{{name}}/{sub}"] = {"parameters": common, **ops}
    return paths


def _open(description: str) -> dict[str, Any]:
    return {"description": description, "type": "object",
            "x-kubernetes-preserve-unknown-fields": True}


def _kind_schema(rtype: ResourceType) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "apiVersion": {"type": "string", "description": "APIVersion defines the versioned "
                       "schema of this representation of an object."},
        "kind": {"type": "string", "description": "Kind is a string value representing the "
                 "REST resource this object represents."},
        "metadata": {"allOf": [_ref(OBJECT_META)], "default": {},
                     "description": "Standard object's metadata."},
    }
    for name in rtype.top_level_fields:
        properties[name] = _open(f"{rtype.kind} {name}")
    return {"description": f"{rtype.kind} (the lab's API server keeps nested fields open).",
            "type": "object", "properties": properties,
            "x-kubernetes-group-version-kind": [_gvk(rtype.group, rtype.version, rtype.kind)]}


def _list_schema(rtype: ResourceType) -> dict[str, Any]:
    return {"description": f"{rtype.list_kind} is a list of {rtype.kind}.", "type": "object",
            "required": ["items"],
            "properties": {
                "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                "items": {"type": "array", "items": {"allOf": [_ref(schema_name(rtype))],
                                                     "default": {}}},
                "metadata": {"allOf": [_ref(LIST_META)], "default": {}}},
            "x-kubernetes-group-version-kind": [
                _gvk(rtype.group, rtype.version, rtype.list_kind)]}


def _string_map() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": {"type": "string", "default": ""}}


COMMON_SCHEMAS: dict[str, Any] = {
    OBJECT_META: {
        "description": "ObjectMeta is metadata that all persisted resources must have.",
        "type": "object",
        "properties": {
            "annotations": _string_map(), "labels": _string_map(),
            "creationTimestamp": {"type": "string", "format": "date-time"},
            "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
            "deletionTimestamp": {"type": "string", "format": "date-time"},
            "finalizers": {"type": "array", "items": {"type": "string", "default": ""},
                           "x-kubernetes-list-type": "set",
                           "x-kubernetes-patch-strategy": "merge"},
            "generateName": {"type": "string"},
            "generation": {"type": "integer", "format": "int64"},
            "managedFields": {"type": "array", "items": {"type": "object"}},
            "name": {"type": "string"}, "namespace": {"type": "string"},
            "ownerReferences": {"type": "array", "items": {"type": "object"},
                                "x-kubernetes-patch-merge-key": "uid",
                                "x-kubernetes-patch-strategy": "merge"},
            "resourceVersion": {"type": "string"}, "selfLink": {"type": "string"},
            "uid": {"type": "string"},
        },
    },
    LIST_META: {"type": "object", "properties": {
        "continue": {"type": "string"}, "remainingItemCount": {"type": "integer"},
        "resourceVersion": {"type": "string"}, "selfLink": {"type": "string"}}},
    STATUS: {"type": "object", "properties": {
        "apiVersion": {"type": "string"}, "code": {"type": "integer", "format": "int32"},
        "details": {"type": "object"}, "kind": {"type": "string"},
        "message": {"type": "string"}, "metadata": {"allOf": [_ref(LIST_META)]},
        "reason": {"type": "string"}, "status": {"type": "string"}},
        "x-kubernetes-group-version-kind": [_gvk("", "v1", "Status")]},
    PATCH: {"description": "Patch is provided to give a concrete name and type to the "
                           "Kubernetes PATCH request body.", "type": "object"},
    DELETE_OPTIONS: {"type": "object", "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
        "dryRun": {"type": "array", "items": {"type": "string", "default": ""}},
        "gracePeriodSeconds": {"type": "integer", "format": "int64"},
        "preconditions": {"type": "object"}, "propagationPolicy": {"type": "string"}},
        "x-kubernetes-group-version-kind": [_gvk("", "v1", "DeleteOptions")]},
    SCALE: {"description": "Scale represents a scaling request for a resource.",
            "type": "object", "properties": {
                "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                "metadata": {"allOf": [_ref(OBJECT_META)], "default": {}},
                "spec": {"type": "object", "properties": {
                    "replicas": {"type": "integer", "format": "int32"}}},
                "status": {"type": "object", "properties": {
                    "replicas": {"type": "integer", "format": "int32", "default": 0},
                    "selector": {"type": "string"}}}},
            "x-kubernetes-group-version-kind": [_gvk("autoscaling", "v1", "Scale")]},
}


def group_version_document(table: ResourceTable, group: str, version: str,
                           server_version: str = "v1.31.0") -> dict[str, Any] | None:
    types = table.in_group_version(group, version)
    if not types:
        return None
    paths: dict[str, Any] = {}
    schemas = dict(COMMON_SCHEMAS)
    for rtype in types:
        paths.update(_paths(rtype))
        schemas[schema_name(rtype)] = _kind_schema(rtype)
        schemas[f"{schema_name(rtype)}List"] = _list_schema(rtype)
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": server_version},
            "paths": dict(sorted(paths.items())),
            "components": {"schemas": dict(sorted(schemas.items()))}}


def path_key(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


class OpenApiV3:
    """The documents of one resource table, serialised once (thread-safe, lazy)."""

    def __init__(self, table: ResourceTable, server_version: str = "v1.31.0") -> None:
        self.table = table
        self.server_version = server_version
        self._lock = threading.Lock()
        self._docs: dict[str, bytes] | None = None
        self._root: bytes | None = None
        self._swagger: tuple[bytes, bytes] | None = None

    def _build(self) -> tuple[dict[str, bytes], bytes]:
        with self._lock:
            if self._docs is None or self._root is None:
                docs: dict[str, bytes] = {}
                for group, versions in self.table.group_versions():
                    for version in versions:
                        doc = group_version_document(self.table, group, version,
                                                     self.server_version)
                        if doc is not None:
                            docs[path_key(group, version)] = json.dumps(
                                doc, separators=(",", ":")).encode()
                root = {"paths": {
                    key: {"serverRelativeURL": f"/openapi/v3/{key}?hash="
                          f"{hashlib.sha512(body).hexdigest().upper()}"}
                    for key, body in sorted(docs.items())}}
                self._docs, self._root = docs, json.dumps(root, separators=(",", ":")).encode()
            return self._docs, self._root

    def root(self) -> bytes:
        return self._build()[1]

    def swagger(self, protobuf: bool) -> bytes:
        """``/openapi/v2``: protobuf (what client-go asks for) or JSON."""
        with self._lock:
            if self._swagger is None:
                doc = swagger_document(self.table, self.server_version)
                self._swagger = (swagger_protobuf(doc),
                                 json.dumps(doc, separators=(",", ":")).encode())
            return self._swagger[0 if protobuf else 1]

    def document(self, key: str) -> bytes | None:
        """``key`` is the part after ``/openapi/v3/``: ``api/v1``, ``apis/apps/v1``."""
        return self._build()[0].get(key.strip("/"))


# --- /openapi/v2 (protobuf, for kubectl 1.27's QueryParamVerifier) -------------------------

# Clients ask for ``...spec.v2@v1.0+protobuf``; the answer's type has a dot for the ``@``,
# which Go's mime parser (client-go reads every Content-Type) refuses.
V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"


def swagger_document(table: ResourceTable, server_version: str = "v1.31.0") -> dict[str, Any]:
    """The part of ``/openapi/v2`` kubectl 1.27 reads: every path's operations tagged with
    their kind, PATCH and the writes naming ``fieldValidation``; no definitions, so kubectl
    computes strategic merge patches from its compiled-in types."""
    paths: dict[str, Any] = {}
    for rtype in table:
        for path, item in _paths(rtype).items():
            ops: dict[str, Any] = {}
            for method, op in item.items():
                if method == "parameters":
                    continue
                params = [{k: v for k, v in p.items() if k != "schema"}
                          | {"type": p["schema"]["type"], "uniqueItems": True}
                          for p in op["parameters"] if p["in"] == "query"]
                ops[method] = {"operationId": op["operationId"],
                               "consumes": (list(PATCH_CONTENT_TYPES) if method == "patch"
                                            else ["*/*"]),
                               "produces": ["application/json", "application/yaml"],
                               "parameters": params,
                               "responses": {"200": {"description": "OK"}},
                               "x-kubernetes-action": op["x-kubernetes-action"],
                               "x-kubernetes-group-version-kind":
                                   op["x-kubernetes-group-version-kind"]}
            paths[path] = ops
    return {"swagger": "2.0", "info": {"title": "Kubernetes", "version": server_version},
            "paths": dict(sorted(paths.items()))}


def _key(field: int, wire: int) -> bytes:
    return _uvarint(field << 3 | wire)


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _bytes(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _uvarint(len(data)) + data


def _str(field: int, text: str) -> bytes:
    return _bytes(field, text.encode()) if text else b""


def _bool(field: int, value: bool) -> bytes:
    return _key(field, 0) + b"\x01" if value else b""


def _named_any(name: str, value: Any) -> bytes:
    if isinstance(value, dict):
        text = "".join(f"{k}: {v}\n" for k, v in sorted(value.items()))
    else:
        text = f"{value}\n"
    return _str(1, name) + _bytes(2, _str(2, text))  # NamedAny{name, Any{yaml}}


_METHOD_FIELDS = {"get": 2, "put": 3, "post": 4, "delete": 5, "patch": 8}  # PathItem


def _operation(op: dict[str, Any]) -> bytes:
    out = _str(5, op["operationId"])
    out += b"".join(_str(6, p) for p in op["produces"])
    out += b"".join(_str(7, c) for c in op["consumes"])
    for p in op["parameters"]:
        query = (_str(2, "query") + _str(3, p.get("description", "")) + _str(4, p["name"])
                 + _str(6, p["type"]) + _bool(20, True))  # QueryParameterSubSchema
        # ParametersItem{parameter: Parameter{non_body_parameter: NonBodyParameter{query}}}
        out += _bytes(8, _bytes(1, _bytes(2, _bytes(3, query))))
    responses = b"".join(
        _bytes(1, _str(1, code) + _bytes(2, _bytes(1, _str(1, r["description"]))))
        for code, r in op["responses"].items())
    out += _bytes(9, responses)
    for name in ("x-kubernetes-action", "x-kubernetes-group-version-kind"):
        out += _bytes(13, _named_any(name, op[name]))
    return out


def swagger_protobuf(doc: dict[str, Any]) -> bytes:
    """``doc`` (from :func:`swagger_document`) as gnostic's openapi_v2.Document message."""
    info = _str(1, doc["info"]["title"]) + _str(2, doc["info"]["version"])
    paths = b""
    for path, ops in doc["paths"].items():
        item = b"".join(_bytes(_METHOD_FIELDS[m], _operation(op)) for m, op in ops.items())
        paths += _bytes(2, _str(1, path) + _bytes(2, item))  # Paths.path: NamedPathItem
    return _str(1, doc["swagger"]) + _bytes(2, info) + _bytes(8, paths)
