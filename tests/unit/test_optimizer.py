"""The optimizer's policy pieces, table-driven, with time sequences on a fake clock."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from modelpilot.api.v1alpha1 import ModelDeploymentSpec, StageHistoryStatus
from modelpilot.optimizer import calibration, queueing
from modelpilot.optimizer.forecast import burst_headroom, forecast
from modelpilot.optimizer.history import History, StageHistory
from modelpilot.optimizer.policy import Decision, decide
from modelpilot.optimizer.profiles import Profiles, parse
from modelpilot.optimizer.seasonal import seasonal_forecast
from modelpilot.optimizer.sizing import burst_factor, calibrated, max_utilisation, predict
from modelpilot.optimizer.snapshot import (
    HISTORY_AHEAD_S,
    HISTORY_LOOKBACK_S,
    HISTORY_STEP_S,
    RateHistory,
    SeasonWindow,
    Snapshot,
    StageTelemetry,
)
from modelpilot.optimizer.tunables import Tunables
from modelpilot.render import plan as plans
from tests.unit.optimizer_cases import PROFILE_DOC, PROFILES, SPEC_DOC, make_spec, snap

pytestmark = pytest.mark.unit


def run(
    spec: ModelDeploymentSpec,
    rates: Sequence[float],
    start: plans.Plan | None = None,
    step: int = 15,
) -> list[Decision]:
    """Feed a rate per tick through decide(), carrying plan and history like the operator."""
    plan, history, out = start or plans.initial(spec), History(), []
    for i, rate in enumerate(rates):
        now = 1_000_000 + i * step
        d = decide(spec, plan, snap(now, rate), history, PROFILES, now)
        plan, history = d.plan, d.history
        out.append(d)
    return out


# ----------------------------------------------------------------------------- queueing


@pytest.mark.parametrize(
    ("servers", "offered", "expected"),
    [
        (1, 0.5, 0.5),  # M/M/1: P(wait) = rho
        (2, 1.0, 1 / 3),
        (3, 2.0, 4 / 9),
        (2, 2.0, 1.0),  # unstable
        (4, 0.0, 0.0),
    ],
)
def test_erlang_c(servers: int, offered: float, expected: float) -> None:
    assert queueing.erlang_c(servers, offered) == pytest.approx(expected, rel=1e-9)


def test_mm1_wait_matches_the_closed_form() -> None:
    lam, mu = 8.0, 10.0
    assert queueing.mean_wait(1, lam, mu) == pytest.approx((lam / mu) / (mu - lam))
    # P(W > t) = rho * exp(-(mu - lam) t) => t95 = ln(rho / 0.05) / (mu - lam)
    assert queueing.wait_quantile(1, lam, mu) == pytest.approx(math.log(0.8 / 0.05) / 2)
    assert queueing.wait_quantile(1, 12, mu) == math.inf


def test_prediction_grows_with_load_and_shrinks_with_replicas() -> None:
    prof = PROFILES.models["emb_big"]
    low, _ = predict(prof, 50, 2, 16, 1000)
    high, _ = predict(prof, 400, 2, 16, 1000)
    wider, _ = predict(prof, 400, 4, 16, 1000)
    assert low < high and wider < high


@pytest.mark.parametrize(
    ("long", "short", "expected", "why"),
    [
        (100.0, None, 100.0, False),  # no short window: the stable rate
        (100.0, 80.0, 100.0, False),  # falling: scale-down waits for the stable window
        (100.0, 109.0, 100.0, False),  # within the 10% deadband: noise
        # climbing: slope (130 - 100) / 22.5 s, projected 7.5 + 30 s past the short rate
        (100.0, 130.0, 130.0 + 30.0 / 22.5 * 37.5, True),
        (40.0, 110.0, 165.0, True),  # a jump: at most 1.5x the short rate
    ],
)
def test_forecast_sizes_for_the_rate_new_replicas_will_meet(
    long: float, short: float | None, expected: float, why: bool
) -> None:
    rate, reason = forecast(long, short, Tunables())
    assert rate == pytest.approx(expected)
    assert (reason is not None) == why


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        (0.0, 0.75),
        (4.0, 0.75),  # small pools keep the fixed margin: 4 / (4 + 1.5 * 2) = 0.57 < 0.75
        (36.0, 36.0 / (36.0 + 9.0)),  # 0.8
        (100.0, 100.0 / 115.0),
    ],
)
def test_large_pools_run_hotter_by_square_root_staffing(offered: float, expected: float) -> None:
    assert max_utilisation(offered, Tunables()) == pytest.approx(expected)


# ------------------------------------------------------------------------ time sequences


def test_stationary_load_never_changes_anything_over_100_ticks() -> None:
    rng = random.Random(7)
    spec = make_spec()
    decisions = run(spec, [300 * (1 + rng.uniform(-0.03, 0.03)) for _ in range(110)])
    settled = decisions[10:]
    assert all(d.changed == () for d in settled), [d.reasons for d in settled if d.changed]
    assert settled[-1].plan["embedding"].replicas >= 1


def test_a_step_up_scales_up_within_two_ticks() -> None:
    spec = make_spec()
    decisions = run(spec, [50] * 20 + [3000] * 5)  # more than batching alone absorbs
    before = decisions[19].plan
    after = decisions[21].plan
    for stage in ("embedding", "inference", "ingestion"):
        assert after[stage].replicas > before[stage].replicas, stage
    assert any("scale up" in r for r in decisions[20].reasons)


def test_a_climb_is_met_ahead_and_its_forecast_is_not_held_for_the_window() -> None:
    spec = make_spec()
    plan, history = plans.initial(spec), History()
    ticks: list[Decision] = []
    # Steady 300/s, then the short window climbs to 450/s, then everything settles at 450/s.
    for i, (long, short) in enumerate([(300, 300)] * 10 + [(300, 450)] + [(450, 450)] * 6):
        now = 1_000_000 + 15 * i
        stages = {
            s: StageTelemetry(rate_rps=long, rate_short_rps=short)
            for s in ("ingestion", "embedding", "retrieval", "inference")
        }
        d = decide(spec, plan, Snapshot(now, now, stages), history, PROFILES, now)
        plan, history = d.plan, d.history
        ticks.append(d)
    plain = run(spec, [300] * 10 + [450] * 7)  # the same load without the early signal
    surge, settled = ticks[10].plan["ingestion"].replicas, ticks[-1].plan["ingestion"].replicas
    assert any("rate climbing" in r for r in ticks[10].reasons)
    assert surge > plain[10].plan["ingestion"].replicas
    # The forecast bought replicas ahead of the load; once the load is measured, the stage
    # goes back to what 450/s needs instead of holding the forecast for the whole window.
    assert settled == plain[-1].plan["ingestion"].replicas < surge


def test_a_drop_scales_down_only_after_the_stabilization_window() -> None:
    spec = make_spec()  # window 300 s = 20 ticks of 15 s
    decisions = run(spec, [3000] * 20 + [30] * 30)
    high = decisions[19].plan["embedding"].replicas
    assert high > 1
    for i in range(20, 39):  # inside the window: never lower than at the peak
        assert decisions[i].plan["embedding"].replicas == high, i
    assert decisions[-1].plan["embedding"].replicas < high


def test_stale_or_missing_metrics_hold_everything() -> None:
    spec = make_spec()
    plan = plans.initial(spec)
    now = 2_000_000.0
    old = Snapshot(time=now, newest_sample=now - 600, stages=snap(now, 900).stages)
    for snapshot in (old, None, Snapshot(time=now, newest_sample=None)):
        d = decide(spec, plan, snapshot, History(), PROFILES, now)
        assert d.hold and d.plan == plan and d.changed == ()


def test_a_missing_rate_holds_that_stage_only() -> None:
    spec = make_spec()
    plan = plans.initial(spec)
    now = 3_000_000.0
    s = snap(now, 3000)
    stages = dict(s.stages)
    stages["embedding"] = StageTelemetry(rate_rps=None)
    d = decide(spec, plan, Snapshot(now, now, stages), History(), PROFILES, now)
    assert d.plan["embedding"] == plan["embedding"]
    assert d.plan["inference"].replicas > plan["inference"].replicas
    assert "embedding: hold, no request rate" in d.reasons


def test_the_budget_forces_cheaper_variants_and_says_so() -> None:
    rich = run(make_spec(), [4000] * 3)[-1]
    capped = run(make_spec(maxCostPerHour="5"), [4000] * 3)[-1]
    assert capped.budget_limited and "maxCostPerHour" in capped.budget_limited
    assert capped.cost_per_hour <= 5 < rich.cost_per_hour
    assert any("budget" in r for r in capped.reasons)


def test_variant_choice_respects_the_quality_floor() -> None:
    # From the best variants, a low floor lets the optimizer go down to the cheapest ...
    low_floor = run(make_spec(minQuality="0.5"), [200] * 3)[-1]
    assert low_floor.plan["embedding"].variant == "tiny"
    # ... and from variants under a strict floor, the floor forces the switch up.
    spec = make_spec(minQuality="0.99")
    start = plans.initial(spec)
    start = {
        **start,
        "embedding": replace(start["embedding"], variant="tiny"),
        "inference": replace(start["inference"], variant="small"),
    }
    strict = run(spec, [200] * 3, start=start)[0]
    assert strict.plan["embedding"].variant == "big"
    assert strict.plan["inference"].variant == "big"
    assert "embedding: switch variant tiny -> big" in " ".join(strict.reasons)


def test_the_batch_tuner_batches_more_under_load() -> None:
    spec = make_spec()
    quiet = run(spec, [5] * 3)[-1].plan["embedding"]
    busy = run(spec, [2000] * 3)[-1].plan["embedding"]
    assert (busy.max_batch_size or 0) > (quiet.max_batch_size or 0)


@pytest.mark.parametrize("items", [1.0, 10.0, 24.0])
def test_multi_item_requests_size_batches_and_replicas_in_items(items: float) -> None:
    """A re-ranked query is one Triton request of all its candidate pairs: the batch never
    goes below a request (Triton would reject it) and the load counts every pair."""
    spec, now = make_spec(), 1_000_000
    rate = 40.0
    stages = {
        s: StageTelemetry(rate_rps=rate, items_per_request=items if s == "inference" else None)
        for s in ("ingestion", "embedding", "retrieval", "inference")
    }
    d = decide(spec, plans.initial(spec), Snapshot(now, now, stages), History(), PROFILES, now)
    inference = d.plan["inference"]
    assert (inference.max_batch_size or 0) >= items
    model = PROFILES.models["inf_small" if inference.variant == "small" else "inf_big"]
    batch = inference.max_batch_size or 1
    # Capacity in items over the chosen replicas covers the item rate at the target.
    assert inference.replicas * model.throughput_rps(batch) * 0.75 >= rate * items


def test_prediction_counts_items_and_refuses_a_batch_below_a_request() -> None:
    prof = PROFILES.models["inf_small"]
    one, _ = predict(prof, 20, 2, 32, 1000, items=1)
    ten, util = predict(prof, 20, 2, 32, 1000, items=10)
    assert ten > one and util > 0
    assert predict(prof, 20, 2, 8, 1000, items=10)[0] == math.inf


def _with_instances(speedup: dict[int, float] | None) -> Profiles:
    doc = copy.deepcopy(PROFILE_DOC)
    for m in doc["models"].values():
        if speedup is not None:
            m["instances"] = [{"count": k, "throughput_rps": 100.0 * v} for k, v in speedup.items()]
    return parse(doc)


def test_more_instances_add_capacity_only_by_their_measured_speedup() -> None:
    scaling = _with_instances({1: 1.0, 2: 1.8, 3: 1.0}).models["emb_big"]
    one, util1 = predict(scaling, 100, 1, 4, 0, instances=1)
    two, util2 = predict(scaling, 100, 1, 4, 0, instances=2)
    assert util2 == pytest.approx(util1 / 1.8, rel=0.05) and two < one
    # A third instance that measured no gain adds none (each runs three times slower).
    assert scaling.throughput_rps(1, 3) == pytest.approx(scaling.throughput_rps(1, 1))
    assert scaling.instance_slowdown(3) == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("speedup", "max_instances", "expected"),
    [
        ({1: 1.0, 2: 1.8}, 2, 2),  # one replica allowed, measured gain: a second instance
        ({1: 1.0, 2: 1.8}, 1, 1),  # the spec does not allow it
        (None, 4, 1),  # never measured: never planned
        ({1: 1.0, 2: 1.0}, 2, 1),  # measured, but no gain
    ],
)
def test_instances_are_tuned_where_measured_allowed_and_needed(
    speedup: dict[int, float] | None, max_instances: int, expected: int
) -> None:
    doc = copy.deepcopy(SPEC_DOC)
    doc["embedding"]["replicas"] = {"min": 1, "max": 1}
    doc["embedding"]["batching"]["maxInstances"] = max_instances
    doc["embedding"]["variants"] = doc["embedding"]["variants"][:1]  # big: fp32, quality 1
    spec = ModelDeploymentSpec.model_validate(doc)
    profiles, now = _with_instances(speedup), 1_000_000
    rate = 300.0  # one instance of emb_big misses the 57 ms share at every batch size
    d = decide(spec, plans.initial(spec), snap(now, rate), History(), profiles, now)
    assert d.plan["embedding"].instances == expected
    moved = f"embedding: model instances per replica 1 -> {expected}"
    assert (moved in d.reasons) is (expected != 1)
    assert plans.status_fields(d.plan["embedding"])["instances"] == expected


def test_a_recorded_instance_count_is_clamped_to_the_spec() -> None:
    doc = copy.deepcopy(SPEC_DOC)
    doc["embedding"]["batching"]["maxInstances"] = 2
    spec = ModelDeploymentSpec.model_validate(doc)
    recorded = {"embedding": {"replicas": 2, "variant": "big", "instances": 4}}
    assert plans.resume(spec, recorded)["embedding"].instances == 2
    assert plans.initial(spec)["embedding"].instances == 1


def _one_replica_spec() -> ModelDeploymentSpec:
    doc = copy.deepcopy(SPEC_DOC)
    doc["embedding"]["replicas"] = {"min": 1, "max": 1}
    doc["embedding"]["variants"] = doc["embedding"]["variants"][:1]  # big: fp32, quality 1
    return ModelDeploymentSpec.model_validate(doc)


@pytest.mark.parametrize(
    ("rate", "measured_p95_ms", "backed_off"),
    [
        (10, 500.0, True),  # over the 57 ms share where batch 1 fits: the server disagreed
        (10, 30.0, False),  # within it: the smaller batch is only what the model prefers now
        (10, None, False),  # nothing measured: no evidence against the batch
        (600, 500.0, False),  # nothing fits one replica: an overload, not the batch's fault
    ],
)
def test_a_batch_retreated_from_over_budget_is_backed_off(
    rate: float, measured_p95_ms: float | None, backed_off: bool
) -> None:
    spec, now = _one_replica_spec(), 1_000_000
    start = plans.initial(spec)
    start = {**start, "embedding": replace(start["embedding"], max_batch_size=8)}
    d = decide(spec, start, snap(now, rate, p95_ms=measured_p95_ms), History(), PROFILES, now)
    assert d.plan["embedding"].max_batch_size == 1
    expected = ((1, 8, now + Tunables().batching_backoff_s),) if backed_off else ()
    assert d.history.stage("embedding").backoff == expected
    assert any("no batch of 8 or more" in r for r in d.reasons) is backed_off
    assert History.from_status(d.history.to_status()) == d.history
    raw = d.history.to_status()["embedding"]  # what status.optimizerState keeps, field for field
    assert StageHistoryStatus.model_validate(raw).model_dump(by_alias=True) == raw


def test_a_backed_off_batch_is_not_tried_again_until_it_expires() -> None:
    spec, now = _one_replica_spec(), 1_000_000
    # At 200 requests/s the profile says batch 4 (1 cannot keep up) ...
    free = decide(spec, plans.initial(spec), snap(now, 200), History(), PROFILES, now)
    assert free.plan["embedding"].max_batch_size == 4
    # ... but this server measured batch 4 over its budget: smaller batches only, for now.
    history = History({"embedding": StageHistory(backoff=((1, 4, now + 60),))})
    held = decide(spec, plans.initial(spec), snap(now, 200), history, PROFILES, now)
    assert (held.plan["embedding"].max_batch_size or 0) < 4
    later = decide(spec, plans.initial(spec), snap(now + 60, 200), history, PROFILES, now + 60)
    assert later.plan["embedding"].max_batch_size == 4
    assert later.history.stage("embedding").backoff == ()


def test_a_profile_with_instances_needs_the_single_instance_row() -> None:
    doc = copy.deepcopy(PROFILE_DOC)
    doc["models"]["emb_big"]["instances"] = [{"count": 2, "throughput_rps": 10.0}]
    with pytest.raises(ValueError, match="count 1"):
        parse(doc)


def test_optimizer_off_holds() -> None:
    doc = copy.deepcopy(SPEC_DOC)
    doc["optimizer"]["mode"] = "Off"
    spec = ModelDeploymentSpec.model_validate(doc)
    d = run(spec, [900])[-1]
    assert d.hold == "optimizer is Off" and d.plan == plans.initial(spec)


def test_history_survives_a_round_trip_through_status() -> None:
    d = run(make_spec(), [3000] * 3 + [30] * 3)[-1]
    again = History.from_status(d.history.to_status())
    assert again == d.history


def test_decide_is_deterministic() -> None:
    a = run(make_spec(), [100, 400, 900, 50, 50])
    b = run(make_spec(), [100, 400, 900, 50, 50])
    assert [(x.plan, x.reasons) for x in a] == [(x.plan, x.reasons) for x in b]


# ----------------------------------------------------------------------------- summary


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, "no change: every stage fits its budget"),
        ({"changed": ("embedding",)}, "changed embedding"),
        (
            {"short": ("embedding",), "slo_met": False},
            "no change: embedding predicted over its latency budget",
        ),
        (
            {"short": ("embedding", "inference"), "slo_met": False},
            "no change: embedding, inference predicted over their latency budget",
        ),
        (
            {"short": ("ingestion", "inference"), "slo_met": False},
            "no change: inference predicted over its latency budget; "
            "ingestion capped at max replicas",
        ),
        (
            {"changed": ("embedding",), "short": ("inference",), "slo_met": False},
            "changed embedding: inference predicted over its latency budget",
        ),
        (
            {"budget_limited": "cost/h 9.00 would exceed", "slo_met": False},
            "no change: limited by maxCostPerHour",
        ),
        ({"slo_met": False}, "no change: measured p95 over the SLO"),
        ({"held": ("embedding",)}, "no change: embedding on hold, the others fit their budget"),
        ({"hold": "no telemetry snapshot", "short": ("embedding",)}, "hold: no telemetry snapshot"),
    ],
)
def test_the_summary_agrees_with_the_reasons(fields: dict[str, Any], expected: str) -> None:
    d = Decision(plans.initial(make_spec()), ("reasons",), History(), **fields)
    assert d.summary == expected


def test_a_stage_over_its_budget_is_not_summarized_as_fitting() -> None:
    """The demo's contradiction: reasons "even 1 replicas ... predict p95 100 ms over its
    12 ms" under the summary "no change: every stage fits its budget"."""
    decisions = run(make_spec(latencyP95Ms=10), [200] * 3)
    last = decisions[-1]
    assert last.changed == () and last.slo_met is False
    assert any("even" in r and "predict p95" in r for r in last.reasons)
    assert last.summary.startswith("no change: ") and "every stage fits" not in last.summary
    assert "predicted over" in last.summary and "latency budget" in last.summary
    fits = run(make_spec(), [200] * 3)[-1]
    assert fits.summary == "no change: every stage fits its budget" and fits.slo_met


