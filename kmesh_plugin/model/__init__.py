"""The model: nodes, services, endpoints and locality, free of any kernel or I/O concern."""

from kmesh_plugin.model.locality import Locality, LocalityLabels, Scope, tier
from kmesh_plugin.model.objects import (
    Conditions,
    EndpointSlice,
    Namespace,
    Node,
    ObjectKey,
    Service,
    ServicePort,
)
from kmesh_plugin.model.strategy import NO_STRATEGY, Claim, Mode, Strategy
from kmesh_plugin.model.views import DatapathInfo, EndpointInfo, NodeInfo, PodInfo

__all__ = [
    "NO_STRATEGY",
    "Claim",
    "Conditions",
    "DatapathInfo",
    "EndpointInfo",
    "EndpointSlice",
    "Locality",
    "LocalityLabels",
    "Mode",
    "Namespace",
    "Node",
    "NodeInfo",
    "ObjectKey",
    "PodInfo",
    "Scope",
    "Service",
    "ServicePort",
    "Strategy",
    "tier",
]
