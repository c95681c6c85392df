"""The table of kinds the server serves: names, scope, verbs, subresources, selectable fields
and strategic-merge-patch list rules.

One :class:`ResourceType` per (group, version, plural). The rest of the server reads only
this table, so a new kind is one more entry: discovery, routing, storage, selectors and patch
pick it up. :data:`DEFAULT_RESOURCES` holds what the lab needs (core v1 namespaces, nodes,
services, pods, configmaps; discovery.k8s.io/v1 endpointslices; apps/v1 deployments).

Strategic merge patch needs, for each list field, whether Kubernetes merges it and by which
key (the ``patchMergeKey``/``patchStrategy`` tags of the Go types). Without an OpenAPI
schema the table records them as :class:`MergeRule` entries by field path (list indices
left out), e.g. ``("spec", "template", "spec", "containers", "ports")``. A list without a
rule is replaced whole, which is what Kubernetes does for atomic lists.

Subresources: ``status`` (writes change only ``.status``) and ``scale`` (an autoscaling/v1
``Scale`` view of ``spec.replicas``, Deployments); :data:`SUBRESOURCE_KINDS` names the kind a
subresource speaks when it is not the parent's. ``top_level_fields`` lists the fields a kind
has besides apiVersion, kind and metadata: ``fieldValidation`` (Strict/Warn/Ignore) checks
those and :data:`OBJECT_META_FIELDS` only. The printed columns (``tables``) and the OpenAPI
documents (``openapi``) are derived from this table too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

STANDARD_VERBS = (
    "create", "delete", "deletecollection", "get", "list", "patch", "update", "watch",
)
SUBRESOURCE_VERBS = {"status": ("get", "patch", "update"), "scale": ("get", "patch", "update")}
# (group, version, kind) of a subresource whose kind is not its parent's.
SUBRESOURCE_KINDS = {"scale": ("autoscaling", "v1", "Scale")}
OBJECT_META_FIELDS = frozenset((
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
    "annotations", "ownerReferences", "finalizers", "managedFields",
))
Path = tuple[str, ...]


@dataclass(frozen=True)
class MergeRule:
    """How strategic merge patch merges one list: by ``key``, or as a set of primitives."""

    key: str | None  # None: a list of primitives merged as a set (metadata.finalizers)


@dataclass(frozen=True, eq=False)  # identity: each table entry is one kind
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = STANDARD_VERBS
    subresources: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    # Field selector label -> path in the object, besides metadata.name and metadata.namespace.
    selectable_fields: Mapping[str, Path] = field(default_factory=dict)
    merge_rules: Mapping[Path, MergeRule] = field(default_factory=dict)
    # DELETE answers the deleted object (True) or a Status (False), kind by kind as the real
    # server does (registry ReturnDeletedObject).
    returns_deleted_object: bool = False
    # DELETE with a grace period marks the object terminating instead (Pods).
    graceful_delete: bool = False
    # The object's fields besides apiVersion, kind and metadata (unknown-field checks).
    top_level_fields: tuple[str, ...] = ("spec", "status")

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def qualified(self) -> str:
        """``services``, ``deployments.apps``: how error messages name the resource."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        """A status subresource: writes to the object keep .status, and create drops it."""
        return "status" in self.subresources

    def base_path(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def path(self, namespace: str = "", name: str = "") -> str:
        parts = [self.base_path()]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        return "/".join(parts)

    def field_labels(self) -> tuple[str, ...]:
        return ("metadata.name", "metadata.namespace", *self.selectable_fields)


def _under(prefix: Path, rules: Mapping[Path, MergeRule]) -> dict[Path, MergeRule]:
    return {prefix + path: rule for path, rule in rules.items()}


BY_NAME = MergeRule("name")
AS_SET = MergeRule(None)

METADATA_RULES: dict[Path, MergeRule] = {
    ("finalizers",): AS_SET,
    ("ownerReferences",): MergeRule("uid"),
}

_CONTAINER_RULES: dict[Path, MergeRule] = {
    ("ports",): MergeRule("containerPort"),
    ("env",): BY_NAME,
    ("volumeMounts",): MergeRule("mountPath"),
    ("volumeDevices",): MergeRule("devicePath"),
    ("resizePolicy",): MergeRule("resourceName"),
}

POD_SPEC_RULES: dict[Path, MergeRule] = {
    ("volumes",): BY_NAME,
    ("imagePullSecrets",): BY_NAME,
    ("hostAliases",): MergeRule("ip"),
    ("topologySpreadConstraints",): MergeRule("topologyKey"),
    ("resourceClaims",): BY_NAME,
    ("schedulingGates",): BY_NAME,
}
for _containers in ("containers", "initContainers", "ephemeralContainers"):
    POD_SPEC_RULES[(_containers,)] = BY_NAME
    POD_SPEC_RULES.update(_under((_containers,), _CONTAINER_RULES))

POD_STATUS_RULES: dict[Path, MergeRule] = {
    ("conditions",): MergeRule("type"),
    ("podIPs",): MergeRule("ip"),
    ("hostIPs",): MergeRule("ip"),
}
CONDITIONS = {("status", "conditions"): MergeRule("type")}


def _rules(*parts: Mapping[Path, MergeRule]) -> Mapping[Path, MergeRule]:
    merged: dict[Path, MergeRule] = _under(("metadata",), METADATA_RULES)
    for part in parts:
        merged.update(part)
    return MappingProxyType(merged)


def pod_template_rules(prefix: Path) -> dict[Path, MergeRule]:
    """Rules for a pod template at ``prefix`` (``spec.template`` in a Deployment)."""
    return {
        **_under((*prefix, "metadata"), METADATA_RULES),
        **_under((*prefix, "spec"), POD_SPEC_RULES),
    }


NAMESPACES = ResourceType(
    "", "v1", "namespaces", "namespace", "Namespace", False, ("ns",),
    verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
    selectable_fields={"status.phase": ("status", "phase")},
    merge_rules=_rules(CONDITIONS),
    returns_deleted_object=True,
)
NODES = ResourceType(
    "", "v1", "nodes", "node", "Node", False, ("no",),
    subresources=("status",),  # the kubelet reports a node's conditions and nodeInfo there
    selectable_fields={"spec.unschedulable": ("spec", "unschedulable")},
    merge_rules=_rules(
        CONDITIONS,
        {("status", "addresses"): MergeRule("type"), ("spec", "podCIDRs"): AS_SET},
    ),
)
SERVICES = ResourceType(
    "", "v1", "services", "service", "Service", True, ("svc",),
    verbs=("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"),
    subresources=("status",),
    categories=("all",),
    merge_rules=_rules(CONDITIONS, {("spec", "ports"): MergeRule("port")}),
    returns_deleted_object=True,
)
PODS = ResourceType(
    "", "v1", "pods", "pod", "Pod", True, ("po",),
    subresources=("status",),
    categories=("all",),
    selectable_fields={
        "spec.nodeName": ("spec", "nodeName"),
        "spec.restartPolicy": ("spec", "restartPolicy"),
        "spec.schedulerName": ("spec", "schedulerName"),
        "spec.serviceAccountName": ("spec", "serviceAccountName"),
        "status.phase": ("status", "phase"),
        "status.podIP": ("status", "podIP"),
    },
    merge_rules=_rules(_under(("spec",), POD_SPEC_RULES), _under(("status",), POD_STATUS_RULES)),
    returns_deleted_object=True,
    graceful_delete=True,
)
CONFIGMAPS = ResourceType(
    "", "v1", "configmaps", "configmap", "ConfigMap", True, ("cm",),
    merge_rules=_rules(),
    top_level_fields=("data", "binaryData", "immutable"),
)
ENDPOINTSLICES = ResourceType(
    "discovery.k8s.io", "v1", "endpointslices", "endpointslice", "EndpointSlice", True,
    merge_rules=_rules(),  # endpoints and ports are atomic lists
    top_level_fields=("addressType", "endpoints", "ports"),
)
DEPLOYMENTS = ResourceType(
    "apps", "v1", "deployments", "deployment", "Deployment", True, ("deploy",),
    subresources=("status", "scale"),
    categories=("all",),
    merge_rules=_rules(CONDITIONS, pod_template_rules(("spec", "template"))),
)


class ResourceTable:
    """Lookups over a set of :class:`ResourceType`: by URL, by kind, by any name kubectl takes."""

    def __init__(self, types: Iterable[ResourceType]) -> None:
        self.types: tuple[ResourceType, ...] = tuple(types)
        self._by_path = {(t.group, t.version, t.plural): t for t in self.types}
        self._by_kind = {(t.api_version, t.kind): t for t in self.types}
        self._by_name: dict[str, ResourceType] = {}
        # Later entries never shadow earlier ones: the first kind listed owns a short name.
        for t in self.types:
            for name in (t.plural, t.singular, t.kind, t.kind.lower(), *t.short_names,
                         f"{t.plural}.{t.group}" if t.group else t.plural,
                         f"{t.kind}.{t.group}" if t.group else t.kind):
                self._by_name.setdefault(name, t)
        if len(self._by_path) != len(self.types):
            raise ValueError("two resource types share a group, version and plural")

    def __iter__(self) -> Iterator[ResourceType]:
        return iter(self.types)

    def by_path(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._by_path.get((group, version, plural))

    def by_kind(self, api_version: str, kind: str) -> ResourceType | None:
        return self._by_kind.get((api_version, kind))

    def lookup(self, name: str) -> ResourceType:
        """A kind, plural, singular, short name or ``plural.group``; KeyError if unknown."""
        found = self._by_name.get(name) or self._by_name.get(name.lower())
        if found is None:
            raise KeyError(f"unknown resource {name!r}")
        return found

    def group_versions(self) -> list[tuple[str, list[str]]]:
        """Groups in table order with their versions (the first is the preferred one)."""
        groups: dict[str, list[str]] = {}
        for t in self.types:
            versions = groups.setdefault(t.group, [])
            if t.version not in versions:
                versions.append(t.version)
        return list(groups.items())

    def in_group_version(self, group: str, version: str) -> list[ResourceType]:
        return [t for t in self.types if t.group == group and t.version == version]


DEFAULT_RESOURCES = ResourceTable(
    [NAMESPACES, NODES, SERVICES, PODS, CONFIGMAPS, ENDPOINTSLICES, DEPLOYMENTS]
)
