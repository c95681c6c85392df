"""The lab API server's three patch formats: RFC 7386, RFC 6902 and strategic merge patch."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from kmesh_lab.apiserver.patch import PatchError, json_patch, merge_patch, strategic_merge_patch
from kmesh_lab.apiserver.resources import DEPLOYMENTS, NODES, PODS, SERVICES

# RFC 7386 appendix A, every example.
RFC7386 = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), RFC7386)
def test_merge_patch_rfc7386_examples(target: Any, patch: Any, result: Any) -> None:
    before = copy.deepcopy(target)
    assert merge_patch(target, patch) == result
    assert target == before


# RFC 6902 appendix A (and a few more), as (document, patch, result or error code).
RFC6902: list[tuple[Any, list[dict[str, Any]], Any]] = [
    ({"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}],
     {"baz": "qux", "foo": "bar"}),
    ({"foo": ["bar", "baz"]}, [{"op": "add", "path": "/foo/1", "value": "qux"}],
     {"foo": ["bar", "qux", "baz"]}),
    ({"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}], {"foo": "bar"}),
    ({"foo": ["bar", "qux", "baz"]}, [{"op": "remove", "path": "/foo/1"}],
     {"foo": ["bar", "baz"]}),
    ({"baz": "qux", "foo": "bar"}, [{"op": "replace", "path": "/baz", "value": "boo"}],
     {"baz": "boo", "foo": "bar"}),
    ({"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}},
     [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}],
     {"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}}),
    ({"foo": ["all", "grass", "cows", "eat"]}, [{"op": "move", "from": "/foo/1",
                                                 "path": "/foo/3"}],
     {"foo": ["all", "cows", "eat", "grass"]}),
    ({"baz": "qux", "foo": ["a", 2, "c"]},
     [{"op": "test", "path": "/baz", "value": "qux"},
      {"op": "test", "path": "/foo/1", "value": 2}],
     {"baz": "qux", "foo": ["a", 2, "c"]}),
    ({"baz": "qux"}, [{"op": "test", "path": "/baz", "value": "bar"}], 422),
    ({"foo": "bar"}, [{"op": "add", "path": "/child", "value": {"grandchild": {}}}],
     {"foo": "bar", "child": {"grandchild": {}}}),
    ({"foo": "bar"}, [{"op": "add", "path": "/baz/bat", "value": "qux"}], 422),
    ({"foo": ["bar"]}, [{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}],
     {"foo": ["bar", ["abc", "def"]]}),
    ({"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": 10},
                          {"op": "replace", "path": "/~1", "value": 1}], {"/": 1, "~1": 10}),
    ({"foo": "bar"}, [{"op": "copy", "from": "/foo", "path": "/baz"}],
     {"foo": "bar", "baz": "bar"}),
    ({"foo": "bar"}, [{"op": "replace", "path": "/missing", "value": 1}], 422),
    ({"foo": "bar"}, [{"op": "remove", "path": "/missing"}], 422),
    ({"foo": ["a"]}, [{"op": "add", "path": "/foo/5", "value": 1}], 422),
    ({"foo": "bar"}, [{"op": "frobnicate", "path": "/foo"}], 400),
    ({"foo": "bar"}, [{"op": "add", "path": "foo", "value": 1}], 400),
]


@pytest.mark.parametrize(("doc", "patch", "result"), RFC6902)
def test_json_patch_rfc6902_examples(doc: Any, patch: list[dict[str, Any]], result: Any) -> None:
    before = copy.deepcopy(doc)
    if isinstance(result, int):
        with pytest.raises(PatchError) as err:
            json_patch(doc, patch)
        assert err.value.code == result
    else:
        assert json_patch(doc, patch) == result
    assert doc == before


def test_json_patch_must_be_a_list() -> None:
    with pytest.raises(PatchError) as err:
        json_patch({}, {"op": "add"})
    assert err.value.code == 400


def deployment(containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "demo", "finalizers": ["a", "b"]},
        "spec": {"replicas": 1, **spec,
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": containers}}},
    }


def smp(obj: dict[str, Any], patch: dict[str, Any], rules: Any = DEPLOYMENTS.merge_rules
        ) -> dict[str, Any]:
    before = copy.deepcopy(obj)
    result = strategic_merge_patch(obj, patch, rules)
    assert obj == before, "the original must not change"
    return result


def containers_of(obj: dict[str, Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = obj["spec"]["template"]["spec"]["containers"]
    return result


def template_spec(patch: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"template": {"spec": patch}}}


BASE = deployment([
    {"name": "app", "image": "app:1", "env": [{"name": "A", "value": "1"}],
     "ports": [{"containerPort": 80, "name": "http"}]},
    {"name": "sidecar", "image": "proxy:1"},
])


def test_containers_merge_by_name_and_their_lists_by_their_keys() -> None:
    result = smp(BASE, template_spec({"containers": [
        {"name": "app", "image": "app:2", "env": [{"name": "B", "value": "2"}],
         "ports": [{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 9090}]},
    ]}))
    app, sidecar = containers_of(result)
    assert app["image"] == "app:2"
    assert app["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    assert app["ports"] == [{"containerPort": 80, "name": "http", "protocol": "TCP"},
                            {"containerPort": 9090}]
    assert sidecar == {"name": "sidecar", "image": "proxy:1"}  # untouched, kept


def test_patch_delete_directive_removes_a_list_element() -> None:
    result = smp(BASE, template_spec({"containers": [{"name": "sidecar", "$patch": "delete"}]}))
    assert [c["name"] for c in containers_of(result)] == ["app"]


def test_patch_replace_directive_in_a_list_replaces_it() -> None:
    result = smp(BASE, template_spec({"containers": [
        {"$patch": "replace"}, {"name": "only", "image": "x"}]}))
    assert containers_of(result) == [{"name": "only", "image": "x"}]


def test_patch_replace_and_delete_directives_on_maps() -> None:
    result = smp(BASE, {"spec": {"template": {"metadata": {"labels": {
        "$patch": "replace", "new": "1"}}}}})
    assert result["spec"]["template"]["metadata"]["labels"] == {"new": "1"}
    result = smp(BASE, {"spec": {"template": {"metadata": {"$patch": "delete"}}}})
    assert "metadata" not in result["spec"]["template"]
    with pytest.raises(PatchError):
        smp(BASE, {"spec": {"$patch": "frobnicate"}})


def test_set_element_order_reorders_a_merged_list() -> None:
    result = smp(BASE, template_spec({
        "$setElementOrder/containers": [{"name": "sidecar"}, {"name": "app"}],
        "containers": [{"name": "app", "image": "app:3"}],
    }))
    assert [c["name"] for c in containers_of(result)] == ["sidecar", "app"]
    assert containers_of(result)[1]["image"] == "app:3"


def test_retain_keys_clears_the_fields_it_does_not_list() -> None:
    obj = deployment([], strategy={"type": "RollingUpdate",
                                   "rollingUpdate": {"maxSurge": 1}})
    result = smp(obj, {"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}})
    assert result["spec"]["strategy"] == {"type": "Recreate"}


def test_primitive_lists_merge_as_sets_and_delete_from_primitive_list() -> None:
    result = smp(BASE, {"metadata": {"finalizers": ["b", "c"],
                                     "$deleteFromPrimitiveList/finalizers": ["a"]}})
    assert result["metadata"]["finalizers"] == ["b", "c"]
    result = smp(BASE, {"metadata": {"$setElementOrder/finalizers": ["b", "a"]}})
    assert result["metadata"]["finalizers"] == ["b", "a"]


def test_null_deletes_and_lists_without_a_rule_are_replaced() -> None:
    result = smp(BASE, {"spec": {"replicas": None}})
    assert "replicas" not in result["spec"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "args": ["a", "b"]}],
                    "tolerations": [{"key": "k1"}]}}
    result = smp(pod, {"spec": {"tolerations": [{"key": "k2"}],
                                "containers": [{"name": "c", "args": ["z"]}]}}, PODS.merge_rules)
    assert result["spec"]["tolerations"] == [{"key": "k2"}]  # atomic list
    assert result["spec"]["containers"] == [{"name": "c", "args": ["z"]}]


def test_service_ports_merge_by_port_and_node_addresses_by_type() -> None:
    svc = {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80, "name": "http"},
                                                         {"port": 443, "name": "https"}]}}
    result = smp(svc, {"spec": {"ports": [{"port": 443, "targetPort": 8443}]}},
                 SERVICES.merge_rules)
    assert result["spec"]["ports"] == [{"port": 80, "name": "http"},
                                       {"port": 443, "name": "https", "targetPort": 8443}]
    node = {"metadata": {"name": "n"}, "status": {"addresses": [
        {"type": "InternalIP", "address": "198.18.0.1"}, {"type": "Hostname", "address": "n"}]}}
    result = smp(node, {"status": {"addresses": [{"type": "InternalIP",
                                                  "address": "198.18.0.2"}]}}, NODES.merge_rules)
    assert result["status"]["addresses"][0] == {"type": "InternalIP", "address": "198.18.0.2"}
    assert len(result["status"]["addresses"]) == 2


def test_new_elements_lose_their_directives_and_a_missing_merge_key_is_an_error() -> None:
    result = smp(BASE, template_spec({"containers": [
        {"name": "new", "env": [{"name": "X", "$patch": "merge"}]}]}))
    assert containers_of(result)[-1] == {"name": "new", "env": [{"name": "X"}]}
    with pytest.raises(PatchError) as err:
        smp(BASE, template_spec({"containers": [{"image": "nameless"}]}))
    assert err.value.code == 422


def test_the_patch_kubectl_apply_sends_round_trips() -> None:
    """The shape kubectl 1.27-1.33 send for a second apply (captured from kubectl)."""
    applied = deployment([{"name": "c", "image": "img:1", "env": [{"name": "A", "value": "1"}],
                           "ports": [{"containerPort": 80}]}])
    applied["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration":
                                          json.dumps(applied)}
    patch = {
        "metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                     "labels": {"v": "2"}},
        "spec": {"replicas": 3, "template": {"spec": {
            "$setElementOrder/containers": [{"name": "c"}],
            "containers": [{"$setElementOrder/env": [{"name": "A"}, {"name": "B"}],
                            "env": [{"name": "B", "value": "2"}],
                            "image": "img:2", "name": "c"}]}}},
    }
    result = smp(applied, patch)
    (container,) = containers_of(result)
    assert container["image"] == "img:2"
    assert container["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    assert container["ports"] == [{"containerPort": 80}]
    assert result["spec"]["replicas"] == 3
    assert result["metadata"]["labels"] == {"v": "2"}
    assert not directive_keys(result)


def directive_keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [k for k in value if k.startswith("$")] + [
            d for v in value.values() for d in directive_keys(v)]
    if isinstance(value, list):
        return [d for v in value for d in directive_keys(v)]
    return []
