"""From cluster state to backend sets (SPEC.md sections 3, 5 and 7), and what events touch."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from kmesh_plugin import hookimpl
from kmesh_plugin.agent.planner import GroupPlan, Planner, ServicePlan, backend_set
from kmesh_plugin.agent.state import ClusterState, Impact
from kmesh_plugin.datapath.records import (
    MODE_FAILOVER,
    MODE_RANDOM,
    MODE_STRICT,
    Backend,
    BackendSet,
)
from kmesh_plugin.hookspecs import PRIORITY_THIRD_PARTY, StrategySettings
from kmesh_plugin.model import (
    Claim,
    Conditions,
    EndpointInfo,
    Locality,
    LocalityLabels,
    Mode,
    NodeInfo,
    Scope,
    Service,
    Strategy,
)
from kmesh_plugin.model.objects import object_key, parse
from kmesh_plugin.plugins import PluginError, Plugins
from kmesh_plugin.sources.base import Event

NS = "sample"
SVC = (NS, "helloworld")
CLUSTER_IP = "198.18.0.10"
PREFER_CLOSE = (Scope.NETWORK, Scope.REGION, Scope.ZONE, Scope.SUBZONE)

# Endpoint addresses of the seed's three instances.
EP1, EP2, EP3 = "198.19.1.1", "198.19.2.1", "198.19.3.1"


# -- building objects ---------------------------------------------------------------------


def node(name: str, region: str = "", zone: str = "", subzone: str = "") -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    if region:
        labels["topology.kubernetes.io/region"] = region
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    if subzone:
        labels["topology.kubernetes.io/subzone"] = subzone  # the seed's key
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def seed_nodes() -> list[dict[str, Any]]:
    return [
        node("worker1", "region", "zone1", "subzone1"),
        node("worker2", "region", "zone1", "subzone2"),
        node("worker3", "region", "zone2", "subzone3"),
    ]


def service(
    name: str = "helloworld",
    *,
    ns: str = NS,
    cluster_ips: Sequence[str] = (CLUSTER_IP,),
    ports: Sequence[dict[str, Any]] = ({"name": "http", "port": 5000},),
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"ports": list(ports), **spec}
    if cluster_ips:
        body["clusterIP"] = cluster_ips[0]
        body["clusterIPs"] = list(cluster_ips)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": body,
    }


def ep(
    address: str,
    node_name: str | None,
    ready: bool | None = None,
    serving: bool | None = None,
    terminating: bool | None = None,
) -> dict[str, Any]:
    conditions = {
        k: v
        for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
        if v is not None
    }
    out: dict[str, Any] = {"addresses": [address], "conditions": conditions}
    if node_name is not None:
        out["nodeName"] = node_name
    return out


def endpoint_slice(
    name: str,
    endpoints: Sequence[dict[str, Any]],
    *,
    service_name: str = "helloworld",
    ns: str = NS,
    address_type: str = "IPv4",
    ports: Sequence[dict[str, Any]] = ({"name": "http", "port": 5000, "protocol": "TCP"},),
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "ports": list(ports),
        "endpoints": list(endpoints),
    }


def namespace(name: str = NS, **annotations: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "annotations": annotations}}


def events(objects: Iterable[dict[str, Any]]) -> list[Event]:
    return [Event(object_key(o), parse(o)) for o in objects]


def deleted(obj: dict[str, Any]) -> Event:
    return Event(object_key(obj), None)


def cluster(*objects: dict[str, Any], client: str = "worker1") -> ClusterState:
    state = ClusterState(LocalityLabels(), client)
    state.apply(events(objects))
    return state


@pytest.fixture
def planner() -> Planner:
    return Planner(Plugins.load(["local", "prefer_close"]), StrategySettings(PREFER_CLOSE))


def b(address: str, port: int = 5000) -> Backend:
    return Backend(ipaddress.ip_address(address), port)


def only_group(plan: ServicePlan | None) -> GroupPlan:
    assert plan is not None
    assert len(plan.groups) == 1
    return plan.groups[0]


def seed_cluster(*extra: dict[str, Any], client: str = "worker1", **spec: Any) -> ClusterState:
    return cluster(
        *seed_nodes(),
        service(**spec),
        endpoint_slice("helloworld-abc", [ep(EP1, "worker1"), ep(EP2, "worker2"),
                                          ep(EP3, "worker3")]),
        *extra,
        client=client,
    )


# -- the seed experiment --------------------------------------------------------------------


def test_seed_prefer_close_tiers(planner: Planner) -> None:
    state = seed_cluster(trafficDistribution="PreferClose")
    plan = planner.plan_service(state, SVC)
    group = only_group(plan)
    assert plan is not None
    assert plan.strategy.name == "PreferClose"
    assert plan.claimed_by == "prefer_close"
    assert plan.warning is None
    assert group.ranked_by == "core"
    assert group.family == 4
    assert str(group.frontend) == "198.18.0.10:5000/TCP"
    # Tier 0 worker1, tier 1 worker2 (subzone mismatch), tier 2 worker3 (zone mismatch); the
    # set keeps all five tiers of a four-scope preference.
    assert group.backends == BackendSet(
        MODE_FAILOVER, ((b(EP1),), (b(EP2),), (b(EP3),), (), ())
    )
    assert [(r.endpoint.address, r.endpoint.node, r.tier) for r in group.endpoints] == [
        (EP1, "worker1", 0), (EP2, "worker2", 1), (EP3, "worker3", 2),
    ]


def test_seed_step2_worker1_instance_deleted(planner: Planner) -> None:
    state = seed_cluster(trafficDistribution="PreferClose")
    impact = state.apply(events([endpoint_slice(
        "helloworld-abc", [ep(EP2, "worker2"), ep(EP3, "worker3")]
    )]))
    assert impact.services == {SVC}
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(MODE_FAILOVER, ((), (b(EP2),), (b(EP3),), (), ()))


def test_seed_step3_worker3_relabelled(planner: Planner) -> None:
    state = seed_cluster(trafficDistribution="PreferClose")
    state.apply(events([endpoint_slice(
        "helloworld-abc", [ep(EP2, "worker2"), ep(EP3, "worker3")]
    )]))
    impact = state.apply(events([node("worker3", "region", "zone1", "subzone2")]))
    assert impact.services == {SVC}
    assert not impact.everything
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(MODE_FAILOVER, ((), (b(EP2), b(EP3)), (), (), ()))


def test_seed_from_worker3(planner: Planner) -> None:
    state = seed_cluster(trafficDistribution="PreferClose", client="worker3")
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(
        MODE_FAILOVER, ((b(EP3),), (), (b(EP1), b(EP2)), (), ())
    )


def test_prefer_close_without_subzone(planner: Planner) -> None:
    planner = Planner(planner.plugins, StrategySettings(PREFER_CLOSE[:3]))
    state = seed_cluster(trafficDistribution="PreferClose")
    group = only_group(planner.plan_service(state, SVC))
    # worker1 and worker2 share the zone: both tier 0 once SUBZONE is dropped.
    assert group.backends == BackendSet(
        MODE_FAILOVER, ((b(EP1), b(EP2)), (b(EP3),), (), ())
    )


def test_prefer_same_node(planner: Planner) -> None:
    state = seed_cluster(trafficDistribution="PreferSameNode", client="worker2")
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(
        MODE_FAILOVER, ((b(EP2),), (), (b(EP1),), (b(EP3),), (), ())
    )


def test_no_strategy_is_random_over_all(planner: Planner) -> None:
    state = seed_cluster()
    plan = planner.plan_service(state, SVC)
    group = only_group(plan)
    assert plan is not None
    assert plan.strategy.name == "none"
    assert plan.claimed_by == ""
    assert group.backends == BackendSet(MODE_RANDOM, ((b(EP1), b(EP2), b(EP3)),))


def test_unknown_annotation_plan_carries_the_warning(planner: Planner) -> None:
    state = seed_cluster(
        namespace(**{"networking.istio.io/traffic-distribution": "PreferClose"}),
    )
    svc = service()
    svc["metadata"]["annotations"] = {"networking.istio.io/traffic-distribution": "Nearby"}
    state.apply(events([svc]))
    plan = planner.plan_service(state, SVC)
    group = only_group(plan)
    assert plan is not None
    assert plan.warning is not None and "'Nearby'" in plan.warning
    assert group.backends == BackendSet(MODE_RANDOM, ((b(EP1), b(EP2), b(EP3)),))


def test_namespace_annotation_reaches_the_plan(planner: Planner) -> None:
    state = seed_cluster(
        namespace(**{"networking.istio.io/traffic-distribution": "PreferSameZone"}),
    )
    plan = planner.plan_service(state, SVC)
    group = only_group(plan)
    assert plan is not None and plan.strategy.name == "PreferSameZone"
    # worker3: network and region match, zone does not -> tier 1 of [NETWORK, REGION, ZONE].
    assert group.backends == BackendSet(MODE_FAILOVER, ((b(EP1), b(EP2)), (b(EP3),), (), ()))


# -- Local (strict) -------------------------------------------------------------------------


def test_local_uses_only_local_ready(planner: Planner) -> None:
    state = seed_cluster(internalTrafficPolicy="Local", trafficDistribution="PreferClose")
    plan = planner.plan_service(state, SVC)
    group = only_group(plan)
    assert plan is not None and plan.strategy.name == "Local"
    assert group.backends == BackendSet(MODE_STRICT, ((b(EP1),),))
    assert [(r.endpoint.address, r.tier) for r in group.endpoints] == [
        (EP1, 0), (EP2, None), (EP3, None),
    ]


def test_local_prefers_ready_over_terminating(planner: Planner) -> None:
    local_term = "198.19.1.2"
    state = cluster(
        *seed_nodes(),
        service(internalTrafficPolicy="Local"),
        endpoint_slice("s", [
            ep(EP1, "worker1"),
            ep(local_term, "worker1", ready=False, serving=True, terminating=True),
            ep(EP2, "worker2"),
        ]),
    )
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(MODE_STRICT, ((b(EP1),),))


def test_local_falls_back_to_local_serving_terminating(planner: Planner) -> None:
    state = cluster(
        *seed_nodes(),
        service(internalTrafficPolicy="Local"),
        endpoint_slice("s", [
            ep(EP1, "worker1", ready=False, serving=True, terminating=True),
            ep("198.19.1.2", "worker1", ready=False, serving=False, terminating=True),
            ep(EP2, "worker2"),  # ready, but not local
            ep(EP3, "worker3", ready=False, serving=True, terminating=True),
        ]),
    )
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(MODE_STRICT, ((b(EP1),),))


@pytest.mark.parametrize(
    "local",
    [
        [],  # no local endpoint at all
        [ep(EP1, "worker1", ready=False)],  # local, not ready, not terminating
        [ep(EP1, "worker1", ready=False, serving=False, terminating=True)],
    ],
)
def test_local_refuses_without_a_usable_local_endpoint(
    planner: Planner, local: list[dict[str, Any]]
) -> None:
    state = cluster(
        *seed_nodes(),
        service(internalTrafficPolicy="Local"),
        endpoint_slice("s", [*local, ep(EP2, "worker2"), ep(EP3, "worker3")]),
    )
    group = only_group(planner.plan_service(state, SVC))
    # One empty tier 0: the kernel refuses the connect at once.
    assert group.backends == BackendSet(MODE_STRICT, ((),))
    assert all(r.tier is None for r in group.endpoints)


def test_local_without_any_endpoint(planner: Planner) -> None:
    state = cluster(*seed_nodes(), service(internalTrafficPolicy="Local"))
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(MODE_STRICT, ((),))
    assert group.endpoints == []


class SameRegionStrictRanker:
    """A third-party strict strategy that ranks endpoints itself."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    @hookimpl
    def kmesh_strategy_claim(self) -> Claim:
        return Claim(Strategy("Ranked", Mode.STRICT, (), "test"), PRIORITY_THIRD_PARTY)

    @hookimpl
    def kmesh_endpoint_tiers(self, endpoints: Sequence[EndpointInfo]) -> list[int | None]:
        self.asked.append(len(endpoints))
        return [0 for _ in endpoints]


