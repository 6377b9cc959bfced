"""Trace-replay simulator: the operator optimizer against HPA, KEDA, KPA, static, the oracle
and its reactive twin."""