# ------------------------------------------------------------------------- calibration


def scaled(factor: float) -> Profiles:
    """PROFILES as measured on a machine ``factor`` times slower (every batch time)."""
    doc = copy.deepcopy(PROFILE_DOC)
    for model in doc["models"].values():
        for row in model["batches"]:
            row["p50_ms"] *= factor
            row["p95_ms"] *= factor
    return parse(doc)


def measured(spec: ModelDeploymentSpec, plan: plans.Plan, rate: float) -> Snapshot:
    """What this machine (the true PROFILES) measures at ``rate`` under ``plan``: the
    model's p95 without a queue, or, saturated, a backlog: p95 and queue time far over the
    SLO."""
    slo = spec.slo.latency_p95_ms
    stages = {}
    for name, p in plan.items():
        tele = StageTelemetry(rate_rps=rate)
        if p.variant is not None:
            model = spec.stage(name).variant(p.variant).model  # type: ignore[attr-defined]
            batch, delay = p.max_batch_size or 1, p.max_queue_delay_us or 0
            p95, _ = predict(PROFILES.models[model], rate, p.replicas, batch, delay)
            backlog = not math.isfinite(p95)
            tele = replace(
                tele, p95_ms=10.0 * slo if backlog else p95, queue_ms=5.0 * slo if backlog else 0.0
            )
        stages[name] = tele
    return Snapshot(time=0, newest_sample=0, stages=stages)


