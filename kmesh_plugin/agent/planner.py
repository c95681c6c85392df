"""From cluster state to what the datapath should hold: strategies -> tiers -> backend sets.

A Service becomes one *group* per ClusterIP (one per IP family), port and protocol; each group
is one frontend in the kernel. This module is pure apart from calling the strategy plugins.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kmesh_plugin.agent.state import ClusterState, ServiceKey
from kmesh_plugin.datapath.records import (
    MAX_TIERS,
    MODE_FAILOVER,
    MODE_RANDOM,
    MODE_STRICT,
    PROTOCOLS,
    Backend,
    BackendSet,
    Frontend,
    parse_ip,
)
from kmesh_plugin.hookspecs import StrategySettings
from kmesh_plugin.model import (
    NO_STRATEGY,
    Claim,
    EndpointInfo,
    Locality,
    Mode,
    NodeInfo,
    Service,
    ServicePort,
    Strategy,
    tier,
)
from kmesh_plugin.plugins import Plugins

log = logging.getLogger(__name__)

KERNEL_MODE = {Mode.FAILOVER: MODE_FAILOVER, Mode.STRICT: MODE_STRICT, Mode.RANDOM: MODE_RANDOM}


@dataclass(frozen=True, slots=True)
class Ranked:
    """One endpoint of a group and what the plan made of it (for ``explain``)."""

    endpoint: EndpointInfo
    tier: int | None  # None: not eligible
    note: str  # why it is (not) eligible


@dataclass
class GroupPlan:
    service: ServiceKey
    port: ServicePort
    family: int
    frontend: Frontend
    strategy: Strategy
    claimed_by: str  # plugin name, "" when no plugin claimed
    ranked_by: str  # plugin that ranked the endpoints, or "core"
    backends: BackendSet
    endpoints: list[Ranked] = field(default_factory=list)
    other_claims: list[Claim] = field(default_factory=list)


LOAD_BALANCED = ("TCP", "UDP")  # Service port protocols the datapath takes


@dataclass
class ServicePlan:
    groups: list[GroupPlan]
    strategy: Strategy
    claimed_by: str
    warning: str | None = None


class Planner:
    def __init__(self, plugins: Plugins, settings: StrategySettings) -> None:
        self.plugins = plugins
        self.settings = settings
        self._client: tuple[object, Locality, NodeInfo] | None = None

    def client(self, state: ClusterState) -> NodeInfo:
        """The agent's own node as strategies see it; one object while the Node is unchanged
        (its labels read-only: every Service's plan shares it)."""
        node = state.nodes.get(state.node_name)
        locality = state.locality(state.node_name)
        cached = self._client
        if cached is not None and cached[0] is node and cached[1] is locality:
            return cached[2]
        labels = types.MappingProxyType(dict(node.labels) if node else {})
        info = NodeInfo(state.node_name, locality, labels)
        self._client = (node, locality, info)
        return info

    def plan_service(self, state: ClusterState, key: ServiceKey, *,
                     detail: bool = True) -> ServicePlan | None:
        """The groups of one Service, or None when it is gone or not load-balanced.

        ``detail=False``: the groups' ``endpoints`` (why each endpoint is where it is, for
        ``explain``) stay empty."""
        service = state.services.get(key)
        if service is None or not service.load_balanced:
            return None
        claims = self.plugins.claims(service, state.namespaces.get(service.namespace),
                                     self.settings)
        winner = claims[0] if claims else None
        strategy = winner.strategy if winner else NO_STRATEGY
        client = self.client(state)
        groups = []
        # SCTP is not ours (SPEC.md is silent; README "Which Service gets which strategy"):
        # its ports are left to whatever the cluster runs, and the program passes SCTP
        # sockets untouched. No test kernel here has SCTP to prove a translation with.
        ports = [p for p in service.ports if p.protocol in LOAD_BALANCED]
        skipped = [p for p in service.ports if p.protocol not in LOAD_BALANCED]
        for cluster_ip in service.cluster_ips:
            ip = parse_ip(cluster_ip)
            for port in ports:
                pairs = _endpoints(state, service, port, ip.version)
                endpoints = [e for e, _ in pairs]
                ranked, ranked_by = self._rank(strategy, client, service, endpoints)
                backends, rows = backend_set(strategy, ranked, service, detail=detail,
                                             backends=[b for _, b in pairs])
                groups.append(
                    GroupPlan(
                        service=key,
                        port=port,
                        family=ip.version,
                        frontend=Frontend(ip, port.port, PROTOCOLS[port.protocol]),
                        strategy=strategy,
                        claimed_by=winner.plugin if winner else "",
                        ranked_by=ranked_by,
                        backends=backends,
                        endpoints=rows,
                        other_claims=claims[1:],
                    )
                )
        warnings = [winner.warning] if winner and winner.warning else []
        if skipped:
            names = ", ".join(f"{p.name or p.port}/{p.protocol}" for p in skipped)
            warnings.append(f"Service {key[0]}/{key[1]}: port(s) {names} not load-balanced: "
                            "kmesh-plugin balances TCP and UDP only; these connects pass "
                            "untouched")
        return ServicePlan(groups, strategy, winner.plugin if winner else "",
                           "; ".join(warnings) or None)

    def _rank(
        self, strategy: Strategy, client: NodeInfo, service: Service, endpoints: list[EndpointInfo]
    ) -> tuple[list[tuple[EndpointInfo, int | None]], str]:
        if strategy.mode is Mode.RANDOM:
            return [(e, 0) for e in endpoints], "core"
        answer = self.plugins.endpoint_tiers(strategy, client, service, endpoints)
        if answer is not None:
            tiers, plugin = answer
            return list(zip(endpoints, tiers, strict=True)), plugin
        pref = strategy.preference
        # A tier depends only on the endpoint's locality: a handful of nodes, many endpoints.
        # Keyed by identity: ClusterState gives every node one shared Locality, and hashing
        # the dataclass per endpoint cost more than computing the tier.
        memo: dict[int, int] = {}
        ranked = []
        for e in endpoints:
            t = memo.get(id(e.locality))
            if t is None:
                t = memo[id(e.locality)] = tier(client.locality, e.locality, pref)
            ranked.append((e, t))
        return ranked, "core"


def endpoints_for(
    state: ClusterState, service: Service, port: ServicePort, family: int
) -> list[EndpointInfo]:
    """The endpoints serving ``port`` in one IP family, deduplicated, in a stable order
    (by address, then port).

    The target port is the slice port with the same name (and protocol) as the Service port.
    The same address in two slices counts once, keeping its best conditions (ready first).
    """
    return [e for e, _ in _endpoints(state, service, port, family)]


def _endpoints(
    state: ClusterState, service: Service, port: ServicePort, family: int
) -> list[tuple[EndpointInfo, Backend]]:
    """``endpoints_for`` with each endpoint's Backend, made once: it is the sort key (its 16
    address bytes order like the address) and what the set holds."""
    address_type = f"IPv{family}"
    best: dict[tuple[str, int], tuple[EndpointInfo, Backend]] = {}
    for eps in state.slices_for(service.key):
        if eps.address_type != address_type:
            continue
        target = next(
            (p.port for p in eps.ports if p.name == port.name and p.protocol == port.protocol),
            None,
        )
        if target is None:
            continue
        for ep in eps.endpoints:
            address = ep.addresses[0]  # canonical text already; kube-proxy uses the first
            node = ep.node_name or ""
            # SPEC.md section 2: the locality of the node it runs on, read from the Node object
            # only; a node without one has no labels. (The slice's zone hint is not used: a
            # Node that appears later with a locality equal to "no labels" would recompute
            # nothing, and the hint would stay.)
            locality = state.locality(node)
            info = EndpointInfo(address, target, node, locality, ep.conditions, ep.target)
            key = (address, target)
            current = best.get(key)
            if current is None:
                best[key] = (info, Backend(address, target))
            elif _condition_rank(info) < _condition_rank(current[0]):
                best[key] = (info, current[1])
    return sorted(best.values(), key=lambda pair: (pair[1].addr, pair[1].port))


def _condition_rank(e: EndpointInfo) -> int:
    if e.conditions.is_ready:
        return 0
    return 1 if e.conditions.is_serving_terminating else 2


def backend_set(
    strategy: Strategy, ranked: Iterable[tuple[EndpointInfo, int | None]], service: Service,
    *, detail: bool = True, backends: Sequence[Backend] | None = None,
) -> tuple[BackendSet, list[Ranked]]:
    """Apply SPEC.md sections 3 and 5: which endpoints are eligible, in which tier.

    * ready (or unset) endpoints are eligible; ``publishNotReadyAddresses`` makes all eligible;
    * failover: tiers as ranked; with no ready endpoint at all, the serving+terminating ones,
      all in one tier (locality ignored, as kube-proxy does);
    * strict: tier 0 only; no ready one there -> serving+terminating ones of tier 0 -> none;
    * random: every eligible endpoint in one tier;
    * sessionAffinity ClientIP: the set carries its timeout (SPEC.md section 8).

    The second result explains every endpoint (for ``explain``); ``detail=False`` leaves it
    empty, which the agent's reconcile uses: on a full sync of 100,000 endpoints building the
    explanations cost a quarter of the time. ``backends`` (one per ranked endpoint, the
    same order) saves making them again.
    """
    ranked = list(ranked)
    pnr = service.publish_not_ready_addresses
    ready: list[int] = []  # indexes into ranked
    fallback: list[int] = []
    for i, (e, t) in enumerate(ranked):
        if t is None:
            continue
        if pnr or e.conditions.is_ready:
            ready.append(i)
        elif e.conditions.is_serving_terminating:
            fallback.append(i)
    why = ""  # the note of the chosen endpoints, when they all share one
    if strategy.mode is Mode.STRICT:
        chosen = [i for i in ready if ranked[i][1] == 0]
        why = "tier 0"
        if not chosen:
            chosen = [i for i in fallback if ranked[i][1] == 0]
            why = "tier 0 (no ready endpoint: serving+terminating)"
        tiers = [chosen]
    elif not ready:
        tiers = [fallback]
        why = "no ready endpoint: serving+terminating, locality ignored"
    elif strategy.mode is Mode.RANDOM:
        tiers = [ready]
        why = "eligible (no preference)"
    else:
        count = len(strategy.preference) + 1 if strategy.preference else 0
        count = min(MAX_TIERS, max(count, max(ranked[i][1] or 0 for i in ready) + 1))
        tiers = [[] for _ in range(count)]
        for i in ready:
            tiers[ranked[i][1]].append(i)  # type: ignore[index]
    if backends is None:
        backends = [Backend(e.address, e.port) for e, _ in ranked]
    # With sessionAffinity the set sorts each of its tiers (the program binary-searches a
    # client's endpoint); the explanations below follow ``ranked``, not the tier order.
    result = BackendSet(KERNEL_MODE[strategy.mode],
                        tuple(tuple([backends[i] for i in members]) for members in tiers),
                        affinity=service.session_affinity_timeout)
    if not detail:
        return result, []
    return result, _explain(strategy, ranked, set(ready), set(fallback), tiers, why)


def _explain(
    strategy: Strategy, ranked: list[tuple[EndpointInfo, int | None]], ready: set[int],
    fallback: set[int], tiers: list[list[int]], why: str,
) -> list[Ranked]:
    """Why each endpoint is (not) in the set ``backend_set`` chose."""
    picked = {i for members in tiers for i in members}
    rows = []
    for i, (e, t) in enumerate(ranked):
        if i in picked:
            note = why or f"tier {t}"
        elif t is None:
            note = "excluded by the strategy"
        elif i in ready:
            note = f"tier {t}: strict mode uses tier 0 only"  # only strict leaves ready ones
        elif i in fallback:
            note = "not ready (serving, terminating)"
        else:
            note = "not ready"
        rows.append(Ranked(e, t if i in picked else None, note))
    return rows
