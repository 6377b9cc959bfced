"""Variant quality by measurement: the assessment table, and decide() holding the floor to it
with the measured profile of our own models."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from modelpilot.api.v1alpha1 import ModelDeploymentSpec, ModelStage
from modelpilot.optimizer.history import History
from modelpilot.optimizer.policy import decide
from modelpilot.optimizer.profiles import load, parse
from modelpilot.optimizer.quality import assess
from modelpilot.optimizer.tunables import Tunables
from modelpilot.render import plan as plans
from tests.helpers import ROOT, sample
from tests.unit.optimizer_cases import PROFILE_DOC, snap

pytestmark = pytest.mark.unit


def stage_of(variants: list[tuple[str, str, str, bool]]) -> ModelStage:
    return ModelStage.model_validate(
        {
            "variants": [
                {"name": n, "model": m, "precision": "fp32", "quality": q, "cost": "1"}
                | ({"reference": True} if ref else {})
                for n, m, q, ref in variants
            ]
        }
    )


def profiles_with(**models: tuple[float | None, str | None]) -> Any:
    """PROFILE_DOC's curves under new model names, each with (quality, reference)."""
    doc = copy.deepcopy(PROFILE_DOC)
    curve = doc["models"]["emb_big"]["batches"]
    doc["models"] = {
        name: {"stage": "embedding", "quality": q, "reference": ref, "batches": curve}
        for name, (q, ref) in models.items()
    }
    return parse(doc)


BIG, SMALL = ("big", "m_big", "1", False), ("small", "m_small", "0.9", False)
SMALL_REF = ("small", "m_small", "0.9", True)
A, B = ("a", "m_a", "1", False), ("b", "m_b", "1", False)
REF, MEASURED, DECLARED = "reference", "measured", "declared"


@pytest.mark.parametrize(
    ("variants", "measured", "expected"),
    [
        # measured against the reference: the measured figure, no finding within the margin
        (
            [BIG, SMALL],
            {"m_small": (0.85, "m_big")},
            {"big": (1.0, REF, False), "small": (0.85, MEASURED, False)},
        ),
        # a declared figure far from the measured one: measured wins, with a finding
        ([BIG, SMALL], {"m_small": (0.34, "m_big")}, {"small": (0.34, "measured", True)}),
        # no measurement: the declared figure stands, and status says why
        ([BIG, SMALL], {}, {"small": (0.9, "declared", True)}),
        ([BIG, SMALL], {"m_small": (None, None)}, {"small": (0.9, "declared", True)}),
        # measured against another reference (stale): declared stands
        ([BIG, SMALL], {"m_small": (0.5, "m_other")}, {"small": (0.9, "declared", True)}),
        # a measurement without a named reference is taken as against the stage's reference
        ([BIG, SMALL], {"m_small": (0.88, None)}, {"small": (0.88, "measured", False)}),
        # the reference is the marked variant, whatever the declared figures say ...
        (
            [BIG, SMALL_REF],
            {"m_big": (0.7, "m_small")},
            {"small": (1.0, REF, False), "big": (0.7, MEASURED, True)},
        ),
        # ... else the highest declared one, the first on a tie
        ([A, B], {"m_b": (0.95, "m_a")}, {"a": (1.0, REF, False), "b": (0.95, MEASURED, False)}),
    ],
)
def test_assess(
    variants: list[tuple[str, str, str, bool]],
    measured: dict[str, tuple[float | None, str | None]],
    expected: dict[str, tuple[float, str, bool]],
) -> None:
    got = assess("embedding", stage_of(variants), profiles_with(**measured), Tunables())
    for name, (value, source, finding) in expected.items():
        q = got[name]
        assert (q.value, q.source, q.finding is not None) == (pytest.approx(value), source, finding)
        assert q.declared == float(next(v[2] for v in variants if v[0] == name))


def test_two_marked_references_are_rejected() -> None:
    with pytest.raises(ValueError, match="at most one variant may be the reference"):
        stage_of([("a", "m_a", "1", True), ("b", "m_b", "0.9", True)])


# --------------------------------------------- decide() with the measured profile of ours
REAL = load(ROOT / "profiles/cpu.json")


def full_spec(min_quality: str) -> ModelDeploymentSpec:
    """examples/full.yaml (static declared 0.86, int8 0.97) at another floor, unverified."""
    doc = copy.deepcopy(sample("full")["spec"])
    doc["slo"]["minQuality"] = min_quality
    doc["slo"].pop("maxCostPerHour", None)
    doc["optimizer"] = {"mode": "Auto", "verification": {"enabled": False}}
    return ModelDeploymentSpec.model_validate(doc)


@pytest.mark.parametrize(
    ("floor", "serves", "never"),
    [
        ("0.8", "minilm-int8", {"minilm-static"}),  # int8 measured 0.82, static 0.34
        ("0.9", "minilm-fp32", {"minilm-static", "minilm-int8"}),
        ("0.3", "minilm-static", set()),  # the floor admits even the measured static model
    ],
)
def test_the_floor_holds_by_measured_quality(floor: str, serves: str, never: set[str]) -> None:
    spec = full_spec(floor)
    plan = plans.initial(spec)
    plan["embedding"] = plan["embedding"].__class__(1, "minilm-fp32", 8, 1000)
    decision = decide(spec, plan, snap(1_000_000, 2.0), History(), REAL, 1_000_000)
    assert decision.plan["embedding"].variant == serves
    quality = decision.quality["embedding"]
    assert quality["minilm-static"].source == "measured"
    assert quality["minilm-static"].value == pytest.approx(0.34, abs=0.05)
    assert quality["minilm-static"].finding is not None  # declared 0.86 is contradicted
    assert quality["minilm-int8"].value == pytest.approx(0.82, abs=0.05)
    assert not never & {decision.plan["embedding"].variant}


def test_a_variant_declared_above_the_floor_but_measured_under_it_is_left() -> None:
    """Serving minilm-static (declared 0.86) under minQuality 0.8: the measured 0.34 breaks the
    floor, so the optimizer switches away at once, with the measured figure in the reason."""
    spec = full_spec("0.8")
    plan = plans.initial(spec)
    plan["embedding"] = plan["embedding"].__class__(1, "minilm-static", 8, 1000)
    decision = decide(spec, plan, snap(1_000_000, 2.0), History(), REAL, 1_000_000)
    assert decision.plan["embedding"].variant == "minilm-int8"
    assert any("switch variant minilm-static -> minilm-int8" in r for r in decision.reasons)
