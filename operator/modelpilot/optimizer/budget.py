"""The cost budget (``slo.maxCostPerHour``) as a hard limit on a plan."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from modelpilot.api.v1alpha1 import ModelDeploymentSpec, ModelStage
from modelpilot.contract import MODEL_STAGES
from modelpilot.render.plan import Plan


def enforce_budget(
    spec: ModelDeploymentSpec,
    plan: Plan,
    cost: float,
    limit: float,
    reasons: list[str],
    excluded: Mapping[str, set[str]],
    quality: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[Plan, float, str | None]:
    """Degrade toward cheaper variants, then fewer replicas, until the plan fits ``limit``.

    The budget is a hard limit: these switches do not wait for verification, but never go
    to a variant that failed it (``excluded``) or under the quality floor (``quality``: stage
    -> variant -> assessed quality; by default the declared figures)."""
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
                if (quality[s][v.name] if quality else float(v.quality_value)) >= floor
                and v.name not in excluded.get(s, set())
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
