"""kmesh-plugin: locality-aware L4 load balancing in the kernel, driven by strategy plugins."""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing`: kmesh-cni's start-up imports nothing it can avoid
if TYPE_CHECKING:
    from typing import Any

    from kmesh_plugin.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]


def __getattr__(name: str) -> Any:
    # `from kmesh_plugin import hookimpl` keeps working for plugin authors, but importing any
    # submodule no longer pulls in pluggy, yaml and the model: kmesh-cni runs once per pod in
    # the runtime's CNI chain, and those imports alone cost ~50 ms of it (PEP 562).
    if name == "hookimpl":
        from kmesh_plugin.hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module 'kmesh_plugin' has no attribute {name!r}")
