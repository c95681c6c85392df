"""Locality: where a node is, and how far an endpoint is from a client (its tier).

A missing label is the empty string and two empty strings are equal, as Istio and Kmesh
compare them: two nodes that both lack a zone label count as the same zone. This keeps a
cluster without topology labels working (everything is tier 0) instead of spreading traffic
into "unknown" localities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


class Scope(StrEnum):
    """A locality scope, broadest first."""

    NETWORK = "NETWORK"
    REGION = "REGION"
    ZONE = "ZONE"
    SUBZONE = "SUBZONE"
    NODE = "NODE"


_FIELD = {
    Scope.NETWORK: "network", Scope.REGION: "region", Scope.ZONE: "zone",
    Scope.SUBZONE: "subzone", Scope.NODE: "node",
}


@dataclass(frozen=True, slots=True)
class Locality:
    network: str = ""
    region: str = ""
    zone: str = ""
    subzone: str = ""
    node: str = ""

    def get(self, scope: Scope) -> str:
        return getattr(self, _FIELD[scope])

    def __str__(self) -> str:
        return "/".join(
            f"{s.value.lower()}={self.get(s) or '-'}" for s in Scope
        )


@dataclass(frozen=True)
class LocalityLabels:
    """Which node labels carry each scope (plugin.toml [locality])."""

    network: str = "topology.istio.io/network"
    region: str = "topology.kubernetes.io/region"
    zone: str = "topology.kubernetes.io/zone"
    # In order of precedence: Istio reads topology.istio.io/subzone; the seed document labels
    # topology.kubernetes.io/subzone. The first one set wins.
    subzone: tuple[str, ...] = ("topology.istio.io/subzone", "topology.kubernetes.io/subzone")
    default_network: str = ""

    def locality_of(self, node_name: str, labels: Mapping[str, str]) -> Locality:
        subzone = next((labels[k] for k in self.subzone if labels.get(k)), "")
        return Locality(
            network=labels.get(self.network) or self.default_network,
            region=labels.get(self.region, ""),
            zone=labels.get(self.zone, ""),
            subzone=subzone,
            node=node_name,
        )


def tier(client: Locality, endpoint: Locality, preference: Sequence[Scope]) -> int:
    """len(preference) minus the number of *leading* scopes on which both agree.

    Counting stops at the first mismatch: a zone match only counts when the region matched
    before it. Tier 0 is the best; ``len(preference)`` matches nothing.
    """
    matched = 0
    for scope in preference:
        if client.get(scope) != endpoint.get(scope):
            break
        matched += 1
    return len(preference) - matched