def test_strict_third_party_ranking_without_any_endpoint_refuses(planner: Planner) -> None:
    ranker = SameRegionStrictRanker()
    planner.plugins.register(ranker, "ranked")
    state = cluster(*seed_nodes(), service())
    group = only_group(planner.plan_service(state, SVC))
    assert ranker.asked == [0]
    assert group.ranked_by == "ranked"
    # One empty tier 0: the kernel refuses the connect at once.
    assert group.backends == BackendSet(MODE_STRICT, ((),))


def test_local_seed_after_deleting_worker1s_instance(planner: Planner) -> None:
    state = seed_cluster(internalTrafficPolicy="Local")
    state.apply(events([endpoint_slice("helloworld-abc", [ep(EP2, "worker2"),
                                                           ep(EP3, "worker3")])]))
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(MODE_STRICT, ((),))


# -- eligibility ----------------------------------------------------------------------------


def test_not_ready_endpoints_are_skipped(planner: Planner) -> None:
    state = cluster(
        *seed_nodes(),
        service(trafficDistribution="PreferClose"),
        endpoint_slice("s", [
            ep(EP1, "worker1", ready=False),
            ep("198.19.1.2", "worker1", ready=False, serving=True, terminating=True),
            ep(EP2, "worker2", ready=True),
            ep(EP3, "worker3"),  # conditions unset: ready
        ]),
    )
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(MODE_FAILOVER, ((), (b(EP2),), (b(EP3),), (), ()))


