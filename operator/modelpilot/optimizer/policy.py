"""The optimizer: a pure, deterministic function from what is known to what to run.

``decide(spec, plan, snapshot, history, profiles, now)`` returns a :class:`Decision`: the
next plan (replicas, variant, batching per stage), the reasons a human can read, and the
history to carry to the next call. No I/O, no clock: the same code runs in the operator and
in the trace-replay simulator.

A decision is a short pipeline of pure steps, each in its own module:

- per stage, the rate to size for (:mod:`.forecast`: the measured rate, or ahead of a climb;
  :mod:`.seasonal`: ahead of what followed this moment a season ago)
  and how bursty its arrivals are (their measured index of dispersion, :mod:`.sizing`);
- a model stage's calibration against Triton's measured batch times and its measured p95
  (:mod:`.calibration`);
- the running verification, if any, judged (:mod:`.verification`);
- every allowed variant sized (:mod:`.sizing`, the queueing model) and the one to serve
  chosen (:mod:`.variants`); a switch waits for its verification (:mod:`.verification`);
- replicas stabilized (:mod:`.stabilize`: up at once, down only after a window);
- the gateway's small share and cache threshold tuned under the quality floor
  (:mod:`.gateway`);
- the whole plan held to the cost budget (:mod:`.budget`).

Stability. Scale-up is immediate (bounded by ``maxScaleUpStep``); scale-down goes only to the
highest recommendation over the stabilization window and not within a cooldown of the last
change; batching and variant change only when the current choice stops fitting or a
candidate is markedly cheaper. A stationary load therefore settles and stays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial

from modelpilot.api.v1alpha1 import (
    STAGES,
    InferenceStage,
    ModelDeploymentSpec,
    ModelStage,
    OptimizerMode,
    Stage,
    Variant,
    Verification,
)
from modelpilot.contract import MODEL_STAGES
from modelpilot.optimizer.budget import enforce_budget
from modelpilot.optimizer.calibration import batch_time_permille, learn
from modelpilot.optimizer.forecast import burst_headroom, forecast
from modelpilot.optimizer.gateway import KnobStep, Measured, tune_cache, tune_routing
from modelpilot.optimizer.history import History, StageHistory
from modelpilot.optimizer.profiles import Profiles, routed
from modelpilot.optimizer.quality import Quality, assess
from modelpilot.optimizer.seasonal import seasonal_forecast
from modelpilot.optimizer.sizing import Sizing, burst_factor, stage_budgets, stage_sizer
from modelpilot.optimizer.snapshot import BURST_WINDOW_S, Snapshot, StageTelemetry, dispersion
from modelpilot.optimizer.stabilize import stabilize
from modelpilot.optimizer.tunables import Tunables
from modelpilot.optimizer.variants import choose, variant_options
from modelpilot.optimizer.verification import Gated, Progress, gate_switch, progress
from modelpilot.render.plan import Plan, StagePlan


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
    quality: Mapping[str, Mapping[str, Quality]] = field(default_factory=dict)  # stage -> variant
    gateway: Mapping[str, Measured] = field(default_factory=dict)  # "routing" | "cache"

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
    quality: dict[str, dict[str, Quality]]  # model stage -> variant -> its assessed quality
    rules: Verification
    gated: bool  # variant switches wait for a verification
    unavailable: Mapping[str, frozenset[str]]  # stage -> variants whose model does not load
    reasons: list[str] = field(default_factory=list)
    verifications: list[tuple[str, str, str]] = field(default_factory=list)
    excluded: dict[str, set[str]] = field(default_factory=dict)  # rejected candidates
    short: list[str] = field(default_factory=list)  # stages that cannot meet their budget
    held: list[str] = field(default_factory=list)
    chosen_variants: dict[str, Variant] = field(default_factory=dict)
    sizings: dict[str, Sizing] = field(default_factory=dict)
    slo_ok: bool = True

    def judge_running(
        self, name: str, stage: ModelStage, cur: StagePlan, hist: StageHistory, tele: StageTelemetry
    ) -> Progress:
        """The stage's running verification judged (``verification.progress``), its reason
        and event kept."""
        per_sample = _samples_per_request(name, tele)
        running = progress(
            name,
            stage,
            cur,
            hist,
            self.snapshot,
            self.budgets[name],
            tele.rate_rps,
            per_sample,
            self.t,
            self.rules,
            self.tun,
            self.floor,
        )
        self.note(name, running)
        return running

    def note(self, stage: str, step: Progress | Gated) -> None:
        """Keep a step's reason and verification event."""
        if step.reason:
            self.reasons.append(step.reason)
        if step.event:
            self.verifications.append((stage, *step.event))


