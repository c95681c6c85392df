"""The cluster the seed document makes with kind, as the lab starts it by default.

``kind create cluster --name ambient`` with three workers names them ``ambient-worker``,
``ambient-worker2`` and ``ambient-worker3`` and gives each only kind's own labels; the seed's
``kubectl label node`` commands then set the locality. :data:`SEED_LOCALITY` is what those
commands leave (the seed scenario's nodes), for tests that start from there.
"""

from __future__ import annotations

import platform
import re

CLUSTER = "ambient"
WORKERS = (f"{CLUSTER}-worker", f"{CLUSTER}-worker2", f"{CLUSTER}-worker3")
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
# A DNS subdomain (RFC 1123), as the API server requires of a Node's name.
NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

REGION = "topology.kubernetes.io/region"
ZONE = "topology.kubernetes.io/zone"
SUBZONE = "topology.kubernetes.io/subzone"  # the seed's key (Istio reads topology.istio.io/...)
SEED_LOCALITY = {
    WORKERS[0]: {REGION: "region", ZONE: "zone1", SUBZONE: "subzone1"},
    WORKERS[1]: {REGION: "region", ZONE: "zone1", SUBZONE: "subzone2"},
    WORKERS[2]: {REGION: "region", ZONE: "zone2", SUBZONE: "subzone3"},
}


def kind_labels(node: str) -> dict[str, str]:
    """The labels kind's kubelet gives a worker node, and nothing else."""
    return {"beta.kubernetes.io/arch": ARCH, "beta.kubernetes.io/os": "linux",
            "kubernetes.io/arch": ARCH, "kubernetes.io/hostname": node,
            "kubernetes.io/os": "linux"}


def worker_nodes() -> dict[str, dict[str, str | None]]:
    """``lab up``'s default nodes: the seed's three kind workers, unlabelled."""
    return {node: dict(kind_labels(node)) for node in WORKERS}