def predicted_vs_measured(
    spec: ModelDeploymentSpec, d: Decision, profiles: Profiles, rate: float
) -> list[float]:
    """Per model stage, the decision's calibrated prediction for its own plan over what the
    true profile gives for that plan."""
    out = []
    for name in ("embedding", "inference"):
        p = d.plan[name]
        model = spec.stage(name).variant(p.variant or "").model  # type: ignore[attr-defined]
        calib = d.history.stage(name).calibration_permille / 1000
        prof, factor = calibrated(profiles.models[model], calib, Tunables())
        setting = (p.replicas, p.max_batch_size or 1, p.max_queue_delay_us or 0)
        mine, _ = predict(prof, rate, *setting, 1.0, factor)
        true, _ = predict(PROFILES.models[model], rate, *setting)
        out.append(mine / true)
    return out


@pytest.mark.parametrize(
    ("factor", "slo_ms"),
    [
        (10.0, 60),  # 10x pessimistic, infeasible at first: "even 1 replicas ... over"
        (10.0, 200),  # 10x pessimistic: feasible, at ten times the replicas
        (0.1, 200),  # 10x optimistic: a tenth of the replicas, saturated
    ],
)
def test_calibration_corrects_a_profile_ten_times_off(factor: float, slo_ms: int) -> None:
    spec, profiles, rate = make_spec(latencyP95Ms=slo_ms), scaled(factor), 200.0
    plan, history = plans.initial(spec), History()
    decisions = []
    for i in range(80):
        now = 1_000_000 + 15 * i
        snapshot = replace(measured(spec, plan, rate), time=now, newest_sample=now)
        d = decide(spec, plan, snapshot, history, profiles, now)
        plan, history = d.plan, d.history
        decisions.append(d)
    # Within 30 decisions (7.5 min at 15 s), and from then on: predictions within 2x of
    # what the machine measures, and a plan that meets the SLO.
    for i, d in enumerate(decisions[30:], 30):
        ratios = predicted_vs_measured(spec, d, profiles, rate)
        assert all(0.5 <= r <= 2.0 for r in ratios), (i, ratios, d.reasons)
        assert d.slo_met and d.short == (), (i, d.reasons)
    # Stable: once corrected, nothing changes (no oscillation between settings).
    assert all(d.changed == () for d in decisions[-20:]), [d.reasons for d in decisions[-20:]]


