"""The agent's view of the cluster, and which Services an event makes it recompute."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from kmesh_plugin.model import EndpointSlice, Locality, LocalityLabels, Namespace, Node, Service
from kmesh_plugin.model.objects import KubeObject, ObjectKey
from kmesh_plugin.sources.base import Event

ServiceKey = tuple[str, str]  # (namespace, name)


@dataclass
class Impact:
    """What a batch of events changed: Services to recompute (``everything`` after a label
    change of the agent's own node), and the nodes whose locality changed."""

    services: set[ServiceKey] = field(default_factory=set)
    everything: bool = False
    relabelled: list[tuple[str, Locality, Locality]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.everything or bool(self.services)


class ClusterState:
    def __init__(self, labels: LocalityLabels, node_name: str) -> None:
        self.labels = labels
        self.node_name = node_name
        self.nodes: dict[str, Node] = {}
        self.namespaces: dict[str, Namespace] = {}
        self.services: dict[ServiceKey, Service] = {}
        self.slices: dict[ServiceKey, EndpointSlice] = {}  # (namespace, slice name)
        self.slices_of: dict[ServiceKey, set[str]] = defaultdict(set)
        self._localities: dict[str, Locality] = {}  # one shared Locality per node

    # -- queries ----------------------------------------------------------------------------

    def locality(self, node_name: str) -> Locality:
        found = self._localities.get(node_name)
        if found is None:
            node = self.nodes.get(node_name)
            found = self.labels.locality_of(node_name, node.labels if node else {})
            self._localities[node_name] = found
        return found

    def slices_for(self, service: ServiceKey) -> list[EndpointSlice]:
        ns = service[0]
        return [self.slices[(ns, name)] for name in sorted(self.slices_of.get(service, ()))]

    def services_on_node(self, node_name: str) -> set[ServiceKey]:
        """Services with an endpoint on ``node_name``: a relabel of it moves their tiers."""
        return {
            (s.namespace, s.service_name)
            for s in self.slices.values()
            if any(e.node_name == node_name for e in s.endpoints)
        }

    # -- updates ----------------------------------------------------------------------------

    def apply(self, events: Iterable[Event]) -> Impact:
        impact = Impact()
        for event in events:
            self._apply_one(event, impact)
        return impact

    def _apply_one(self, event: Event, impact: Impact) -> None:
        key = event.key
        obj = event.obj
        match key.kind:
            case "Node":
                before = self.locality(key.name)
                old = self.nodes.get(key.name)
                if isinstance(obj, Node):
                    self.nodes[key.name] = obj
                else:
                    self.nodes.pop(key.name, None)
                self._localities.pop(key.name, None)
                after = self.locality(key.name)
                if key.name == self.node_name:
                    # Strategies see the client node's labels (NodeInfo.labels), not only its
                    # locality: a plugin may rank by any of them, so any change recomputes
                    # every Service (a locality change is one of these).
                    old_labels = dict(old.labels) if old is not None else {}
                    new_labels = dict(obj.labels) if isinstance(obj, Node) else {}
                    if old_labels != new_labels:
                        impact.everything = True
                elif before != after:
                    # Endpoints carry only their node's locality: nothing else can move them.
                    impact.services |= self.services_on_node(key.name)
                if before != after:
                    impact.relabelled.append((key.name, before, after))
            case "Namespace":
                if isinstance(obj, Namespace):
                    self.namespaces[key.name] = obj
                else:
                    self.namespaces.pop(key.name, None)
                impact.services |= {k for k in self.services if k[0] == key.name}
            case "Service":
                skey = (key.namespace, key.name)
                if isinstance(obj, Service):
                    self.services[skey] = obj
                else:
                    self.services.pop(skey, None)
                impact.services.add(skey)
            case "EndpointSlice":
                self._apply_slice(key, obj, impact)

    def _apply_slice(self, key: ObjectKey, obj: KubeObject | None, impact: Impact) -> None:
        skey = (key.namespace, key.name)
        old = self.slices.pop(skey, None)
        if old is not None:
            owner = (old.namespace, old.service_name)
            self.slices_of[owner].discard(old.name)
            if not self.slices_of[owner]:
                del self.slices_of[owner]
            impact.services.add(owner)
        if isinstance(obj, EndpointSlice):
            self.slices[skey] = obj
            owner = (obj.namespace, obj.service_name)
            self.slices_of[owner].add(obj.name)
            impact.services.add(owner)
