"""Pure status logic: Kubernetes-style conditions and the stage roll-up into Ready."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