# A stage of "big" embeddings with 1 replica: at 3000 requests/s the model predicts it
# saturated (utilisation > 1); at 5 requests/s, far from it. Its budget is 56.7 ms.
ONE_BIG = {"embedding": plans.StagePlan(1, "big", 64, 5000)}


@pytest.mark.parametrize(
    ("rate", "p95_ms", "queue_ms", "expected"),
    [
        # Measured saturated (over budget with a queue, or over it with no queue time): a
        # backlog's p95, never taken for a model that is too pessimistic.
        (3000.0, 400.0, 300.0, (1000, 1000)),
        (3000.0, 400.0, None, (1000, 1000)),
        # Waiting in the queue but within budget: cannot tell, nothing learnt.
        (3000.0, 40.0, 30.0, (1000, 1000)),
        # Measured with headroom while the model predicts saturation: the model is too
        # pessimistic, lowered at once by the largest step (3x).
        (3000.0, 8.0, 0.5, (333, 333)),
        (3000.0, 8.0, None, (333, 333)),
        # The model predicts headroom and the stage measures slower: raised, by 3x at most.
        (5.0, 400.0, 300.0, (1001, 3000)),
    ],
)
def test_a_saturated_stage_does_not_learn_an_optimistic_factor(
    rate: float, p95_ms: float, queue_ms: float | None, expected: tuple[int, int]
) -> None:
    spec, now = make_spec(), 1_000_000
    plan = {**plans.initial(spec), **ONE_BIG}
    stages = dict(snap(now, rate).stages)
    stages["embedding"] = StageTelemetry(rate_rps=rate, p95_ms=p95_ms, queue_ms=queue_ms)
    history = History({"embedding": StageHistory(calibration_permille=1000)})
    d = decide(spec, plan, Snapshot(now, now, stages), history, PROFILES, now)
    lo, hi = expected
    assert lo <= d.history.stage("embedding").calibration_permille <= hi


