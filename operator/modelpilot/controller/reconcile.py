"""Reconcile one ModelDeployment: level-triggered and idempotent.

Reads the object fresh, has the actuator apply the children of its spec and current plan,
and writes status only when it differs from what is stored. The optimizer converges to a
new plan through the same :meth:`Reconciler.converge`, with its own status fields, in one
status write. Invalid specs become ``Degraded`` rather than exceptions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from modelpilot.adapters.kube import Kube
from modelpilot.api.v1alpha1 import STAGES, ModelDeploymentSpec
from modelpilot.contract import MODEL_STAGES
from modelpilot.controller import conditions as cond
from modelpilot.controller.actuate import Actuator, ApplyRejected
from modelpilot.optimizer.profiles import Profiles
from modelpilot.optimizer.quality import assess_all
from modelpilot.optimizer.tunables import Tunables
from modelpilot.render import plan as plans
from modelpilot.render.children import child_name

log = logging.getLogger(__name__)


class TransientError(Exception):
    """The apiserver could not be reached or refused for now; retry with backoff."""


@dataclass(frozen=True)
class Outcome:
    applied: int
    status_written: bool
    degraded: str | None = None


def now_rfc3339() -> str:
    return cond.rfc3339(time.time())


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"spec.{where}: {err['msg']}")
    return "; ".join(parts)


def _observed(
    children: Mapping[tuple[str, str], Mapping[str, Any]], owner: str
) -> dict[str, cond.Observed | None]:
    out: dict[str, cond.Observed | None] = {}
    for stage in STAGES:
        dep = children.get(("Deployment", child_name(owner, stage)))
        if dep is None:
            out[stage] = None
            continue
        st = dep.get("status") or {}
        out[stage] = cond.Observed(
            replicas=int(st.get("replicas") or 0),
            ready=int(st.get("readyReplicas") or 0),
            updated=int(st.get("updatedReplicas") or 0),
            generation_current=(st.get("observedGeneration") or 0)
            >= (dep["metadata"].get("generation") or 0),
        )
    return out


def _serving_unavailable(
    spec: ModelDeploymentSpec, plan: plans.Plan, stages: Mapping[str, Any]
) -> str | None:
    """Why a stage must serve a variant whose model does not load (no other variant of it
    does), or None."""
    out = []
    for name in MODEL_STAGES:
        recorded, variant = stages.get(name) or {}, plan[name].variant
        if variant in plans.unavailable(spec.model_stage(name), recorded):
            why = next(r["reason"] for r in recorded["unavailable"] if r["variant"] == variant)
            out.append(f"{name}/{variant}: no variant of the stage loads: {why}")
    return "; ".join(out)[:1024] or None


def _stage_status(
    plan: plans.Plan, observed: Mapping[str, cond.Observed | None]
) -> dict[str, dict[str, Any]]:
    """The plan and readiness per stage. A merge patch leaves the keys it does not name, so
    what the live sync records there (podsOnPlan, liveMessage) stays its own."""
    out = {}
    for stage in STAGES:
        obs = observed.get(stage)
        out[stage] = {**plans.status_fields(plan[stage]), "readyReplicas": obs.ready if obs else 0}
    return out


class Reconciler:
    """Drives one ModelDeployment's children and status towards its spec."""

    def __init__(
        self,
        kube: Kube,
        actuator: Actuator,
        check_spec: Callable[[ModelDeploymentSpec], tuple[str, str] | None] | None = None,
        profiles: Profiles | None = None,
    ) -> None:
        self.kube = kube
        self.actuator = actuator
        # What the variants' quality is measured to be: a new ModelDeployment starts on a
        # variant that meets its floor by measurement, not only by declaration.
        self.profiles = profiles or Profiles({})
        # Operator-level rules a valid spec may still break: (reason, message) or None.
        self.check_spec = check_spec or (lambda spec: None)

    def reconcile(self, namespace: str, name: str, attempt: int = 0) -> Outcome | None:
        """Reconcile once. ``attempt`` counts consecutive failures: from the third on, the
        failure is surfaced as Degraded so a stuck object is visible, not only logged."""
        try:
            return self._reconcile(namespace, name)
        except Exception as exc:
            if attempt >= 2:
                md = self.kube.get_model_deployment(namespace, name)
                if md is not None:
                    body = getattr(exc, "body", None) or str(exc)
                    self._degrade(
                        md, "ReconcileFailing", f"{attempt + 1} attempts failed: {body}"[:1000]
                    )
            if isinstance(exc, TransientError):
                raise
            raise TransientError(str(exc)) from exc

    def _write_status(self, md: Mapping[str, Any], status: dict[str, Any]) -> bool:
        current = md.get("status") or {}
        if cond.merge_patch(current, status) == current:
            return False
        self.kube.patch_status(md["metadata"]["namespace"], md["metadata"]["name"], status)
        return True

    def _degrade(self, md: Mapping[str, Any], reason: str, message: str) -> Outcome:
        meta = md["metadata"]
        status = md.get("status") or {}
        old = cond.get_condition(status.get("conditions") or [], "Degraded")
        now, gen = now_rfc3339(), meta.get("generation")
        conditions = cond.set_condition(
            status.get("conditions") or [], "Degraded", "True", reason, message, now, gen
        )
        conditions = cond.set_condition(
            conditions,
            "Ready",
            "False",
            reason,
            "cannot act on the spec: see the Degraded condition",
            now,
            gen,
        )
        written = self._write_status(md, {"conditions": conditions, "observedGeneration": gen})
        if not old or old.get("status") != "True" or old.get("message") != message:
            self.kube.event(md, "Warning", reason, message)
        return Outcome(applied=0, status_written=written, degraded=message)

    def _reconcile(self, namespace: str, name: str) -> Outcome | None:
        md = self.kube.get_model_deployment(namespace, name)
        if md is None or md["metadata"].get("deletionTimestamp"):
            return None  # children go with it through their ownerReferences
        try:
            spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
        except ValidationError as exc:
            return self._degrade(md, "InvalidSpec", _validation_message(exc))
        plan = plans.resume(spec, (md.get("status") or {}).get("stages") or {}, self.quality(spec))
        return self.converge(md, spec, plan)

    def quality(self, spec: ModelDeploymentSpec) -> dict[str, dict[str, float]]:
        """The spec's variant qualities as the optimizer assesses them."""
        return assess_all(spec, self.profiles, Tunables())

    def converge(
        self,
        md: Mapping[str, Any],
        spec: ModelDeploymentSpec,
        plan: plans.Plan,
        extra_status: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """Apply ``plan`` and write status (with ``extra_status``) in one write."""
        if (problem := self.check_spec(spec)) is not None:
            return self._degrade(md, *problem)
        meta = md["metadata"]
        status = md.get("status") or {}
        try:
            applied = self.actuator.apply(
                md, spec, plan, prune=status.get("observedGeneration") != meta.get("generation")
            )
        except ApplyRejected as exc:
            return self._degrade(md, "ApplyRejected", str(exc))

        observed = _observed(applied.children, meta["name"])
        ready, progressing, message = cond.rollout(observed, {s: plan[s].replicas for s in STAGES})
        now, gen = now_rfc3339(), meta.get("generation")
        conditions = (extra_status or {}).get("conditions") or status.get("conditions") or []
        conditions = cond.set_condition(
            conditions,
            "Ready",
            "True" if ready else "False",
            "StagesReady" if ready else "StagesNotReady",
            message,
            now,
            gen,
        )
        conditions = cond.set_condition(
            conditions,
            "Progressing",
            "True" if progressing else "False",
            "RollingOut" if progressing else "Stable",
            message,
            now,
            gen,
        )
        stuck = _serving_unavailable(spec, plan, status.get("stages") or {})
        conditions = cond.set_condition(
            conditions,
            "Degraded",
            "True" if stuck else "False",
            "ModelUnavailable" if stuck else "ReconcileSucceeded",
            stuck or "children match the spec",
            now,
            gen,
        )
        for type_ in ("MetricsAvailable", "SLOMet"):
            if cond.get_condition(conditions, type_) is None:
                conditions = cond.set_condition(
                    conditions,
                    type_,
                    "Unknown",
                    "NotYetObserved",
                    "the optimizer has not run yet",
                    now,
                    gen,
                )
        extra = dict(extra_status or {})
        stages = _stage_status(plan, observed)
        for stage, more in (extra.pop("stages", None) or {}).items():  # the optimizer's
            stages[stage] = {**stages[stage], **more}
        written = self._write_status(
            md,
            {**extra, "observedGeneration": gen, "conditions": conditions, "stages": stages},
        )
        return Outcome(applied=len(applied.changes), status_written=written)
