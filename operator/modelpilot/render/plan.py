"""The plan: what each stage runs right now (replicas, variant, batching and model instances,
the gateway's small share and cache threshold).

It starts from the spec, is changed only by optimizer decisions, and lives in
``status.stages`` so an operator restart resumes it instead of starting over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from modelpilot.api.v1alpha1 import (
    STAGES,
    InferenceStage,
    KnobMode,
    ModelDeploymentSpec,
    ModelStage,
    Routing,
    SemanticCache,
    Variant,
)


@dataclass(frozen=True)
class StagePlan:
    replicas: int
    variant: str | None = None
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    shadow_variant: str | None = None  # candidate under verification, mirrored to
    small_share: float | None = None  # the gateway's share routed small, when routing is on
    cache_threshold: float | None = None  # the gateway's, when its cache is on
    instances: int | None = None  # Triton model instances per replica


Plan = dict[str, StagePlan]


Quality = Mapping[str, Mapping[str, float]]  # stage -> variant -> quality


def unavailable(stage: ModelStage, recorded: Mapping[str, Any] | None) -> frozenset[str]:
    """The stage's variants recorded in ``status.stages.<stage>.unavailable`` (their model
    did not load) that still name the same model: a variant whose model the user changed
    is tried again."""
    out = set()
    for row in (recorded or {}).get("unavailable") or []:
        v = stage.variant(str(row.get("variant")))
        if v is not None and v.model == row.get("model"):
            out.add(v.name)
    return frozenset(out)


def record_unavailable(
    stage: ModelStage,
    recorded: Mapping[str, Any] | None,
    found: Mapping[str, str],
    now: float,
    retry_s: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The stage's ``unavailable`` records after a load check found ``found`` (model ->
    Triton's message): earlier records stay until ``until`` or until their variant's model
    changes (a variant that no longer serves is no longer checked, so forgetting it at once
    would try it again at once); each variant of a model found is added. Returns (records,
    the new ones)."""
    still = unavailable(stage, recorded)
    keep = [
        dict(r)
        for r in (recorded or {}).get("unavailable") or []
        if int(r.get("until") or 0) > now and r.get("variant") in still
    ]
    have = {(r["variant"], r["model"]) for r in keep}
    new = [
        {"variant": v.name, "model": v.model, "reason": found[v.model][:1024],
         "until": int(now) + retry_s}
        for v in stage.variants
        if v.model in found and (v.name, v.model) not in have
    ]  # fmt: skip
    return keep + new, new


def _starting_variant(
    spec: ModelDeploymentSpec,
    name: str,
    stage: ModelStage,
    quality: Quality | None,
    exclude: frozenset[str] = frozenset(),
) -> str:
    """The cheapest variant that meets the quality floor, by ``quality`` (the operator's
    assessment: measured where a profile has it) or else the declared figures, among those
    not excluded (while any is not)."""
    floor = float(spec.slo.min_quality_value)
    known = quality.get(name, {}) if quality else {}

    def q(v: Variant) -> float:
        return known.get(v.name, float(v.quality_value))

    usable = [v for v in stage.variants if v.name not in exclude] or list(stage.variants)
    ok = [v for v in usable if q(v) >= floor]
    best = stage.reference if stage.reference in usable else max(usable, key=q)
    pool = ok or [best]
    return min(pool, key=lambda v: (v.cost_value, -q(v))).name


def _knob(knob: Routing | SemanticCache, recorded: Any = None) -> float | None:
    """A gateway knob's value (small share, cache threshold): none when the knob is Off, the
    user's when Fixed, and when Auto the recorded one (the optimizer's) within the knob's
    bounds, else the user's start."""
    if knob.mode == KnobMode.OFF:
        return None
    if knob.mode == KnobMode.FIXED or recorded is None:
        return knob.start
    low, high = knob.bounds
    return min(max(float(recorded), low), high)


def _routing(
    stage: InferenceStage, skip: frozenset[str], recorded: Any = None
) -> tuple[float | None, str | None]:
    """(small share, the variant the stage must plan) for the gateway: routing on pins the
    plan to largeVariant (its replicas serve both routes); a routed variant whose model does
    not load pauses routing."""
    routed = (stage.routing.small_variant, stage.routing.large_variant)
    share = _knob(stage.routing, recorded)
    if share is None or any(v in skip for v in routed):
        return None, None
    return share, stage.routing.large_variant


