"""The gateway's routing and cache thresholds (optimizer/gateway.py), table-driven, and the
path from the plan to service.json, status and the Prometheus bands."""

from __future__ import annotations

import pytest

from modelpilot import contract
from modelpilot.adapters.prometheus import Telemetry
from modelpilot.api.v1alpha1 import ModelDeploymentSpec, Routing, SemanticCache
from modelpilot.optimizer.gateway import (
    cache_quality,
    routing_quality,
    tune_cache,
    tune_routing,
)
from modelpilot.optimizer.history import History
from modelpilot.optimizer.policy import decide
from modelpilot.optimizer.snapshot import Agreement, Band, Snapshot
from modelpilot.optimizer.tunables import Tunables
from modelpilot.render import plan as plans
from modelpilot.render.children import service_config
from tests.helpers import spec_of
from tests.unit.optimizer_cases import PROFILES, SPEC_DOC, snap

pytestmark = pytest.mark.unit
TUN = Tunables(gateway_min_samples=30, band_prior=0.0, knob_margin=0.01)


def bands(*rows: tuple[float, float, int, float | None]) -> tuple[Band, ...]:
    return tuple(Band(edge, count, samples, agreement) for edge, count, samples, agreement in rows)


AUTO = Routing(mode="Auto", smallVariant="s", largeVariant="l", smallShare="0.5")
AGREE_90 = Agreement(samples=100, mean=0.9)  # quality(s) = 1 - 0.1 s


def test_predicted_routing_quality_loses_the_disagreement_of_the_small_share() -> None:
    assert routing_quality(0.0, 0.9, 1.0) == 1.0
    assert routing_quality(0.5, 0.9, 1.0) == pytest.approx(0.95)
    assert routing_quality(1.0, 0.9, 0.9) == pytest.approx(0.81)


@pytest.mark.parametrize(
    ("floor", "current", "want"),
    [
        (0.8, 0.5, 1.0),  # everything small still predicts 0.9: all the way up
        (0.95, 0.5, 0.5),  # 0.55 would predict 0.945 < 0.95 + margin
        (0.93, 0.5, 0.6),  # 0.6 predicts 0.94 >= 0.93 + 0.01
        (0.97, 0.5, 0.3),  # 0.5 predicts 0.95 < 0.97: down to the highest that holds
        (0.999, 1.0, 0.0),
        (0.935, 0.6, 0.6),  # 0.65 predicts 0.935 < 0.945: the deadband keeps 0.6 ...
        (0.94, 0.6, 0.6),  # ... and 0.6 itself (0.94 >= 0.94): no back and forth
    ],
)
def test_auto_routes_as_much_to_small_as_the_quality_floor_allows(
    floor: float, current: float, want: float
) -> None:
    step = tune_routing(AUTO, current, AGREE_90, floor, 1.0, TUN)
    assert step.value == pytest.approx(want)
    assert step.measured is not None and step.measured.quality is not None
    assert step.measured.agreement == 0.9  # what was measured, beside what is expected
    assert step.measured.quality >= floor - 1e-9 or want == 0.0
    assert (step.reason is not None) == (want != current)


def test_raising_the_floor_lowers_the_small_share() -> None:
    shares = []
    for floor in (0.8, 0.9, 0.93, 0.95, 0.97, 0.99):
        step = tune_routing(AUTO, 0.5, AGREE_90, floor, 1.0, TUN)
        assert step.measured is not None
        shares.append(step.measured.share)
    assert shares == sorted(shares, reverse=True) and shares[0] > shares[-1]


def test_a_large_variant_below_the_reference_leaves_less_room_for_the_small_one() -> None:
    assert tune_routing(AUTO, 0.5, AGREE_90, 0.9, 1.0, TUN).value == pytest.approx(0.9)
    assert tune_routing(AUTO, 0.5, AGREE_90, 0.9, 0.95, TUN).value == pytest.approx(0.5)