def decide(
    spec: ModelDeploymentSpec,
    plan: Plan,
    snapshot: Snapshot | None,
    history: History,
    profiles: Profiles,
    now: float,
    tun: Tunables | None = None,
    unavailable: Mapping[str, frozenset[str]] | None = None,
) -> Decision:
    """Decide the next plan. See the module docstring for the model and the guarantees.
    ``unavailable``: per stage, the variants whose model a load check found not loading
    (never chosen nor verified)."""
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
        cooldown=tun.cooldown_intervals * spec.optimizer.interval_seconds,
        floor=float(spec.slo.min_quality_value),
        quality={s: assess(s, spec.model_stage(s), profiles, tun) for s in MODEL_STAGES},
        rules=rules,
        gated=spec.optimizer.mode == OptimizerMode.AUTO and rules.enabled,
        unavailable=unavailable or {},
    )
    reasons = ctx.reasons
    new_plan: Plan = dict(plan)
    new_hist: dict[str, StageHistory] = dict(history.stages)

    for name in STAGES:
        stage = spec.stage(name)
        cur = plan[name]
        tele = snapshot.stages.get(name) or StageTelemetry()
        hist = history.stage(name)
        hist = replace(hist, rejected=tuple(r for r in hist.rejected if r[1] > t))
        if tele.rate_rps is None:
            if (held := _unmeasured_stage(ctx, name, stage, cur, tele, hist)) is not None:
                new_plan[name], new_hist[name] = held
            continue
        burst = dispersion(tele)
        rate, trend = forecast(tele.rate_rps, tele.rate_short_rps, tun, burst)
        if trend:
            reasons.append(f"{name}: {trend}")
        else:
            rate, headroom = burst_headroom(tele.rate_rps, burst, tun)
            if headroom:
                reasons.append(f"{name}: {headroom}")
        horizon = tun.forecast_lead_s + spec.optimizer.interval_seconds
        if (
            tele.rate_history is not None
            and (season := seasonal_forecast(tele.rate_history, horizon, tun))
            and season.rate > rate
        ):
            rate, trend = season.rate, season.reason
            reasons.append(f"{name}: {season.reason}")
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

    gateway: dict[str, Measured] = {}
    if isinstance(inference := spec.stage("inference"), InferenceStage):
        new_plan["inference"] = _gateway(ctx, inference, new_plan["inference"], gateway)
    cost = sum(new_plan[s].replicas * float(v.cost_value) for s, v in ctx.chosen_variants.items())
    budget_note = None
    if spec.slo.max_cost_per_hour_value is not None:
        limit = float(spec.slo.max_cost_per_hour_value)
        values = {s: {v: q.value for v, q in by.items()} for s, by in ctx.quality.items()}
        new_plan, cost, budget_note = enforce_budget(
            spec, new_plan, cost, limit, reasons, ctx.excluded, values
        )
        if budget_note:
            ctx.slo_ok = False
    _end_displaced_verifications(new_plan, new_hist)
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
        verifications=tuple(ctx.verifications),
        short=tuple(ctx.short),
        held=tuple(ctx.held),
        quality=ctx.quality,
        gateway=gateway,
    )


