"""The lab: fake Kubernetes nodes and pods on one machine (network namespaces, CNI, cgroups)."""
