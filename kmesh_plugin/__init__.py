"""kmesh-plugin: locality-aware L4 load balancing in the kernel, driven by strategy plugins."""

__version__ = "0.1.0"
