"""The source plugin.toml names, and a one-shot read of it (explain)."""

from __future__ import annotations

import time

from kmesh_plugin.config import Config
from kmesh_plugin.errors import KmeshError
from kmesh_plugin.sources.base import Batch, Source


def make_source(cfg: Config) -> Source:
    """The source of ``[source] kind``; nothing is opened until ``start()``."""
    if cfg.source_kind == "kubernetes":
        from kmesh_plugin.sources.kubernetes import KubernetesSource

        return KubernetesSource(cfg.kubeconfig)
    from kmesh_plugin.sources.manifests import ManifestSource

    return ManifestSource(cfg.source_path)


def read_once(source: Source, timeout: float = 30.0) -> Batch:
    """Start ``source``, wait for its complete initial state, close it; that state."""
    source.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            batch = source.next_batch(max(0.0, min(1.0, deadline - time.monotonic())))
            if batch is not None and batch.synced:
                return batch
            if time.monotonic() >= deadline:
                raise KmeshError(
                    f"the {source.kind} source gave no complete state within {timeout:.0f} s: "
                    f"{source.describe()}"
                )
    finally:
        source.close()
