"""The lab API server's semantics without HTTP: the registry (what a write does to an
object), the store (resourceVersion, snapshots, compaction), watch streams and protobuf."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kmesh_lab.apiserver import ApiError, ApiServer, FieldSelector, LabelSelector
from kmesh_lab.apiserver import errors as api_errors
from kmesh_lab.apiserver.protobuf import ProtobufError, decode
from kmesh_lab.apiserver.registry import decode_continue
from kmesh_lab.apiserver.resources import CONFIGMAPS, PODS, SERVICES
from kmesh_lab.apiserver.watches import WatchStream


def service(name: str, ns: str = "default", **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"ports": [{"port": 80}]}, "status": {"loadBalancer": {"x": 1}}}


def configmap(name: str, ns: str = "default", **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns, "labels": labels}, "data": {}}


def pod(name: str, node: str = "", **labels: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "i"}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": spec}


@pytest.fixture
def server() -> ApiServer:
    return ApiServer()  # never started: the in-process API needs no port


def code_of(call: Any, *args: Any) -> int:
    with pytest.raises(ApiError) as err:
        call(*args)
    return err.value.code


# --- registry ----------------------------------------------------------------------------


def test_the_default_namespace_exists_and_namespaces_get_their_defaults(server: ApiServer) -> None:
    ns = server.get("namespaces", None, "default")
    assert ns["status"] == {"phase": "Active"}
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "default"}
    assert server.revision == 1


def test_create_fills_metadata_and_one_counter_orders_every_kind(server: ApiServer) -> None:
    svc = server.create(service("web"))
    cm = server.create(configmap("cm"))
    meta = svc["metadata"]
    assert (svc["kind"], svc["apiVersion"]) == ("Service", "v1")
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1
    assert int(cm["metadata"]["resourceVersion"]) == int(meta["resourceVersion"]) + 1
    assert server.revision == int(cm["metadata"]["resourceVersion"])
    assert svc["status"] == {}, "create drops .status of a kind with a status subresource"


def test_create_errors_are_the_real_servers(server: ApiServer) -> None:
    server.create(service("web"))
    with pytest.raises(ApiError) as err:
        server.create(service("web"))
    assert (err.value.code, err.value.reason) == (409, "AlreadyExists")
    assert err.value.message == 'services "web" already exists'
    with pytest.raises(ApiError) as err:
        server.create(service("web", ns="nowhere"))
    assert err.value.status["message"] == 'namespaces "nowhere" not found'
    assert err.value.status["details"] == {"name": "nowhere", "kind": "namespaces"}
    assert code_of(server.create, service("Bad_Name")) == 422
    nameless = service("x")
    del nameless["metadata"]["name"]
    assert code_of(server.create, nameless) == 422
    body = service("x")
    body["metadata"]["resourceVersion"] = "5"
    assert code_of(server.create, body) == 500  # as kube-apiserver answers it
    with pytest.raises(ApiError) as err:
        server.registry.create(SERVICES, "default", service("y", ns="other"))
    assert err.value.code == 400 and "does not match the namespace" in err.value.message


def test_generate_name(server: ApiServer) -> None:
    obj = configmap("")
    obj["metadata"] = {"generateName": "cm-", "namespace": "default"}
    name = server.create(obj)["metadata"]["name"]
    assert name.startswith("cm-") and len(name) == 8


def test_update_conflicts_keeps_identity_status_and_bumps_generation(server: ApiServer) -> None:
    created = server.create(service("web"))
    server.update_status({**created, "status": {"loadBalancer": {"ingress": [{"ip": "1"}]}}})
    stale = dict(created)
    assert code_of(server.update, stale) == 409  # its resourceVersion is no longer current
    current = server.get("services", "default", "web")
    changed = json.loads(json.dumps(current))
    changed["spec"]["ports"] = [{"port": 81}]
    changed["status"] = {"ignored": True}
    changed["metadata"]["uid"] = current["metadata"]["uid"]
    updated = server.update(changed)
    assert updated["metadata"]["generation"] == 2
    assert updated["status"] == {"loadBalancer": {"ingress": [{"ip": "1"}]}}
    assert updated["metadata"]["creationTimestamp"] == created["metadata"]["creationTimestamp"]
    relabeled = server.patch("services", "default", "web", {"metadata": {"labels": {"a": "b"}}},
                             "merge")
    assert relabeled["metadata"]["generation"] == 2, "metadata changes keep the generation"
    unconditional = service("web")  # no resourceVersion: an unconditional update
    unconditional["spec"]["ports"] = [{"port": 82}]
    assert server.update(unconditional)["spec"]["ports"] == [{"port": 82}]


def test_a_write_that_changes_nothing_stores_nothing(server: ApiServer) -> None:
    created = server.create(configmap("cm"))
    revision = server.revision
    again = server.patch("configmaps", "default", "cm", {"data": {}}, "merge")
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert server.revision == revision
    assert server.last_change("configmaps") == revision


def test_status_subresource_changes_only_status(server: ApiServer) -> None:
    server.create(service("web"))
    body = service("web")
    body["spec"]["ports"] = [{"port": 9999}]
    body["status"] = {"conditions": [{"type": "Ready"}]}
    result = server.update_status(body)
    assert result["spec"]["ports"] == [{"port": 80}]
    assert result["status"] == {"conditions": [{"type": "Ready"}]}
    patched = server.patch("services", "default", "web",
                           {"status": {"conditions": [{"type": "Ready", "status": "True"}]},
                            "spec": {"ports": [{"port": 1}]}}, subresource="status")
    assert patched["status"]["conditions"] == [{"type": "Ready", "status": "True"}]
    assert patched["spec"]["ports"] == [{"port": 80}]


def test_status_on_create_kept_only_without_a_status_subresource(server: ApiServer) -> None:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n1"},
          "status": {"phase": "Active"}}
    assert server.create(ns)["status"] == ns["status"]
    # A Node's status is its subresource (the kubelet writes it there): create drops it.
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"}]}}
    assert server.create(node)["status"] == {}


def test_admission_hooks_mutate_and_refuse() -> None:
    calls: list[tuple[str, str | None]] = []

    def hook(verb: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        calls.append((verb, old and old["metadata"]["resourceVersion"]))
        if obj["kind"] != "Service" or verb == "delete":
            return
        if obj["metadata"]["name"] == "refused":
            raise api_errors.invalid(SERVICES, "refused", "spec.ports", "Required value")
        obj["spec"].setdefault("clusterIP", "198.19.0.10")

    def broken(verb: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        if obj["metadata"]["name"] == "boom":
            raise RuntimeError("a bug")

    server = ApiServer(admission=[hook, broken])
    assert server.create(service("web"))["spec"]["clusterIP"] == "198.19.0.10"
    with pytest.raises(ApiError) as err:
        server.create(service("refused"))
    assert (err.value.code, err.value.reason) == (422, "Invalid")
    assert code_of(server.create, service("boom")) == 500
    server.update_status(service("web"))
    server.delete("services", "default", "web")
    assert [verb for verb, _ in calls] == ["create", "create", "create", "update/status",
                                           "delete"]
    assert server.list("services") == []


def test_graceful_deletion_of_pods(server: ApiServer) -> None:
    server.create(pod("unscheduled"))
    server.delete("pods", "default", "unscheduled")
    assert code_of(server.get, "pods", "default", "unscheduled") == 404
    server.create(pod("running", node="n1"))
    terminating = server.delete("pods", "default", "running")
    assert terminating["metadata"]["deletionGracePeriodSeconds"] == 30
    assert server.get("pods", "default", "running")["metadata"]["deletionTimestamp"]
    server.delete("pods", "default", "running", grace_period_seconds=0)
    assert code_of(server.get, "pods", "default", "running") == 404


def test_deleting_a_namespace_deletes_its_contents(server: ApiServer) -> None:
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}})
    server.create(configmap("cm", ns="demo"))
    server.create(configmap("cm"))
    server.delete("namespaces", None, "demo")
    assert [c["metadata"]["namespace"] for c in server.list("configmaps")] == ["default"]
    assert code_of(server.delete, "namespaces", None, "default") == 403


def test_patch_errors(server: ApiServer) -> None:
    server.create(configmap("cm"))
    assert code_of(server.patch, "configmaps", "default", "cm",
                   [{"op": "test", "path": "/data/x", "value": 1}], "json") == 422
    assert code_of(server.patch, "configmaps", "default", "cm", ["x"], "merge") == 400
    assert code_of(server.patch, "configmaps", "default", "nope", {}, "merge") == 404
    assert code_of(server.patch, "configmaps", "default", "cm",
                   {"metadata": {"name": "other"}}, "merge") == 400


# --- lists, snapshots, compaction --------------------------------------------------------


def test_pages_come_from_one_snapshot(server: ApiServer) -> None:
    for i in range(7):
        server.create(configmap(f"cm{i}"))
    first = server.registry.list(CONFIGMAPS, "default", limit=3)
    assert [r.name for r in first.records] == ["cm0", "cm1", "cm2"]
    assert first.remaining == 4
    assert decode_continue(first.continue_token or "") == (first.rv, "cm2\x00")
    server.delete("configmaps", "default", "cm4")
    server.create(configmap("cm3a"))
    second = server.registry.list(CONFIGMAPS, "default", limit=3,
                                  continue_token=first.continue_token)
    assert [r.name for r in second.records] == ["cm3", "cm4", "cm5"]
    assert second.rv == first.rv and second.remaining == 1
    last = server.registry.list(CONFIGMAPS, "default", limit=3,
                                continue_token=second.continue_token)
    assert [r.name for r in last.records] == ["cm6"]
    assert last.continue_token is None and last.remaining is None


def test_selectors_filter_pages_without_a_remaining_count(server: ApiServer) -> None:
    for i in range(6):
        server.create(configmap(f"cm{i}", parity=str(i % 2)))
    page = server.registry.list(CONFIGMAPS, "", LabelSelector.parse("parity=1"), limit=2)
    assert [r.name for r in page.records] == ["cm1", "cm3"]
    assert page.continue_token and page.remaining is None
    page = server.registry.list(CONFIGMAPS, "", fields=FieldSelector.parse("metadata.name=cm4"))
    assert [r.name for r in page.records] == ["cm4"]
    with pytest.raises(ApiError) as err:
        server.registry.list(CONFIGMAPS, "", fields=FieldSelector.parse("spec.nodeName=x"))
    assert err.value.message == "field label not supported: spec.nodeName"
    server.create(pod("p", node="n1"))
    assert server.list("pods", field_selector="spec.nodeName=n1")[0]["metadata"]["name"] == "p"


def test_a_namespace_lists_only_its_own(server: ApiServer) -> None:
    for ns in ("a", "a-b", "b"):
        server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        server.create(configmap("cm", ns=ns))
    assert [c["metadata"]["namespace"] for c in server.list("configmaps", "a")] == ["a"]
    assert len(server.list("configmaps")) == 3


def test_compaction_expires_continue_tokens_with_an_inconsistent_one(server: ApiServer) -> None:
    for i in range(4):
        server.create(configmap(f"cm{i}"))
    first = server.registry.list(CONFIGMAPS, "default", limit=2)
    server.faults.compact()
    with pytest.raises(ApiError) as err:
        server.registry.list(CONFIGMAPS, "default", limit=2, continue_token=first.continue_token)
    assert err.value.code == 410 and err.value.reason == "Expired"
    assert err.value.message.startswith("The provided continue parameter is too old")
    inconsistent = err.value.status["metadata"]["continue"]
    assert decode_continue(inconsistent) == (-1, "cm1\x00")
    rest = server.registry.list(CONFIGMAPS, "default", continue_token=inconsistent)
    assert [r.name for r in rest.records] == ["cm2", "cm3"]


def test_snapshots_at_older_versions_are_rebuilt_from_history() -> None:
    server = ApiServer()
    server.store._snapshot_cache_size = 0  # force the rebuild path
    server.create(configmap("a"))
    at = server.revision
    server.create(configmap("b"))
    server.patch("configmaps", "default", "a", {"data": {"x": "1"}}, "merge")
    server.delete("configmaps", "default", "a")
    snap = server.store.snapshot(CONFIGMAPS, at)
    assert [r.name for r in snap.records] == ["a"]
    assert json.loads(snap.records[0].raw)["data"] == {}
    exact = server.registry.list(CONFIGMAPS, "", exact_rv=at)  # resourceVersionMatch=Exact
    assert [r.name for r in exact.records] == ["a"]
    server.faults.compact()
    assert code_of(server.registry.list, CONFIGMAPS, "", None, None, None, None, at) == 410


def test_history_limit_raises_the_floor() -> None:
    server = ApiServer(history_limit=4)
    for i in range(12):
        server.create(configmap(f"cm{i}"))
    floor = server.store.collection(CONFIGMAPS).floor
    assert floor > 1
    assert server.store.too_old(CONFIGMAPS, floor - 1) is not None
    assert server.store.too_old(CONFIGMAPS, floor) is None


# --- watch streams -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def events(lines: list[bytes] | None) -> list[tuple[str, str]]:
    out = []
    for line in lines or []:
        event = json.loads(line)
        meta = event["object"].get("metadata", {})
        out.append((event["type"], meta.get("name") or meta.get("resourceVersion")))
    return out


def test_watch_from_zero_lists_first_then_streams(server: ApiServer) -> None:
    server.create(configmap("old"))
    stream = WatchStream(server.store, CONFIGMAPS, resource_version="0")
    assert events(stream.open()) == [("ADDED", "old")]
    server.create(configmap("new"))
    server.delete("configmaps", "default", "old")
    assert events(stream.next_lines()) == [("ADDED", "new"), ("DELETED", "old")]
    stream.close()
    assert stream.next_lines() is None


def test_watch_from_a_version_sends_what_came_after(server: ApiServer) -> None:
    server.create(configmap("a"))
    rv = server.revision
    server.patch("configmaps", "default", "a", {"data": {"k": "v"}}, "merge")
    stream = WatchStream(server.store, CONFIGMAPS, resource_version=str(rv))
    assert stream.open() == []
    lines = stream.next_lines()
    assert events(lines) == [("MODIFIED", "a")]
    assert json.loads((lines or [b""])[0])["object"]["data"] == {"k": "v"}
    stream.close()


def test_selectors_turn_changes_into_added_and_deleted(server: ApiServer) -> None:
    server.create(configmap("cm", app="other"))
    stream = WatchStream(server.store, CONFIGMAPS, "default", LabelSelector.parse("app=web"),
                         resource_version=str(server.revision))
    stream.open()
    server.patch("configmaps", "default", "cm", {"metadata": {"labels": {"app": "web"}}},
                 "merge")
    assert events(stream.next_lines()) == [("ADDED", "cm")]
    server.patch("configmaps", "default", "cm", {"metadata": {"labels": {"app": "x"}}}, "merge")
    lines = stream.next_lines() or [b""]
    deleted = json.loads(lines[0])
    assert deleted["type"] == "DELETED"
    assert deleted["object"]["metadata"]["labels"] == {"app": "web"}, "the last matching state"
    assert deleted["object"]["metadata"]["resourceVersion"] == str(server.revision)
    server.delete("configmaps", "default", "cm")  # no longer selected: nothing to say
    server.create(configmap("other-ns-ignored", app="web", ns="default"))
    assert events(stream.next_lines()) == [("ADDED", "other-ns-ignored")]
    stream.close()


def test_a_too_old_watch_gets_one_error_event(server: ApiServer) -> None:
    server.create(configmap("a"))
    old = server.revision
    floor = server.faults.compact()
    stream = WatchStream(server.store, CONFIGMAPS, resource_version=str(old))
    (line,) = stream.open()
    event = json.loads(line)
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"
    assert event["object"]["message"] == f"too old resource version: {old} ({floor})"
    assert stream.next_lines() is None
    fresh = WatchStream(server.store, CONFIGMAPS, resource_version=str(floor))
    assert fresh.open() == []
    fresh.close()


def test_bookmarks_every_interval_and_before_the_timeout(server: ApiServer) -> None:
    clock = Clock()
    stream = WatchStream(server.store, CONFIGMAPS, resource_version=str(server.revision),
                         allow_bookmarks=True, timeout=10.0, bookmark_interval=3.0, clock=clock)
    stream.open()
    clock.now += 3.0
    (bookmark,) = stream.next_lines() or []
    assert json.loads(bookmark) == {"type": "BOOKMARK", "object": {
        "kind": "ConfigMap", "apiVersion": "v1",
        "metadata": {"resourceVersion": str(server.revision)}}}
    clock.now += 3.0
    assert events(stream.next_lines()) == [("BOOKMARK", str(server.revision))]
    clock.now += 2.0  # at 8 s: 2 s before the timeout
    assert events(stream.next_lines()) == [("BOOKMARK", str(server.revision))]
    clock.now += 2.0
    assert stream.next_lines() is None and not stream.dropped


def test_initial_events_end_with_an_annotated_bookmark(server: ApiServer) -> None:
    server.create(configmap("a"))
    stream = WatchStream(server.store, CONFIGMAPS, send_initial_events=True,
                         allow_bookmarks=True)
    lines = stream.open()
    assert events(lines)[0] == ("ADDED", "a")
    last = json.loads(lines[-1])
    assert last["type"] == "BOOKMARK"
    assert last["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    stream.close()


def test_an_open_watch_survives_compaction(server: ApiServer) -> None:
    stream = WatchStream(server.store, PODS, resource_version=str(server.revision))
    stream.open()
    server.create(pod("p"))
    server.faults.compact()
    assert events(stream.next_lines()) == [("ADDED", "p")]
    stream.close(dropped=True)
    assert stream.dropped


# --- protobuf ----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int | str) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _envelope(api_version: str, kind: str, raw: bytes) -> bytes:
    type_meta = _field(1, api_version) + _field(2, kind)
    return b"k8s\x00" + _field(1, type_meta) + _field(2, raw) + _field(3, "") + _field(4, "")


def test_protobuf_namespace_as_kubectl_133_sends_it() -> None:
    meta = _field(1, "demo") + _field(2, "") + _field(11, _field(1, "team") + _field(2, "a"))
    raw = _field(1, meta) + _field(2, b"") + _field(3, b"")
    assert decode(_envelope("v1", "Namespace", raw)) == {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "demo", "labels": {"team": "a"}}, "spec": {}, "status": {}}


def test_protobuf_unknown_nonzero_fields_are_refused_and_zero_ones_skipped() -> None:
    cm = _field(1, _field(1, "cm") + _field(99, "")) + _field(2, _field(1, "k") + _field(2, "v"))
    assert decode(_envelope("v1", "ConfigMap", cm))["data"] == {"k": "v"}
    with pytest.raises(ProtobufError, match="field 99 of ObjectMeta"):
        decode(_envelope("v1", "ConfigMap", _field(1, _field(99, "set"))))
    with pytest.raises(ProtobufError):
        decode(_envelope("v1", "Secret", b""))
    with pytest.raises(ProtobufError):
        decode(b"{}")
