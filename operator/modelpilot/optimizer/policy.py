"""The optimizer: a pure, deterministic function from what is known to what to run.

``decide(spec, plan, snapshot, history, profiles, now)`` returns a :class:`Decision`: the
next plan (replicas, variant, batching per stage), the reasons a human can read, and the
history to carry to the next call. No I/O, no clock: the same code runs in the operator and
in the trace-replay simulator.

Model. A model stage replica runs Triton with dynamic batching. Triton batches *items* (texts
to embed, query-passage pairs to re-rank), and one request may carry several: a query is
re-ranked as one request of all its candidates. At an item rate lambda (request rate x
measured items per request) over ``c`` replicas, the batch a replica forms is about the items
that arrive while it waits (queue delay) or executes the previous batch; batch execution time
comes from the measured profile; waiting for a free replica follows M/M/c on batches. A
calibration factor learnt online (measured p95 / predicted p95) corrects the model from live
telemetry: near 1 it scales the predicted latency (the model's tail), far from it the
profile's batch times too, so a machine much faster or slower than the profiled one is
sized for its own capacity. Replicas are the fewest that keep the predicted
p95 inside the stage's share of the SLO and utilisation under a safety margin, which shrinks
for large pools (square-root staffing). The rate sized for is the measured one, or, while the
short window shows a clear climb, the rate forecast for when new replicas will serve.

Stability. Scale-up is immediate (bounded by ``maxScaleUpStep``); scale-down goes only to the
highest recommendation over the stabilization window and not within a cooldown of the last
change; batching and variant change only when the current choice stops fitting or a
candidate is markedly cheaper. A stationary load therefore settles and stays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from functools import partial

from modelpilot.api.v1alpha1 import (
    STAGES,
    ModelDeploymentSpec,
    ModelStage,
    OptimizerMode,
    Stage,
    Variant,
    Verification,
)
from modelpilot.optimizer.gate import Verdict, judge, unverifiable
from modelpilot.optimizer.profiles import ModelProfile, Profiles
from modelpilot.optimizer.queueing import wait_quantile
from modelpilot.optimizer.snapshot import (
    RATE_WINDOW_S,
    SHORT_RATE_WINDOW_S,
    Snapshot,
    StageTelemetry,
)
from modelpilot.render.plan import Plan, StagePlan

QUERY_PATH = ("embedding", "retrieval", "inference")
MODEL_STAGES = ("embedding", "inference")


@dataclass(frozen=True)
class Tunables:
    """Policy constants; documented so SREs can reason about every decision."""

    target_utilisation: float = 0.75  # safety margin: never plan replicas past this ...
    staffing_beta: float = 1.5  # ... unless the pool is large (square-root staffing, below)
    slo_headroom: float = 0.85  # share of the SLO the stages may use (rest: network, gateway)
    min_stage_share: float = 0.10  # no query-path stage gets less of the budget than this
    switch_saving: float = 0.15  # a variant switch must save at least this share of cost
    calibration_smoothing: float = 0.3  # EWMA weight (log scale) of the newest ratio
    calibration_bounds: tuple[float, float] = (0.04, 25.0)  # a profile 20x off still fits
    calibration_max_step: float = 3.0  # one update moves the factor at most this many times
    # Factors from this up to 1 scale the predicted latency only (the model's tail is
    # pessimistic); outside, the profile's batch times too (see calibrated()).
    calibration_latency_floor: float = 0.5
    # The measured stage clearly has headroom when requests wait in Triton's queue (beyond
    # the batching delay) less than this share of its p95 ...
    headroom_queue_share: float = 0.25
    headroom_p95_share: float = 0.5  # ... or, with no queue time, its p95 under this x budget
    min_metric_age_s: float = 60.0  # metrics older than max(this, 3 intervals) are stale
    forecast_lead_s: float = 30.0  # a new replica serves about this long after the decision
    forecast_deadband: float = 0.10  # short/long rate rises below this are noise, not trend
    forecast_max_ratio: float = 1.5  # never size for more than this x the short-window rate


@dataclass(frozen=True)
class StageHistory:
    """What the policy remembers about a stage between decisions (persisted in status)."""

    scale_down_window: tuple[tuple[int, int], ...] = ()  # (time s, replicas), newest last
    last_change: int | None = None
    calibration_permille: int = 1000
    verification_started: int | None = None  # when the running shadow verification started
    rejected: tuple[tuple[str, int, str], ...] = ()  # (variant, until, why): failed verification

    def rejected_at(self, t: int) -> set[str]:
        return {v for v, until, _ in self.rejected if until > t}


@dataclass(frozen=True)
class History:
    stages: Mapping[str, StageHistory] = field(default_factory=dict)

    def stage(self, name: str) -> StageHistory:
        return self.stages.get(name, StageHistory())

    def to_status(self) -> dict[str, object]:
        return {
            name: {
                "scaleDownWindow": [list(r) for r in h.scale_down_window],
                "lastChange": h.last_change,
                "calibrationPermille": h.calibration_permille,
                "verificationStarted": h.verification_started,
                "rejected": [
                    {"variant": v, "until": until, "reason": why} for v, until, why in h.rejected
                ],
            }
            for name, h in sorted(self.stages.items())
        }

    @classmethod
    def from_status(cls, raw: Mapping[str, object] | None) -> History:
        stages = {}
        for name, h in (raw or {}).items():
            if not isinstance(h, Mapping):
                continue
            # (older operators wrote these as "recommendations" and "trialStarted")
            pairs = h.get("scaleDownWindow", h.get("recommendations")) or []
            window = tuple((int(t), int(r)) for t, r in pairs)
            rejected = tuple(
                (str(r["variant"]), int(r["until"]), str(r.get("reason") or ""))
                for r in h.get("rejected") or []
                if isinstance(r, Mapping)
            )
            stages[name] = StageHistory(
                window,
                h.get("lastChange"),
                int(h.get("calibrationPermille") or 1000),
                h.get("verificationStarted", h.get("trialStarted")),
                rejected,
            )
        return cls(stages)


@dataclass(frozen=True)
class Decision:
    plan: Plan
    reasons: tuple[str, ...]
    history: History
    hold: str | None = None  # why nothing may change now, when that is the case
    changed: tuple[str, ...] = ()  # stages whose plan differs from the input plan
    budget_limited: str | None = None  # set when the cost budget overrode the SLO
    slo_met: bool | None = None
    cost_per_hour: float = 0.0
    # (stage, "started" | "promoted" | "rejected", message): verification steps taken now
    verifications: tuple[tuple[str, str, str], ...] = ()
    short: tuple[str, ...] = ()  # stages that cannot meet their budget within their bounds
    held: tuple[str, ...] = ()  # stages not sized (no request rate, no profile)

    @property
    def summary(self) -> str:
        """One short line that agrees with the reasons (a status field, an Event's prefix)."""
        if self.hold:
            return f"hold: {self.hold}"
        head = "changed " + ", ".join(self.changed) if self.changed else "no change"
        if self.short:
            over = [s for s in self.short if s in MODEL_STAGES]
            capped = [s for s in self.short if s not in MODEL_STAGES]
            their = "its" if len(over) == 1 else "their"
            parts = [f"{', '.join(over)} predicted over {their} latency budget"] if over else []
            parts += [f"{', '.join(capped)} capped at max replicas"] if capped else []
            return f"{head}: {'; '.join(parts)}"
        if self.budget_limited:
            return f"{head}: limited by maxCostPerHour"
        if self.slo_met is False:
            return f"{head}: measured p95 over the SLO"
        if self.changed:
            return head
        if self.held:
            rest = "" if len(self.held) == len(STAGES) else ", the others fit their budget"
            return f"no change: {', '.join(self.held)} on hold{rest}"
        return "no change: every stage fits its budget"


@dataclass(frozen=True)
class Sizing:
    replicas: int
    max_batch_size: int
    max_queue_delay_us: int
    p95_ms: float
    utilisation: float
    feasible: bool


def _powers_of_two(limit: int) -> list[int]:
    out = [1]
    while out[-1] * 2 <= limit:
        out.append(out[-1] * 2)
    if out[-1] != limit:
        out.append(limit)
    return out


def _delays(limit: int) -> list[int]:
    grid = [0, 100, 250, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
    return [d for d in grid if d < limit] + [limit]


def predict(
    profile: ModelProfile,
    rate: float,
    replicas: int,
    max_batch: int,
    delay_us: int,
    items: float = 1.0,
    latency_factor: float = 1.0,
) -> tuple[float, float]:
    """(p95 latency ms, utilisation) of a model stage under the batching model above.

    ``rate`` is in requests/s, each of ``items`` items; ``max_batch`` counts items, so a
    request larger than it cannot be served (Triton rejects it). ``latency_factor`` scales
    the modelled waits and batch times, not the configured queue delay.
    """
    items = max(items, 1.0)
    if replicas <= 0 or max_batch < items:
        return (math.inf, math.inf) if rate > 0 else (0.0, 0.0)
    per_replica = rate * items / replicas
    delay_ms = delay_us / 1000.0
    batch = items
    for _ in range(8):  # fixed point: the batch is what arrives while waiting + executing
        exec_ms = profile.latency_ms(batch)
        batch = min(float(max_batch), max(items, per_replica * (delay_ms + exec_ms) / 1000.0))
    exec_ms = profile.latency_ms(batch)
    utilisation = per_replica * exec_ms / (1000.0 * batch)
    if utilisation >= 1.0:
        return math.inf, utilisation
    wait_ms = 1000.0 * wait_quantile(replicas, rate * items / batch, 1000.0 / exec_ms, 0.95)
    room = max_batch - items
    fill_ms = min(delay_ms, 1000.0 * room / per_replica) if per_replica > 0 else 0
    # The tail is set by the large batches, not the mean one: a request shares its batch with
    # the requests that reached the replica while it waited or ran the previous batch
    # (Poisson), up to max_batch. On hardware where a batch costs its size in time (CPU), a
    # few coinciding requests double the p95.
    extra = _poisson_quantile(rate / replicas * (delay_ms + exec_ms) / 1000.0, 0.95)
    tail_batch = min(float(max_batch), max(batch, items * (1 + extra)))
    modelled = wait_ms + profile.latency_ms(tail_batch, "p95")
    return modelled * latency_factor + max(fill_ms, 0.0), utilisation


def _poisson_quantile(mean: float, q: float) -> int:
    """The smallest k with P(Poisson(mean) <= k) >= q."""
    if mean <= 0:
        return 0
    k, term = 0, math.exp(-mean)
    total = term
    while total < q and k < 10_000:
        k += 1
        term *= mean / k
        total += term
    return k


def calibrated(
    profile: ModelProfile, calibration: float, tun: Tunables
) -> tuple[ModelProfile, float]:
    """The profile to predict from and the factor on its predicted p95, for ``calibration``.

    A factor near 1 is the model's own error, in the tail it predicts: down to
    ``calibration_latency_floor`` it scales the latency alone. Beyond that, or above 1, the
    stage's batches themselves take longer or shorter than profiled (another machine), so
    capacity changes with latency: the profile's batch times are scaled by what the latency
    factor leaves. Above 1 all of it goes to the batch times, the cautious side: a stage
    slower than profiled is short of replicas, not only of latency."""
    floor = tun.calibration_latency_floor
    if floor <= calibration <= 1.0:
        return profile, calibration
    latency = floor if calibration < floor else 1.0
    time = calibration / latency
    points = tuple(
        replace(p, p50_ms=p.p50_ms * time, p95_ms=p.p95_ms * time) for p in profile.points
    )
    return replace(profile, points=points), latency


def max_utilisation(offered: float, tun: Tunables) -> float:
    """The highest utilisation to plan for ``offered`` busy replicas (arrival rate / one
    replica's capacity).

    Square-root staffing (Halfin-Whitt): random arrivals need spare capacity in proportion to
    the square root of the load, not to the load itself, so a large pool runs hotter than a
    small one at the same risk. Never below ``target_utilisation``."""
    if offered <= 0:
        return tun.target_utilisation
    return max(tun.target_utilisation, offered / (offered + tun.staffing_beta * math.sqrt(offered)))


def size_model_stage(
    profile: ModelProfile,
    rate: float,
    budget_ms: float,
    calibration: float,
    bounds: tuple[int, int],
    max_batch: int,
    max_delay_us: int,
    tun: Tunables,
    prefer: tuple[int, int] | None = None,
    items: float = 1.0,
) -> Sizing:
    """The fewest replicas (then lowest p95) meeting utilisation and latency targets.

    ``prefer`` is the current (max batch, delay): kept whenever it is as good in replicas,
    so batching does not churn when several settings fit. ``items`` is the mean number of
    items per request; batch sizes below it are never proposed. ``calibration`` applies as
    :func:`calibrated` says.
    """
    lo, hi = bounds
    profile, factor = calibrated(profile, calibration, tun)
    best: Sizing | None = None
    batches = [b for b in _powers_of_two(max_batch) if b >= items] or [max_batch]
    configs = [(b, d) for b in batches for d in _delays(max_delay_us)]
    if prefer in configs:
        configs.remove(prefer)
        configs.insert(0, prefer)
    for b, d in configs:
        # However many replicas, a request still takes its own batch's time plus the queue
        # delay when the batch has room: skip settings that cannot fit at any count.
        floor = profile.latency_ms(items, "p95") * factor + (d / 1000.0 if b > items else 0.0)
        if floor > budget_ms:
            continue
        start = max(lo, 1 if rate > 0 else lo)
        offered = rate * max(items, 1.0) / profile.throughput_rps(b)  # busy replicas
        limit = max_utilisation(offered, tun)
        if rate > 0:
            start = max(start, math.ceil(offered / limit))
        top = hi if best is None else min(hi, best.replicas)

        def fits(c: int, b: int = b, d: int = d, limit: float = limit) -> Sizing:
            p95, util = predict(profile, rate, c, b, d, items, factor)
            ok = util <= limit and p95 <= budget_ms
            return Sizing(c, b, d, p95, util, ok)

        # The first few counts one by one (exact where it matters most), then bisection:
        # more replicas never raise the p95 by more than the queue delay.
        found = next(
            (z for c in range(start, min(top, start + 8) + 1) if (z := fits(c)).feasible), None
        )
        if found is None and start + 8 < top and fits(top).feasible:
            low, high = start + 9, top
            while low < high:
                mid = (low + high) // 2
                if fits(mid).feasible:
                    high = mid
                else:
                    low = mid + 1
            found = fits(low)
        if found is not None and (
            best is None or (found.replicas, found.p95_ms) < (best.replicas, best.p95_ms - 1e-9)
        ):
            best = found
    if best is not None:
        return best
    # Nothing fits the latency budget: the batch's own time is over it, so more replicas
    # would not help. Serve at the utilisation target with the fastest setting (the smallest
    # batch, no queue delay) rather than buy every replica allowed.
    b = batches[0]
    need = math.ceil(rate * max(items, 1.0) / (profile.throughput_rps(b) * tun.target_utilisation))
    c = min(hi, max(lo, need, 1 if rate > 0 else lo))
    p95, util = predict(profile, rate, c, b, 0, items, factor)
    return Sizing(c, b, 0, p95, util, False)


def stage_sizer(
    stage: ModelStage, budget_ms: float, calibration: float, tun: Tunables, items: float
) -> Callable[..., Sizing]:
    """``size_model_stage`` bound to the stage's bounds and batching limits:
    call it as ``size(profile, rate=..., prefer=...)``."""
    return partial(
        size_model_stage,
        budget_ms=budget_ms,
        calibration=calibration,
        bounds=(stage.replicas.min, stage.replicas.max),
        max_batch=stage.batching.max_batch_size,
        max_delay_us=stage.batching.max_queue_delay_microseconds,
        tun=tun,
        items=items,
    )


Option = tuple[float, Variant, Sizing]  # (cost per hour, variant, its sizing)


def variant_options(
    stage: ModelStage,
    profiles: Profiles,
    floor: float,
    size: Callable[..., Sizing],
    excluded: Collection[str] = (),
    prefer: tuple[str, tuple[int, int]] | None = None,
) -> list[Option]:
    """Every variant the stage may serve (profiled, at or above the quality ``floor``, not
    ``excluded``), sized by ``size(profile, prefer=...)``. ``prefer`` is (variant, its current
    batching), kept for that variant when it is as good."""
    out: list[Option] = []
    for v in stage.variants:
        prof = profiles.model(v.model)
        if prof is None or float(v.quality_value) < floor or v.name in excluded:
            continue
        s = size(prof, prefer=prefer[1] if prefer and prefer[0] == v.name else None)
        out.append((s.replicas * float(v.cost_value), v, s))
    return out


def cheapest(options: list[Option]) -> list[Option]:
    """The feasible options, cheapest first (then the higher quality)."""
    return sorted(
        (o for o in options if o[2].feasible), key=lambda o: (o[0], -float(o[1].quality_value))
    )


def stage_budgets(spec: ModelDeploymentSpec, snapshot: Snapshot, tun: Tunables) -> dict[str, float]:
    """Split the end-to-end SLO over the query-path stages by their measured p95 shares."""
    total = spec.slo.latency_p95_ms * tun.slo_headroom
    measured = {s: (snapshot.stages.get(s) or StageTelemetry()).p95_ms for s in QUERY_PATH}
    if all(v is not None and v > 0 for v in measured.values()):
        weights = {s: float(v or 0) for s, v in measured.items()}
    else:
        weights = {s: 1.0 for s in QUERY_PATH}
    norm = sum(weights.values())
    shares = {s: max(w / norm, tun.min_stage_share) for s, w in weights.items()}
    norm = sum(shares.values())
    return {s: total * shares[s] / norm for s in QUERY_PATH}


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


def _calibrate(
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


def _stabilize(
    name: str,
    current: int,
    desired: int,
    hist: StageHistory,
    now: int,
    spec: ModelDeploymentSpec,
    cooldown: int,
    reasons: list[str],
    remember: int | None = None,
) -> tuple[int, StageHistory]:
    """Scale up at once (bounded by maxScaleUpStep); scale down only to the highest
    recommendation over the stabilization window, outside the cooldown. ``remember`` is the
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
    if desired > current:
        new = min(desired, current + spec.optimizer.max_scale_up_step)
        reasons.append(f"{name}: scale up {current} -> {new} (needs {desired})")
        return new, hist
    if desired < current:
        ceiling = max(r for _, r in kept)
        if ceiling >= current:
            return current, hist
        if hist.last_change is not None and now - hist.last_change < cooldown:
            return current, hist
        reasons.append(
            f"{name}: scale down {current} -> {ceiling} (highest need over the last {window}s)"
        )
        return ceiling, hist
    return current, hist


def forecast(long: float, short: float | None, tun: Tunables) -> tuple[float, str | None]:
    """The request rate to size for, and why when it is above what was measured.

    Normally the long-window rate: a short window only a little above it is noise. A surge
    shows in the short window first; when it is more than ``forecast_deadband`` above the
    long one the load is climbing, and replicas ordered now serve only after
    ``forecast_lead_s``, so size for the rate the climb reaches by then (linear from the two
    windows' midpoints), bounded by ``forecast_max_ratio``."""
    if short is None or short <= long * (1 + tun.forecast_deadband):
        return long, None
    long_w, short_w = RATE_WINDOW_S, SHORT_RATE_WINDOW_S
    slope = (short - long) / ((long_w - short_w) / 2)  # requests/s per second
    ahead = min(short + slope * (short_w / 2 + tun.forecast_lead_s), short * tun.forecast_max_ratio)
    why = (
        f"rate climbing {slope:.2f}/s ({short_w}s {short:.1f} vs {long_w}s {long:.1f} "
        f"requests/s): sized for {ahead:.1f} requests/s, the rate in {tun.forecast_lead_s:.0f}s"
    )
    return ahead, why


@dataclass
class _Tick:
    """One decide() call's inputs and what its stage steps gather."""

    spec: ModelDeploymentSpec
    snapshot: Snapshot
    profiles: Profiles
    tun: Tunables
    t: int
    budgets: dict[str, float]
    cooldown: int
    floor: float
    rules: Verification
    gated: bool  # variant switches wait for a verification
    reasons: list[str] = field(default_factory=list)
    verifications: list[tuple[str, str, str]] = field(default_factory=list)
    excluded: dict[str, set[str]] = field(default_factory=dict)  # rejected candidates
    short: list[str] = field(default_factory=list)  # stages that cannot meet their budget
    held: list[str] = field(default_factory=list)
    chosen_variants: dict[str, Variant] = field(default_factory=dict)
    sizings: dict[str, Sizing] = field(default_factory=dict)
    slo_ok: bool = True


def decide(
    spec: ModelDeploymentSpec,
    plan: Plan,
    snapshot: Snapshot | None,
    history: History,
    profiles: Profiles,
    now: float,
    tun: Tunables | None = None,
) -> Decision:
    """Decide the next plan. See the module docstring for the model and the guarantees."""
    tun = tun or Tunables()
    t = int(now)
    if spec.optimizer.mode == OptimizerMode.OFF:
        return Decision(plan, ("optimizer mode is Off",), history, hold="optimizer is Off")
    max_age = max(tun.min_metric_age_s, 3.0 * spec.optimizer.interval_seconds)
    stale = "no telemetry snapshot" if snapshot is None else snapshot.stale(now, max_age)
    if stale or snapshot is None:
        return Decision(plan, (f"holding every stage: {stale}",), history, hold=stale)

    rules = spec.optimizer.verification
    ctx = _Tick(
        spec=spec,
        snapshot=snapshot,
        profiles=profiles,
        tun=tun,
        t=t,
        budgets=stage_budgets(spec, snapshot, tun),
        cooldown=2 * spec.optimizer.interval_seconds,
        floor=float(spec.slo.min_quality_value),
        rules=rules,
        gated=spec.optimizer.mode == OptimizerMode.AUTO and rules.enabled,
    )
    reasons, held, verifications = ctx.reasons, ctx.held, ctx.verifications
    budgets, gated = ctx.budgets, ctx.gated
    new_plan: Plan = dict(plan)
    new_hist: dict[str, StageHistory] = dict(history.stages)

    for name in STAGES:
        stage = spec.stage(name)
        cur = plan[name]
        tele = snapshot.stages.get(name) or StageTelemetry()
        hist = history.stage(name)
        hist = replace(hist, rejected=tuple(r for r in hist.rejected if r[1] > t))
        if tele.rate_rps is None:
            reasons.append(f"{name}: hold, no request rate")
            held.append(name)
            if gated and isinstance(stage, ModelStage) and cur.shadow_variant is not None:
                # Sizing holds, but a verification still ends once it cannot finish.
                still, _, hist = _verify(
                    name,
                    stage,
                    cur,
                    hist,
                    snapshot,
                    budgets[name],
                    None,
                    _samples_per_request(name, tele),
                    t,
                    rules,
                    reasons,
                    verifications,
                )
                new_plan[name] = replace(cur, shadow_variant=still)
                new_hist[name] = hist
            continue
        rate, trend = forecast(tele.rate_rps, tele.rate_short_rps, tun)
        if trend:
            reasons.append(f"{name}: {trend}")
        measured = tele.rate_short_rps or 0.0  # a forecast's base: read only when trending
        if isinstance(stage, ModelStage):
            step = _model_stage(ctx, name, stage, cur, tele, hist, rate, trend, measured)
        else:
            step = _service_stage(ctx, name, stage, cur, hist, rate, trend, measured)
        if step is None:
            continue
        new_plan[name], hist = step
        if new_plan[name] != cur:
            hist = replace(hist, last_change=t)
        new_hist[name] = hist

    cost = sum(new_plan[s].replicas * float(v.cost_value) for s, v in ctx.chosen_variants.items())
    budget_note = None
    if spec.slo.max_cost_per_hour_value is not None:
        limit = float(spec.slo.max_cost_per_hour_value)
        new_plan, cost, budget_note = _enforce_budget(
            spec, new_plan, cost, limit, reasons, ctx.excluded
        )
        if budget_note:
            ctx.slo_ok = False
    # A switch to the candidate by another path (the budget, a failed quality floor) ends
    # its verification: the shadow and its start time go together.
    for name in MODEL_STAGES:
        if new_plan[name].shadow_variant is not None and (
            new_plan[name].shadow_variant == new_plan[name].variant
        ):
            new_plan[name] = replace(new_plan[name], shadow_variant=None)
            new_hist[name] = replace(new_hist.get(name, StageHistory()), verification_started=None)
    changed = tuple(s for s in STAGES if new_plan[s] != plan[s])
    for name in changed:
        new_hist[name] = replace(new_hist.get(name, StageHistory()), last_change=t)
    e2e, slo = snapshot.e2e_p95_ms, spec.slo.latency_p95_ms
    measured_ok = e2e is None or e2e <= slo
    if not measured_ok and ctx.slo_ok:
        reasons.append(
            f"measured p95 {e2e:.0f} ms is over the {slo} ms SLO although every stage is "
            f"predicted within its budget"
        )
    if not reasons:
        reasons.append("every stage fits its latency budget at the current settings")
    return Decision(
        new_plan,
        tuple(reasons),
        History(new_hist),
        changed=changed,
        budget_limited=budget_note,
        slo_met=ctx.slo_ok and measured_ok,
        cost_per_hour=cost,
        verifications=tuple(verifications),
        short=tuple(ctx.short),
        held=tuple(held),
    )


def _samples_per_request(stage: str, tele: StageTelemetry) -> float:
    """What one mirrored request gives the gate: the embedding stage records a cosine per
    text (Triton item), the re-ranker one top-k overlap per query (request)."""
    return (tele.items_per_request or 1.0) if stage == "embedding" else 1.0


def _model_stage(
    ctx: _Tick,
    name: str,
    stage: ModelStage,
    cur: StagePlan,
    tele: StageTelemetry,
    hist: StageHistory,
    rate: float,
    trend: str | None,
    measured: float,
) -> tuple[StagePlan, StageHistory] | None:
    """A model stage's next plan: calibrate, verify a candidate, choose the variant and its
    batching, size and stabilize the replicas. None: hold the stage as it is."""
    spec, snapshot, profiles, tun, t = ctx.spec, ctx.snapshot, ctx.profiles, ctx.tun, ctx.t
    reasons, short, held = ctx.reasons, ctx.short, ctx.held
    budgets, rules, gated, floor = ctx.budgets, ctx.rules, ctx.gated, ctx.floor
    verifications, excluded, cooldown = ctx.verifications, ctx.excluded, ctx.cooldown
    per_sample = _samples_per_request(name, tele)
    budget = budgets[name]
    cur_var = stage.variant(cur.variant or "")
    cur_prof = profiles.model(cur_var.model) if cur_var else None
    if cur_var is None or cur_prof is None:
        reasons.append(f"{name}: hold, no profile for variant {cur.variant}")
        held.append(name)
        return None
    items = tele.items_per_request or 1.0
    calib_pm = _learn(cur, cur_prof, tele, hist, rate, budget, t, tun)
    calib = calib_pm / 1000
    shadow: str | None = None
    verdict: Verdict | None = None
    if gated:
        shadow, verdict, hist = _verify(
            name,
            stage,
            cur,
            hist,
            snapshot,
            budget,
            tele.rate_rps,
            per_sample,
            t,
            rules,
            reasons,
            verifications,
        )
    excluded[name] = hist.rejected_at(t) - {cur.variant or ""}
    size = stage_sizer(stage, budget, calib, tun, items)
    batching = (cur.max_batch_size or 1, cur.max_queue_delay_us or 0)
    options = variant_options(
        stage,
        profiles,
        floor,
        partial(size, rate=rate),
        excluded[name],
        (cur.variant or "", batching),
    )
    feasible = cheapest(options)
    current = next((o for o in options if o[1].name == cur.variant), None)
    pick = (
        feasible[0]
        if feasible
        else max(options, key=lambda o: (o[2].utilisation <= 1, -o[2].p95_ms))
    )
    recently = hist.last_change is not None and t - hist.last_change < cooldown
    if (
        current is not None
        and current[2].feasible
        and pick is not current
        and (recently or pick[0] > current[0] * (1 - tun.switch_saving))
    ):
        pick = current  # not worth a switch (or too soon after the last change)
    if verdict is not None and verdict.action == "promote":
        promoted = next((o for o in options if o[1].name == cur.shadow_variant), None)
        if promoted is not None:
            pick = promoted
            why = f"{name}: {cur.shadow_variant} promoted after verification: "
            verifications.append((name, "promoted", why + verdict.reason))
            reasons.append(why + verdict.reason)
    elif verdict is not None and verdict.action == "wait" and current is not None:
        pick = current  # sized as usual: replicas and batching do not wait for it
    elif (
        gated
        and shadow is None
        and current is not None
        and pick is not current
        and (blocked := unverifiable(rules, tele.rate_rps, per_sample))
    ):
        reasons.append(
            f"{name}: staying on {cur.variant}: {pick[1].name} would cost/h "
            f"{pick[0]:.2f} vs {current[0]:.2f} but cannot be verified now: {blocked}"
        )
        pick = current
    elif gated and shadow is None and current is not None and pick is not current:
        # A better variant: verify it on mirrored traffic before it serves anyone.
        shadow = pick[1].name
        hist = replace(hist, verification_started=t)
        why = (
            f"{name}: verifying {shadow} on {rules.sample_ratio_value:g} of live "
            f"traffic before switching from {cur.variant} (cost/h {pick[0]:.2f} vs "
            f"{current[0]:.2f}, predicted p95 {pick[2].p95_ms:.0f} ms, budget "
            f"{budget:.0f} ms)"
        )
        verifications.append((name, "started", why))
        reasons.append(why)
        pick = current
    cost, variant, sizing = pick
    if not sizing.feasible:
        ctx.slo_ok = False
        short.append(name)
        reasons.append(
            f"{name}: even {sizing.replicas} replicas of {variant.name} "
            f"predict p95 {sizing.p95_ms:.0f} ms over its {budget:.0f} ms"
        )
    if variant.name != cur.variant:
        reasons.append(
            f"{name}: switch variant {cur.variant} -> {variant.name} "
            f"(cost/h {cost:.2f}, predicted p95 {sizing.p95_ms:.0f} ms "
            f"<= {budget:.0f} ms)"
        )
    if (sizing.max_batch_size, sizing.max_queue_delay_us) != (
        cur.max_batch_size,
        cur.max_queue_delay_us,
    ):
        reasons.append(
            f"{name}: batching max {cur.max_batch_size} -> "
            f"{sizing.max_batch_size}, delay {cur.max_queue_delay_us} -> "
            f"{sizing.max_queue_delay_us} us"
        )
    remember = None
    if trend and (prof := profiles.model(variant.model)) is not None:
        # The stabilization window holds what the measured rate needs: the forecast
        # buys replicas ahead of a climb, not for the next five minutes.
        kept = (sizing.max_batch_size, sizing.max_queue_delay_us)
        remember = size(prof, rate=measured, prefer=kept).replicas
    replicas, hist = _stabilize(
        name, cur.replicas, sizing.replicas, hist, t, spec, cooldown, reasons, remember
    )
    hist = replace(hist, calibration_permille=calib_pm)
    ctx.chosen_variants[name] = variant
    ctx.sizings[name] = sizing
    return (
        StagePlan(replicas, variant.name, sizing.max_batch_size, sizing.max_queue_delay_us, shadow),
        hist,
    )


def _learn(
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
    if hist.last_change is not None and t - hist.last_change < 60:
        return calib_pm
    delay_us = cur.max_queue_delay_us or 0
    model, factor = calibrated(prof, calib_pm / 1000, tun)
    items = tele.items_per_request or 1.0
    p95, util = predict(
        model, rate, max(cur.replicas, 1), cur.max_batch_size or 1, delay_us, items, factor
    )
    headroom = measured_headroom(tele, delay_us / 1000, budget, tun)
    return _calibrate(calib_pm, tele.p95_ms, (p95, util), headroom, tun)


def _service_stage(
    ctx: _Tick,
    name: str,
    stage: Stage,
    cur: StagePlan,
    hist: StageHistory,
    rate: float,
    trend: str | None,
    measured: float,
) -> tuple[StagePlan, StageHistory] | None:
    """A model-free stage's replicas from its measured capacity. None: no profile, hold."""
    spec, profiles, tun, t = ctx.spec, ctx.profiles, ctx.tun, ctx.t
    reasons, short = ctx.reasons, ctx.short
    cooldown = ctx.cooldown
    bounds = (stage.replicas.min, stage.replicas.max)
    svc = profiles.services.get(name)
    if svc is None:
        reasons.append(f"{name}: hold, no capacity profile")
        return None

    def replicas_for(r: float, cap: float = svc.capacity_rps) -> int:
        return math.ceil(r / (cap * tun.target_utilisation)) if r else 0

    need = replicas_for(rate)
    desired = min(max(need, bounds[0]), bounds[1])
    if need > bounds[1]:
        ctx.slo_ok = False
        short.append(name)
        reasons.append(f"{name}: needs {need} replicas, capped at max {bounds[1]}")
    remember = min(max(replicas_for(measured), bounds[0]), bounds[1]) if trend else None
    replicas, hist = _stabilize(
        name, cur.replicas, desired, hist, t, spec, cooldown, reasons, remember
    )
    return replace(cur, replicas=replicas), hist


def _verify(
    name: str,
    stage: ModelStage,
    cur: StagePlan,
    hist: StageHistory,
    snapshot: Snapshot,
    budget: float,
    rate: float | None,
    per_sample: float,
    t: int,
    rules: Verification,
    reasons: list[str],
    verifications: list[tuple[str, str, str]],
) -> tuple[str | None, Verdict | None, StageHistory]:
    """Judge the stage's running verification, if any: (the candidate still in shadow, the
    verdict, the history). A rejection is recorded, not retried for ``retryAfterSeconds``;
    a wait says how far it got and why."""
    shadow = cur.shadow_variant
    if shadow is None or (cand := stage.variant(shadow)) is None:
        return shadow, None, hist
    started = hist.verification_started if hist.verification_started is not None else t
    stats = snapshot.shadow.get((name, cand.model))
    verdict = judge(rules, stats, budget, started, t, rate, per_sample)
    if verdict.action == "wait":
        reasons.append(
            f"{name}: verifying {shadow} on shadow traffic before switching from "
            f"{cur.variant}: {verdict.reason}"
        )
        # A verification restored without its start time starts counting now, so it still ends.
        return shadow, verdict, replace(hist, verification_started=started)
    if verdict.action == "reject":
        why = (
            f"{name}: {shadow} rejected after verification: {verdict.reason}; "
            f"not tried again for {rules.retry_after_seconds} s"
        )
        until = t + rules.retry_after_seconds
        hist = replace(hist, rejected=(*hist.rejected, (shadow, until, why)))
        verifications.append((name, "rejected", why))
        reasons.append(why)
    return None, verdict, replace(hist, verification_started=None)


def _enforce_budget(
    spec: ModelDeploymentSpec,
    plan: Plan,
    cost: float,
    limit: float,
    reasons: list[str],
    excluded: Mapping[str, set[str]],
) -> tuple[Plan, float, str | None]:
    """Degrade toward cheaper variants, then fewer replicas, until the plan fits ``limit``.

    The budget is a hard limit: these switches do not wait for verification, but never go
    to a variant that failed it (``excluded``)."""
    if cost <= limit:
        return plan, cost, None
    plan = dict(plan)
    floor = float(spec.slo.min_quality_value)

    def total() -> float:
        out = 0.0
        for s in MODEL_STAGES:
            v = spec.stage(s).variant(plan[s].variant or "")  # type: ignore[attr-defined]
            out += plan[s].replicas * float(v.cost_value) if v else 0.0
        return out

    for s in MODEL_STAGES:
        stage = spec.stage(s)
        assert isinstance(stage, ModelStage)
        cheaper = sorted(
            (
                v
                for v in stage.variants
                if float(v.quality_value) >= floor and v.name not in excluded.get(s, set())
            ),
            key=lambda v: v.cost_value,
        )
        if cheaper and cheaper[0].name != plan[s].variant and total() > limit:
            reasons.append(f"{s}: budget forces the cheapest allowed variant {cheaper[0].name}")
            plan[s] = replace(plan[s], variant=cheaper[0].name)
    while total() > limit:
        # Shed a replica from the stage whose replica costs the most, never below min.
        costs = []
        for s in MODEL_STAGES:
            stage = spec.stage(s)
            assert isinstance(stage, ModelStage)
            v = stage.variant(plan[s].variant or "")
            if v and plan[s].replicas > max(stage.replicas.min, 1):
                costs.append((float(v.cost_value), s))
        if not costs:
            break
        _, s = max(costs)
        plan[s] = replace(plan[s], replicas=plan[s].replicas - 1)
        reasons.append(f"{s}: budget caps replicas at {plan[s].replicas}")
    note = f"cost/h {cost:.2f} would exceed maxCostPerHour {limit:g}: degraded to {total():.2f}"
    return plan, total(), note
