"""The only modules that talk to the outside: the apiserver, Prometheus, running pods."""
