"""Replica changes that do not flap: scale up at once, down only after a window."""

from __future__ import annotations

from dataclasses import replace

from modelpilot.api.v1alpha1 import ModelDeploymentSpec
from modelpilot.optimizer.history import StageHistory


def stabilize(
    name: str,
    current: int,
    desired: int,
    hist: StageHistory,
    now: int,
    spec: ModelDeploymentSpec,
    cooldown: int,
    reasons: list[str],
    remember: int | None = None,
    tolerance: float = 0.0,
) -> tuple[int, StageHistory]:
    """Scale up at once (bounded by maxScaleUpStep); scale down only to the highest
    recommendation over the stabilization window, outside the cooldown. Either way only by
    more than ``tolerance`` of the current count (HPA's tolerance: a need that wanders by a
    replica around a steady load must not move the stage, nor ratchet it up). ``remember`` is the
    recommendation to keep for that window when it differs from ``desired`` (a forecast)."""
    window = spec.optimizer.scale_down_stabilization_seconds
    recent = tuple(r for r in hist.scale_down_window if now - r[0] < window)
    recs = (*recent, (now, desired if remember is None else remember))
    # Keep only what can still be the window's maximum: a monotone, bounded history.
    kept: list[tuple[int, int]] = []
    for r in recs:
        while kept and kept[-1][1] <= r[1]:
            kept.pop()
        kept.append(r)
    hist = replace(hist, scale_down_window=tuple(kept))
    if desired > current and desired - current > tolerance * current:
        new = min(desired, current + spec.optimizer.max_scale_up_step)
        reasons.append(f"{name}: scale up {current} -> {new} (needs {desired})")
        return new, hist
    if desired <= current:
        # Never below what this decision needs: the window remembers the measured need, which
        # a forecast (a climb, a season) may exceed.
        ceiling = max(max(r for _, r in kept), desired)
        if ceiling >= current or current - ceiling <= tolerance * current:
            return current, hist
        if hist.last_change is not None and now - hist.last_change < cooldown:
            return current, hist
        reasons.append(
            f"{name}: scale down {current} -> {ceiling} (highest need over the last {window}s)"
        )
        return ceiling, hist
    return current, hist
