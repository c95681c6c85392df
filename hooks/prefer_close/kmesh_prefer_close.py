"""The trafficDistribution strategies: PreferClose, PreferSameZone, PreferSameNode.

Which Service gets one (SPEC.md section 4, after internalTrafficPolicy: Local, which another
plugin claims with a higher priority):

1. ``spec.trafficDistribution`` with one of the three values; any other value falls through;
2. the Service annotation ``networking.istio.io/traffic-distribution`` (case-insensitive);
3. the same annotation on the Service's Namespace.

An annotation with a value outside the table means "no preference", with a warning; it does not
fall through to the Namespace annotation.
"""

from __future__ import annotations

from kmesh_plugin import hookimpl
from kmesh_plugin.hookspecs import PRIORITY_TRAFFIC_DISTRIBUTION, StrategySettings
from kmesh_plugin.model import NO_STRATEGY, Claim, Mode, Namespace, Scope, Service, Strategy

ANNOTATION = "networking.istio.io/traffic-distribution"

PREFER_SAME_ZONE = (Scope.NETWORK, Scope.REGION, Scope.ZONE)
PREFER_SAME_NODE = (Scope.NETWORK, Scope.REGION, Scope.ZONE, Scope.SUBZONE, Scope.NODE)
VALUES = ("PreferClose", "PreferSameZone", "PreferSameNode")


def preference(value: str, settings: StrategySettings) -> tuple[Scope, ...]:
    if value == "PreferClose":
        return settings.prefer_close_scopes  # the seed's definition, configurable
    return PREFER_SAME_ZONE if value == "PreferSameZone" else PREFER_SAME_NODE


def _claim(value: str, reason: str, settings: StrategySettings) -> Claim:
    strategy = Strategy(value, Mode.FAILOVER, preference(value, settings), reason)
    return Claim(strategy, PRIORITY_TRAFFIC_DISTRIBUTION)


def _from_annotation(raw: str, where: str, settings: StrategySettings) -> Claim:
    canonical = {v.lower(): v for v in VALUES}.get(raw.strip().lower())
    if canonical is not None:
        return _claim(canonical, f"{where} annotation {ANNOTATION}: {raw}", settings)
    reason = f"{where} annotation {ANNOTATION} has unknown value {raw!r}: no preference"
    return Claim(
        Strategy(NO_STRATEGY.name, Mode.RANDOM, (), reason),
        PRIORITY_TRAFFIC_DISTRIBUTION,
        warning=f"{reason} (expected one of {', '.join(VALUES)})",
    )


@hookimpl
def kmesh_strategy_claim(
    service: Service, namespace: Namespace | None, settings: StrategySettings
) -> Claim | None:
    field = service.traffic_distribution
    if isinstance(field, str) and field in VALUES:
        return _claim(field, f"spec.trafficDistribution: {field}", settings)
    if ANNOTATION in service.annotations:
        return _from_annotation(service.annotations[ANNOTATION], "Service", settings)
    if namespace is not None and ANNOTATION in namespace.annotations:
        return _from_annotation(
            namespace.annotations[ANNOTATION], f"Namespace {namespace.name}", settings
        )
    return None
