"""The agent: reconciles a cluster source into the datapath maps."""
