"""The verification gate: the pure verdict, and variant switches through decide() on a fake
clock (trial start, wait, promote, reject, retry, Recommend and disabled modes)."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from modelpilot import plan as plans
from modelpilot.api.v1alpha1 import ModelDeploymentSpec, Verification
from modelpilot.optimizer.gate import judge
from modelpilot.optimizer.policy import Decision, History, decide
from modelpilot.optimizer.snapshot import ShadowStats, Snapshot, StageTelemetry
from tests.unit.test_optimizer import PROFILES, SPEC_DOC

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
    verdict = judge(RULES, stats, budget_ms=50.0, started=1000, now=1000 + waited)
    assert verdict.action == action
    assert says in verdict.reason


T0 = 2_000_000
STEP = 15


def spec(mode: str = "Auto", **verification: Any) -> ModelDeploymentSpec:
    doc = copy.deepcopy(SPEC_DOC)
    doc["optimizer"].update(mode=mode, verification={"minSamples": 50, **verification})
    return ModelDeploymentSpec.model_validate(doc)


def snap(now: int, shadow: dict[tuple[str, str], ShadowStats] | None = None) -> Snapshot:
    stages = {
        s: StageTelemetry(rate_rps=200.0)
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

    def tick(self, shadow: dict[tuple[str, str], ShadowStats] | None = None) -> Decision:
        d = decide(self.spec, self.plan, snap(self.now, shadow), self.history, PROFILES, self.now)
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
    assert loop.history.stage("embedding").trial_started == T0
    waiting = loop.tick()  # no mirrored samples yet: keep serving big, keep verifying
    assert loop.stage().variant == "big" and loop.stage().shadow_variant == "small"
    assert any("verifying small" in r and "0/50" in r for r in waiting.reasons)
    assert embedding_steps(waiting) == []
    promoted = loop.tick(GOOD)
    assert embedding_steps(promoted) == ["promoted"]
    assert loop.stage().variant == "small" and loop.stage().shadow_variant is None
    assert loop.history.stage("embedding").trial_started is None
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
