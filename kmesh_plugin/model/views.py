"""What hooks see of the cluster: nodes, endpoints and pods with their locality resolved."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kmesh_plugin.model.locality import Locality
from kmesh_plugin.model.objects import Conditions


@dataclass(frozen=True)
class NodeInfo:
    """A node as the strategies see it; ``locality.node`` is its name."""

    name: str
    locality: Locality
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """One endpoint of one service port, in one IP family.

    ``locality`` is the locality of the node it runs on (its EndpointSlice ``nodeName``).
    """

    address: str
    port: int
    node: str
    locality: Locality
    conditions: Conditions = field(default_factory=Conditions)
    target: str | None = None  # the pod's name, when the slice names it


@dataclass(frozen=True)
class PodInfo:
    """A pod that the CNI chain set up on this node."""

    namespace: str
    name: str
    container_id: str
    netns: Path
    ips: tuple[str, ...] = ()
    cgroup: Path | None = None


@dataclass(frozen=True)
class DatapathInfo:
    """The datapath an agent attached."""

    pin_dir: Path
    cgroup: Path
    programs: tuple[str, ...]
    events: tuple[str, ...] = ()