def test_routing_stays_within_its_bounds_and_fixed_and_off_never_move() -> None:
    bounded = AUTO.model_copy(update={"min_small_share": "0.3", "max_small_share": "0.6"})
    assert tune_routing(bounded, 0.5, AGREE_90, 0.8, 1.0, TUN).value == pytest.approx(0.6)
    assert tune_routing(bounded, 0.5, AGREE_90, 0.999, 1.0, TUN).value == pytest.approx(0.3)
    fixed = AUTO.model_copy(update={"mode": "Fixed"})
    step = tune_routing(fixed, 0.5, AGREE_90, 0.8, 1.0, TUN)
    assert step.value == 0.5 and step.reason is None
    off = AUTO.model_copy(update={"mode": "Off"})
    assert tune_routing(off, 0.5, AGREE_90, 0.8, 1.0, TUN).value is None


def test_routing_holds_with_too_few_samples_and_says_so() -> None:
    step = tune_routing(AUTO, 0.5, Agreement(20, 1.0), 0.8, 1.0, TUN)
    assert step.value == 0.5 and step.reason is not None and "until 30" in step.reason
    assert tune_routing(AUTO, None, None, 0.8, 1.0, TUN).value == 0.5  # the spec's start


# Similarity bands: near-duplicates agree, looser matches less.
CACHE_BANDS = bands(
    (0.8, 100, 50, 0.4), (0.85, 20, 20, 0.7), (0.9, 20, 20, 0.85), (0.95, 20, 20, 0.95),
    (1.0, 40, 40, 1.0),
)  # fmt: skip
CACHE = SemanticCache(mode="Auto", similarityThreshold="0.95", minSimilarityThreshold="0.8")


def test_predicted_hits_are_the_bands_above_the_threshold() -> None:
    agree = [b.agreement or 0.0 for b in CACHE_BANDS]
    share, agreement = cache_quality(CACHE_BANDS, agree, 0.9)
    assert share == pytest.approx(60 / 200)
    assert agreement == pytest.approx((20 * 0.95 + 40 * 1.0) / 60)
    assert cache_quality(CACHE_BANDS, agree, 1.0) == (0.0, None)


@pytest.mark.parametrize(
    ("floor", "current", "want"),
    [
        # hits from 0.95 agree 1.0; from 0.9: 0.983; from 0.85: 0.95; from 0.8: 0.90
        (0.9, 0.95, 0.85),  # 0.8 would give 0.90 < 0.9 + margin
        (0.97, 0.95, 0.9),
        (0.98, 0.95, 0.95),  # 0.983 < 0.98 + margin: the deadband keeps 0.95
        (0.98, 0.9, 0.9),  # ... and keeps 0.9
        (0.97, 0.8, 0.9),  # too loose: tightened to the first threshold that holds
        (0.999, 0.8, 0.95),
        (0.5, 0.95, 0.8),  # never below minSimilarityThreshold
    ],
)
def test_auto_loosens_the_cache_while_hits_agree_and_tightens_after_bad_hits(
    floor: float, current: float, want: float
) -> None:
    step = tune_cache(CACHE, current, CACHE_BANDS, floor, TUN)
    assert step.value == pytest.approx(want)
    assert (step.reason is not None) == (want != current)


def test_off_knobs_are_none_and_the_plan_carries_thresholds_to_the_gateway() -> None:
    spec = spec_of("full")
    start = plans.initial(spec)["inference"]
    assert (start.small_share, start.cache_threshold) == (0.5, 0.95)
    resumed = plans.resume(spec, {"inference": {"smallShare": 0.05, "cacheThreshold": 0.9}})[
        "inference"
    ]
    assert resumed.small_share == 0.2  # clamped to minSmallShare
    assert resumed.cache_threshold == 0.9
    config = service_config(spec, "inference", resumed)
    assert (config.smallShare, config.cacheThreshold) == (0.2, 0.9)
    assert config.routing == {
        "enabled": True,
        "smallVariant": "reranker-small",
        "largeVariant": "reranker-large-gpu",
        "sampleRatio": 0.1,
    }
    assert plans.status_fields(resumed)["smallShare"] == 0.2
    off = spec_of("minimal")
    assert plans.initial(off)["inference"].small_share is None
    assert service_config(off, "inference", plans.initial(off)["inference"]).cacheThreshold is None


