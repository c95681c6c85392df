"""Kubernetes semantics of the verbs on top of the store: what the real registry does to an
object between the request and etcd.

* create: ``apiVersion``/``kind`` set from the resource; ``metadata.namespace`` from the URL
  (another one in the body is 400 BadRequest); the namespace must exist (404); ``name`` or
  ``generateName``; server-filled ``uid``, ``creationTimestamp``, ``generation`` (1); 409
  AlreadyExists; ``.status`` dropped for kinds with a status subresource; Namespaces get
  ``status.phase: Active``, ``spec.finalizers: [kubernetes]`` and the
  ``kubernetes.io/metadata.name`` label.
* update (PUT) and patch: 409 Conflict when the body's resourceVersion is set and stale;
  identity fields kept; ``generation`` bumped when anything outside metadata and status
  changes; ``.status`` kept for kinds with a status subresource, and a write to ``/status``
  changes only ``.status``. A write that changes nothing stores nothing (no new
  resourceVersion, no event), as etcd's GuaranteedUpdate does.
* delete: preconditions (uid, resourceVersion), then removal (later GETs are 404), except
  graceful deletion of Pods: a scheduled, unfinished Pod deleted with a grace period (the
  options', else ``terminationGracePeriodSeconds``, else 30) gets ``deletionTimestamp`` and
  ``deletionGracePeriodSeconds`` and stays until deleted with ``gracePeriodSeconds=0``, as
  the kubelet does. No finalizers. Deleting a Namespace deletes what is in it first, at once;
  ``default``, ``kube-system`` and ``kube-public`` cannot be deleted (403).
* list: consistent pages from one snapshot, ``continue`` tokens in the real server's format
  (base64 of ``{"v":"meta.k8s.io/v1","rv":N,"start":"<key>\\u0000"}``), remainingItemCount,
  selectors; a token older than the last compaction is 410 Expired with the real message
  and an "inconsistent" token (rv -1) that continues from the current state.

* scale (``deployments/scale``): an autoscaling/v1 ``Scale`` of ``spec.replicas`` (default 1),
  ``status.replicas`` and the selector as a string; PUT and PATCH write ``spec.replicas``
  through the update path (preconditions, generation, admission as ``"update"``).

Admission hooks ``fn(verb, obj, old)`` run just before a write is stored, under the store
lock (they may use the server's in-process API, never its HTTP port). ``verb`` is
``"create"``, ``"update"`` (PUT and PATCH), ``"update/status"`` (a write to the status
subresource) or ``"delete"``. A hook may change ``obj`` (ignored for delete) or raise
:class:`~.errors.ApiError` (e.g. ``errors.invalid(...)``, 422), which becomes the answer;
any other exception is a 500 InternalError naming the hook.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import errors, patch
from .errors import ApiError
from .resources import NAMESPACES, ResourceTable, ResourceType
from .selectors import FieldSelector, LabelSelector, SelectorError, format_label_selector
from .store import Record, Store, dumps, make_record, object_key

AdmissionHook = Callable[[str, dict[str, Any], dict[str, Any] | None], None]

PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
}
UNDELETABLE_NAMESPACES = ("default", "kube-system", "kube-public")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # apimachinery's, no vowels and no 0/1/3
INCONSISTENT_CONTINUE = (
    "The provided continue parameter is too old to display a consistent list result. You can "
    "start a new list without the continue parameter, or use the continue token in this "
    "response to retrieve the remainder of the results. Continuing with the provided token "
    "results in an inconsistent list - objects that were created, modified, or deleted "
    "between the time the first chunk was returned and now may show up in the list."
)
_NOT_SPEC = ("metadata", "status", "kind", "apiVersion")
_SERVER_OWNED_META = ("selfLink", "managedFields", "deletionTimestamp",
                      "deletionGracePeriodSeconds")


def now_rfc3339(offset_seconds: float = 0.0) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + offset_seconds))


def encode_continue(rv: int, start: str) -> str:
    token = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start},
                       separators=(",", ":"))
    return base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def decode_continue(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if data.get("v") != "meta.k8s.io/v1":
            raise ValueError("the continue token is not supported by this server")
        rv, start = data["rv"], data["start"]
        if not isinstance(rv, int) or not isinstance(start, str) or rv == 0:
            raise ValueError("the continue token has no resource version")
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError) as e:
        raise errors.bad_request(f"continue key is not valid: {e}") from None
    return rv, start


@dataclass
class ListPage:
    rtype: ResourceType
    rv: int
    records: list[Record]
    continue_token: str | None = None
    remaining: int | None = None

    def body(self) -> bytes:
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if self.continue_token:
            meta["continue"] = self.continue_token
        if self.remaining is not None:
            meta["remainingItemCount"] = self.remaining
        head = (f'{{"kind":"{self.rtype.list_kind}","apiVersion":"{self.rtype.api_version}",'
                f'"metadata":').encode()
        return b"".join((head, dumps(meta), b',"items":[',
                         b",".join(r.raw for r in self.records), b"]}"))


def _apply_patch(doc: dict[str, Any], patch_type: str, patch_body: Any,
                 rules: Mapping[Any, Any]) -> Any:
    try:
        if patch_type == "json":
            return patch.json_patch(doc, patch_body)
        if patch_type == "merge":
            if not isinstance(patch_body, dict):
                raise patch.PatchError("a merge patch must be a JSON object")
            return patch.merge_patch(doc, patch_body)
        if patch_type == "strategic":
            return patch.strategic_merge_patch(doc, patch_body, rules)
    except patch.PatchError as e:
        if e.code == 422:
            raise ApiError(422, str(e), "Invalid") from None
        raise errors.bad_request(str(e)) from None
    raise errors.unsupported_patch_type(patch_type)


def _spec_part(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in _NOT_SPEC}


def _without_rv(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "resourceVersion"}
    return {**obj, "metadata": meta}


class Registry:
    def __init__(self, store: Store, table: ResourceTable,
                 admission: Sequence[AdmissionHook] = ()) -> None:
        self.store = store
        self.table = table
        self.admission = tuple(admission)

    # --- helpers -----------------------------------------------------------------------

    def _admit(self, verb: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        for hook in self.admission:
            try:
                hook(verb, obj, old)
            except ApiError:
                raise
            except Exception as e:  # a bug in the hook, reported as the real server would
                name = getattr(hook, "__qualname__", repr(hook))
                raise ApiError(500, f"Internal error occurred: admission hook {name} failed: "
                                    f"{type(e).__name__}: {e}", "InternalError") from e

    def _existing(self, rtype: ResourceType, namespace: str, name: str) -> Record:
        record = self.store.get(rtype, object_key(rtype, namespace, name))
        if record is None:
            raise errors.not_found(rtype, name)
        return record

    def _check_body(self, rtype: ResourceType, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise errors.bad_request(
                f"the object provided is unrecognized (must be of type {rtype.kind})")
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if api_version and api_version != rtype.api_version:
            raise errors.bad_request(
                f"the API version in the data ({api_version}) does not match the expected "
                f"API version ({rtype.api_version})")
        if kind and kind != rtype.kind:
            raise errors.bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rtype.kind})")
        meta = body.get("metadata")
        if meta is None:
            meta = body["metadata"] = {}
        if not isinstance(meta, dict):
            raise errors.bad_request("metadata must be an object")
        body["apiVersion"], body["kind"] = rtype.api_version, rtype.kind
        return meta

    def _check_namespace(self, rtype: ResourceType, meta: dict[str, Any], namespace: str) -> None:
        if not rtype.namespaced:
            meta.pop("namespace", None)
            return
        given = meta.get("namespace")
        if given and given != namespace:
            raise errors.bad_request("the namespace of the provided object does not match the "
                                     "namespace sent on the request")
        meta["namespace"] = namespace

    def _check_name(self, rtype: ResourceType, name: str) -> None:
        pattern, limit = ((_DNS_LABEL, 63) if rtype is NAMESPACES else (_DNS_SUBDOMAIN, 253))
        if len(name) > limit or not pattern.match(name):
            what = "RFC 1123 label" if rtype is NAMESPACES else "lowercase RFC 1123 subdomain"
            raise errors.invalid(
                rtype, name, "metadata.name",
                f'Invalid value: "{name}": a {what} must consist of lower case alphanumeric '
                f"characters, '-' or '.', and must start and end with an alphanumeric "
                f"character (at most {limit} characters)")

    def _commit(self, rtype: ResourceType, obj: dict[str, Any], previous: Record | None,
                dry_run: bool) -> Record:
        if dry_run:
            return make_record(rtype, obj, previous.rv if previous else None)
        return self.store.write(rtype, obj, previous)

    # --- reads -------------------------------------------------------------------------

    def get(self, rtype: ResourceType, namespace: str, name: str) -> Record:
        with self.store.lock:
            return self._existing(rtype, namespace, name)

    def list(
        self,
        rtype: ResourceType,
        namespace: str = "",
        labels: LabelSelector | None = None,
        fields: FieldSelector | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
        exact_rv: int | None = None,
    ) -> ListPage:
        """One page (all of it without ``limit``) in key order."""
        labels = labels or LabelSelector()
        fields = fields or FieldSelector()
        unsupported = fields.unsupported(rtype.field_labels())
        if unsupported:
            raise errors.bad_request(f"field label not supported: {unsupported}")
        if limit is not None and limit <= 0:
            limit = None
        prefix = f"{namespace}/" if rtype.namespaced and namespace else ""
        start = ""
        rv: int | None = exact_rv
        if continue_token:
            rv, start = decode_continue(continue_token)
            if rv == -1:
                rv = None  # an inconsistent token continues from the current state
        try:
            snap = self.store.snapshot(rtype, rv)
        except ApiError as e:
            if e.code == 410 and continue_token:
                raise errors.expired(INCONSISTENT_CONTINUE,
                                     encode_continue(-1, start)) from None
            raise
        keys, records = snap.keys, snap.records
        lo = bisect.bisect_left(keys, prefix + start) if (prefix or start) else 0
        hi = bisect.bisect_left(keys, prefix[:-1] + "0") if prefix else len(keys)
        selecting = not labels.empty or not fields.empty
        out: list[Record] = []
        index = lo
        while index < hi:
            record = records[index]
            index += 1
            if selecting and not (labels.matches(record.labels) and fields.matches(record.fields)):
                continue
            out.append(record)
            if limit is not None and len(out) == limit:
                break
        page = ListPage(rtype, snap.rv, out)
        if limit is not None and len(out) == limit and index < hi:
            page.continue_token = encode_continue(snap.rv, out[-1].key[len(prefix):] + "\x00")
            if not selecting:
                page.remaining = hi - index
        return page

    # --- writes ------------------------------------------------------------------------

    def create(self, rtype: ResourceType, namespace: str, body: Any,
               dry_run: bool = False) -> Record:
        meta = self._check_body(rtype, body)
        with self.store.lock:
            name = meta.get("name")
            if not name:
                generate = meta.get("generateName")
                if not generate:
                    raise errors.invalid(rtype, "", "metadata.name",
                                         "Required value: name or generateName is required")
                name = generate + "".join(secrets.choice(_NAME_ALPHABET) for _ in range(5))
                meta["name"] = name
            if not isinstance(name, str):
                raise errors.bad_request("metadata.name must be a string")
            self._check_name(rtype, name)
            self._check_namespace(rtype, meta, namespace)
            if rtype.namespaced and self.store.get(NAMESPACES, namespace) is None:
                raise errors.not_found(NAMESPACES, namespace)
            if meta.get("resourceVersion"):
                raise ApiError(500, "resourceVersion should not be set on objects to be created",
                               "InternalError")
            if self.store.get(rtype, object_key(rtype, namespace, name)) is not None:
                raise errors.already_exists(rtype, name)
            for key in _SERVER_OWNED_META:
                meta.pop(key, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_rfc3339()
            meta["generation"] = 1
            if rtype.has_status:
                body["status"] = {}
            if rtype is NAMESPACES:
                self._namespace_defaults(body, name)
            self._admit("create", body, None)
            self._check_unchanged_identity(rtype, body, name, namespace, meta["uid"])
            return self._commit(rtype, body, None, dry_run)

    @staticmethod
    def _namespace_defaults(body: dict[str, Any], name: str) -> None:
        meta = body["metadata"]
        labels = meta.get("labels") or {}
        labels["kubernetes.io/metadata.name"] = name
        meta["labels"] = labels
        spec = body.get("spec") or {}
        spec.setdefault("finalizers", ["kubernetes"])
        body["spec"] = spec
        body["status"] = {"phase": "Active"}

    def _check_unchanged_identity(self, rtype: ResourceType, obj: dict[str, Any], name: str,
                                  namespace: str, uid: str) -> None:
        meta = obj.get("metadata") or {}
        if (meta.get("name") != name or meta.get("uid") != uid
                or (rtype.namespaced and meta.get("namespace") != namespace)):
            raise ApiError(500, "Internal error occurred: an admission hook changed the "
                                "object's name, namespace or uid", "InternalError")

    def update(self, rtype: ResourceType, namespace: str, name: str, body: Any,
               subresource: str = "", dry_run: bool = False) -> Record:
        meta = self._check_body(rtype, body)
        with self.store.lock:
            old = self._existing(rtype, namespace, name)
            return self._update(rtype, namespace, name, body, meta, old, subresource, dry_run)

    def _update(self, rtype: ResourceType, namespace: str, name: str, body: dict[str, Any],
                meta: dict[str, Any], old: Record, subresource: str, dry_run: bool) -> Record:
        if meta.get("name") != name:
            raise errors.bad_request(f"the name of the object ({meta.get('name') or ''}) does "
                                     f"not match the name on the URL ({name})")
        self._check_namespace(rtype, meta, namespace)
        given_rv = meta.get("resourceVersion")
        if given_rv and str(given_rv) != str(old.rv):
            raise errors.conflict(rtype, name)
        if meta.get("uid") and meta["uid"] != old.uid:
            raise errors.conflict(rtype, name, f"Precondition failed: UID in precondition: "
                                               f"{meta['uid']}, UID in object meta: {old.uid}")
        old_obj = old.object()
        old_meta = old_obj["metadata"]
        if subresource == "status":
            new = old.object()
            if "status" in body:
                new["status"] = body["status"]
            else:
                new.pop("status", None)
        else:
            new = body
            for key in _SERVER_OWNED_META:
                meta.pop(key, None)
            for key in ("uid", "creationTimestamp", "generation", "deletionTimestamp",
                        "deletionGracePeriodSeconds"):
                if key in old_meta:
                    meta[key] = old_meta[key]
            if rtype.has_status:
                if "status" in old_obj:
                    new["status"] = old_obj["status"]
                else:
                    new.pop("status", None)
            if rtype is NAMESPACES:
                labels = meta.get("labels") or {}
                labels["kubernetes.io/metadata.name"] = name
                meta["labels"] = labels
            if _spec_part(new) != _spec_part(old_obj):
                meta["generation"] = int(old_meta.get("generation") or 0) + 1
        new["metadata"]["resourceVersion"] = str(old.rv)
        self._admit("update/status" if subresource == "status" else "update", new, old_obj)
        self._check_unchanged_identity(rtype, new, name, namespace, old.uid)
        if _without_rv(new) == _without_rv(old_obj):
            return old
        return self._commit(rtype, new, old, dry_run)

    def patch(self, rtype: ResourceType, namespace: str, name: str, patch_type: str,
              patch_body: Any, subresource: str = "", dry_run: bool = False,
              check: Callable[[dict[str, Any]], None] | None = None) -> Record:
        """``patch_type`` is ``json``, ``merge`` or ``strategic``; ``check`` sees (and may
        change, or refuse with an ApiError) the patched object before it is written."""
        with self.store.lock:
            old = self._existing(rtype, namespace, name)
            new = _apply_patch(old.object(), patch_type, patch_body, rtype.merge_rules)
            meta = self._check_body(rtype, new)
            if check is not None:
                check(new)
            return self._update(rtype, namespace, name, new, meta, old, subresource, dry_run)

    # --- the scale subresource (autoscaling/v1 Scale of spec.replicas) ---------------------

    @staticmethod
    def scale_of(record: Record) -> dict[str, Any]:
        """The Scale the real registry derives from a Deployment (``scaleFromDeployment``)."""
        obj = record.object()
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        status = obj.get("status") or {}
        try:
            selector = format_label_selector(spec.get("selector"))
        except SelectorError:
            selector = ""
        scale_status: dict[str, Any] = {"replicas": int(status.get("replicas") or 0)}
        if selector:
            scale_status["selector"] = selector
        replicas = spec.get("replicas")
        return {
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                              "creationTimestamp") if k in meta},
            "spec": {"replicas": 1 if replicas is None else int(replicas)},
            "status": scale_status,
        }

    def get_scale(self, rtype: ResourceType, namespace: str, name: str) -> dict[str, Any]:
        return self.scale_of(self.get(rtype, namespace, name))

    def update_scale(self, rtype: ResourceType, namespace: str, name: str, body: Any,
                     dry_run: bool = False) -> dict[str, Any]:
        """PUT ``.../scale``: sets ``spec.replicas`` (a stale resourceVersion is 409)."""
        with self.store.lock:
            old = self._existing(rtype, namespace, name)
            return self._write_scale(rtype, namespace, name, old, body, dry_run)

    def patch_scale(self, rtype: ResourceType, namespace: str, name: str, patch_type: str,
                    patch_body: Any, dry_run: bool = False) -> dict[str, Any]:
        with self.store.lock:
            old = self._existing(rtype, namespace, name)
            scale = _apply_patch(self.scale_of(old), patch_type, patch_body, {})
            return self._write_scale(rtype, namespace, name, old, scale, dry_run)

    def _write_scale(self, rtype: ResourceType, namespace: str, name: str, old: Record,
                     scale: Any, dry_run: bool) -> dict[str, Any]:
        if not isinstance(scale, dict):
            raise errors.bad_request("the object provided is unrecognized (must be of type "
                                     "Scale)")
        if scale.get("kind") not in (None, "", "Scale") or \
                scale.get("apiVersion") not in (None, "", "autoscaling/v1"):
            raise errors.bad_request(f"the kind in the data ({scale.get('kind')}) does not "
                                     f"match the expected kind (Scale)")
        meta = scale.get("metadata") or {}
        if not isinstance(meta, dict):
            raise errors.bad_request("metadata must be an object")
        if meta.get("name") not in (None, "", name):
            raise errors.bad_request(f"the name of the object ({meta['name']}) does not match "
                                     f"the name on the URL ({name})")
        replicas = (scale.get("spec") or {}).get("replicas", 0)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise errors.invalid(rtype, name, "spec.replicas",
                                 f"Invalid value: {json.dumps(replicas)}: must be greater "
                                 f"than or equal to 0")
        new = old.object()
        new.setdefault("spec", {})["replicas"] = replicas
        new_meta = new["metadata"]
        for key in ("resourceVersion", "uid"):
            if meta.get(key):
                new_meta[key] = meta[key]  # preconditions, checked by _update
        record = self._update(rtype, namespace, name, new, new_meta, old, "", dry_run)
        return self.scale_of(record)

    def delete(self, rtype: ResourceType, namespace: str, name: str,
               options: Mapping[str, Any] | None = None, dry_run: bool = False) -> Record:
        """Remove the object, or for a kind with graceful deletion (Pods) mark it
        terminating when its grace period is not zero (see :meth:`_grace_period`)."""
        with self.store.lock:
            old = self._existing(rtype, namespace, name)
            preconditions = (options or {}).get("preconditions") or {}
            want_uid, want_rv = preconditions.get("uid"), preconditions.get("resourceVersion")
            if want_uid and want_uid != old.uid:
                raise errors.conflict(rtype, name, f"Precondition failed: UID in precondition: "
                                                   f"{want_uid}, UID in object meta: {old.uid}")
            if want_rv and str(want_rv) != str(old.rv):
                raise errors.conflict(
                    rtype, name, f"Precondition failed: ResourceVersion in precondition: "
                                 f"{want_rv}, ResourceVersion in object meta: {old.rv}")
            if rtype is NAMESPACES and name in UNDELETABLE_NAMESPACES:
                raise errors.ApiError(
                    403, f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                    "Forbidden", {"name": name, "kind": "namespaces"})
            old_obj = old.object()
            self._admit("delete", old_obj, old.object())
            grace = self._grace_period(rtype, old_obj, options)
            if grace:
                meta = old_obj["metadata"]
                if "deletionTimestamp" in meta and \
                        int(meta.get("deletionGracePeriodSeconds") or 0) <= grace:
                    return old  # already terminating at least this soon
                meta["deletionTimestamp"] = now_rfc3339(grace)
                meta["deletionGracePeriodSeconds"] = grace
                if meta.get("generation"):
                    meta["generation"] = int(meta["generation"]) + 1
                return self._commit(rtype, old_obj, old, dry_run)
            if dry_run:
                return old
            if rtype is NAMESPACES:
                for other in self.table:
                    if other.namespaced:
                        for record in list(self.store.collection(other).items.values()):
                            if record.namespace == name:
                                self.store.remove(other, record)
            return self.store.remove(rtype, old)

    @staticmethod
    def _grace_period(rtype: ResourceType, obj: Mapping[str, Any],
                      options: Mapping[str, Any] | None) -> int:
        """Seconds of graceful deletion, as the pod strategy decides: the options' period,
        else ``spec.terminationGracePeriodSeconds`` (default 30); 0 for a pod that is not
        scheduled or has finished. The kubelet (the lab) removes it with period 0."""
        if not rtype.graceful_delete:
            return 0
        spec = obj.get("spec") or {}
        phase = (obj.get("status") or {}).get("phase")
        if not spec.get("nodeName") or phase in ("Succeeded", "Failed"):
            return 0
        given = (options or {}).get("gracePeriodSeconds")
        if given is None:
            given = spec.get("terminationGracePeriodSeconds", 30)
        try:
            return max(0, int(given))
        except (TypeError, ValueError):
            raise errors.bad_request(f"invalid gracePeriodSeconds: {given!r}") from None

    def delete_collection(self, rtype: ResourceType, namespace: str,
                          labels: LabelSelector | None = None,
                          fields: FieldSelector | None = None,
                          options: Mapping[str, Any] | None = None,
                          dry_run: bool = False) -> ListPage:
        with self.store.lock:
            page = self.list(rtype, namespace, labels, fields)
            deleted = [self.delete(rtype, r.namespace, r.name, options, dry_run)
                       for r in page.records]
            return ListPage(rtype, self.store.revision, deleted)
