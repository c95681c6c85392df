"""The API resources the Kubernetes source reads, and how (one place: deploy/ RBAC is checked
against it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resource:
    """A collection the agent lists and watches: its API group ("" is core), version, plural,
    kind, and the label selector it is read with."""

    group: str
    version: str
    plural: str
    kind: str
    label_selector: str = ""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


# kube-proxy's selector for Services and EndpointSlices: headless Services, and Services that
# another proxy serves (service.kubernetes.io/service-proxy-name), are not ours.
PROXY_SELECTOR = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"

#: Everything the agent reads, cluster-wide, with list and watch only (deploy/ RBAC grants
#: exactly this). All Nodes, since other nodes' labels give endpoint localities; Namespaces for
#: the traffic-distribution annotation.
WATCHED: tuple[Resource, ...] = (
    Resource("", "v1", "nodes", "Node"),
    Resource("", "v1", "namespaces", "Namespace"),
    Resource("", "v1", "services", "Service", PROXY_SELECTOR),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", PROXY_SELECTOR),
)
