"""The discovery documents: ``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/<g>``,
``/apis/<g>/<v>``, in the legacy (pre-aggregated) format, built from the resource table.

kubectl asks ``/api`` and ``/apis`` for aggregated discovery first (Accept
``application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,...,application/json``);
answering these documents with ``Content-Type: application/json`` makes it fall back to the
legacy walk (``/api/v1``, then every ``/apis/<g>/<v>``). Aggregated discovery itself is left
out. A subresource that speaks another kind (``deployments/scale``: autoscaling/v1 Scale)
names its group and version, which ``kubectl scale`` reads.
"""

from __future__ import annotations

from typing import Any

from .resources import SUBRESOURCE_KINDS, SUBRESOURCE_VERBS, ResourceTable, ResourceType

# What each minor's /version looked like (the git commit is irrelevant to clients).
GO_VERSIONS = {27: "go1.20.4", 28: "go1.20.10", 29: "go1.21.5", 30: "go1.22.2",
               31: "go1.22.5", 32: "go1.23.4", 33: "go1.24.2"}


def version_info(version: tuple[int, ...]) -> dict[str, Any]:
    major, minor = version[0], version[1]
    patch = version[2] if len(version) > 2 else 0
    return {
        "major": str(major),
        "minor": str(minor),
        "gitVersion": f"v{major}.{minor}.{patch}",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2024-01-01T00:00:00Z",
        "goVersion": GO_VERSIONS.get(minor, "go1.22.5"),
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def api_versions(server_address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                        "serverAddress": server_address}],
    }


def _group(name: str, versions: list[str]) -> dict[str, Any]:
    entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": entries, "preferredVersion": entries[0]}


def api_group_list(table: ResourceTable) -> dict[str, Any]:
    groups = [_group(name, versions) for name, versions in table.group_versions() if name]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(table: ResourceTable, name: str) -> dict[str, Any] | None:
    for group, versions in table.group_versions():
        if group and group == name:
            return {"kind": "APIGroup", "apiVersion": "v1", **_group(name, versions)}
    return None


def _resource_entry(t: ResourceType) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": t.plural,
        "singularName": t.singular,
        "namespaced": t.namespaced,
        "kind": t.kind,
        "verbs": sorted(t.verbs),
    }
    if t.short_names:
        entry["shortNames"] = list(t.short_names)
    if t.categories:
        entry["categories"] = list(t.categories)
    return entry


def api_resource_list(table: ResourceTable, group: str, version: str) -> dict[str, Any] | None:
    types = table.in_group_version(group, version)
    if not types:
        return None
    resources: list[dict[str, Any]] = []
    for t in types:
        resources.append(_resource_entry(t))
        for sub in t.subresources:
            entry: dict[str, Any] = {"name": f"{t.plural}/{sub}", "singularName": "",
                                     "namespaced": t.namespaced}
            if sub in SUBRESOURCE_KINDS:  # kubectl scale finds the Scale kind here
                group_, version_, kind = SUBRESOURCE_KINDS[sub]
                entry.update(group=group_, version=version_, kind=kind)
            else:
                entry["kind"] = t.kind
            entry["verbs"] = list(SUBRESOURCE_VERBS.get(sub, ("get",)))
            resources.append(entry)
    doc: dict[str, Any] = {"kind": "APIResourceList"}
    if group:
        doc["apiVersion"] = "v1"
    doc["groupVersion"] = f"{group}/{version}" if group else version
    doc["resources"] = resources
    return doc
