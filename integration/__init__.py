"""Integration layer: the multi-node lab, scenarios and benchmarks that run on a real kernel."""