# ------------------------------------------------------------- the calibration step


@pytest.mark.parametrize(
    ("last_change", "measured_ratio", "expect"),
    [
        (None, 3.0, "up"),  # settled, slower than the profile predicts
        (None, 1 / 3, "down"),  # settled, faster, with headroom
        (None, 1.0, "same"),
        (999_970, 3.0, "same"),  # changed 30 s ago: the window mixes settings
    ],
)
def test_the_calibration_learns_only_from_a_settled_stage(
    last_change: int | None, measured_ratio: float, expect: str
) -> None:
    tun = Tunables()
    cur = plans.StagePlan(1, "small", 8, 0)
    prof = PROFILES.model("emb_small")
    assert prof is not None
    model, factor = calibrated(prof, 1.0, tun)
    predicted, _ = predict(model, 20.0, 1, 8, 0, 1.0, factor)
    tele = StageTelemetry(rate_rps=20.0, p95_ms=predicted * measured_ratio, queue_ms=0.0)
    hist = StageHistory(last_change=last_change)
    learnt = calibration.learn(cur, prof, tele, hist, 20.0, 10 * predicted, 1_000_000, tun)
    assert {"up": learnt > 1000, "down": learnt < 1000, "same": learnt == 1000}[expect], learnt


# ------------------------------------------------------------------------ bursty arrivals


