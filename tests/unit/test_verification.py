"""The verification gate: the pure verdict, and variant switches through decide() on a fake
clock (trial start, wait, promote, reject, retry, too few samples and why, Recommend and
disabled modes)."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from modelpilot.api.v1alpha1 import ModelDeploymentSpec, Verification
from modelpilot.optimizer.history import History
from modelpilot.optimizer.policy import Decision, decide
from modelpilot.optimizer.snapshot import ShadowStats, Snapshot, StageTelemetry
from modelpilot.optimizer.verification import judge
from modelpilot.render import plan as plans
from tests.unit.optimizer_cases import PROFILES, SPEC_DOC

pytestmark = pytest.mark.unit
RULES = Verification.model_validate({"minAgreement": "0.9", "minSamples": 50})


@pytest.mark.parametrize(
    ("stats", "waited", "action", "says"),
    [
        (None, 10, "wait", "0/50 shadow samples"),
        (ShadowStats(20, 0.99, 5.0), 100, "wait", "20/50"),
        (None, 600, "reject", "only 0 shadow samples in 600 s"),
        (ShadowStats(49, 0.99, 5.0), 700, "reject", "only 49"),
        (ShadowStats(50, 0.95, 5.0), 60, "promote", "agreement 0.950 >= 0.9 over 50"),
        (ShadowStats(500, 0.90, None), 60, "promote", "agreement 0.900"),
        (ShadowStats(50, 0.89, 5.0), 60, "reject", "agreement 0.890 < 0.9"),
        (ShadowStats(50, None, 5.0), 60, "reject", "agreement unknown"),
        (ShadowStats(50, 0.99, 80.0), 60, "reject", "shadow p95 80 ms > the stage budget 50"),
        (ShadowStats(200, 0.99, 5.0, errors=3), 60, "reject", "failed 3 of 203"),
        (ShadowStats(200, 0.99, 5.0, errors=2), 60, "promote", "agreement 0.990"),
    ],
)
def test_the_verdict_on_a_candidate(
    stats: ShadowStats | None, waited: int, action: str, says: str
) -> None:
    verdict = judge(RULES, stats, 50.0, started=1000, now=1000 + waited, rate_rps=20.0)
    assert verdict.action == action
    assert says in verdict.reason


# Defaults: sampleRatio 0.1, timeoutSeconds 600; minSamples 50.
@pytest.mark.parametrize(
    ("rate", "per_request", "stats", "waited", "action", "says"),
    [
        # The stage serves nothing: nothing to mirror. Said at once, given up after 60 s.
        (0.0, 1.0, None, 30, "wait", "no requests in the last 60 s"),
        (0.0, 1.0, None, 75, "reject", "cannot reach 50 by timeoutSeconds 600: the stage"),
        (None, 1.0, None, 75, "reject", "had no requests in the last 60 s"),
        # 20 requests/s x 0.1 should have mirrored ~150 requests: the pods do not mirror.
        (20.0, 1.0, None, 75, "reject", "no shadow series for the candidate"),
        (20.0, 1.0, None, 75, "reject", "pods are not mirroring to it"),
        # Series exist but hold no sample: mirroring stopped (not the same as no series).
        (20.0, 1.0, ShadowStats(0, None, None), 75, "reject", "show no samples"),
        # Too few mirrored requests yet to call the mirror broken: out of reach all the same.
        (0.9, 1.0, None, 60, "reject", "0.9 requests/s x sampleRatio 0.1 bring about 49 more"),
        # Too early to tell a broken mirror from a slow start.
        (20.0, 1.0, None, 30, "wait", "0/50 shadow samples after 30 s; about 1140 more"),
        # 0.3 requests/s x 0.1: ~16 more in the 525 s left, short of 50.
        (0.3, 1.0, ShadowStats(2, 0.99, 5.0), 75, "reject", "bring about 16 more in the 525 s"),
        (0.3, 1.0, ShadowStats(2, 0.99, 5.0), 75, "reject", "raise sampleRatio or timeoutSeconds"),
        # The same rate of 10-text embedding requests gives ten samples a request: enough.
        (0.3, 10.0, ShadowStats(20, 0.99, 5.0), 75, "wait", "20/50 shadow samples after 75 s"),
        # What arrived so far counts when it outpaces the rate's prediction.
        (0.3, 1.0, ShadowStats(30, 0.99, 5.0), 75, "wait", "30/50"),
    ],
)
def test_too_few_samples_say_why_and_end_once_out_of_reach(
    rate: float | None,
    per_request: float,
    stats: ShadowStats | None,
    waited: int,
    action: str,
    says: str,
) -> None:
    verdict = judge(RULES, stats, 50.0, 1000, 1000 + waited, rate, per_request)
    assert verdict.action == action
    assert says in verdict.reason


T0 = 2_000_000
STEP = 15


def spec(mode: str = "Auto", **verification: Any) -> ModelDeploymentSpec:
    doc = copy.deepcopy(SPEC_DOC)
    doc["optimizer"].update(mode=mode, verification={"minSamples": 50, **verification})
    return ModelDeploymentSpec.model_validate(doc)


def snap(
    now: int, shadow: dict[tuple[str, str], ShadowStats] | None = None, rate: float | None = 200.0
) -> Snapshot:
    stages = {
        s: StageTelemetry(rate_rps=rate)
        for s in ("ingestion", "embedding", "retrieval", "inference")
    }
    return Snapshot(time=now, newest_sample=now, stages=stages, shadow=shadow or {})


class Loop:
    """decide() carried from tick to tick as the operator carries it (plan and history)."""

    def __init__(self, spec: ModelDeploymentSpec) -> None:
        self.spec = spec
        start = plans.initial(spec)
        # Serving the expensive variant at a load where "small" fits: the optimizer wants it.
        self.plan = {**start, "embedding": replace(start["embedding"], variant="big")}
        self.history = History()
        self.now = T0

    def tick(
        self, shadow: dict[tuple[str, str], ShadowStats] | None = None, rate: float | None = 200.0
    ) -> Decision:
        now = self.now
        d = decide(self.spec, self.plan, snap(now, shadow, rate), self.history, PROFILES, now)
        self.plan, self.history = d.plan, d.history
        self.now += STEP
        return d

    def stage(self) -> plans.StagePlan:
        return self.plan["embedding"]


GOOD = {("embedding", "emb_small"): ShadowStats(samples=80, agreement=0.97, p95_ms=3.0)}
BAD = {("embedding", "emb_small"): ShadowStats(samples=80, agreement=0.62, p95_ms=3.0)}


def embedding_steps(d: Decision) -> list[str]:
    return [action for stage, action, _ in d.verifications if stage == "embedding"]


def test_a_better_variant_is_verified_in_shadow_then_promoted() -> None:
    loop = Loop(spec())
    first = loop.tick()
    assert embedding_steps(first) == ["started"]
    assert loop.stage().variant == "big" and loop.stage().shadow_variant == "small"
    assert "embedding" in first.changed  # the shadow is part of the plan: it gets applied
    assert loop.history.stage("embedding").verification_started == T0
    waiting = loop.tick()  # no mirrored samples yet: keep serving big, keep verifying
    assert loop.stage().variant == "big" and loop.stage().shadow_variant == "small"
    assert any("verifying small" in r and "0/50" in r for r in waiting.reasons)
    assert embedding_steps(waiting) == []
    promoted = loop.tick(GOOD)
    assert embedding_steps(promoted) == ["promoted"]
    assert loop.stage().variant == "small" and loop.stage().shadow_variant is None
    assert loop.history.stage("embedding").verification_started is None
    assert any("promoted after verification: agreement 0.970" in r for r in promoted.reasons)


def test_a_disagreeing_candidate_is_rejected_and_not_retried_until_retry_after() -> None:
    loop = Loop(spec(retryAfterSeconds=600))
    loop.tick()
    rejected = loop.tick(BAD)
    assert embedding_steps(rejected) == ["rejected"]
    assert loop.stage().variant == "big" and loop.stage().shadow_variant is None
    assert any(
        "small rejected after verification: agreement 0.620 < 0.9" in r for r in rejected.reasons
    )
    (variant, until, why), *_ = loop.history.stage("embedding").rejected
    assert (variant, until) == ("small", T0 + STEP + 600) and "0.620" in why
    quiet = [loop.tick() for _ in range(600 // STEP - 1)]
    assert all(embedding_steps(d) == [] for d in quiet)
    assert loop.stage().variant == "big" and loop.stage().shadow_variant is None
    retried = loop.tick()  # the rejection expired: small is tried again, in shadow first
    assert embedding_steps(retried) == ["started"] and loop.stage().shadow_variant == "small"
    assert loop.history.stage("embedding").rejected == ()


def test_too_little_shadow_traffic_rejects_at_the_timeout() -> None:
    loop = Loop(spec(timeoutSeconds=60))
    loop.tick()
    few = {("embedding", "emb_small"): ShadowStats(samples=3, agreement=1.0, p95_ms=1.0)}
    steps = [embedding_steps(loop.tick(few)) for _ in range(60 // STEP)]
    assert steps[:-1] == [[]] * (len(steps) - 1) and steps[-1] == ["rejected"]
    assert "only 3 shadow samples in 60 s" in loop.history.stage("embedding").rejected[0][2]
    assert loop.stage().variant == "big"


def test_recommend_mode_and_a_disabled_gate_switch_without_shadow() -> None:
    for s in (spec(mode="Recommend"), spec(enabled=False)):
        loop = Loop(s)
        d = loop.tick()
        assert d.verifications == ()
        assert loop.stage().variant == "small" and loop.stage().shadow_variant is None


def test_a_verification_survives_an_operator_restart_through_status() -> None:
    loop = Loop(spec())
    loop.tick()
    loop.tick(BAD)
    loop.tick()
    status_stages = {s: plans.status_fields(p) for s, p in loop.plan.items()}
    loop.plan = plans.resume(loop.spec, status_stages)
    loop.history = History.from_status(loop.history.to_status())
    assert loop.history.stage("embedding").rejected[0][0] == "small"
    d = loop.tick()
    assert embedding_steps(d) == [] and loop.stage().variant == "big"

    fresh = Loop(spec())
    fresh.tick()
    status_stages = {s: plans.status_fields(p) for s, p in fresh.plan.items()}
    assert status_stages["embedding"]["shadowVariant"] == "small"
    fresh.plan = plans.resume(fresh.spec, status_stages)
    fresh.history = History.from_status(fresh.history.to_status())
    assert fresh.stage().shadow_variant == "small"
    assert embedding_steps(fresh.tick(GOOD)) == ["promoted"]


NONE: dict[tuple[str, str], ShadowStats] = {}
EMPTY = {("embedding", "emb_small"): ShadowStats(samples=0, agreement=None, p95_ms=None)}


@pytest.mark.parametrize(
    ("rate", "shadow", "says"),
    [
        # The demo: 0/50 shadow samples for minutes. Now: why, and over after 60 s, not 600.
        (200.0, NONE, "no shadow series for the candidate"),
        (200.0, EMPTY, "the candidate's shadow series show no samples"),
        (0.0, NONE, "the stage had no requests in the last 60 s"),
        (None, NONE, "the stage had no requests in the last 60 s"),
        (0.5, NONE, "0.5 requests/s x sampleRatio 0.1 bring about 27 more"),
    ],
)
def test_a_verification_without_samples_ends_with_its_cause(
    rate: float | None, shadow: dict[tuple[str, str], ShadowStats], says: str
) -> None:
    loop = Loop(spec(retryAfterSeconds=900))
    assert embedding_steps(loop.tick()) == ["started"]  # at 200 requests/s
    waiting = [loop.tick(shadow, rate) for _ in range(60 // STEP - 1)]
    assert all(embedding_steps(d) == [] for d in waiting)
    assert any("verifying small" in r and "0/50 shadow samples" in r for r in waiting[-1].reasons)
    ended = loop.tick(shadow, rate)  # 60 s in, 540 s before the timeout
    assert embedding_steps(ended) == ["rejected"]
    (_, _, why), *_ = ended.verifications
    assert says in why and "not tried again for 900 s" in why
    assert loop.stage().variant == "big" and loop.stage().shadow_variant is None
    assert loop.history.stage("embedding").verification_started is None
    (variant, until, recorded), *_ = loop.history.stage("embedding").rejected
    assert (variant, until, recorded) == ("small", T0 + 60 + 900, why)


def test_a_verification_does_not_hold_up_replicas_or_batching() -> None:
    loop = Loop(spec())
    loop.tick()
    before = loop.stage()
    surge = [loop.tick(rate=3000.0) for _ in range(2)]  # samples still to come: it waits
    after = loop.stage()
    assert all(embedding_steps(d) == [] for d in surge)
    assert any("verifying small" in r for r in surge[0].reasons)
    assert (after.variant, after.shadow_variant) == ("big", "small")
    assert after.replicas > before.replicas
    assert (after.max_batch_size, after.max_queue_delay_us) != (
        before.max_batch_size,
        before.max_queue_delay_us,
    )


@pytest.mark.parametrize(
    ("rate", "starts"),
    [
        (200.0, True),  # 200 x 0.1 x 600 s: thousands of samples
        (1.0, True),  # 1 x 0.1 x 600 s = 60 >= 50
        (0.5, False),  # 30 < 50: the verification could only time out
        (0.0, False),
    ],
)
def test_a_verification_that_cannot_reach_min_samples_is_not_started(
    rate: float, starts: bool
) -> None:
    loop = Loop(spec())
    d = loop.tick(rate=rate)
    assert (embedding_steps(d) == ["started"]) == starts
    assert (loop.stage().shadow_variant == "small") == starts
    staying = [r for r in d.reasons if r.startswith("embedding: staying on big")]
    assert bool(staying) != starts
    if staying:
        assert "cannot be verified now" in staying[0] and "fewer than minSamples 50" in staying[0]
