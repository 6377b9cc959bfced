"""Load checks: a variant whose Triton model does not load is recorded with Triton's message,
moved off and not used again until its time is up or its model changes."""

from __future__ import annotations

from typing import Any

import pytest

from modelpilot.controller import conditions as cond
from modelpilot.controller.actuate import Actuator
from modelpilot.controller.reconcile import Reconciler
from modelpilot.optimizer.history import History
from modelpilot.optimizer.policy import decide
from modelpilot.render import plan as plans
from modelpilot.render.children import Defaults
from tests.helpers import sample, spec_of
from tests.unit.fake_kube import FakeKube
from tests.unit.optimizer_cases import PROFILES, make_spec, snap

pytestmark = pytest.mark.unit
NOW = 1_000_000
SPEC = make_spec(minQuality="0.5")  # embedding: big (cost 4), small (1), tiny (0.2)
EMBEDDING = SPEC.model_stage("embedding")


def row(variant: str, model: str, until: int = NOW + 60) -> dict[str, Any]:
    return {"variant": variant, "model": model, "reason": "not found", "until": until}


@pytest.mark.parametrize(
    ("recorded", "found", "kept", "added"),
    [
        ([], {"emb_tiny": "not found"}, [], ["tiny"]),  # a new finding
        ([row("tiny", "emb_tiny")], {}, ["tiny"], []),  # no longer served: still recorded
        ([row("tiny", "emb_tiny")], {"emb_tiny": "x"}, ["tiny"], []),  # once, not per pass
        ([row("tiny", "emb_tiny", until=NOW)], {}, [], []),  # its time is up: tried again
        ([row("tiny", "emb_old")], {}, [], []),  # the user changed its model: tried again
        ([row("gone", "emb_gone")], {}, [], []),  # the variant left the spec
    ],
)
def test_records_keep_until_their_time_or_a_model_change(
    recorded: list[dict[str, Any]], found: dict[str, str], kept: list[str], added: list[str]
) -> None:
    records, new = plans.record_unavailable(
        EMBEDDING, {"unavailable": recorded}, found, NOW, retry_s=3600
    )
    assert [r["variant"] for r in records] == kept + added
    assert [r["variant"] for r in new] == added
    assert all(r["until"] == NOW + 3600 and r["reason"] == found[r["model"]] for r in new)


def test_the_plan_moves_off_an_unavailable_variant_and_drops_it_as_a_shadow() -> None:
    assert plans.initial(SPEC)["embedding"].variant == "tiny"  # the cheapest over the floor
    missing = [row("tiny", "emb_tiny"), row("small", "emb_small")]
    status = {"embedding": {"variant": "tiny", "shadowVariant": "small", "unavailable": missing}}
    moved = plans.resume(SPEC, status)["embedding"]
    assert (moved.variant, moved.shadow_variant) == ("big", None)
    every = {"embedding": {"variant": "small", "unavailable": [
        row(v.name, v.model) for v in EMBEDDING.variants]}}  # fmt: skip
    assert plans.resume(SPEC, every)["embedding"].variant == "small"  # none loads: no churn


def test_the_optimizer_never_chooses_an_unavailable_variant_and_says_why() -> None:
    start = plans.initial(SPEC)
    start = {**start, "embedding": plans.StagePlan(1, "big", 64, 5000)}
    free = decide(SPEC, start, snap(NOW, 200), History(), PROFILES, NOW)
    assert free.plan["embedding"].shadow_variant == "tiny"  # verified before it serves
    held = decide(
        SPEC, start, snap(NOW, 200), History(), PROFILES, NOW,
        unavailable={"embedding": frozenset({"tiny"})},
    )  # fmt: skip
    assert held.plan["embedding"].shadow_variant == "small"
    assert "embedding: not using tiny: model does not load" in held.reasons


def test_a_stage_whose_every_variant_fails_to_load_is_degraded_with_tritons_message() -> None:
    kube = FakeKube()
    doc = sample("minimal")["spec"]
    kube.create_model_deployment("ns", "m", doc)
    reconciler = Reconciler(kube, Actuator(kube, Defaults(), admin_key=b"k" * 32))  # type: ignore[arg-type]
    reconciler.reconcile("ns", "m")
    md = kube.objects[("ModelDeployment", "ns", "m")]
    md["status"]["stages"]["embedding"]["unavailable"] = [
        {"variant": "minilm-fp32", "model": "minilm_fp32", "until": NOW * 10,
         "reason": "Request for unknown model: 'minilm_fp32' is not found (pod m-0)"}
    ]  # fmt: skip
    reconciler.reconcile("ns", "m")
    degraded = cond.get_condition(md["status"]["conditions"], "Degraded")
    assert degraded is not None and degraded["status"] == "True"
    assert degraded["reason"] == "ModelUnavailable"
    assert "embedding/minilm-fp32" in degraded["message"] and "not found" in degraded["message"]


def test_a_routed_variant_that_does_not_load_pauses_routing() -> None:
    """The gateway's pods load both routed models; one that does not load would keep every
    new pod from Ready. Routing pauses (the planned variant serves alone) until it loads."""
    from modelpilot.render.children import served_models, service_config

    spec = spec_of("full")  # routing Auto: reranker-small / reranker-large-gpu
    routed = plans.initial(spec)["inference"]
    assert routed.small_share == 0.5 and routed.variant == "reranker-large-gpu"
    missing = {"inference": {"unavailable": [row("reranker-small", "reranker_small")]}}
    paused = plans.resume(spec, missing)["inference"]
    assert paused.small_share is None and paused.variant == "reranker-large-gpu"
    assert served_models(spec, "inference", paused) == ["reranker_large"]
    config = service_config(spec, "inference", paused)
    assert config.routing is not None and config.routing["enabled"] is False
    assert config.smallShare is None
