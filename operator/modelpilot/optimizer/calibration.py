"""Online calibration: how far the stage's measurements are from what its profile predicts.

Two corrections, from live telemetry. The batch times themselves: Triton reports how long
it computes the batches it runs, and a stage whose batches take markedly longer or shorter
than the profile says (another machine, another build) is sized with its profile scaled by
the ratio (:func:`batch_time_permille`). Then the latency: a factor learnt online (measured
p95 / predicted p95) corrects the model's tail; near 1 it scales the predicted latency, far
from it the profile's batch times too (see :func:`modelpilot.optimizer.sizing.calibrated`),
so a machine much faster or slower than the profiled one is sized for its own capacity even
without Triton's statistics.
"""

from __future__ import annotations

import math

from modelpilot.optimizer.history import StageHistory
from modelpilot.optimizer.profiles import ModelProfile
from modelpilot.optimizer.sizing import calibrated, predict
from modelpilot.optimizer.snapshot import StageTelemetry, dispersion
from modelpilot.optimizer.tunables import Tunables
from modelpilot.render.plan import StagePlan


def measured_headroom(
    tele: StageTelemetry, delay_ms: float, budget_ms: float, tun: Tunables
) -> bool | None:
    """From the measurements alone, whatever the model predicts: True when the stage clearly
    is not saturated, False when it clearly is (over its budget with a queue), None when
    they cannot tell.

    Triton's queue time includes the batching delay (``delay_ms``); only the wait beyond it
    is a wait for a busy replica. Without a queue time, a p95 far inside the budget is
    taken as headroom and one over it as saturation."""
    p95 = tele.p95_ms
    if p95 is None:
        return None
    if tele.queue_ms is not None:
        queued = tele.queue_ms - delay_ms > tun.headroom_queue_share * p95
        if p95 > budget_ms:
            return False if queued else None
        return None if queued else True
    if p95 > budget_ms:
        return False
    return True if p95 <= tun.headroom_p95_share * budget_ms else None


def step_factor(
    permille: int,
    measured_ms: float | None,
    predicted: tuple[float, float],
    headroom: bool | None,
    tun: Tunables,
) -> int:
    """The calibration moved toward measured / ``predicted`` (p95 ms, utilisation, both at
    the current calibration and setting): an EWMA of the ratio on a log scale, so a profile
    10x off is corrected as fast as one 10x under, and at most ``calibration_max_step`` per
    update.

    Learnt where the model predicts headroom (utilisation under target), as near saturation
    a small error in the load moves the predicted p95 a lot; there, never lowered while the
    stage is measured saturated (a backlog's p95 is no model error, and an optimistic factor
    would keep the stage short of replicas). A model that predicts saturation for a stage
    measured with headroom is too pessimistic: it is lowered (at once when it predicts
    an unbounded p95)."""
    predicted_ms, utilisation = predicted
    if measured_ms is None or measured_ms <= 0 or predicted_ms <= 0:
        return permille
    ratio = measured_ms / predicted_ms  # 0 when the model predicts saturation (inf)
    if utilisation <= tun.target_utilisation:
        if ratio < 1 and headroom is False:
            return permille
    elif ratio >= 1 or headroom is not True:
        return permille
    most = math.log(tun.calibration_max_step)
    step = tun.calibration_smoothing * math.log(ratio) if ratio > 0 else -most
    lo, hi = tun.calibration_bounds
    new = permille / 1000 * math.exp(min(max(step, -most), most))
    return round(1000 * min(max(new, lo), hi))


def batch_time_permille(
    cur: StagePlan,
    prof: ModelProfile,
    tele: StageTelemetry,
    hist: StageHistory,
    t: int,
    tun: Tunables,
) -> int:
    """Measured over profiled batch time, in thousandths, to size the stage with: Triton's
    mean compute time per batch against the profile's mean for the achieved batch size (at the
    stage's instance count). Kept as it was while unmeasured, too soon after a change (the
    window may hold another variant's or setting's batches) or within
    ``batch_time_hysteresis`` of the measured ratio; 1000 when the ratio is within
    ``batch_time_deadband`` of the profile (the latency calibration keeps small errors)."""
    kept = hist.batch_time_permille
    if tele.exec_ms is None or not tele.batch_size or tele.exec_ms <= 0:
        return kept
    if hist.last_change is not None and t - hist.last_change < tun.calibration_settle_s:
        return kept
    profiled = prof.mean_ms(tele.batch_size) * prof.instance_slowdown(cur.instances or 1)
    lo, hi = tun.calibration_bounds
    ratio = min(max(tele.exec_ms / profiled, lo), hi)
    if abs(math.log(ratio * 1000 / kept)) <= math.log(tun.batch_time_hysteresis):
        return kept
    band = tun.batch_time_deadband
    return 1000 if 1 / band <= ratio <= band else round(1000 * ratio)


def learn(
    cur: StagePlan,
    prof: ModelProfile,
    tele: StageTelemetry,
    hist: StageHistory,
    rate: float,
    budget: float,
    t: int,
    tun: Tunables,
) -> int:
    """The stage's calibration (permille) after comparing what its model predicts for the
    current settings with the measured p95."""
    calib_pm = hist.calibration_permille
    # Learn only from a settled stage: with a window that mixes settings, the
    # measured p95 is a transient, not a model error. (At the rate sized for: while
    # it climbs, the measured p95 already holds some of the climb's queueing.)
    if hist.last_change is not None and t - hist.last_change < tun.calibration_settle_s:
        return calib_pm
    delay_us = cur.max_queue_delay_us or 0
    model, factor = calibrated(prof, calib_pm / 1000, tun)
    items = tele.items_per_request or 1.0
    p95, util = predict(
        model,
        rate,
        max(cur.replicas, 1),
        cur.max_batch_size or 1,
        delay_us,
        items,
        factor,
        cur.instances or 1,
        dispersion(tele),
    )
    headroom = measured_headroom(tele, delay_us / 1000, budget, tun)
    return step_factor(calib_pm, tele.p95_ms, (p95, util), headroom, tun)