@pytest.mark.parametrize(
    ("dispersion", "factor"),
    [(1.0, 1.0), (0.3, 1.0), (3.0, 2.0), (9.0, 5.0)],  # never below Poisson's
)
def test_burstier_arrivals_wait_longer_by_the_allen_cunneen_factor(
    dispersion: float, factor: float
) -> None:
    assert burst_factor(dispersion) == pytest.approx(factor)


def test_bursty_arrivals_need_more_replicas_and_run_cooler() -> None:
    prof = PROFILES.models["inf_small"]
    poisson, _ = predict(prof, 1000, 4, 8, 0, dispersion=1.0)
    bursty, _ = predict(prof, 1000, 4, 8, 0, dispersion=9.0)
    assert bursty > poisson
    assert max_utilisation(100.0, Tunables(), 9.0) < max_utilisation(100.0, Tunables())
    assert max_utilisation(2.0, Tunables(), 9.0) == Tunables().target_utilisation  # the floor
    spec = make_spec()
    calm = decide(spec, plans.initial(spec), snap(1e6, 800.0), History(), PROFILES, 1e6)
    burst = decide(
        spec,
        plans.initial(spec),
        snap(1e6, 800.0, arrival_dispersion=9.0),
        History(),
        PROFILES,
        1e6,
    )
    assert burst.plan["inference"].replicas > calm.plan["inference"].replicas
    said = [r for r in burst.reasons if r.startswith("inference: arrivals bursty")]
    assert said and "x5.0" in said[0], burst.reasons
    assert not any("bursty" in r for r in calm.reasons)


