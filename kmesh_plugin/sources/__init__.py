"""Cluster sources: where the agent learns about Nodes, Services, EndpointSlices, Namespaces."""
