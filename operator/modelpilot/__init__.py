"""ModelPilot: a Kubernetes operator for self-optimizing ML serving pipelines."""