def test_calibration_does_not_take_burstiness_for_a_model_error() -> None:
    """A stage measuring the p95 its model predicts for its bursty arrivals keeps its
    calibration: the queueing the bursts cause is in the prediction, not in the factor."""
    prof = PROFILES.models["inf_small"]
    cur = plans.StagePlan(4, "small", 8, 0)
    bursty, _ = predict(prof, 1000, 4, 8, 0, dispersion=9.0)
    tele = StageTelemetry(rate_rps=1000, p95_ms=bursty, arrival_dispersion=9.0)
    hist, tun = StageHistory(), Tunables()
    assert calibration.learn(cur, prof, tele, hist, 1000, 10 * bursty, 10_000, tun) == 1000
    poisson = StageTelemetry(rate_rps=1000, p95_ms=bursty)  # the same p95 read as an error
    assert calibration.learn(cur, prof, poisson, hist, 1000, 10 * bursty, 10_000, tun) > 1000


def test_a_batch_holds_whole_requests() -> None:
    """Triton does not split a request: with 10 pairs a request, 16 items hold one request,
    as 10 do, and the prediction says the same for both."""
    prof = PROFILES.models["inf_small"]
    for rate in (5.0, 50.0):
        assert predict(prof, rate, 4, 16, 1000, items=10) == predict(
            prof, rate, 4, 10, 1000, items=10
        )
    assert predict(prof, 50.0, 4, 20, 1000, items=10) != predict(prof, 50.0, 4, 16, 1000, items=10)


@pytest.mark.parametrize(
    ("dispersion", "expected"),
    [
        (1.0, 50.0),  # Poisson: its noise is the queueing model's business
        (0.5, 50.0),
        (118.0, 50.0 + 1.65 * math.sqrt(117.0 * 50.0 / 60.0)),  # a scaled production trace
    ],
)
def test_a_bursty_stream_is_sized_above_its_measured_rate_by_its_excess_noise(
    dispersion: float, expected: float
) -> None:
    rate, why = burst_headroom(50.0, dispersion, Tunables())
    assert rate == pytest.approx(expected)
    assert (why is not None) == (dispersion > 1.0)


def test_a_bursty_streams_short_window_noise_is_not_taken_for_a_climb() -> None:
    tun = Tunables()
    assert forecast(50.0, 70.0, tun, 1.0)[1] is not None  # +40% on a Poisson stream: a climb
    assert forecast(50.0, 70.0, tun, 118.0) == (50.0, None)  # within a bursty stream's noise
    assert forecast(50.0, 150.0, tun, 118.0)[1] is not None  # a surge clears the noise


# ------------------------------------------------------------------- measured batch times


def test_a_profile_mean_is_its_log_normal_mean() -> None:
    prof = PROFILES.models["inf_small"]  # p95 = 1.2 x p50 at every batch
    sigma = math.log(1.2) / 1.645
    assert prof.mean_ms(8) == pytest.approx(6.0 * math.exp(sigma**2 / 2))
    assert prof.scaled(2.0).latency_ms(8, "p95") == pytest.approx(2 * prof.latency_ms(8, "p95"))


@pytest.mark.parametrize(
    ("exec_ratio", "batch", "instances", "kept", "expected"),
    [
        (2.0, 8.0, 1, 1000, 2000),  # batches take twice the profile's time
        (0.5, 8.0, 1, 1000, 500),
        (1.1, 8.0, 1, 1000, 1000),  # within the deadband: the latency calibration's business
        (2.0, None, 1, 1500, 1500),  # no achieved batch size: kept as last measured
        (2.0, 8.0, 2, 1000, 1000),  # two instances share the cores: twice as long is as profiled
        (4.0, 8.0, 2, 1000, 2000),
        (2.1, 8.0, 1, 2000, 2000),  # within 10% of the factor in use: kept, no churn
        (1.1, 8.0, 1, 2000, 1000),  # back to the profile
    ],
)
def test_measured_batch_times_rescale_the_profile(
    exec_ratio: float, batch: float | None, instances: int, kept: int, expected: int
) -> None:
    prof = _with_instances({1: 1.0, 2: 1.0}).models["inf_small"]
    exec_ms = exec_ratio * prof.mean_ms(8.0)
    tele = StageTelemetry(rate_rps=100, batch_size=batch, exec_ms=exec_ms)
    cur = plans.StagePlan(4, "small", 8, 0, instances=instances)
    hist = StageHistory(batch_time_permille=kept)
    assert calibration.batch_time_permille(cur, prof, tele, hist, 10_000, Tunables()) == expected
    # Within a minute of a change the window may hold the previous variant's batches.
    just = replace(hist, last_change=9_990)
    assert calibration.batch_time_permille(cur, prof, tele, just, 10_000, Tunables()) == kept