def test_failover_without_ready_uses_serving_terminating_ignoring_locality(
    planner: Planner,
) -> None:
    state = cluster(
        *seed_nodes(),
        service(trafficDistribution="PreferClose"),
        endpoint_slice("s", [
            ep(EP1, "worker1", ready=False),  # local, but neither ready nor terminating
            ep(EP2, "worker2", ready=False, serving=True, terminating=True),
            ep(EP3, "worker3", ready=False, terminating=True),  # serving unset: serving (§5)
            ep("198.19.3.2", "worker3", ready=False, serving=True, terminating=True),
            ep("198.19.3.3", "worker3", ready=False, serving=False, terminating=True),
        ]),
    )
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(MODE_FAILOVER, ((b(EP2), b(EP3), b("198.19.3.2")),))
    assert [(r.endpoint.address, r.tier is not None) for r in group.endpoints] == [
        (EP1, False), (EP2, True), (EP3, True), ("198.19.3.2", True), ("198.19.3.3", False),
    ]


def test_random_without_ready_uses_serving_terminating(planner: Planner) -> None:
    state = cluster(
        *seed_nodes(),
        service(),
        endpoint_slice("s", [
            ep(EP1, "worker1", ready=False),
            ep(EP2, "worker2", ready=False, serving=True, terminating=True),
        ]),
    )
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(MODE_RANDOM, ((b(EP2),),))


