"""kmesh-plugin: locality-aware L4 load balancing in the kernel, driven by strategy plugins."""

from kmesh_plugin.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
