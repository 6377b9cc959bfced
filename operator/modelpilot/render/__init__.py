"""Pure: a spec and a plan -> the Kubernetes objects that run them."""