def test_prometheus_bands_are_the_histogram_differences_and_the_summary_means() -> None:
    h, s = contract.METRIC_CACHE_SIMILARITY, contract.METRIC_CACHE_AGREEMENT

    def query(promql: str) -> list[dict[str, object]]:
        if f"{h}_bucket" in promql:
            cum = {"0.5": 30, "1.0": 100, "+Inf": 100}
            return [{"metric": {"le": le}, "value": [0, str(n)]} for le, n in cum.items()]
        if f"{s}_sum" in promql:
            return [{"metric": {"band": "0.5"}, "value": [0, "9"]}]
        if f"{s}_count" in promql:
            return [{"metric": {"band": "0.5"}, "value": [0, "10"]}]
        return []

    got = Telemetry("http://unused", query=query).bands('namespace="x"', h, s)
    assert got == (Band(0.5, 30, 10, 0.9), Band(1.0, 70, 0, None))
    assert Telemetry("http://unused", query=lambda q: []).bands("x", h, s) == ()


def test_prometheus_routing_agreement_is_the_pooled_summary_mean() -> None:
    def query(promql: str) -> list[dict[str, object]]:
        value = "40" if "_count" in promql else "36"
        return [{"metric": {}, "value": [0, value]}]

    telemetry = Telemetry("http://unused", query=query)
    assert telemetry.agreement("x", contract.METRIC_ROUTING_AGREEMENT) == Agreement(40, 0.9)
    assert Telemetry("http://unused", query=lambda q: []).agreement("x", "m") is None


def test_near_misses_far_below_the_lowest_threshold_do_not_weigh_on_the_hits() -> None:
    """Repeats hit and agree; unrelated queries are near misses at low similarity that
    disagree. Only the bands a threshold in bounds can reach are pooled."""
    rows = bands((0.6, 500, 500, 0.1), (0.9, 0, 0, None), (1.0, 40, 40, 1.0))
    prior = Tunables(gateway_min_samples=30, band_prior=10.0)
    step = tune_cache(CACHE, 0.95, rows, 0.8, prior)
    assert step.value == pytest.approx(0.8) and step.measured is not None
    assert step.measured.agreement == pytest.approx(1.0)


def test_a_tuned_share_is_carried_from_tick_to_tick_and_sizes_the_routed_stage() -> None:
    """Once the share is set, later ticks keep it without a change (no Event per tick, no
    reset of the scale-down cooldown), and the routed stage is sized for the mix: fewer
    replicas than all-large at the same rate."""

    def run(mode: str) -> tuple[list[float | None], list[str], int]:
        doc = {**SPEC_DOC, "slo": {"latencyP95Ms": 200, "minQuality": "0.95"}}
        doc["inference"] = {
            **SPEC_DOC["inference"],
            "routing": {"mode": mode, "smallVariant": "small", "largeVariant": "big",
                        "smallShare": "0"},
        }  # fmt: skip
        spec = ModelDeploymentSpec.model_validate(doc)
        plan, history, shares, reasons = plans.initial(spec), History(), [], []
        for i in range(12):
            now = 1_000_000 + 15 * i
            tick = Snapshot(now, now, snap(now, 2000.0).stages, routing=Agreement(1000, 0.93))
            d = decide(spec, plan, tick, history, PROFILES, now)
            plan, history = d.plan, d.history
            shares.append(plan["inference"].small_share)
            reasons += [r for r in d.reasons if "small share" in r]
        return shares, reasons, plan["inference"].replicas

    shares, reasons, routed = run("Auto")
    # quality(s) = 1 - 0.07 s >= 0.95 + 0.01: s <= 0.57 -> 0.55, set once and kept
    assert shares == [0.55] * 12 and len(reasons) == 1
    _, _, large_only = run("Off")
    assert routed < large_only
