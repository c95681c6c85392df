"""`kmesh-plugin dump` and `kmesh-plugin status`: the kernel state and the agent's health."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from kmesh_plugin.agent.status import StatusFile
from kmesh_plugin.config import Config
from kmesh_plugin.datapath import inspect
from kmesh_plugin.datapath.loader import Datapath
from kmesh_plugin.errors import KmeshError

STALE_AFTER = 30.0  # seconds without a status heartbeat before the agent counts as hung


def dump(cfg: Config) -> inspect.DatapathView:
    dp = Datapath.open(cfg.pin_dir, read_only=True)
    try:
        return inspect.read(dp)
    finally:
        dp.close()


def enrolled_pods(cfg: Config, view: inspect.DatapathView) -> list[dict[str, Any]]:
    """The enrolled netns cookies with the pods kmesh-cni recorded for them; a cookie without a
    record (or a record whose cookie the map lacks) is shown as such, not hidden."""
    from kmesh_plugin.cni import spool

    by_cookie: dict[int, list[spool.PodRecord]] = {}
    for rec in spool.read_records(cfg.cni_state_dir, lambda path, reason: None):
        by_cookie.setdefault(rec.netns_cookie, []).append(rec)
    out = []
    for cookie in sorted(set(view.enrolled) | set(by_cookie)):
        recs = by_cookie.get(cookie, [])
        out.append({
            "netns_cookie": cookie,
            "in_map": cookie in view.enrolled,
            "pods": [{"namespace": r.pod_namespace, "name": r.pod_name,
                      "container_id": r.container_id, "ifname": r.ifname, "netns": r.netns,
                      "ips": list(r.ips)} for r in recs],
        })
    return out


def render_pods(enrolment: str, pods: list[dict[str, Any]], indent: str = "") -> list[str]:
    if enrolment == "all":
        return [f"{indent}enrolment all: every socket in the attached cgroup and below it"]
    lines = [f"{indent}enrolment cni: only pods kmesh-cni enrolled ({len(pods)} netns); every "
             "other socket passes untouched"]
    for p in pods:
        who = ", ".join(f"{q['namespace'] or '-'}/{q['name'] or '-'} ({q['container_id'][:12]}"
                        f" {q['ifname']}, {' '.join(q['ips']) or 'no IP'})" for q in p["pods"])
        note = "" if p["in_map"] else "  NOT IN kmesh_enrolled"
        lines.append(f"{indent}  netns cookie {p['netns_cookie']}: {who or 'no CNI record'}"
                     f"{note}")
    return lines


def render_dump(view: inspect.DatapathView, pods: list[dict[str, Any]]) -> str:
    lines = [f"datapath pinned at {view.pin_dir}"]
    for link in view.links:
        if link.error:
            lines.append(f"  link {link.name}: {link.error}")
        else:
            lines.append(f"  link {link.name}: id {link.link_id}, program {link.prog_name} "
                         f"(id {link.prog_id}, tag {link.prog_tag}), cgroup id {link.cgroup_id}")
    lines.append("maps:")
    for name in sorted(view.capacity):
        lines.append(f"  {name:<20} {view.entries[name]:>8} / {view.capacity[name]}")
    lines.append(f"frontends ({len(view.groups)}):")
    for frontend, p in sorted(view.groups.items(), key=lambda i: i[1].sid):
        g = inspect.group_json(frontend, p, view.stats.get(p.sid, {}), frontend in view.cached)
        if "error" in g:
            lines.append(f"  {g['frontend']}  sid {p.sid}: {g['error']}")
            continue
        affinity = (f", session affinity {g['affinity_timeout']} s" if g["affinity_timeout"]
                    else "")
        # A frontend that shares its cache line with another costs a hash lookup per connect.
        slow = "" if g["cached"] else ", found by hash (its cache lines hold other frontends)"
        lines.append(f"  {g['frontend']}  sid {p.sid}, set {p.set}, generation {p.generation}, "
                     f"{g['mode']}{affinity}{slow}")
        for tier, members in enumerate(g["tiers"]):
            if members:
                lines.append(f"    tier {tier}: {', '.join(members)}")
        for tier, c in g["counters"].items():
            lines.append(f"    counters tier {tier}: {c['connects']} connects, "
                         f"{c['refused']} refused")
    lines.append(f"ClusterIPs ({len(view.vips)}): {', '.join(map(str, view.vips)) or '-'}")
    lines += render_pods(view.enrolment, pods)
    lines.append(f"reverse translations ({len(view.reverse)}): per translated socket and "
                 "endpoint, what getpeername() and replies show")
    for r in view.reverse:
        lines.append(f"  socket cookie {r.socket_cookie}: {r.endpoint} shown as {r.frontend} "
                     f"({r.held})")
    lines.append(f"session affinity ({len(view.affinity)}): the endpoint each client network "
                 "namespace is held to")
    for a in view.affinity:
        lines.append("  " + render_affinity(inspect.affinity_json(a, view.published_for(a),
                                                                   view.read_at)))
    return "\n".join(lines)


def render_affinity(a: dict[str, Any], frontend: bool = True) -> str:
    """One kmesh_affinity entry (inspect.affinity_json) on one line."""
    idle = "last used in the future" if a["idle_seconds"] is None else (
        f"idle {a['idle_seconds']:.0f} s")
    left = "" if a["left_seconds"] is None else f", {a['left_seconds']:.0f} s left"
    state = a["state"] + (f" ({a['why']})" if a["why"] else "")
    where = f"{a['frontend']} -> " if frontend else ""
    client = f" ({a['client']})" if a.get("client") else ""
    return (f"netns cookie {a['netns_cookie']}{client}: {where}{a['endpoint']}, slot tier "
            f"{a['tier']} index {a['index']}, {idle}{left}: {state}")


def status(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"config": str(cfg.path), "node": cfg.node_name}
    try:
        agent = StatusFile(cfg.status_file).read()
    except (OSError, ValueError) as e:
        agent = None
        out["agent"] = {"running": False, "problem": f"no status at {cfg.status_file}: {e}"}
    if agent is not None:
        out["agent"] = _agent_health(agent)
    try:
        view = dump(cfg)
    except KmeshError as e:
        out["datapath"] = {"attached": False, "problem": str(e)}
    else:
        out["datapath"] = {
            "attached": all(link.error is None for link in view.links),
            "pin_dir": str(view.pin_dir),
            "enrolment": view.enrolment,
            "enrolled": enrolled_pods(cfg, view),
            "links": [vars(link) for link in view.links],
            "maps": {
                name: {
                    "entries": view.entries[name],
                    "capacity": view.capacity[name],
                    # Every counted map has a capacity; the guard keeps a foreign pin (a
                    # map of max_entries 0) from failing the whole status.
                    "fill": round(view.entries[name] / view.capacity[name], 4)
                    if view.capacity[name] else 0.0,
                }
                for name in sorted(view.capacity)
            },
        }
    return out


def _agent_health(agent: dict[str, Any]) -> dict[str, Any]:
    pid = int(agent.get("pid") or 0)
    alive = _agent_alive(pid)
    age = time.time() - float(agent.get("updated_at") or 0)
    # Problems make the agent unhealthy (and `status` exit 1: a liveness probe restarts it);
    # warnings do not, since a restart cannot fix a broken manifest or an API outage, and the
    # maps keep their last good state meanwhile.
    problems = []
    warnings = []
    if not alive:
        problems.append(f"agent pid {pid} is not running")
    elif age > STALE_AFTER:
        problems.append(f"no heartbeat for {age:.0f} s")
    if not agent.get("synced"):
        warnings.append("not synced with its source yet")
    last = agent.get("last_reconcile") or {}
    if last.get("errors"):
        warnings.append(f"last reconcile reported {len(last['errors'])} error(s)")
    source = agent.get("source") or {}
    if source.get("errors"):
        warnings.append("the source has rejected input")
    for plural, r in (source.get("resources") or {}).items():
        if r.get("failing_since"):
            since = time.strftime("%H:%M:%S", time.localtime(r["failing_since"]))
            warnings.append(f"{plural}: API errors since {since} ({r.get('last_error')})")
    not_programmed = agent.get("not_programmed") or {}
    if not_programmed.get("count"):
        # Capacity or an oversized tier: a restart cannot fix it, so a warning, not a problem.
        warnings.append(f"{not_programmed['count']} Service(s) not (fully) programmed in the maps")
    return {
        "running": alive,
        "healthy": alive and not problems,
        "problems": problems,
        "warnings": warnings,
        "pid": pid,
        "heartbeat_age_seconds": round(age, 1),
        "synced": agent.get("synced"),
        "source": agent.get("source"),
        "source_revision": agent.get("source_revision"),
        "last_reconcile": last or None,
        "plugins": agent.get("plugins"),
        "metrics": agent.get("metrics"),
        "not_programmed": not_programmed or None,
    }


def _agent_alive(pid: int) -> bool:
    """The pid runs an agent (`kmesh-plugin run` or `python -m kmesh_plugin.cli run`)."""
    if pid <= 0:
        return False
    with contextlib.suppress(OSError):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"kmesh_plugin" in cmdline or b"kmesh-plugin" in cmdline
    return False


def render_status(s: dict[str, Any]) -> str:
    lines = [f"node {s['node']} ({s['config']})"]
    agent = s["agent"]
    if not agent.get("running") and "problem" in agent:
        lines.append(f"agent: NOT RUNNING ({agent['problem']})")
    else:
        health = "healthy" if agent["healthy"] else "UNHEALTHY: " + "; ".join(agent["problems"])
        lines.append(f"agent: pid {agent['pid']}, {health}, heartbeat "
                     f"{agent['heartbeat_age_seconds']} s ago")
        for warning in agent.get("warnings") or []:
            lines.append(f"  warning: {warning}")
        src = agent.get("source") or {}
        where = src.get("path") or src.get("server") or ""
        revision = agent["source_revision"]
        if isinstance(revision, dict):
            revision = ", ".join(f"{k} {v}" for k, v in revision.items())
        lines.append(f"  source: {src.get('kind')} {where}, synced {agent['synced']}, "
                     f"revision {revision}, {src.get('objects', '?')} objects")
        for plural, r in (src.get("resources") or {}).items():
            errors = sum((r.get("errors") or {}).values())
            lines.append(f"    {plural:<15} {r.get('state')}, resourceVersion "
                         f"{r.get('resource_version') or '-'}, {r.get('objects')} objects, "
                         f"{r.get('relists')} relists, {errors} errors"
                         + (f" (last: {r['last_error']})" if r.get("last_error") else ""))
        for file, problem in (src.get("errors") or {}).items():
            lines.append(f"    rejected {file}: {problem}")
        last = agent.get("last_reconcile")
        if last:
            lines.append(
                f"  last reconcile: {time.strftime('%H:%M:%S', time.localtime(last['at']))}, "
                f"{last['seconds'] * 1000:.1f} ms, {'full' if last['full'] else 'partial'}, "
                f"+{last['added']} ~{last['updated']} -{last['removed']} groups"
                + (f", {len(last['errors'])} error(s)" if last.get("errors") else "")
            )
            for err in last.get("errors") or []:
                lines.append(f"    {err}")
        np = agent.get("not_programmed") or {}
        for service, entries in (np.get("services") or {}).items():
            for e in entries:
                lines.append(f"  not programmed: {service}"
                             + (f" {e['frontend']}" if e.get("frontend") else "")
                             + f" ({e['reason']}): {e['detail']}"
                             + ("; the maps keep its last set" if e.get("stale") else ""))
        if np.get("truncated"):
            lines.append(f"  ... {np['count'] - len(np.get('services') or {})} more Services "
                         "not programmed (see the status file)")
        lines.append(f"  plugins: {', '.join(agent.get('plugins') or []) or '-'}")
        if agent.get("metrics"):
            lines.append(f"  metrics: {agent['metrics']}")
    dp = s["datapath"]
    if "problem" in dp:
        lines.append(f"datapath: NOT ATTACHED ({dp['problem']})")
    else:
        lines.append(f"datapath: {'attached' if dp['attached'] else 'DETACHED'} ({dp['pin_dir']})")
        lines += render_pods(dp["enrolment"], dp["enrolled"], "  ")
        for link in dp["links"]:
            if link["error"]:
                lines.append(f"  {link['name']}: {link['error']}")
            else:
                lines.append(f"  {link['name']}: link {link['link_id']} -> program "
                             f"{link['prog_name']} id {link['prog_id']} tag {link['prog_tag']}")
        for name, m in dp["maps"].items():
            lines.append(f"  {name:<16} {m['entries']:>8} / {m['capacity']:<8} "
                         f"{m['fill'] * 100:5.1f}%")
    return "\n".join(lines)