def test_no_endpoint_at_all(planner: Planner) -> None:
    state = cluster(*seed_nodes(), service(trafficDistribution="PreferClose"))
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(MODE_FAILOVER, ((),))


def test_publish_not_ready_addresses_makes_every_endpoint_eligible(planner: Planner) -> None:
    state = cluster(
        *seed_nodes(),
        service(trafficDistribution="PreferClose", publishNotReadyAddresses=True),
        endpoint_slice("s", [
            ep(EP1, "worker1", ready=False, serving=False),
            ep(EP2, "worker2", ready=False, serving=False, terminating=True),
            ep(EP3, "worker3", ready=True),
        ]),
    )
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(
        MODE_FAILOVER, ((b(EP1),), (b(EP2),), (b(EP3),), (), ())
    )


def test_publish_not_ready_addresses_with_local(planner: Planner) -> None:
    state = cluster(
        *seed_nodes(),
        service(internalTrafficPolicy="Local", publishNotReadyAddresses=True),
        endpoint_slice("s", [ep(EP1, "worker1", ready=False), ep(EP2, "worker2")]),
    )
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(MODE_STRICT, ((b(EP1),),))


@pytest.mark.parametrize(
    "obj",
    [
        service(cluster_ips=("None",)),
        service(cluster_ips=()),
        service(cluster_ips=(), type="ExternalName", externalName="example.invalid"),
    ],
    ids=["headless", "no-cluster-ip", "external-name"],
)
def test_not_load_balanced(planner: Planner, obj: dict[str, Any]) -> None:
    state = cluster(*seed_nodes(), obj, endpoint_slice("s", [ep(EP1, "worker1")]))
    assert SVC in state.services
    assert planner.plan_service(state, SVC) is None


def test_unknown_service(planner: Planner) -> None:
    assert planner.plan_service(cluster(*seed_nodes()), SVC) is None


# -- groups: families, ports, protocols -----------------------------------------------------


def test_dual_stack_one_group_per_family(planner: Planner) -> None:
    state = cluster(
        *seed_nodes(),
        service(cluster_ips=(CLUSTER_IP, "fd00::10"), trafficDistribution="PreferClose"),
        endpoint_slice("v4", [ep(EP1, "worker1"), ep(EP2, "worker2")]),
        endpoint_slice("v6", [ep("fd00:1::1", "worker1"), ep("fd00:3::1", "worker3")],
                       address_type="IPv6"),
    )
    plan = planner.plan_service(state, SVC)
    assert plan is not None
    assert [(g.family, str(g.frontend)) for g in plan.groups] == [
        (4, "198.18.0.10:5000/TCP"), (6, "[fd00::10]:5000/TCP"),
    ]
    v4, v6 = plan.groups
    assert v4.backends == BackendSet(MODE_FAILOVER, ((b(EP1),), (b(EP2),), (), (), ()))
    assert v6.backends == BackendSet(
        MODE_FAILOVER, ((b("fd00:1::1"),), (), (b("fd00:3::1"),), (), ())
    )


def test_family_without_a_slice_of_its_type_is_empty(planner: Planner) -> None:
    state = cluster(
        *seed_nodes(),
        service(cluster_ips=("fd00::10", CLUSTER_IP)),
        endpoint_slice("v4", [ep(EP1, "worker1")]),
    )
    plan = planner.plan_service(state, SVC)
    assert plan is not None
    assert [g.family for g in plan.groups] == [6, 4]
    assert plan.groups[0].backends == BackendSet(MODE_RANDOM, ((),))
    assert plan.groups[1].backends == BackendSet(MODE_RANDOM, ((b(EP1),),))


def test_target_port_comes_from_the_slice_port_with_the_same_name(planner: Planner) -> None:
    state = cluster(
        *seed_nodes(),
        service(ports=[
            {"name": "http", "port": 80, "targetPort": "web"},
            {"name": "metrics", "port": 9090, "targetPort": 9090},
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "grpc", "port": 7000},
        ]),
        endpoint_slice("s", [ep(EP1, "worker1")], ports=[
            {"name": "metrics", "port": 19090, "protocol": "TCP"},
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 5353, "protocol": "UDP"},
            {"name": "grpc", "port": 7001, "protocol": "UDP"},  # wrong protocol: no match
        ]),
    )
    plan = planner.plan_service(state, SVC)
    assert plan is not None
    got = {str(g.frontend): g.backends.tiers for g in plan.groups}
    assert got == {
        "198.18.0.10:80/TCP": ((b(EP1, 8080),),),
        "198.18.0.10:9090/TCP": ((b(EP1, 19090),),),
        "198.18.0.10:53/UDP": ((b(EP1, 5353),),),
        "198.18.0.10:7000/TCP": ((),),
    }