def initial(
    spec: ModelDeploymentSpec,
    quality: Quality | None = None,
    exclude: Mapping[str, frozenset[str]] | None = None,
) -> Plan:
    """Where a new ModelDeployment starts: min replicas (at least 1), spec batching, the
    cheapest variant at or above the quality floor (``quality``: see _starting_variant)
    that is not in ``exclude`` (stage -> variants whose model does not load)."""
    plan: Plan = {}
    for name in STAGES:
        stage = spec.stage(name)
        replicas = max(stage.replicas.min, min(1, stage.replicas.max))
        if isinstance(stage, ModelStage):
            skip = (exclude or {}).get(name, frozenset())
            plan[name] = StagePlan(
                replicas=replicas,
                variant=_starting_variant(spec, name, stage, quality, skip),
                max_batch_size=stage.batching.max_batch_size,
                max_queue_delay_us=stage.batching.max_queue_delay_microseconds,
                instances=1,
            )
            if isinstance(stage, InferenceStage):
                share, pinned = _routing(stage, skip)
                plan[name] = replace(
                    plan[name],
                    variant=pinned or plan[name].variant,
                    small_share=share,
                    cache_threshold=_knob(stage.semantic_cache),
                )
        else:
            plan[name] = StagePlan(replicas=replicas)
    return plan


def resume(
    spec: ModelDeploymentSpec,
    stages_status: Mapping[str, Mapping[str, Any]],
    quality: Quality | None = None,
) -> Plan:
    """The plan recorded in status, clamped to the current spec's bounds.

    A spec edit can shrink bounds or remove a variant: the recorded value is then clamped
    or reset to the starting point, never carried over out of bounds. A variant whose model
    does not load (:func:`unavailable`) neither serves nor is shadowed while another can.
    """
    exclude = {
        name: unavailable(stage, stages_status.get(name))
        for name in STAGES
        if isinstance(stage := spec.stage(name), ModelStage)
    }
    start = initial(spec, quality, exclude)
    plan: Plan = {}
    for name in STAGES:
        stage = spec.stage(name)
        recorded = stages_status.get(name) or {}
        base = start[name]
        replicas = recorded.get("replicas", base.replicas)
        replicas = min(max(int(replicas), stage.replicas.min), stage.replicas.max)
        if not isinstance(stage, ModelStage):
            plan[name] = StagePlan(replicas=replicas)
            continue
        variant = recorded.get("variant")
        skip = exclude.get(name, frozenset())
        gone = variant is None or stage.variant(variant) is None
        if gone or (variant in skip and base.variant not in skip):  # another one loads
            variant = base.variant
        mbs = min(
            int(recorded.get("maxBatchSize") or stage.batching.max_batch_size),
            stage.batching.max_batch_size,
        )
        delay = min(
            int(
                recorded.get(
                    "maxQueueDelayMicroseconds", stage.batching.max_queue_delay_microseconds
                )
            ),
            stage.batching.max_queue_delay_microseconds,
        )
        instances = min(max(int(recorded.get("instances") or 1), 1), stage.batching.max_instances)
        shadow = recorded.get("shadowVariant")
        if shadow is not None and (
            stage.variant(shadow) is None or shadow == variant or shadow in skip
        ):
            shadow = None
        plan[name] = replace(
            base,
            replicas=replicas,
            variant=variant,
            max_batch_size=mbs,
            max_queue_delay_us=delay,
            instances=instances,
            shadow_variant=shadow,
        )
        if isinstance(stage, InferenceStage):
            share, pinned = _routing(stage, skip, recorded.get("smallShare"))
            plan[name] = replace(
                plan[name],
                variant=pinned or plan[name].variant,
                shadow_variant=None if pinned else plan[name].shadow_variant,
                small_share=share,
                cache_threshold=_knob(stage.semantic_cache, recorded.get("cacheThreshold")),
            )
    return plan


def status_fields(plan: StagePlan) -> dict[str, Any]:
    """The plan of one stage as its ``status.stages`` entry (what the operator has set)."""
    out: dict[str, Any] = {"replicas": plan.replicas}
    if plan.variant is not None:
        out.update(
            variant=plan.variant,
            maxBatchSize=plan.max_batch_size,
            maxQueueDelayMicroseconds=plan.max_queue_delay_us,
            instances=plan.instances,
            shadowVariant=plan.shadow_variant,
        )
        # None too: a knob turned Off clears what status showed (a merge patch deletes it)
        out.update(smallShare=plan.small_share, cacheThreshold=plan.cache_threshold)
    return out
