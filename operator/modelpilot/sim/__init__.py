"""Trace-replay simulator: the operator optimizer against HPA, KEDA, KPA, static, oracle."""
