"""`kmesh-plugin explain`: why a Service's connects go where they go, from a node's seat.

It recomputes the intent exactly as the agent does (same source, same plugins, same planner),
then reads the node's kernel maps back and shows which endpoints a connect can pick *now*, with
a warning where the maps and the intent differ (an agent that is down, lagging, or failing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kmesh_plugin.agent.planner import GroupPlan, Planner
from kmesh_plugin.agent.state import ClusterState
from kmesh_plugin.config import Config
from kmesh_plugin.datapath import inspect
from kmesh_plugin.datapath.loader import Datapath
from kmesh_plugin.datapath.records import MODE_NAMES, MODE_STRICT, Backend
from kmesh_plugin.errors import KmeshError
from kmesh_plugin.hookspecs import StrategySettings
from kmesh_plugin.model import Locality
from kmesh_plugin.ops.status import render_affinity
from kmesh_plugin.plugins import Plugins
from kmesh_plugin.sources.factory import make_source, read_once


@dataclass
class KernelGroup:
    sid: int
    active_set: int
    generation: int
    mode: str
    tier_sizes: list[int]
    pickable: list[str]  # what a connect picks from now: the first non-empty (strict: 0) tier
    pick_tier: int | None
    counters: dict[int, tuple[int, int]]  # tier -> (connects, refused)
    affinity_timeout: int | None = None  # the record's, seconds (0: none; None: not read)
    # This frontend's kmesh_affinity entries (inspect.affinity_json, plus "client": the pod
    # kmesh-cni recorded for the netns cookie, if any).
    affinity: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class GroupExplanation:
    frontend: str
    port_name: str
    family: int
    endpoints: list[dict[str, Any]]
    intended_tiers: list[list[str]]
    kernel: KernelGroup | None
    kernel_note: str | None = None
    mismatch: str | None = None
    session_affinity: str = "None"  # the intent: "None" or "ClientIP"
    affinity_timeout: int = 0  # the intent's timeout, seconds (0 with None)


@dataclass
class Explanation:
    namespace: str
    service: str
    node: str
    node_locality: Locality
    strategy: str
    mode: str
    preference: list[str]
    reason: str
    claimed_by: str
    ranked_by: str
    other_claims: list[str]
    groups: list[GroupExplanation] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    enrolment: str | None = None  # which sockets the node's datapath takes (None: not read)
    enrolled_pods: int = 0  # network namespaces enrolled, in mode cni

    def to_json(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["node_locality"] = asdict(self.node_locality)
        out["groups"] = [
            {**vars(g), "kernel": vars(g.kernel) if g.kernel else None} for g in self.groups
        ]
        return out


def load_state(cfg: Config, node: str | None = None) -> ClusterState:
    """The cluster as the configured source shows it now (one full read)."""
    batch = read_once(make_source(cfg))
    state = ClusterState(cfg.locality, node or cfg.node_name)
    state.apply(batch.events)
    return state


def explain(
    cfg: Config,
    plugins: Plugins,
    namespace: str,
    service: str,
    node: str | None = None,
    state: ClusterState | None = None,
) -> Explanation:
    node = node or cfg.node_name
    state = state or load_state(cfg, node)
    key = (namespace, service)
    svc = state.services.get(key)
    if svc is None:
        known = sorted(f"{ns}/{n}" for ns, n in state.services if ns == namespace)
        raise KmeshError(
            f"Service {namespace}/{service} is not in the {cfg.source_kind} source "
            f"(Services in namespace {namespace}: {', '.join(known) or 'none'})"
        )
    planner = Planner(plugins, StrategySettings(cfg.prefer_close_scopes))
    plan = planner.plan_service(state, key)
    if plan is None:
        why = "ExternalName" if svc.type == "ExternalName" else "headless (clusterIP: None)"
        raise KmeshError(f"Service {namespace}/{service} is {why}: it is not load-balanced")
    first = plan.groups[0] if plan.groups else None
    expl = Explanation(
        namespace=namespace,
        service=service,
        node=node,
        node_locality=state.locality(node),
        strategy=plan.strategy.name,
        mode=plan.strategy.mode.value,
        preference=[s.value for s in plan.strategy.preference],
        reason=plan.strategy.reason,
        claimed_by=plan.claimed_by or "(no plugin claimed it)",
        ranked_by=first.ranked_by if first else "core",
        other_claims=[
            f"{c.plugin}: {c.strategy.name} (priority {c.priority}): {c.strategy.reason}"
            for c in (first.other_claims if first else [])
        ],
    )
    if plan.warning:
        expl.warnings.append(plan.warning)
    if node not in state.nodes:
        expl.warnings.append(f"node {node} has no Node object in the source: its locality is "
                             "all empty")

    view = None
    kernel_note = None
    if node != cfg.node_name:
        kernel_note = (f"not read: the maps at {cfg.pin_dir} belong to node {cfg.node_name}; "
                       f"use that node's plugin.toml to read node {node}'s")
    else:
        try:
            dp = Datapath.open(cfg.pin_dir, read_only=True)
        except KmeshError as e:
            kernel_note = f"not read: {e}"
        else:
            try:
                view = inspect.read(dp)
            finally:
                dp.close()
            expl.enrolment, expl.enrolled_pods = view.enrolment, len(view.enrolled)
    clients = _clients(cfg) if view is not None and view.affinity else {}
    for group in plan.groups:
        expl.groups.append(_group(group, view, kernel_note, clients))
    for g in expl.groups:
        if g.mismatch:
            expl.warnings.append(f"{g.frontend}: {g.mismatch}")
    return expl


def _clients(cfg: Config) -> dict[int, str]:
    """netns cookie -> the pod(s) kmesh-cni enrolled with it (namespace/name): names the
    clients of the affinity entries. Empty in enrolment mode all (no records)."""
    from kmesh_plugin.cni import spool

    names: dict[int, list[str]] = {}
    for rec in spool.read_records(cfg.cni_state_dir, lambda path, reason: None):
        names.setdefault(rec.netns_cookie, []).append(
            f"{rec.pod_namespace or '-'}/{rec.pod_name or '-'}")
    return {cookie: ", ".join(sorted(set(pods))) for cookie, pods in names.items()}


def _group(group: GroupPlan, view: inspect.DatapathView | None,
           kernel_note: str | None, clients: dict[int, str] | None = None) -> GroupExplanation:
    names = {(r.endpoint.address, r.endpoint.port): r.endpoint.target for r in group.endpoints}

    def label(b: Backend) -> str:
        pod = names.get((str(b.ip), b.port))
        return f"{b} ({pod})" if pod else str(b)

    out = GroupExplanation(
        frontend=str(group.frontend),
        port_name=group.port.name,
        family=group.family,
        endpoints=[
            {
                "address": _host_port(r.endpoint.address, r.endpoint.port),
                "pod": r.endpoint.target,
                "node": r.endpoint.node,
                "locality": str(r.endpoint.locality),
                "tier": r.tier,
                "eligible": r.tier is not None,
                "why": r.note,
            }
            for r in group.endpoints
        ],
        intended_tiers=[[label(b) for b in tier] for tier in group.backends.tiers],
        kernel=None,
        kernel_note=kernel_note,
        session_affinity="ClientIP" if group.backends.affinity else "None",
        affinity_timeout=group.backends.affinity,
    )
    if view is None:
        return out
    published = view.groups.get(group.frontend)
    if published is None:
        out.kernel_note = "no frontend in the maps"
        out.mismatch = "the maps have no frontend for it (is the agent running and synced?)"
        return out
    stats = view.stats.get(published.sid, {})
    counters = {t: (s.hits, s.refused) for t, s in sorted(stats.items())}
    # The entries a connect to this frontend looks up: their key holds its packed key.
    key = group.frontend.pack()
    held = []
    for a in view.affinity:
        if a.frontend_key == key:
            entry = inspect.affinity_json(a, published, view.read_at)
            entry["endpoint"] = label(a.endpoint)
            entry["client"] = (clients or {}).get(a.netns_cookie)
            held.append(entry)
    if published.backends is None:
        out.mismatch = "the active set in the maps is incomplete"
        out.kernel = KernelGroup(published.sid, published.set, published.generation, "?", [], [],
                                 None, counters, None, held)
        return out
    kb = published.backends
    tiers = kb.tiers[:1] if kb.mode == MODE_STRICT else kb.tiers
    pick_tier = inspect.pick_tier(kb)
    out.kernel = KernelGroup(
        sid=published.sid,
        active_set=published.set,
        generation=published.generation,
        mode=MODE_NAMES.get(kb.mode, str(kb.mode)),
        tier_sizes=[len(t) for t in kb.tiers],
        pickable=[label(b) for b in tiers[pick_tier]] if pick_tier is not None else [],
        pick_tier=pick_tier,
        counters=counters,
        affinity_timeout=kb.affinity,
        affinity=held,
    )
    if kb != group.backends:
        out.mismatch = (
            f"the maps differ from the intent: kernel tiers "
            f"{[[str(b) for b in t] for t in kb.tiers]} ({out.kernel.mode}"
            f"{_affinity_note(kb.affinity)}), intent "
            f"{[[str(b) for b in t] for t in group.backends.tiers]} "
            f"({MODE_NAMES.get(group.backends.mode)}{_affinity_note(group.backends.affinity)}); "
            "is the agent running and synced?"
        )
    return out


def _affinity_note(timeout: int) -> str:
    return f", session affinity {timeout} s" if timeout else ""


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def render(e: Explanation) -> str:
    lines = [
        f"Service {e.namespace}/{e.service}, seen from node {e.node} ({e.node_locality})",
        f"Strategy: {e.strategy}, claimed by {e.claimed_by}"
        + (f" because {e.reason}" if e.reason else ""),
    ]
    if e.mode == "random":
        lines.append("  no routing preference: every eligible endpoint alike, at random")
    else:
        pref = " > ".join(e.preference) or "(the plugin ranks endpoints itself)"
        lines.append(f"  routing preference: {pref}; mode {e.mode}; ranked by {e.ranked_by}")
    for other in e.other_claims:
        lines.append(f"  also claimed (lower priority): {other}")
    if e.enrolment == "cni":
        lines.append(f"  enrolment cni: only connects from the {e.enrolled_pods} pod network "
                     "namespaces kmesh-cni enrolled are balanced; other sockets pass untouched")
    elif e.enrolment == "all":
        lines.append("  enrolment all: every connect from the attached cgroup is balanced")
    for g in e.groups:
        lines.append("")
        lines.append(f"Frontend {g.frontend} (port {g.port_name or '-'}, IPv{g.family})")
        rows = [("ENDPOINT", "POD", "NODE", "TIER", "ELIGIBLE", "LOCALITY")]
        for ep in g.endpoints:
            rows.append((
                ep["address"], ep["pod"] or "-", ep["node"] or "-",
                "-" if ep["tier"] is None else str(ep["tier"]),
                ("yes: " if ep["eligible"] else "no: ") + ep["why"],
                ep["locality"],
            ))
        if len(rows) == 1:
            lines.append("  no endpoints")
        else:
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for r in rows:
                lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths,
                                                                          strict=True)).rstrip())
        if g.affinity_timeout:
            lines.append(f"  session affinity: ClientIP, timeout {g.affinity_timeout} s (a "
                         "client network namespace keeps its endpoint while that stays in "
                         "the best tier)")
        else:
            lines.append("  session affinity: None")
        k = g.kernel
        if k is None:
            lines.append(f"  kernel: {g.kernel_note}")
        else:
            sticky = ("" if k.affinity_timeout is None else
                      f", session affinity {k.affinity_timeout} s" if k.affinity_timeout else
                      ", no session affinity")
            lines.append(f"  kernel: sid {k.sid}, active set {k.active_set}, generation "
                         f"{k.generation}, {k.mode}, endpoints per tier {k.tier_sizes}{sticky}")
            if k.pick_tier is None:
                lines.append(f"  a connect from {e.node} now: refused (ECONNREFUSED), no "
                             "eligible endpoint")
            elif k.affinity_timeout:
                lines.append(f"  a connect from {e.node} now picks from tier {k.pick_tier}: "
                             f"{', '.join(k.pickable)}; a client held to one of them (below) "
                             "gets it again, any other client one at random")
            else:
                lines.append(f"  a connect from {e.node} now picks, uniformly, from tier "
                             f"{k.pick_tier}: {', '.join(k.pickable)}")
            if k.counters:
                lines.append("  counters: " + ", ".join(
                    f"tier {t}: {c} connects" + (f", {r} refused" if r else "")
                    for t, (c, r) in k.counters.items()))
            if k.affinity or k.affinity_timeout:
                lines.append(f"  session affinity entries ({len(k.affinity)}):")
                for a in k.affinity:
                    lines.append("    " + render_affinity(a, frontend=False))
    for w in e.warnings:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)
