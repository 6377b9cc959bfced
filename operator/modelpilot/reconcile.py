"""Reconcile one ModelDeployment: level-triggered and idempotent.

Reads the object fresh, renders the desired children from its spec and current plan,
server-side applies them, prunes what is no longer desired, and writes status only when it
differs from what is stored. Invalid specs become ``Degraded`` rather than exceptions.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from modelpilot import conditions as cond
from modelpilot import plan as plans
from modelpilot.api.v1alpha1 import STAGES, ModelDeploymentSpec
from modelpilot.kube import Kube, is_client_error
from modelpilot.render import Defaults, Owner, child_name, render

log = logging.getLogger(__name__)


class TransientError(Exception):
    """The apiserver could not be reached or refused for now; retry with backoff."""


@dataclass(frozen=True)
class Outcome:
    applied: int
    status_written: bool
    degraded: str | None = None


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def _stage_status(
    plan: plans.Plan, observed: Mapping[str, cond.Observed | None]
) -> dict[str, dict[str, Any]]:
    out = {}
    for stage in STAGES:
        obs = observed.get(stage)
        out[stage] = {**plans.status_fields(plan[stage]), "readyReplicas": obs.ready if obs else 0}
    return out


class Reconciler:
    """Drives one ModelDeployment's children and status towards its spec."""

    def __init__(self, kube: Kube, defaults: Defaults | None = None) -> None:
        self.kube = kube
        self.defaults = defaults or Defaults()

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
        merged = {**current, **status}
        if merged == current:
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
        meta = md["metadata"]
        try:
            spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
        except ValidationError as exc:
            return self._degrade(md, "InvalidSpec", _validation_message(exc))

        status = md.get("status") or {}
        plan = plans.resume(spec, status.get("stages") or {})
        owner = Owner(name=name, namespace=namespace, uid=meta["uid"])
        desired = render(owner, spec, plan, self.defaults)
        children = self.kube.get_children(desired)

        applied = 0
        for obj in desired:
            key = (obj["kind"], obj["metadata"]["name"])
            try:
                result = self.kube.apply(obj, children.get(key))
            except Exception as exc:
                if is_client_error(exc):
                    body = getattr(exc, "body", "") or str(exc)
                    return self._degrade(
                        md, "ApplyRejected", f"{obj['kind']} {key[1]} was rejected: {body}"[:1000]
                    )
                raise
            if result.action != "unchanged":
                applied += 1
                self.kube.event(
                    md,
                    "Normal",
                    result.action.capitalize(),
                    f"{result.action} {result.kind} {result.name}",
                )
        if status.get("observedGeneration") != meta.get("generation"):
            # A spec change is the only thing that can make a child unwanted: prune then.
            wanted = {(o["kind"], o["metadata"]["name"]) for o in desired}
            for (kind, child), obj in self.kube.list_children(namespace, name).items():
                if (kind, child) not in wanted and obj["metadata"].get("ownerReferences"):
                    self.kube.delete(obj["apiVersion"], kind, namespace, child)
                    self.kube.event(md, "Normal", "Pruned", f"deleted {kind} {child}")
        if applied:
            deployments = [o for o in desired if o["kind"] == "Deployment"]
            children.update(self.kube.get_children(deployments))

        observed = _observed(children, name)
        ready, progressing, message = cond.rollout(observed, {s: plan[s].replicas for s in STAGES})
        now, gen = now_rfc3339(), meta.get("generation")
        conditions = status.get("conditions") or []
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
        conditions = cond.set_condition(
            conditions,
            "Degraded",
            "False",
            "ReconcileSucceeded",
            "children match the spec",
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
        written = self._write_status(
            md,
            {
                "observedGeneration": gen,
                "conditions": conditions,
                "stages": _stage_status(plan, observed),
            },
        )
        return Outcome(applied=applied, status_written=written)