def _unmeasured_stage(
    ctx: _Tick, name: str, stage: Stage, cur: StagePlan, tele: StageTelemetry, hist: StageHistory
) -> tuple[StagePlan, StageHistory] | None:
    """A stage with no request rate holds its size; a verification on it still ends once it
    cannot finish. None: nothing of the stage changes."""
    ctx.reasons.append(f"{name}: hold, no request rate")
    ctx.held.append(name)
    if not (ctx.gated and isinstance(stage, ModelStage) and cur.shadow_variant is not None):
        return None
    running = ctx.judge_running(name, stage, cur, hist, tele)
    return replace(cur, shadow_variant=running.shadow), running.history


def _gateway(
    ctx: _Tick, stage: InferenceStage, cur: StagePlan, measured: dict[str, Measured]
) -> StagePlan:
    """The gateway's small share and cache threshold (:mod:`.gateway`), their reasons kept
    and their measurements put in ``measured``."""
    large = stage.variant(stage.routing.large_variant or "")
    assessed = ctx.quality["inference"].get(large.name) if large else None
    if cur.small_share is None:
        # Off, or paused by the plan (plans.resume) while a routed variant does not load.
        routing = KnobStep(None)
    else:
        routing = tune_routing(
            stage.routing,
            cur.small_share,
            ctx.snapshot.routing,
            ctx.floor,
            assessed.value if assessed else 1.0,
            ctx.tun,
        )
    cache = tune_cache(
        stage.semantic_cache, cur.cache_threshold, ctx.snapshot.cache, ctx.floor, ctx.tun
    )
    for name, step in (("routing", routing), ("cache", cache)):
        if step.reason:
            ctx.reasons.append(step.reason)
        if step.measured:
            measured[name] = step.measured
    return replace(cur, small_share=routing.value, cache_threshold=cache.value)


def _end_displaced_verifications(plan: Plan, history: dict[str, StageHistory]) -> None:
    """A switch to the candidate by another path (the budget, a failed quality floor) ends
    its verification: the shadow and its start time go together."""
    for name in MODEL_STAGES:
        if plan[name].shadow_variant is not None and (
            plan[name].shadow_variant == plan[name].variant
        ):
            plan[name] = replace(plan[name], shadow_variant=None)
            history[name] = replace(history.get(name, StageHistory()), verification_started=None)


