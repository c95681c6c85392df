"""kmesh-cni: the chained CNI plugin that enrols pods (by netns cookie) for the datapath."""
