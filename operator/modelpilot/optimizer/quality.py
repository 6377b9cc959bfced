"""Each variant's quality, by measurement: the figure the optimizer holds to the floor.

A variant's quality is measured against its stage's reference variant, by the stage's one
metric (``contract.QUALITY_METRICS``): neighbour recall@10 for embeddings, top-3 overlap for
re-rankers. The reference has quality 1 by definition. A profile's measurement counts when it
was taken against the same reference model; otherwise, or with none, the declared figure
stands in, said so in the assessment. A declared figure more than ``quality_margin`` from the
measured one is a finding the operator reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from modelpilot.api.v1alpha1 import ModelDeploymentSpec, ModelStage
from modelpilot.contract import MODEL_STAGES, QUALITY_METRICS
from modelpilot.optimizer.profiles import Profiles
from modelpilot.optimizer.tunables import Tunables

Source = Literal["reference", "measured", "declared"]


@dataclass(frozen=True)
class Quality:
    """One variant's quality as the optimizer uses it, and where the figure comes from."""

    variant: str
    value: float
    source: Source
    declared: float
    measured: float | None = None
    finding: str | None = None  # a declared figure the measurement contradicts, or why unmeasured

    def to_status(self, stage: str) -> dict[str, object]:
        out: dict[str, object] = {
            "stage": stage,
            "variant": self.variant,
            "quality": round(self.value, 4),
            "source": self.source,
            "declared": round(self.declared, 4),
        }
        if self.measured is not None:
            out["measured"] = round(self.measured, 4)
        if self.finding:
            out["finding"] = self.finding
        return out


def assess(
    stage_name: str, stage: ModelStage, profiles: Profiles, tun: Tunables
) -> dict[str, Quality]:
    """Every variant's quality in ``stage``, by variant name."""
    ref = stage.reference
    metric = QUALITY_METRICS.get(stage_name, "quality")
    out: dict[str, Quality] = {}
    for v in stage.variants:
        declared = float(v.quality_value)
        if v.name == ref.name:
            out[v.name] = Quality(v.name, 1.0, "reference", declared)
            continue
        prof = profiles.model(v.model)
        measured = prof.quality if prof is not None else None
        against = prof.reference if prof is not None else None
        if measured is None:
            why = f"no measured {metric} for model {v.model}: the declared {declared:g} stands"
            out[v.name] = Quality(v.name, declared, "declared", declared, None, why)
        elif against is not None and against != ref.model:
            why = (
                f"{metric} of {v.model} was measured against {against}, not this stage's "
                f"reference {ref.model}: the declared {declared:g} stands"
            )
            out[v.name] = Quality(v.name, declared, "declared", declared, None, why)
        else:
            finding = None
            if abs(declared - measured) > tun.quality_margin:
                finding = (
                    f"declared quality {declared:g} but measured {metric} {measured:.3f} "
                    f"against {ref.name}: the measured figure is used"
                )
            out[v.name] = Quality(v.name, measured, "measured", declared, measured, finding)
    return out


def assess_all(
    spec: ModelDeploymentSpec, profiles: Profiles, tun: Tunables
) -> dict[str, dict[str, float]]:
    """Every model stage's variant qualities, as ``render.plan`` takes them."""
    return {
        s: {v: q.value for v, q in assess(s, spec.model_stage(s), profiles, tun).items()}
        for s in MODEL_STAGES
    }