def _samples_per_request(stage: str, tele: StageTelemetry) -> float:
    """What one mirrored request gives the gate: the embedding stage records a recall per
    text (Triton item, once its pods' ring of recent texts is warm), the re-ranker one top-3
    overlap per query (request)."""
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
    """A model stage's next plan: calibrate, judge a running verification, size every
    variant, choose one (a switch waits for its verification), stabilize the replicas.
    None: hold the stage as it is."""
    profiles = _serving_profiles(ctx.profiles, stage, cur)
    tun, t, reasons = ctx.tun, ctx.t, ctx.reasons
    budget = ctx.budgets[name]
    cur_var = stage.variant(cur.variant or "")
    cur_prof = profiles.model(cur_var.model) if cur_var else None
    if cur_var is None or cur_prof is None:
        reasons.append(f"{name}: hold, no profile for variant {cur.variant}")
        ctx.held.append(name)
        return None
    batch_pm = batch_time_permille(cur, cur_prof, tele, hist, t, tun)
    hist = replace(hist, batch_time_permille=batch_pm)
    if batch_pm != 1000:
        # The stage's node runs every variant's batches that much slower or faster.
        batch_time = batch_pm / 1000
        models = {v.model for v in stage.variants}
        profiles = replace(
            profiles,
            models={
                m: p.scaled(batch_time) if m in models else p for m, p in profiles.models.items()
            },
        )
        cur_prof = cur_prof.scaled(batch_time)
        seen = (
            f"Triton computes a {tele.batch_size:.1f}-item batch in {tele.exec_ms:.1f} ms"
            if tele.exec_ms and tele.batch_size
            else "as last measured"
        )
        reasons.append(
            f"{name}: batches run {batch_time:.2f}x the profile's time ({seen}): sized with "
            f"the profile scaled so"
        )
    per_sample = _samples_per_request(name, tele)
    calib_pm = learn(cur, cur_prof, tele, hist, rate, budget, t, tun)
    running = Progress(cur.shadow_variant, None, hist)
    if ctx.gated:
        running = ctx.judge_running(name, stage, cur, hist, tele)
        hist = running.history
    ctx.excluded[name] = hist.rejected_at(t) - {cur.variant or ""}
    if missing := ctx.unavailable.get(name, frozenset()) - {cur.variant or ""}:
        ctx.excluded[name] |= missing
        reasons.append(f"{name}: not using {', '.join(sorted(missing))}: model does not load")
    if isinstance(stage, InferenceStage) and cur.small_share is not None:
        # Routing: the large variant's replicas serve both routes (sized for the mix below).
        large = stage.routing.large_variant
        ctx.excluded[name] |= {v.name for v in stage.variants if v.name != large}
    burst = dispersion(tele)
    size = stage_sizer(
        stage,
        budget,
        calib_pm / 1000,
        tun,
        tele.items_per_request or 1.0,
        hist.batch_ceilings(t),
        burst,
    )
    if burst >= tun.bursty_dispersion:
        reasons.append(
            f"{name}: arrivals bursty (per-second counts vary {burst:.1f}x a Poisson "
            f"stream's over {BURST_WINDOW_S}s): queueing waits sized x{burst_factor(burst):.1f}"
        )
    batching = (cur.max_batch_size or 1, cur.max_queue_delay_us or 0, cur.instances or 1)
    options = variant_options(
        stage,
        profiles,
        ctx.floor,
        partial(size, rate=rate),
        ctx.excluded[name],
        (cur.variant or "", batching),
        {v: q.value for v, q in ctx.quality[name].items()},
    )
    if not options:
        reasons.append(f"{name}: hold, no profiled variant at or above minQuality {ctx.floor:g}")
        ctx.held.append(name)
        return None
    recently = hist.last_change is not None and t - hist.last_change < ctx.cooldown
    pick, current = choose(options, cur.variant, recently, tun)
    gated = gate_switch(
        name,
        pick,
        current,
        options,
        running,
        cur.variant,
        ctx.rules,
        ctx.gated,
        tele.rate_rps,
        per_sample,
        budget,
    )
    ctx.note(name, gated)
    if gated.started:
        hist = replace(hist, verification_started=t)
    cost, variant, sizing, _ = gated.pick
    _explain(ctx, name, cur, cost, variant, sizing, budget)
    remember = None
    if trend and (prof := profiles.model(variant.model)) is not None:
        # The stabilization window holds what the measured rate needs: the forecast
        # buys replicas ahead of a climb, not for the next five minutes.
        remember = size(prof, rate=measured, prefer=sizing.setting).replicas
    replicas, hist = stabilize(
        name,
        cur.replicas,
        sizing.replicas,
        hist,
        t,
        ctx.spec,
        ctx.cooldown,
        reasons,
        remember,
        tun.scale_tolerance,
    )
    hist = replace(hist, calibration_permille=calib_pm)
    if variant.name == cur.variant:
        hist = _back_off(name, cur, sizing, tele, budget, hist, t, tun, reasons)
    ctx.chosen_variants[name] = variant
    ctx.sizings[name] = sizing
    plan = replace(
        cur,  # what this step does not decide (the gateway's knobs) carries over
        replicas=replicas,
        variant=variant.name,
        max_batch_size=sizing.max_batch_size,
        max_queue_delay_us=sizing.max_queue_delay_us,
        instances=sizing.instances,
        shadow_variant=gated.shadow,
    )
    return plan, hist