def test_unnamed_port(planner: Planner) -> None:
    state = cluster(
        *seed_nodes(),
        service(ports=[{"port": 80, "targetPort": 8080}]),
        endpoint_slice("s", [ep(EP1, "worker1")], ports=[{"port": 8080}]),
    )
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends.tiers == ((b(EP1, 8080),),)


def test_sctp_ports_are_skipped_with_a_warning(planner: Planner) -> None:
    state = cluster(
        *seed_nodes(),
        service(ports=[{"name": "http", "port": 80, "targetPort": 8080},
                       {"name": "sig", "port": 3868, "protocol": "SCTP"}]),
        endpoint_slice("s", [ep(EP1, "worker1")],
                       ports=[{"name": "http", "port": 8080},
                              {"name": "sig", "port": 3868, "protocol": "SCTP"}]),
    )
    plan = planner.plan_service(state, SVC)
    group = only_group(plan)
    assert group.frontend.port == 80
    assert plan is not None and plan.warning is not None
    assert "sig/SCTP" in plan.warning and "TCP and UDP only" in plan.warning


def test_same_address_in_two_slices_counts_once(planner: Planner) -> None:
    state = cluster(
        *seed_nodes(),
        service(trafficDistribution="PreferClose"),
        endpoint_slice("s1", [ep(EP1, "worker1", ready=False), ep(EP2, "worker2")]),
        endpoint_slice("s2", [ep(EP1, "worker1", ready=True), ep(EP2, "worker2")]),
    )
    group = only_group(planner.plan_service(state, SVC))
    # EP1 keeps its best conditions (ready in s2).
    assert group.backends == BackendSet(MODE_FAILOVER, ((b(EP1),), (b(EP2),), (), (), ()))
    assert [r.endpoint.address for r in group.endpoints] == [EP1, EP2]


def test_slices_of_other_services_and_namespaces_are_ignored(planner: Planner) -> None:
    state = cluster(
        *seed_nodes(),
        service(),
        endpoint_slice("s", [ep(EP1, "worker1")]),
        endpoint_slice("other", [ep(EP2, "worker2")], service_name="other"),
        endpoint_slice("s", [ep(EP3, "worker3")], ns="elsewhere"),
    )
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends == BackendSet(MODE_RANDOM, ((b(EP1),),))


def test_endpoint_order_is_deterministic(planner: Planner) -> None:
    addresses = ["198.19.0.10", "198.19.0.9", "198.19.0.100", "198.19.0.2"]
    slice_a = endpoint_slice("a", [ep(a, "worker1") for a in addresses[:2]])
    slice_b = endpoint_slice("b", [ep(a, "worker1") for a in addresses[2:]])
    first = cluster(*seed_nodes(), service(), slice_a, slice_b)
    second = cluster(slice_b, service(), *reversed(seed_nodes()),
                     endpoint_slice("a", [ep(a, "worker1") for a in reversed(addresses[:2])]))
    expected = ["198.19.0.2", "198.19.0.9", "198.19.0.10", "198.19.0.100"]  # numeric order
    for state in (first, second):
        group = only_group(planner.plan_service(state, SVC))
        assert group.backends == BackendSet(MODE_RANDOM, (tuple(b(a) for a in expected),))
        assert [r.endpoint.address for r in group.endpoints] == expected


def test_endpoint_on_an_unknown_node_has_the_locality_of_an_unlabelled_node(
    planner: Planner,
) -> None:
    # SPEC.md section 2: an endpoint's locality is its node's. The slice's zone hint is not
    # used: it would go stale once the Node appears with a locality no different from "no
    # labels" (nothing would recompute the Service).
    hinted = ep(EP3, "worker9")
    hinted["zone"] = "zone1"
    state = cluster(
        *seed_nodes(),
        service(trafficDistribution="PreferSameZone"),
        endpoint_slice("s", [hinted, ep(EP2, None)]),
    )
    group = only_group(planner.plan_service(state, SVC))
    rows = {r.endpoint.address: r for r in group.endpoints}
    assert rows[EP3].endpoint.locality == LocalityLabels().locality_of("worker9", {})
    assert rows[EP3].endpoint.node == "worker9"
    assert rows[EP2].endpoint.locality == LocalityLabels().locality_of("", {})
    # Both lack a region, worker1 has one: network matches, region does not -> tier 2.
    assert group.backends == BackendSet(MODE_FAILOVER, ((), (), (b(EP2), b(EP3)), ()))


