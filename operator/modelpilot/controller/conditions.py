"""Pure status logic: Kubernetes-style conditions and the stage roll-up into Ready."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelpilot.api.v1alpha1 import OptimizerMode
from modelpilot.optimizer.policy import Decision


def rfc3339(t: float) -> str:
    """``t`` (unix seconds) as Kubernetes writes times: RFC 3339, UTC, whole seconds."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "MetricsAvailable", "SLOMet")


@dataclass(frozen=True)
class Observed:
    """What a stage's Deployment reports."""

    replicas: int
    ready: int
    updated: int
    generation_current: bool


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Return ``conditions`` with one condition set; lastTransitionTime moves only when the
    status flips, so a re-written but unchanged condition does not look like news."""
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    transition = old["lastTransitionTime"] if old and old.get("status") == status else now
    out.append(
        {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": transition,
            "observedGeneration": generation,
        }
    )
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(c["type"], len(order)))


def get_condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def rollout(
    observed: Mapping[str, Observed | None], want: Mapping[str, int]
) -> tuple[bool, bool, str]:
    """(ready, progressing, message) rolled up over the stages.

    Ready: every stage has its wanted replicas updated and ready. Progressing: some stage
    is still rolling out or scaling.
    """
    waiting = []
    for stage, replicas in want.items():
        obs = observed.get(stage)
        if obs is None:
            waiting.append(f"{stage}: not created yet")
        elif not obs.generation_current or obs.updated < replicas or obs.ready < replicas:
            waiting.append(f"{stage}: {obs.ready}/{replicas} ready")
    if waiting:
        return False, True, "waiting for " + ", ".join(waiting)
    return True, False, "all stages ready: " + ", ".join(f"{s} {want[s]}" for s in want)


def merge_patch(target: Any, patch: Any) -> Any:
    """``target`` after a JSON merge patch (RFC 7386), as the apiserver applies status
    patches: ``None`` deletes a key. Comparing with it tells a no-op patch from a write."""
    if not isinstance(patch, Mapping):
        return patch
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def decision_conditions(
    conditions: Sequence[Mapping[str, Any]],
    decision: Decision,
    e2e_p95_ms: float | None,
    have_telemetry: bool,
    problem: str | None,
    mode: OptimizerMode,
    slo_ms: int,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """``conditions`` with what an optimizer tick learnt: MetricsAvailable (whether it could
    read fresh telemetry; ``problem`` is why Prometheus could not be read) and, when it
    decided, SLOMet."""
    out = [dict(c) for c in conditions]
    if decision.hold and mode != OptimizerMode.OFF:
        reason = "PrometheusUnreachable" if problem else "MetricsStale"
        message = problem or decision.hold or ""
        out = set_condition(out, "MetricsAvailable", "False", reason, message, now, generation)
    elif have_telemetry:
        message = "telemetry is fresh"
        out = set_condition(
            out, "MetricsAvailable", "True", "MetricsFresh", message, now, generation
        )
    if decision.hold:
        return out
    if decision.budget_limited:
        return set_condition(
            out, "SLOMet", "False", "BudgetLimited", decision.budget_limited, now, generation
        )
    if decision.slo_met is False:
        message = "; ".join(r for r in decision.reasons if "predict" in r or "capped" in r)
        message = message or "the SLO cannot be met within the replica bounds"
        return set_condition(out, "SLOMet", "False", "CapacityExhausted", message, now, generation)
    message = (
        f"observed p95 {e2e_p95_ms:.0f} ms <= {slo_ms} ms"
        if e2e_p95_ms is not None
        else "every stage is predicted within its budget"
    )
    return set_condition(out, "SLOMet", "True", "WithinSLO", message, now, generation)
