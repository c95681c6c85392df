"""The eBPF datapath."""