def test_client_node_without_a_node_object(planner: Planner) -> None:
    state = seed_cluster(trafficDistribution="PreferClose", client="worker7")
    assert planner.client(state) == NodeInfo("worker7", LocalityLabels().locality_of(
        "worker7", {}))
    group = only_group(planner.plan_service(state, SVC))
    # Empty region/zone/subzone match nothing labelled: everything in tier 3 (network "").
    assert group.backends == BackendSet(
        MODE_FAILOVER, ((), (), (), (b(EP1), b(EP2), b(EP3)), ())
    )


# -- backend_set directly -------------------------------------------------------------------


def _info(address: str, **conditions: bool) -> EndpointInfo:
    return EndpointInfo(address, 80, "n", Locality(node="n"), Conditions(**conditions))


def test_backend_set_excluded_by_the_strategy() -> None:
    strategy = Strategy("X", Mode.FAILOVER, (Scope.ZONE,))
    svc = parse(service())
    assert isinstance(svc, Service)
    backends, rows = backend_set(
        strategy, [(_info("198.19.0.1"), None), (_info("198.19.0.2"), 1)], svc
    )
    assert backends == BackendSet(MODE_FAILOVER, ((), (b("198.19.0.2", 80),)))
    assert [(r.tier, r.note) for r in rows] == [(None, "excluded by the strategy"), (1, "tier 1")]


def test_backend_set_strict_ignores_other_tiers() -> None:
    strategy = Strategy("S", Mode.STRICT, (Scope.REGION, Scope.ZONE))
    svc = parse(service())
    assert isinstance(svc, Service)
    backends, rows = backend_set(
        strategy,
        [(_info("198.19.0.1"), 1), (_info("198.19.0.2", ready=False, serving=True,
                                           terminating=True), 0)],
        svc,
    )
    # No ready endpoint in tier 0: the serving+terminating one there, not the ready tier-1 one.
    assert backends == BackendSet(MODE_STRICT, ((b("198.19.0.2", 80),),))
    assert [r.tier for r in rows] == [None, 0]


# -- sessionAffinity (SPEC.md section 8) ---------------------------------------------------


def test_client_ip_sets_carry_the_timeout(planner: Planner) -> None:
    state = seed_cluster(trafficDistribution="PreferClose", sessionAffinity="ClientIP",
                         sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    group = only_group(planner.plan_service(state, SVC))
    assert group.backends.affinity == 60
    assert group.backends == BackendSet(
        MODE_FAILOVER, ((b(EP1),), (b(EP2),), (b(EP3),), (), ()), affinity=60
    )
    # The explanations are unchanged by it.
    assert [(r.endpoint.address, r.tier, r.note) for r in group.endpoints] == [
        (EP1, 0, "tier 0"), (EP2, 1, "tier 1"), (EP3, 2, "tier 2"),
    ]


def test_client_ip_default_timeout_and_none(planner: Planner) -> None:
    state = seed_cluster(sessionAffinity="ClientIP")
    assert only_group(planner.plan_service(state, SVC)).backends.affinity == 10800
    for spec in ({}, {"sessionAffinity": "None"}):
        group = only_group(planner.plan_service(seed_cluster(**spec), SVC))
        assert group.backends.affinity == 0
        assert group.backends == BackendSet(MODE_RANDOM, ((b(EP1), b(EP2), b(EP3)),))


def test_a_timeout_change_changes_the_set(planner: Planner) -> None:
    # The writer republishes a set that differs: a new timeout reaches the record.
    state = seed_cluster(sessionAffinity="ClientIP")
    before = only_group(planner.plan_service(state, SVC)).backends
    state.apply(events([service(sessionAffinity="ClientIP",
                                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 5}})]))
    after = only_group(planner.plan_service(state, SVC)).backends
    assert after.tiers == before.tiers and (before.affinity, after.affinity) == (10800, 5)
    assert after != before
    state.apply(events([service()]))
    assert only_group(planner.plan_service(state, SVC)).backends.affinity == 0


def test_dual_stack_client_ip_groups_all_carry_the_timeout(planner: Planner) -> None:
    state = cluster(
        *seed_nodes(),
        service(cluster_ips=(CLUSTER_IP, "fd00::10"), sessionAffinity="ClientIP",
                ports=({"name": "http", "port": 5000},
                       {"name": "dns", "port": 53, "protocol": "UDP"})),
    )
    plan = planner.plan_service(state, SVC)
    assert plan is not None and len(plan.groups) == 4
    assert {g.backends.affinity for g in plan.groups} == {10800}