def test_a_stage_measured_twice_as_slow_is_sized_for_it_and_says_why() -> None:
    spec = make_spec()
    first = decide(spec, plans.initial(spec), snap(1e6, 800.0), History(), PROFILES, 1e6)
    cur = first.plan["inference"]
    prof = PROFILES.models[spec.inference.variant(cur.variant or "").model]  # type: ignore[union-attr]
    batch = float(cur.max_batch_size or 1)
    slow = StageTelemetry(rate_rps=800.0, batch_size=batch, exec_ms=2 * prof.mean_ms(batch))
    stages = {**snap(1e6, 800.0).stages, "inference": slow}
    at = 1e6 + 120  # a minute after the first plan: the window holds its batches only
    later = decide(
        spec, first.plan, Snapshot(time=at, newest_sample=at, stages=stages),
        first.history, PROFILES, at,
    )  # fmt: skip
    assert later.plan["inference"].replicas > cur.replicas
    said = [r for r in later.reasons if r.startswith("inference: batches run 2.00x")]
    assert said, later.reasons


# ------------------------------------------------------------------- seasonal forecasts

N = HISTORY_LOOKBACK_S // HISTORY_STEP_S + 1
AHEAD = HISTORY_AHEAD_S // HISTORY_STEP_S


def day(minute: int) -> float:
    """A day's rate by the step: quiet through the lookback window, busy right after it."""
    return 20.0 if minute < N else 120.0


def history(recent_scale: float, past: list[float | None], period: int = 86400) -> RateHistory:
    recent = tuple(None if p is None else recent_scale * p for p in past[:N])
    return RateHistory(HISTORY_STEP_S, recent, (SeasonWindow(period, tuple(past)),))


def test_a_season_that_fits_forecasts_what_followed_at_todays_level() -> None:
    past = [day(m) * (1 + 0.02 * (m % 7)) for m in range(N + AHEAD)]  # busy from step N
    got = seasonal_forecast(history(1.5, past), 45.0, Tunables())
    assert got is not None and got.period_s == 86400
    assert got.level == pytest.approx(1.5)
    # a 45 s horizon: the next step, and the one after (a step's rate trails its minute)
    assert got.rate == pytest.approx(1.5 * max(past[N : N + 2]))
    later = seasonal_forecast(history(1.5, past), 150.0, Tunables())
    assert later is not None and later.rate == pytest.approx(1.5 * max(past[N : N + 4]))
    assert "1 day ago the next 240s reached" in later.reason


def test_a_season_that_does_not_explain_the_last_hour_is_not_trusted() -> None:
    rng = random.Random(3)
    past = [rng.uniform(10, 200) for _ in range(N + AHEAD)]
    steady = tuple(50.0 + rng.uniform(-1, 1) for _ in range(N))  # today: flat, unrelated
    h = RateHistory(HISTORY_STEP_S, steady, (SeasonWindow(86400, tuple(past)),))
    assert seasonal_forecast(h, 45.0, Tunables()) is None
    sparse = [None] * (N // 2 + 2) + [20.0] * (N + AHEAD - N // 2 - 2)  # too little history
    assert seasonal_forecast(history(1.0, sparse), 45.0, Tunables()) is None


def test_the_best_fitting_season_wins() -> None:
    rng = random.Random(5)
    shape = [20.0 + 10 * math.sin(m / 5) for m in range(N + AHEAD)]
    recent = tuple(shape[:N])
    noisy = tuple(s * rng.uniform(0.8, 1.2) for s in shape)
    h = RateHistory(
        HISTORY_STEP_S, recent, (SeasonWindow(86400, noisy), SeasonWindow(604800, tuple(shape)))
    )
    got = seasonal_forecast(h, 45.0, Tunables())
    assert got is not None and got.period_s == 604800


def test_a_recurring_ramp_is_met_ahead_and_said_so() -> None:
    spec = make_spec()
    past = [10 * day(m) for m in range(N + 2)]  # a day ago the load rose 6x the next minute
    quiet = replace(snap(1e6, 200.0).stages["inference"], rate_history=history(1.0, past))
    stages = {**snap(1e6, 200.0).stages, "inference": quiet}
    ahead = decide(
        spec, plans.initial(spec), Snapshot(time=1e6, newest_sample=1e6, stages=stages),
        History(), PROFILES, 1e6,
    )  # fmt: skip
    plain = decide(spec, plans.initial(spec), snap(1e6, 200.0), History(), PROFILES, 1e6)
    assert ahead.plan["inference"].replicas > plain.plan["inference"].replicas
    said = "inference: 1 day ago the next 120s reached"
    assert any(r.startswith(said) for r in ahead.reasons), ahead.reasons
