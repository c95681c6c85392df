"""The extension API of kmesh-plugin: every hook a plugin may implement.

A plugin is a module (or object) with functions named after these hooks and marked with
``kmesh_plugin.hookimpl``; it is found through the entry-point group ``kmesh_plugin`` and
enabled by name in plugin.toml ``[strategies] enabled``. The built-in strategies in ``hooks/``
are plugins of exactly this kind; the core imports none of them.

Rules for every hook:

* Arguments are passed by keyword; an implementation may accept any subset of them, by name.
* Strategy hooks are pure: they compute from their arguments and return. Only the core writes
  the BPF maps, and no hook runs per connection: they run when the cluster changes.
* Every hook is called through the plugin manager (``pm.hook.<name>``), so hook wrappers
  (``@hookimpl(wrapper=True)``), tracing and call monitoring see it, and ``firstresult`` ends
  ``kmesh_endpoint_tiers`` at the first answer. What a wrapper returns is what the core uses,
  attributed to the wrapper's plugin.
* An exception from a strategy hook fails the plan of that Service (the kernel keeps its last
  good state) with an error naming the plugin.
* Lifecycle hooks are notifications; an exception raised in one is logged with the plugin's
  name and stops neither the agent nor the notification of the other plugins.

A minimal third-party strategy::

    from kmesh_plugin import hookimpl
    from kmesh_plugin.model import Claim, Mode, Scope, Strategy

    @hookimpl
    def kmesh_strategy_claim(service):
        if service.annotations.get("example.com/locality") == "same-region":
            strategy = Strategy("SameRegion", Mode.STRICT, (Scope.NETWORK, Scope.REGION),
                                reason="annotation example.com/locality")
            return Claim(strategy, priority=PRIORITY_THIRD_PARTY)

and in its pyproject.toml::

    [project.entry-points.kmesh_plugin]
    same_region = "example_same_region"
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from kmesh_plugin.model import (
    Claim,
    DatapathInfo,
    EndpointInfo,
    Locality,
    Namespace,
    NodeInfo,
    PodInfo,
    Service,
    Strategy,
)
from kmesh_plugin.model.locality import Scope

PROJECT = "kmesh_plugin"
ENTRY_POINT_GROUP = "kmesh_plugin"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Claim priorities of the built-ins (SPEC.md section 4): internalTrafficPolicy Local wins over
#: trafficDistribution and the annotations. A plugin that must decide before the built-ins
#: uses a higher number, e.g. PRIORITY_THIRD_PARTY.
PRIORITY_TRAFFIC_DISTRIBUTION = 100
PRIORITY_LOCAL = 200
PRIORITY_THIRD_PARTY = 1000


class StrategySettings:
    """Strategy settings from plugin.toml ``[strategies]`` handed to every claim."""

    def __init__(self, prefer_close_scopes: Sequence[Scope]) -> None:
        #: The routing preference of PreferClose (NETWORK, REGION, ZONE, SUBZONE by default;
        #: Istio 1.27+ drops SUBZONE).
        self.prefer_close_scopes: tuple[Scope, ...] = tuple(prefer_close_scopes)

    def __repr__(self) -> str:
        return f"StrategySettings(prefer_close_scopes={self.prefer_close_scopes})"


# --- node lifecycle -----------------------------------------------------------------------


@hookspec
def kmesh_agent_started(node: NodeInfo, datapath: DatapathInfo) -> None:
    """The agent on ``node`` has attached ``datapath`` and is about to sync with its source.

    Called once per agent start, after the programs are attached (or swapped in over a
    running datapath) and before the first reconcile.
    """


@hookspec
def kmesh_node_locality_changed(
    node: NodeInfo, previous: Locality, current: Locality, is_local: bool
) -> None:
    """A node's locality changed (a relabel). ``is_local``: it is the agent's own node.

    Called after the change has been reconciled into the maps, and only when the locality
    changed: another label change of the agent's own node recomputes every Service (strategies
    see ``client.labels``) without calling this hook.
    """


@hookspec
def kmesh_agent_stopping(node: NodeInfo) -> None:
    """The agent on ``node`` is stopping. The datapath stays attached and keeps translating."""


# --- pods ---------------------------------------------------------------------------------


@hookspec
def kmesh_pod_enrolled(pod: PodInfo, node: NodeInfo) -> None:
    """The CNI chain set up ``pod`` on ``node``; its connects now go through the datapath."""


@hookspec
def kmesh_pod_removed(pod: PodInfo, node: NodeInfo) -> None:
    """The CNI chain tore ``pod`` down on ``node``."""


# --- strategies ---------------------------------------------------------------------------


@hookspec
def kmesh_strategy_claim(
    service: Service, namespace: Namespace | None, settings: StrategySettings
) -> Claim | None:
    """Claim ``service`` for a strategy, or return None to leave it to others.

    Every implementation is asked; the claim with the highest ``priority`` wins (ties go to
    the plugin registered first, with a warning). No claim at all: every eligible endpoint
    alike, at random. ``namespace`` is the Service's Namespace object when the source has it.
    """


@hookspec(firstresult=True)
def kmesh_endpoint_tiers(
    strategy: Strategy,
    client: NodeInfo,
    service: Service,
    endpoints: Sequence[EndpointInfo],
) -> Sequence[int | None] | None:
    """Rank ``endpoints`` for a connect from ``client`` under ``strategy``, or return None.

    Return one entry per endpoint, in order: its tier (0 is the best, at most 7) or None to
    make it ineligible. The first implementation that returns a list decides; when none does,
    the core ranks by ``strategy.preference`` (SPEC.md section 3). Answer only for a strategy
    your plugin created (compare ``strategy.name``). ``endpoints`` are the eligible ones
    (readiness is the core's concern, SPEC.md section 5); an endpoint's ``locality`` is its
    node's (SPEC.md section 2: a node without a Node object has no labels). ``client.labels``
    are current: any label change of the client node recomputes every Service.
    """