def test_backend_set_with_affinity_sorts_tiers_and_rows_follow_the_ranking() -> None:
    strategy = Strategy("X", Mode.FAILOVER, (Scope.ZONE,))
    svc = parse(service(sessionAffinity="ClientIP",
                        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}}))
    assert isinstance(svc, Service)
    # A plugin may rank endpoints in any order; the set sorts each tier (the program
    # binary-searches a client's endpoint), the explanations keep the ranked order.
    ranked = [(_info("198.19.0.9"), 0), (_info("198.19.0.3"), 1), (_info("198.19.0.1"), 0),
              (_info("198.19.0.2", ready=False), 0), (_info("198.19.0.5"), 1)]
    backends, rows = backend_set(strategy, ranked, svc)
    assert backends.affinity == 30
    assert backends.tiers == ((b("198.19.0.1", 80), b("198.19.0.9", 80)),
                              (b("198.19.0.3", 80), b("198.19.0.5", 80)))
    assert [(r.endpoint.address, r.tier, r.note) for r in rows] == [
        ("198.19.0.9", 0, "tier 0"), ("198.19.0.3", 1, "tier 1"), ("198.19.0.1", 0, "tier 0"),
        ("198.19.0.2", None, "not ready"), ("198.19.0.5", 1, "tier 1"),
    ]
    # The same ranking without affinity keeps the ranked order in each tier.
    plain, _ = backend_set(strategy, ranked, parse(service()))  # type: ignore[arg-type]
    assert plain.affinity == 0
    assert plain.tiers[0] == (b("198.19.0.9", 80), b("198.19.0.1", 80))
    fast, none = backend_set(strategy, ranked, svc, detail=False)
    assert fast == backends and none == []


# -- third-party ranking --------------------------------------------------------------------


class OddEven:
    """Claims every Service; ranks even last octets in tier 0, odd ones out."""

    def __init__(self, tiers: Any = None) -> None:
        self.tiers = tiers

    @hookimpl
    def kmesh_strategy_claim(self) -> Claim:
        return Claim(Strategy("OddEven", Mode.FAILOVER, (), "test"), PRIORITY_THIRD_PARTY)

    @hookimpl
    def kmesh_endpoint_tiers(
        self, strategy: Strategy, endpoints: Sequence[EndpointInfo]
    ) -> list[int | None] | None:
        if strategy.name != "OddEven":
            return None
        if self.tiers is not None:
            return self.tiers  # type: ignore[no-any-return]
        return [0 if int(e.address.rsplit(".", 1)[1]) % 2 == 0 else None for e in endpoints]


def test_third_party_ranking(planner: Planner) -> None:
    planner.plugins.register(OddEven(), "odd_even")
    state = cluster(*seed_nodes(), service(internalTrafficPolicy="Local"),
                    endpoint_slice("s", [ep("198.19.0.1", "worker1"),
                                         ep("198.19.0.2", "worker3")]))
    plan = planner.plan_service(state, SVC)
    group = only_group(plan)
    assert plan is not None and plan.claimed_by == "odd_even"
    assert group.ranked_by == "odd_even"
    assert [c.plugin for c in group.other_claims] == ["local"]
    assert group.backends == BackendSet(MODE_FAILOVER, ((b("198.19.0.2"),),))


@pytest.mark.parametrize("tiers", [[0], [0, 8], [0, -1], [0, "1"]])
def test_third_party_bad_ranking_names_the_plugin(planner: Planner, tiers: list[Any]) -> None:
    planner.plugins.register(OddEven(tiers), "odd_even")
    state = cluster(*seed_nodes(), service(),
                    endpoint_slice("s", [ep("198.19.0.1", "worker1"),
                                         ep("198.19.0.2", "worker3")]))
    with pytest.raises(PluginError, match="plugin 'odd_even': kmesh_endpoint_tiers"):
        planner.plan_service(state, SVC)


# -- ClusterState.apply: what an event touches ---------------------------------------------


def _busy_cluster() -> ClusterState:
    """helloworld on worker1..3, web on worker2 only, api in another namespace on worker3."""
    return cluster(
        *seed_nodes(),
        namespace(),
        namespace("other"),
        service(),
        service("web"),
        service("api", ns="other"),
        endpoint_slice("hw", [ep(EP1, "worker1"), ep(EP2, "worker2"), ep(EP3, "worker3")]),
        endpoint_slice("web-1", [ep("198.19.2.2", "worker2")], service_name="web"),
        endpoint_slice("api-1", [ep("198.19.3.3", "worker3")], service_name="api", ns="other"),
    )


def test_initial_apply_touches_every_service() -> None:
    state = ClusterState(LocalityLabels(), "worker1")
    impact = state.apply(events([
        *seed_nodes(), service(), service("api", ns="other"),
        endpoint_slice("hw", [ep(EP1, "worker1")]),
    ]))
    assert impact.services == {SVC, ("other", "api")}
    assert bool(impact)


def test_own_node_relabel_touches_everything() -> None:
    state = _busy_cluster()
    impact = state.apply(events([node("worker1", "region", "zone9", "subzone1")]))
    assert impact.everything
    assert impact.relabelled == [(
        "worker1",
        Locality("", "region", "zone1", "subzone1", "worker1"),
        Locality("", "region", "zone9", "subzone1", "worker1"),
    )]
    assert state.locality("worker1").zone == "zone9"


