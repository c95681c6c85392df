"""Benchmarks: the datapath against kube-proxy's mechanisms, and the control plane."""
