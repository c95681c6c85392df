"""Which strategy a Service gets (SPEC.md section 4), through the real plugins."""

from __future__ import annotations

from typing import Any

import pytest

from kmesh_plugin import hookimpl
from kmesh_plugin.hookspecs import (
    PRIORITY_LOCAL,
    PRIORITY_THIRD_PARTY,
    PRIORITY_TRAFFIC_DISTRIBUTION,
    StrategySettings,
)
from kmesh_plugin.model import Claim, Mode, Namespace, Scope, Service, Strategy
from kmesh_plugin.model.objects import parse
from kmesh_plugin.plugins import PluginError, Plugins

ANNOTATION = "networking.istio.io/traffic-distribution"
PREFER_CLOSE = (Scope.NETWORK, Scope.REGION, Scope.ZONE, Scope.SUBZONE)
PREFER_SAME_ZONE = (Scope.NETWORK, Scope.REGION, Scope.ZONE)
PREFER_SAME_NODE = (Scope.NETWORK, Scope.REGION, Scope.ZONE, Scope.SUBZONE, Scope.NODE)
SETTINGS = StrategySettings(PREFER_CLOSE)


@pytest.fixture
def plugins() -> Plugins:
    return Plugins.load(["local", "prefer_close"])


def service(
    *,
    itp: str | None = None,
    td: Any = None,
    annotation: str | None = None,
    namespace: str = "sample",
) -> Service:
    spec: dict[str, Any] = {
        "clusterIP": "198.18.0.10",
        "ports": [{"name": "http", "port": 5000}],
    }
    if itp is not None:
        spec["internalTrafficPolicy"] = itp
    if td is not None:
        spec["trafficDistribution"] = td
    meta: dict[str, Any] = {"name": "helloworld", "namespace": namespace}
    if annotation is not None:
        meta["annotations"] = {ANNOTATION: annotation}
    obj = parse({"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec})
    assert isinstance(obj, Service)
    return obj


def namespace(annotation: str | None = None, name: str = "sample") -> Namespace:
    meta: dict[str, Any] = {"name": name}
    if annotation is not None:
        meta["annotations"] = {ANNOTATION: annotation}
    obj = parse({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
    assert isinstance(obj, Namespace)
    return obj


def winner(
    plugins: Plugins, svc: Service, ns: Namespace | None = None,
    settings: StrategySettings = SETTINGS,
) -> Claim:
    claims = plugins.claims(svc, ns, settings)
    assert claims, "expected a claim"
    return claims[0]


def test_load_registers_in_order(plugins: Plugins) -> None:
    assert plugins.names == ["local", "prefer_close"]


# -- internalTrafficPolicy: Local ----------------------------------------------------------


def test_local(plugins: Plugins) -> None:
    claim = winner(plugins, service(itp="Local"))
    assert claim.plugin == "local"
    assert claim.priority == PRIORITY_LOCAL
    assert claim.strategy.name == "Local"
    assert claim.strategy.mode is Mode.STRICT
    assert claim.strategy.preference == (Scope.NODE,)
    assert claim.warning is None


def test_local_wins_over_everything(plugins: Plugins) -> None:
    svc = service(itp="Local", td="PreferSameNode", annotation="PreferSameZone")
    claims = plugins.claims(svc, namespace("PreferClose"), SETTINGS)
    assert [c.plugin for c in claims] == ["local", "prefer_close"]
    assert claims[0].strategy.name == "Local"
    assert claims[1].strategy.name == "PreferSameNode"


def test_local_wins_even_when_registered_last() -> None:
    plugins = Plugins.load(["prefer_close", "local"])
    claim = winner(plugins, service(itp="Local", td="PreferClose"))
    assert claim.strategy.name == "Local"


def test_internal_traffic_policy_cluster_is_not_local(plugins: Plugins) -> None:
    assert plugins.claims(service(itp="Cluster"), None, SETTINGS) == []
    assert winner(plugins, service(itp="Cluster", td="PreferClose")).strategy.name == (
        "PreferClose"
    )


# -- spec.trafficDistribution -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "preference"),
    [
        ("PreferClose", PREFER_CLOSE),
        ("PreferSameZone", PREFER_SAME_ZONE),
        ("PreferSameNode", PREFER_SAME_NODE),
    ],
)
def test_traffic_distribution(
    plugins: Plugins, value: str, preference: tuple[Scope, ...]
) -> None:
    claim = winner(plugins, service(td=value))
    assert claim.plugin == "prefer_close"
    assert claim.priority == PRIORITY_TRAFFIC_DISTRIBUTION
    assert claim.strategy == Strategy(
        value, Mode.FAILOVER, preference, f"spec.trafficDistribution: {value}"
    )
    assert claim.warning is None


def test_traffic_distribution_wins_over_annotations(plugins: Plugins) -> None:
    svc = service(td="PreferSameZone", annotation="PreferSameNode")
    claim = winner(plugins, svc, namespace("PreferClose"))
    assert claim.strategy.name == "PreferSameZone"
    assert claim.strategy.preference == PREFER_SAME_ZONE


@pytest.mark.parametrize("value", ["PreferRegion", "preferclose", {"preferClose": True}, ""])
def test_unknown_traffic_distribution_falls_through_to_the_annotation(
    plugins: Plugins, value: Any
) -> None:
    # The field is compared exactly (the API server does): only the annotation is lenient.
    claim = winner(plugins, service(td=value, annotation="PreferSameNode"))
    assert claim.strategy.name == "PreferSameNode"
    assert claim.strategy.preference == PREFER_SAME_NODE
    assert "annotation" in claim.strategy.reason


def test_unknown_traffic_distribution_falls_through_to_the_namespace(plugins: Plugins) -> None:
    claim = winner(plugins, service(td="PreferRegion"), namespace("PreferSameZone"))
    assert claim.strategy.name == "PreferSameZone"


def test_unknown_traffic_distribution_alone_is_no_claim(plugins: Plugins) -> None:
    assert plugins.claims(service(td="PreferRegion"), namespace(), SETTINGS) == []


# -- the annotation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name", "preference"),
    [
        ("PreferClose", "PreferClose", PREFER_CLOSE),
        ("preferclose", "PreferClose", PREFER_CLOSE),
        ("PREFERSAMEZONE", "PreferSameZone", PREFER_SAME_ZONE),
        ("preferSameNode", "PreferSameNode", PREFER_SAME_NODE),
    ],
)
def test_service_annotation_case_insensitive(
    plugins: Plugins, value: str, name: str, preference: tuple[Scope, ...]
) -> None:
    claim = winner(plugins, service(annotation=value), namespace("PreferSameNode"))
    assert claim.plugin == "prefer_close"
    assert claim.strategy.name == name
    assert claim.strategy.mode is Mode.FAILOVER
    assert claim.strategy.preference == preference
    assert claim.warning is None
    assert claim.strategy.reason.startswith("Service annotation")


def test_unknown_annotation_value_is_no_preference_with_a_warning(plugins: Plugins) -> None:
    # The Namespace says PreferClose, but the Service's own (bad) annotation stops the search.
    claim = winner(plugins, service(annotation="PreferMars"), namespace("PreferClose"))
    assert claim.plugin == "prefer_close"
    assert claim.strategy.name == "none"
    assert claim.strategy.mode is Mode.RANDOM
    assert claim.strategy.preference == ()
    assert claim.warning is not None
    assert "'PreferMars'" in claim.warning
    assert ANNOTATION in claim.warning


def test_unknown_namespace_annotation_value_is_no_preference(plugins: Plugins) -> None:
    claim = winner(plugins, service(), namespace("bogus"))
    assert claim.strategy.mode is Mode.RANDOM
    assert claim.strategy.name == "none"
    assert claim.warning is not None
    assert "Namespace sample" in claim.warning
    assert "'bogus'" in claim.warning


@pytest.mark.parametrize(
    ("value", "name"), [("PreferClose", "PreferClose"), ("prefersamezone", "PreferSameZone")]
)
def test_namespace_annotation_when_the_service_has_none(
    plugins: Plugins, value: str, name: str
) -> None:
    claim = winner(plugins, service(), namespace(value))
    assert claim.strategy.name == name
    assert claim.strategy.mode is Mode.FAILOVER
    assert claim.strategy.reason.startswith("Namespace sample annotation")


def test_nothing_set_is_no_claim(plugins: Plugins) -> None:
    assert plugins.claims(service(), None, SETTINGS) == []
    assert plugins.claims(service(), namespace(), SETTINGS) == []


# -- settings -------------------------------------------------------------------------------


def test_prefer_close_scopes_are_configurable(plugins: Plugins) -> None:
    istio_127 = StrategySettings((Scope.NETWORK, Scope.REGION, Scope.ZONE))
    assert winner(plugins, service(td="PreferClose"), settings=istio_127).strategy.preference == (
        Scope.NETWORK, Scope.REGION, Scope.ZONE,
    )
    assert winner(
        plugins, service(annotation="preferclose"), settings=istio_127
    ).strategy.preference == (Scope.NETWORK, Scope.REGION, Scope.ZONE)
    # The other two keep their fixed preferences.
    assert winner(plugins, service(td="PreferSameNode"), settings=istio_127).strategy.preference \
        == PREFER_SAME_NODE
    assert winner(plugins, service(td="PreferSameZone"), settings=istio_127).strategy.preference \
        == PREFER_SAME_ZONE


# -- third-party plugins --------------------------------------------------------------------


class FixedClaim:
    """A third-party plugin that claims every Service with one strategy."""

    def __init__(self, name: str, priority: int) -> None:
        self.strategy = Strategy(name, Mode.STRICT, (Scope.NETWORK, Scope.REGION), "test")
        self.priority = priority

    @hookimpl
    def kmesh_strategy_claim(self, service: Service) -> Claim | None:
        return Claim(self.strategy, self.priority)


def test_third_party_claims_before_the_builtins(plugins: Plugins) -> None:
    plugins.register(FixedClaim("SameRegion", PRIORITY_THIRD_PARTY), "same_region")
    claims = plugins.claims(service(itp="Local", td="PreferClose"), None, SETTINGS)
    assert [c.plugin for c in claims] == ["same_region", "local", "prefer_close"]
    assert claims[0].strategy.name == "SameRegion"


def test_third_party_with_a_lower_priority_loses(plugins: Plugins) -> None:
    plugins.register(FixedClaim("Low", PRIORITY_TRAFFIC_DISTRIBUTION - 1), "low")
    assert [c.plugin for c in plugins.claims(service(td="PreferClose"), None, SETTINGS)] == [
        "prefer_close", "low",
    ]
    # Alone, it is the only claim.
    assert [c.plugin for c in plugins.claims(service(), None, SETTINGS)] == ["low"]


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_priority_ties_go_to_the_first_registered(order: tuple[str, str]) -> None:
    plugins = Plugins()
    for name in order:
        plugins.register(FixedClaim(name.upper(), 500), name)
    claims = plugins.claims(service(), None, SETTINGS)
    assert [c.plugin for c in claims] == list(order)
    assert claims[0].strategy.name == order[0].upper()


def test_tie_with_a_builtin_goes_to_the_builtin_registered_first(plugins: Plugins) -> None:
    plugins.register(FixedClaim("Same", PRIORITY_LOCAL), "same")
    claims = plugins.claims(service(itp="Local"), None, SETTINGS)
    assert [c.plugin for c in claims] == ["local", "same"]


class Garbage:
    def __init__(self, value: object) -> None:
        self.value = value

    @hookimpl
    def kmesh_strategy_claim(self) -> object:
        return self.value


@pytest.mark.parametrize(
    "value",
    [
        "PreferClose",
        Strategy("X", Mode.FAILOVER),
        Claim("not a strategy", 5),  # type: ignore[arg-type]
        {"strategy": "x"},
    ],
)
def test_garbage_claim_names_the_plugin(plugins: Plugins, value: object) -> None:
    plugins.register(Garbage(value), "garbage")
    with pytest.raises(PluginError, match=r"plugin 'garbage': kmesh_strategy_claim returned"):
        plugins.claims(service(), None, SETTINGS)


def test_register_rejects_unknown_hook_arguments() -> None:
    class Bad:
        @hookimpl
        def kmesh_strategy_claim(self, service: Service, cluster: object) -> None:
            return None

    plugins = Plugins()
    with pytest.raises(PluginError, match="plugin 'bad'"):
        plugins.register(Bad(), "bad")
    assert plugins.names == []


def test_load_unknown_plugin_lists_the_installed_ones() -> None:
    with pytest.raises(PluginError) as info:
        Plugins.load(["local", "nope"])
    message = str(info.value)
    assert "'nope'" in message
    assert "kmesh_plugin" in message
    installed = message.split("installed: ", 1)[1].rstrip(")").split(", ")
    assert {"local", "prefer_close"} <= set(installed)
    assert installed == sorted(installed)


def test_load_nothing() -> None:
    plugins = Plugins.load([])
    assert plugins.names == []
    assert plugins.claims(service(itp="Local", td="PreferClose"), None, SETTINGS) == []