def test_other_node_relabel_touches_services_with_endpoints_there() -> None:
    state = _busy_cluster()
    impact = state.apply(events([node("worker2", "region", "zone2", "subzone2")]))
    assert not impact.everything
    assert impact.services == {SVC, (NS, "web")}
    assert [name for name, _, _ in impact.relabelled] == ["worker2"]

    impact = state.apply(events([node("worker3", "region", "zone1", "subzone3")]))
    assert impact.services == {SVC, ("other", "api")}


def test_node_update_without_locality_change_touches_nothing() -> None:
    state = _busy_cluster()
    relabel = node("worker2", "region", "zone1", "subzone2")
    relabel["metadata"]["labels"]["unrelated"] = "x"
    impact = state.apply(events([relabel, node("worker1", "region", "zone1", "subzone1")]))
    assert impact == Impact()
    assert not impact


def test_own_node_label_change_without_locality_change_touches_everything() -> None:
    # Strategies see the client node's labels (NodeInfo.labels), not only its locality.
    state = _busy_cluster()
    relabel = node("worker1", "region", "zone1", "subzone1")
    relabel["metadata"]["labels"]["example.com/rack"] = "r7"
    impact = state.apply(events([relabel]))
    assert impact.everything
    assert impact.relabelled == []  # the locality did not change: no locality hook


def test_own_node_appearing_without_locality_labels_touches_everything() -> None:
    state = cluster(service(), client="worker1")
    impact = state.apply(events([node("worker1")]))  # only kubernetes.io/hostname
    assert impact.everything
    assert impact.relabelled == []


def test_node_deletion_is_a_relabel() -> None:
    state = _busy_cluster()
    impact = state.apply([deleted(node("worker3"))])
    assert impact.services == {SVC, ("other", "api")}
    assert impact.relabelled[0][2] == LocalityLabels().locality_of("worker3", {})
    impact = state.apply([deleted(node("worker1"))])
    assert impact.everything


def test_node_without_endpoints_relabel_touches_nothing() -> None:
    state = _busy_cluster()
    impact = state.apply(events([node("worker4", "r")]))
    assert impact.services == set()
    assert not impact.everything
    assert [name for name, _, _ in impact.relabelled] == ["worker4"]


def test_namespace_change_touches_its_services() -> None:
    state = _busy_cluster()
    impact = state.apply(events([
        namespace(**{"networking.istio.io/traffic-distribution": "PreferClose"})
    ]))
    assert impact.services == {SVC, (NS, "web")}
    assert not impact.everything
    impact = state.apply([deleted(namespace("other"))])
    assert impact.services == {("other", "api")}
    assert "other" not in state.namespaces


def test_service_change_and_deletion(planner: Planner) -> None:
    state = _busy_cluster()
    impact = state.apply(events([service("web", trafficDistribution="PreferClose")]))
    assert impact.services == {(NS, "web")}
    impact = state.apply([deleted(service("web"))])
    assert impact.services == {(NS, "web")}
    assert planner.plan_service(state, (NS, "web")) is None


def test_slice_change_and_deletion() -> None:
    state = _busy_cluster()
    impact = state.apply(events([endpoint_slice("web-1", [], service_name="web")]))
    assert impact.services == {(NS, "web")}
    impact = state.apply([deleted(endpoint_slice("hw", []))])
    assert impact.services == {SVC}
    assert state.slices_for(SVC) == []


def test_slice_moved_between_services_touches_both(planner: Planner) -> None:
    state = _busy_cluster()
    impact = state.apply(events([
        endpoint_slice("web-1", [ep("198.19.2.2", "worker2")], service_name="helloworld")
    ]))
    assert impact.services == {SVC, (NS, "web")}
    assert [s.name for s in state.slices_for(SVC)] == ["hw", "web-1"]
    assert state.slices_for((NS, "web")) == []
    web = only_group(planner.plan_service(state, (NS, "web")))
    assert web.backends == BackendSet(MODE_RANDOM, ((),))
    hw = only_group(planner.plan_service(state, SVC))
    assert hw.backends == BackendSet(
        MODE_RANDOM, ((b(EP1), b(EP2), b("198.19.2.2"), b(EP3)),)
    )


def test_objects_without_a_namespace_are_in_default(planner: Planner) -> None:
    svc = service("plain")
    del svc["metadata"]["namespace"]
    eps = endpoint_slice("plain-1", [ep(EP1, "worker1")], service_name="plain")
    del eps["metadata"]["namespace"]
    state = cluster(*seed_nodes(), svc, eps)
    assert set(state.services) == {("default", "plain")}
    impact = state.apply(events([namespace("default")]))
    assert impact.services == {("default", "plain")}
    group = only_group(planner.plan_service(state, ("default", "plain")))
    assert group.backends == BackendSet(MODE_RANDOM, ((b(EP1),),))