def _back_off(
    name: str,
    cur: StagePlan,
    sizing: Sizing,
    tele: StageTelemetry,
    budget: float,
    hist: StageHistory,
    t: int,
    tun: Tunables,
    reasons: list[str],
) -> StageHistory:
    """Retreating to a smaller batch that the model says fits, while the stage measures
    over its budget: the server disagrees with the profile's batch curve, so the batch it
    leaves (and larger ones, at that instance count) is backed off for a while, and the
    tuner does not climb back at the next tick its model predicts it fits. A retreat
    because nothing fits (an overload) is no evidence against the batch."""
    batch, k = cur.max_batch_size or 1, cur.instances or 1
    active = hist.backoff_at(t)
    over = tele.p95_ms is not None and tele.p95_ms > budget
    if sizing.max_batch_size >= batch or not sizing.feasible or not over:
        return hist if active == hist.backoff else replace(hist, backoff=active)
    until = t + tun.batching_backoff_s
    kept = tuple(b for b in active if b[:2] != (k, batch))
    reasons.append(
        f"{name}: batch {batch} measured p95 {tele.p95_ms or 0:.0f} ms over its {budget:.0f} ms: "
        f"no batch of {batch} or more at {k} instance(s) for {tun.batching_backoff_s} s"
    )
    return replace(hist, backoff=(*kept, (k, batch, until)))


def _serving_profiles(profiles: Profiles, stage: ModelStage, cur: StagePlan) -> Profiles:
    """The profiles a stage is sized with: a gateway that routes a small share has the large
    variant's replicas serve that share with the small model (``profiles.routed``)."""
    if not isinstance(stage, InferenceStage) or not cur.small_share:
        return profiles
    small = stage.variant(stage.routing.small_variant or "")
    large = stage.variant(stage.routing.large_variant or "")
    if small is None or large is None or small.model == large.model:
        return profiles
    small_prof, large_prof = profiles.model(small.model), profiles.model(large.model)
    if small_prof is None or large_prof is None:
        return profiles
    return profiles.replacing(routed(small_prof, large_prof, cur.small_share))


def _explain(
    ctx: _Tick,
    name: str,
    cur: StagePlan,
    cost: float,
    variant: Variant,
    sizing: Sizing,
    budget: float,
) -> None:
    """The reasons for what the chosen option changes, and a stage it leaves short."""
    if not sizing.feasible:
        ctx.slo_ok = False
        ctx.short.append(name)
        over = (
            f"p95 {sizing.p95_ms:.0f} ms over its {budget:.0f} ms"
            if sizing.p95_ms > budget
            else f"utilisation {sizing.utilisation:.0%}, over the target"
        )
        ctx.reasons.append(
            f"{name}: even {sizing.replicas} replicas of {variant.name} predict {over}"
        )
    if variant.name != cur.variant:
        ctx.reasons.append(
            f"{name}: switch variant {cur.variant} -> {variant.name} "
            f"(cost/h {cost:.2f}, predicted p95 {sizing.p95_ms:.0f} ms "
            f"<= {budget:.0f} ms)"
        )
    if (sizing.max_batch_size, sizing.max_queue_delay_us) != (
        cur.max_batch_size,
        cur.max_queue_delay_us,
    ):
        ctx.reasons.append(
            f"{name}: batching max {cur.max_batch_size} -> "
            f"{sizing.max_batch_size}, delay {cur.max_queue_delay_us} -> "
            f"{sizing.max_queue_delay_us} us"
        )
    if sizing.instances != (cur.instances or 1):
        ctx.reasons.append(
            f"{name}: model instances per replica {cur.instances or 1} -> {sizing.instances}"
        )


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
    replicas, hist = stabilize(
        name, cur.replicas, desired, hist, t, spec, cooldown, reasons, remember,
        tun.scale_tolerance,
    )  # fmt: skip
    return replace(cur, replicas=replicas), hist
