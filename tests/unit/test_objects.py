"""Parsing API-server-shaped objects: what is kept, and errors that name object and field."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

from kmesh_plugin.errors import ManifestError
from kmesh_plugin.model import Conditions, EndpointSlice, Namespace, Node, ObjectKey, Service
from kmesh_plugin.model.objects import SliceEndpoint, SlicePort, object_key, parse


def service(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"clusterIP": "198.18.0.10", "ports": [{"name": "http", "port": 5000}]}
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "helloworld", "namespace": "sample"}, "spec": body}


def endpoint_slice(**fields: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "helloworld-abc", "namespace": "sample",
                     "labels": {"kubernetes.io/service-name": "helloworld"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["198.19.1.1"], "nodeName": "worker1"}],
    }
    obj.update(fields)
    return obj


def parse_service(obj: dict[str, Any]) -> Service:
    result = parse(obj)
    assert isinstance(result, Service)
    return result


def parse_slice(obj: dict[str, Any]) -> EndpointSlice:
    result = parse(obj)
    assert isinstance(result, EndpointSlice)
    return result


# -- what is kept ---------------------------------------------------------------------------


def test_node() -> None:
    obj = {"kind": "Node", "metadata": {"name": "worker1", "namespace": "ignored",
                                        "labels": {"a": "b", "n": 1, "t": True, "e": None}}}
    assert object_key(obj) == ObjectKey("Node", "", "worker1")
    # Non-string label values (YAML's 1, true) become strings, as Kubernetes stores them.
    assert parse(obj) == Node("worker1", {"a": "b", "n": "1", "t": "True", "e": ""})


def test_namespace() -> None:
    obj = {"kind": "Namespace", "metadata": {"name": "sample", "annotations": {"k": "v"}}}
    assert object_key(obj) == ObjectKey("Namespace", "", "sample")
    assert parse(obj) == Namespace("sample", {"k": "v"})


def test_service_fields() -> None:
    svc = parse_service(service(
        clusterIPs=["198.18.0.10", "fd00::10"],
        ports=[{"name": "http", "port": 5000, "targetPort": "web"},
               {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}],
        internalTrafficPolicy="Local",
        trafficDistribution="PreferClose",
        publishNotReadyAddresses=True,
        selector={"app": "helloworld"},
    ))
    assert svc.key == ("sample", "helloworld")
    assert svc.cluster_ips == ("198.18.0.10", "fd00::10")
    assert [(p.name, p.port, p.protocol, p.target_port) for p in svc.ports] == [
        ("http", 5000, "TCP", "web"), ("dns", 53, "UDP", 5353),
    ]
    assert svc.type == "ClusterIP"
    assert svc.internal_traffic_policy == "Local"
    assert svc.traffic_distribution == "PreferClose"
    assert svc.publish_not_ready_addresses is True
    assert svc.selector == {"app": "helloworld"}
    assert svc.load_balanced


def test_service_cluster_ip_alone() -> None:
    assert parse_service(service()).cluster_ips == ("198.18.0.10",)


def test_service_traffic_distribution_kept_raw() -> None:
    # Kept as given so that a value outside the table can fall through (SPEC.md section 4).
    assert parse_service(service(trafficDistribution={"preferClose": True})).traffic_distribution \
        == {"preferClose": True}


@pytest.mark.parametrize(
    ("spec", "load_balanced"),
    [
        ({"clusterIP": "None"}, False),
        ({"clusterIP": "None", "clusterIPs": ["None"]}, False),
        ({"type": "ExternalName", "externalName": "example.invalid", "clusterIP": None}, False),
        ({"type": "NodePort"}, True),
        ({"type": "LoadBalancer"}, True),
    ],
)
def test_load_balanced(spec: dict[str, Any], load_balanced: bool) -> None:
    obj = service(**spec)
    if obj["spec"].get("clusterIP") is None:
        del obj["spec"]["clusterIP"]
    assert parse_service(obj).load_balanced is load_balanced


def test_namespace_defaults_to_default() -> None:
    svc = service()
    del svc["metadata"]["namespace"]
    assert object_key(svc) == ObjectKey("Service", "default", "helloworld")
    assert parse_service(svc).key == ("default", "helloworld")
    eps = endpoint_slice()
    del eps["metadata"]["namespace"]
    assert object_key(eps) == ObjectKey("EndpointSlice", "default", "helloworld-abc")
    assert parse_slice(eps).namespace == "default"


def test_endpoint_slice_fields() -> None:
    eps = parse_slice(endpoint_slice(
        ports=[{"name": "http", "port": 5000}, {"port": None}],
        endpoints=[
            {"addresses": ["198.19.1.1", "198.19.1.2"], "nodeName": "worker1", "zone": "zone1",
             "conditions": {"ready": True, "serving": True, "terminating": False},
             "targetRef": {"kind": "Pod", "name": "helloworld-1"}},
            {"addresses": ["198.19.2.1"]},
        ],
    ))
    assert (eps.namespace, eps.name, eps.service_name, eps.address_type) == (
        "sample", "helloworld-abc", "helloworld", "IPv4"
    )
    assert eps.ports == (SlicePort("http", 5000, "TCP"), SlicePort("", None, "TCP"))
    assert eps.endpoints == (
        SliceEndpoint(("198.19.1.1", "198.19.1.2"), Conditions(True, True, False), "worker1",
                      "zone1", "helloworld-1"),
        SliceEndpoint(("198.19.2.1",)),
    )


def test_endpoint_slice_without_service_label() -> None:
    obj = endpoint_slice()
    del obj["metadata"]["labels"]
    assert parse_slice(obj).service_name == ""


def test_fqdn_slice_is_not_ip_checked() -> None:
    eps = parse_slice(endpoint_slice(addressType="FQDN",
                                     endpoints=[{"addresses": ["example.invalid"]}]))
    assert eps.endpoints[0].addresses == ("example.invalid",)


# -- conditions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ready", "serving", "terminating", "is_ready", "is_serving_terminating"),
    [
        (None, None, None, True, False),  # ready unset means ready
        (True, None, None, True, False),
        (False, None, None, False, False),
        (None, None, True, True, True),  # serving unset means serving
        (True, None, True, True, True),
        # Serving unset means serving even when not ready (SPEC.md section 5: kube-proxy and
        # the v1 API read it so); it does not follow ready.
        (False, None, True, False, True),
        (False, True, True, False, True),
        (False, False, True, False, False),
        (False, True, False, False, False),  # serving but not terminating
        (False, True, None, False, False),  # terminating unset means false
    ],
)
def test_conditions(
    ready: bool | None, serving: bool | None, terminating: bool | None,
    is_ready: bool, is_serving_terminating: bool,
) -> None:
    cond = Conditions(ready, serving, terminating)
    assert cond.is_ready is is_ready
    assert cond.is_serving_terminating is is_serving_terminating


def test_conditions_are_parsed() -> None:
    eps = parse_slice(endpoint_slice(endpoints=[
        {"addresses": ["198.19.1.1"], "conditions": {"ready": False, "terminating": True}},
        {"addresses": ["198.19.1.2"], "conditions": {}},
        {"addresses": ["198.19.1.3"], "conditions": None},
    ]))
    assert [e.conditions for e in eps.endpoints] == [
        Conditions(False, None, True), Conditions(), Conditions(),
    ]
    assert [e.conditions.is_ready for e in eps.endpoints] == [False, True, True]


# -- errors ---------------------------------------------------------------------------------


def _error(obj: dict[str, Any], where: str = "") -> str:
    with pytest.raises(ManifestError) as info:
        parse(obj, where)
    return str(info.value)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"ports": [{"name": "http", "port": "5000"}]}, "spec.ports[0].port"),
        ({"ports": [{"name": "a", "port": 1}, {"name": "b", "port": 65536}]},
         "spec.ports[1].port"),
        ({"ports": [{"name": "http", "port": 0}]}, "spec.ports[0].port"),
        ({"ports": [{"name": "http", "port": True}]}, "spec.ports[0].port"),
        ({"ports": [{"name": "http"}]}, "spec.ports[0].port"),
        ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "spec.ports[0].protocol"),
        ({"ports": [{"port": 80, "targetPort": [8080]}]}, "spec.ports[0].targetPort"),
        ({"ports": [{"port": 80, "targetPort": True}]}, "spec.ports[0].targetPort"),
        ({"ports": ["http"]}, "spec.ports[0]"),
        ({"ports": {"http": 80}}, "spec.ports"),
        ({"clusterIP": "198.18.0.300"}, "spec.clusterIP"),
        ({"clusterIPs": ["198.18.0.10", "fd00::zz"]}, "spec.clusterIPs[1]"),
        ({"clusterIPs": ["198.18.0.11"]}, "spec.clusterIP"),  # differs from clusterIPs[0]
        ({"clusterIPs": "198.18.0.10"}, "spec.clusterIPs"),
        ({"type": 5}, "spec.type"),
        ({"internalTrafficPolicy": ["Local"]}, "spec.internalTrafficPolicy"),
        ({"selector": ["app"]}, "spec.selector"),
    ],
)
def test_service_errors_name_object_and_field(spec: dict[str, Any], field: str) -> None:
    message = _error(service(**spec))
    assert message.startswith(f"Service sample/helloworld: {field}: "), message


def test_service_error_with_file() -> None:
    message = _error(service(ports=[{"name": "http", "port": "5000"}]), "/m/app.yaml")
    assert message.startswith("/m/app.yaml: Service sample/helloworld: spec.ports[0].port: ")
    assert "'5000'" in message


def test_spec_that_is_not_a_mapping() -> None:
    obj = service()
    obj["spec"] = "oops"
    assert "Service sample/helloworld: spec.clusterIPs: " in _error(obj)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"addressType": "IPv5"}, "addressType"),
        ({"addressType": None}, "addressType"),
        ({"ports": [{"name": "http", "port": -1}]}, "ports[0].port"),
        ({"ports": [{"name": "http", "port": True}]}, "ports[0].port"),
        ({"ports": ["http"]}, "ports[0]"),
        ({"endpoints": [{"addresses": []}]}, "endpoints[0].addresses"),
        ({"endpoints": [{"addresses": "198.19.1.1"}]}, "endpoints[0].addresses"),
        ({"endpoints": [{"addresses": ["198.19.1.1"]}, {"addresses": ["fd00::1"]}]},
         "endpoints[1].addresses[0]"),
        ({"endpoints": [{"addresses": ["198.19.1.1", "not-an-ip"]}]},
         "endpoints[0].addresses[1]"),
        ({"endpoints": [{"addresses": ["198.19.1.1"], "conditions": {"ready": "true"}}]},
         "endpoints[0].conditions.ready"),
        ({"endpoints": [{"addresses": ["198.19.1.1"], "conditions": {"serving": 1}}]},
         "endpoints[0].conditions.serving"),
        ({"endpoints": [{"addresses": ["198.19.1.1"], "conditions": ["ready"]}]},
         "endpoints[0].conditions"),
        ({"endpoints": ["198.19.1.1"]}, "endpoints[0]"),
    ],
)
def test_endpoint_slice_errors_name_object_and_field(fields: dict[str, Any], field: str) -> None:
    message = _error(endpoint_slice(**fields))
    assert message.startswith(f"EndpointSlice sample/helloworld-abc: {field}: "), message


def test_ipv6_slice_rejects_ipv4() -> None:
    message = _error(endpoint_slice(addressType="IPv6"))
    assert re.search(r"endpoints\[0\]\.addresses\[0\]: 198\.19\.1\.1 is not an IPv6", message)


@pytest.mark.parametrize(
    "obj",
    [
        {"metadata": {"name": "x"}},
        {"kind": "Node"},
        {"kind": "Node", "metadata": {}},
        {"kind": "Node", "metadata": []},
        {"kind": 5, "metadata": {"name": "x"}},
    ],
)
def test_objects_need_kind_and_name(obj: dict[str, Any]) -> None:
    assert _error(obj, "/m/a.yaml") == "/m/a.yaml: an object needs kind and metadata.name"


def test_unknown_kind() -> None:
    message = _error({"kind": "Pod", "metadata": {"name": "p", "namespace": "sample"}})
    assert message.startswith("Pod sample/p: kind Pod is not one of")


def test_labels_must_be_a_mapping() -> None:
    message = _error({"kind": "Node", "metadata": {"name": "worker1", "labels": ["a"]}})
    assert message.startswith("Node worker1: metadata.labels: ")


# -- serving unset means serving (SPEC.md section 5) ----------------------------------------


def test_terminating_endpoint_with_serving_unset_is_used_without_a_ready_one() -> None:
    # kube-proxy's reading: a terminating endpoint whose slice leaves `serving` unset still
    # serves, so with no ready endpoint it carries the traffic instead of nothing.
    from kmesh_plugin.agent.planner import Planner
    from kmesh_plugin.agent.state import ClusterState
    from kmesh_plugin.datapath.records import Backend
    from kmesh_plugin.hookspecs import StrategySettings
    from kmesh_plugin.model import LocalityLabels, Scope
    from kmesh_plugin.plugins import Plugins
    from kmesh_plugin.sources.base import Event

    objects = [
        {"kind": "Node", "metadata": {"name": "worker1"}},
        service(),
        endpoint_slice(endpoints=[
            {"addresses": ["198.19.1.1"], "nodeName": "worker1",
             "conditions": {"ready": False, "terminating": True}},
            {"addresses": ["198.19.1.2"], "nodeName": "worker1",
             "conditions": {"ready": False, "serving": False, "terminating": True}},
        ]),
    ]
    state = ClusterState(LocalityLabels(), "worker1")
    state.apply([Event(object_key(o), parse(o)) for o in objects])
    planner = Planner(Plugins.load(["local", "prefer_close"]),
                      StrategySettings([Scope.NETWORK, Scope.REGION, Scope.ZONE, Scope.SUBZONE]))
    plan = planner.plan_service(state, ("sample", "helloworld"))
    assert plan is not None and len(plan.groups) == 1
    # The one serving (unset) terminating endpoint; the one with serving: false is not used.
    assert plan.groups[0].backends.tiers == ((Backend(ipaddress.ip_address("198.19.1.1"), 5000),),)


def test_is_serving() -> None:
    assert Conditions().is_serving
    assert Conditions(ready=False).is_serving
    assert not Conditions(serving=False).is_serving


# -- any input: a parsed object or ManifestError naming object and field --------------------


DEEP: Any = "x"
for _ in range(2000):
    DEEP = [DEEP]
HUGE = 10 ** 5000  # str() of it raises ValueError (Python's digit limit)


@pytest.mark.parametrize(
    "obj", [None, "Node", 5, pytest.param(HUGE, id="huge"), ["kind", "Node"], DEEP, 1.5, True]
)
def test_an_object_that_is_not_a_mapping(obj: Any) -> None:
    assert _error(obj, "/m/a.yaml") == "/m/a.yaml: an object needs kind and metadata.name"


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ({"kind": "Node", "metadata": {"name": 5}}, "Node: metadata.name: must be a string"),
        ({"kind": "Node", "metadata": {"name": ["a"]}}, "Node: metadata.name: must be a string"),
        ({"kind": "Node", "metadata": {"name": HUGE}}, "Node: metadata.name: must be a string"),
        ({"kind": "Node", "metadata": {"name": "n" * 300}}, "metadata.name: "),
        ({"kind": "Node", "metadata": {"name": "a\nb"}}, "Node: metadata.name: 'a\\nb' is not"),
        ({"kind": "No\nde", "metadata": {"name": "a"}}, "kind: 'No\\nde' is not a Kubernetes kind"),
        ({"kind": "Service", "metadata": {"name": "a", "namespace": ["x"]}},
         "Service a: metadata.namespace: "),
        ({"kind": "Service", "metadata": {"name": "a", "namespace": DEEP}},
         "Service a: metadata.namespace: "),
    ],
)
def test_bad_names(obj: dict[str, Any], fragment: str) -> None:
    message = _error(obj, "/m/a.yaml")
    assert message.startswith("/m/a.yaml: ") and fragment in message, message
    assert len(message) < 400


@pytest.mark.parametrize(
    ("labels", "field"),
    [
        ({"a": ["b"]}, "metadata.labels['a']"),
        ({"a": {"b": "c"}}, "metadata.labels['a']"),
        ({"a": DEEP}, "metadata.labels['a']"),
        ({"a": HUGE}, "metadata.labels['a']"),
        ({"a": 2 ** 64}, "metadata.labels['a']"),
        ({"a": b"bytes"}, "metadata.labels['a']"),
        ({1: "b"}, "metadata.labels"),
        ({None: "b"}, "metadata.labels"),
    ],
)
def test_label_values_must_be_scalars(labels: dict[Any, Any], field: str) -> None:
    message = _error({"kind": "Node", "metadata": {"name": "worker1", "labels": labels}})
    assert message.startswith(f"Node worker1: {field}: "), message
    assert len(message) < 400


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"ports": [{"name": "http", "port": HUGE}]}, "spec.ports[0].port"),
        ({"ports": [{"name": "http", "port": -HUGE}]}, "spec.ports[0].port"),
        ({"ports": [{"name": "http", "port": 5000.0}]}, "spec.ports[0].port"),
        ({"ports": [{"name": 5, "port": 80}]}, "spec.ports[0].name"),
        ({"ports": [{"name": DEEP, "port": 80}]}, "spec.ports[0].name"),
        ({"ports": [{"port": 80, "protocol": DEEP}]}, "spec.ports[0].protocol"),
        ({"ports": [{"port": 80, "protocol": ["TCP"]}]}, "spec.ports[0].protocol"),
        ({"ports": [{"port": 80, "targetPort": 0}]}, "spec.ports[0].targetPort"),
        ({"ports": [{"port": 80, "targetPort": HUGE}]}, "spec.ports[0].targetPort"),
        ({"ports": DEEP}, "spec.ports[0]"),
        ({"clusterIP": HUGE}, "spec.clusterIP"),
        ({"clusterIP": DEEP}, "spec.clusterIP"),
        ({"clusterIPs": [DEEP]}, "spec.clusterIPs[0]"),
        ({"clusterIP": "198.18.0.10\x00"}, "spec.clusterIP"),
        ({"publishNotReadyAddresses": "false"}, "spec.publishNotReadyAddresses"),
        ({"trafficDistribution": DEEP}, "spec.trafficDistribution"),
        ({"trafficDistribution": {"a": HUGE}}, "spec.trafficDistribution"),
        ({"trafficDistribution": [1] * 5000}, "spec.trafficDistribution"),
        ({"selector": {"app": DEEP}}, "spec.selector['app']"),
    ],
)
def test_hostile_service_fields_are_named(spec: dict[str, Any], field: str) -> None:
    message = _error(service(**spec))
    assert message.startswith(f"Service sample/helloworld: {field}: "), message
    assert len(message) < 400


def test_a_recursive_traffic_distribution_is_refused() -> None:
    value: list[Any] = []
    value.append(value)
    message = _error(service(trafficDistribution=value))
    assert message.startswith("Service sample/helloworld: spec.trafficDistribution: ")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"endpoints": [{"addresses": ["198.19.1.1"], "nodeName": {"n": 1}}]},
         "endpoints[0].nodeName"),
        ({"endpoints": [{"addresses": ["198.19.1.1"], "nodeName": ["worker1"]}]},
         "endpoints[0].nodeName"),
        ({"endpoints": [{"addresses": ["198.19.1.1"], "zone": 1}]}, "endpoints[0].zone"),
        ({"endpoints": [{"addresses": ["198.19.1.1"], "targetRef": ["pod"]}]},
         "endpoints[0].targetRef"),
        ({"endpoints": [{"addresses": ["198.19.1.1"], "targetRef": {"name": DEEP}}]},
         "endpoints[0].targetRef.name"),
        ({"endpoints": [{"addresses": [HUGE]}]}, "endpoints[0].addresses[0]"),
        ({"endpoints": [{"addresses": [DEEP]}]}, "endpoints[0].addresses[0]"),
        ({"endpoints": [{"addresses": ["198.19.1.1"], "conditions": {"ready": HUGE}}]},
         "endpoints[0].conditions.ready"),
        ({"addressType": "FQDN", "endpoints": [{"addresses": [["example.invalid"]]}]},
         "endpoints[0].addresses[0]"),
        ({"ports": [{"name": "http", "port": HUGE}]}, "ports[0].port"),
        ({"ports": [{"name": ["http"], "port": 80}]}, "ports[0].name"),
        ({"ports": [{"name": "http", "port": 80, "protocol": "ICMP"}]}, "ports[0].protocol"),
        ({"addressType": DEEP}, "addressType"),
        ({"endpoints": DEEP}, "endpoints[0]"),
    ],
)
def test_hostile_slice_fields_are_named(fields: dict[str, Any], field: str) -> None:
    message = _error(endpoint_slice(**fields))
    assert message.startswith(f"EndpointSlice sample/helloworld-abc: {field}: "), message
    assert len(message) < 400


@pytest.mark.parametrize(
    ("spec", "field", "shown"),
    [
        ({"type": ["x"] * 100_000}, "spec.type", "a list of 100000 items"),
        ({"clusterIP": "x" * 100_000}, "spec.clusterIP", "'" + "x" * 64 + "'..."),
        ({"type": 2 ** 70}, "spec.type", "an integer of 71 bits"),
    ],
)
def test_values_in_messages_are_bounded(spec: dict[str, Any], field: str, shown: str) -> None:
    message = _error(service(**spec))
    assert message.startswith(f"Service sample/helloworld: {field}: "), message
    assert shown in message
    assert len(message) < 200


def test_protocol_unset_is_tcp() -> None:
    svc = parse_service(service(ports=[{"name": "http", "port": 80, "protocol": None}]))
    assert svc.ports[0].protocol == "TCP"
    eps = parse_slice(endpoint_slice(ports=[{"name": "http", "port": 80, "protocol": None}]))
    assert eps.ports[0].protocol == "TCP"


# -- sessionAffinity (SPEC.md section 8) ----------------------------------------------------

TIMEOUT = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"


def client_ip(timeout: Any) -> dict[str, Any]:
    return {"clientIP": {"timeoutSeconds": timeout}}


@pytest.mark.parametrize(
    ("spec", "timeout"),
    [
        ({}, 0),  # unset is None
        ({"sessionAffinity": None}, 0),
        ({"sessionAffinity": ""}, 0),  # as the API server defaults an empty one
        ({"sessionAffinity": "None"}, 0),
        ({"sessionAffinity": "ClientIP"}, 10800),  # the API server's default timeout
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": None}, 10800),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {}}, 10800),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {}}}, 10800),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": client_ip(None)}, 10800),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": client_ip(60)}, 60),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": client_ip(1)}, 1),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": client_ip(86400)}, 86400),
        # With None the config means nothing (the API server's defaulting drops it): even
        # one Kubernetes would not accept is ignored, not refused.
        ({"sessionAffinity": "None", "sessionAffinityConfig": client_ip(60)}, 0),
        ({"sessionAffinityConfig": client_ip(0)}, 0),
        ({"sessionAffinityConfig": "oops"}, 0),
    ],
)
def test_session_affinity(spec: dict[str, Any], timeout: int) -> None:
    assert parse_service(service(**spec)).session_affinity_timeout == timeout


def test_the_default_timeout_is_the_datapaths() -> None:
    from kmesh_plugin.datapath import records
    from kmesh_plugin.model import objects

    assert objects.DEFAULT_AFFINITY_TIMEOUT == records.DEFAULT_AFFINITY_TIMEOUT == 10800


def test_a_timeout_change_is_a_service_change() -> None:
    # ClusterState keeps the parsed object; the agent replans a Service whose object changed.
    one = parse_service(service(sessionAffinity="ClientIP", sessionAffinityConfig=client_ip(60)))
    other = parse_service(service(sessionAffinity="ClientIP", sessionAffinityConfig=client_ip(61)))
    assert one != other
    assert one == parse_service(service(sessionAffinity="ClientIP",
                                        sessionAffinityConfig=client_ip(60)))


@pytest.mark.parametrize(
    ("spec", "field", "shown"),
    [
        ({"sessionAffinity": "clientip"}, "spec.sessionAffinity", "'clientip'"),
        ({"sessionAffinity": "Cookie"}, "spec.sessionAffinity", "'Cookie'"),
        ({"sessionAffinity": 5}, "spec.sessionAffinity", "5"),
        ({"sessionAffinity": True}, "spec.sessionAffinity", "True"),
        ({"sessionAffinity": ["ClientIP"]}, "spec.sessionAffinity", "a list of 1 items"),
        ({"sessionAffinity": DEEP}, "spec.sessionAffinity", "a list of 1 items"),
        ({"sessionAffinity": "x" * 100_000}, "spec.sessionAffinity", "'" + "x" * 64 + "'..."),
        ({"sessionAffinityConfig": client_ip(0)}, TIMEOUT, "0"),
        ({"sessionAffinityConfig": client_ip(-1)}, TIMEOUT, "-1"),
        ({"sessionAffinityConfig": client_ip(86401)}, TIMEOUT, "86401"),
        ({"sessionAffinityConfig": client_ip("60")}, TIMEOUT, "'60'"),
        ({"sessionAffinityConfig": client_ip(60.0)}, TIMEOUT, "60.0"),
        ({"sessionAffinityConfig": client_ip(True)}, TIMEOUT, "True"),
        ({"sessionAffinityConfig": client_ip(HUGE)}, TIMEOUT, "an integer of"),
        ({"sessionAffinityConfig": client_ip(DEEP)}, TIMEOUT, "a list of 1 items"),
        ({"sessionAffinityConfig": client_ip({"seconds": 60})}, TIMEOUT, "a mapping"),
        ({"sessionAffinityConfig": "oops"}, TIMEOUT, "non-mapping"),
        ({"sessionAffinityConfig": {"clientIP": 60}}, TIMEOUT, "non-mapping"),
    ],
)
def test_session_affinity_errors_name_the_field(spec: dict[str, Any], field: str,
                                                shown: str) -> None:
    if field == TIMEOUT:
        spec = {"sessionAffinity": "ClientIP", **spec}
    message = _error(service(**spec))
    assert message.startswith(f"Service sample/helloworld: {field}: "), message
    assert shown in message
    assert len(message) < 200
