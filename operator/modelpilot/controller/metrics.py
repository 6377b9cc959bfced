"""The operator's own metrics, served at ``:8080/metrics`` by ``modelpilot-operator``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LEADER = Gauge("modelpilot_operator_leader", "1 while this operator replica is the leader")
RECONCILE_SECONDS = Histogram(
    "modelpilot_operator_reconcile_duration_seconds",
    "Time one reconcile of a ModelDeployment took, by outcome (ok, retry, error)",
    ["outcome"],
)
RECONCILE_WAITING = Gauge(
    "modelpilot_operator_reconciles_waiting",
    "Reconciles waiting for their object's previous run to finish (the queue's depth)",
)
TICK_SECONDS = Histogram(
    "modelpilot_operator_optimizer_tick_duration_seconds",
    "Time one optimizer tick took (telemetry read, decision, actions), live sync excluded",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DECISIONS = Counter(
    "modelpilot_operator_decisions_total",
    "Optimizer decisions by kind: changed (the plan moved), held (no safe decision), "
    "unchanged (the plan stays)",
    ["kind"],
)
