"""One optimizer tick for one ModelDeployment: telemetry -> decide() -> act and explain.

``Auto`` converges to the new plan through the reconciler (the actuator applies the
children; the plan lands in ``status.stages`` in the same status write), so replicas and
variants change through the Deployments and batching and shadowing through the ConfigMap;
the live sync that follows each tick brings running pods to it. ``Recommend`` writes
``status.recommendations`` only. ``Off`` does nothing. Every applied change gets an Event
and ``status.lastDecision``; status is written only when something changed.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from modelpilot.adapters.kube import Kube
from modelpilot.api.v1alpha1 import STAGES, ModelDeploymentSpec, OptimizerMode
from modelpilot.controller import conditions as cond
from modelpilot.controller.reconcile import Reconciler
from modelpilot.optimizer.policy import Decision, History, decide
from modelpilot.optimizer.profiles import Profiles
from modelpilot.optimizer.snapshot import Snapshot
from modelpilot.render import plan as plans

log = logging.getLogger(__name__)

SnapshotSource = Callable[[str, str, str, float], Snapshot]  # (url, namespace, name, now)
VERIFICATION_EVENTS = {
    "started": ("Normal", "VerificationStarted"),
    "promoted": ("Normal", "VariantPromoted"),
    "rejected": ("Warning", "VerificationFailed"),
}


def _rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def recommendations(
    old: plans.Plan, new: plans.Plan, reasons: tuple[str, ...]
) -> list[dict[str, Any]]:
    out = []
    for stage in STAGES:
        if old[stage] == new[stage]:
            continue
        why = "; ".join(r for r in reasons if r.startswith(f"{stage}:"))
        p = new[stage]
        rec: dict[str, Any] = {"stage": stage, "replicas": p.replicas, "reason": why}
        if p.variant is not None:
            rec.update(
                variant=p.variant,
                maxBatchSize=p.max_batch_size,
                maxQueueDelayMicroseconds=p.max_queue_delay_us,
            )
        out.append(rec)
    return out


@dataclass
class OptimizerLoop:
    """Runs the optimizer (``modelpilot.optimizer``, pure) on ModelDeployments: one
    :meth:`tick` reads telemetry, decides, and acts or recommends as the spec's mode says."""

    kube: Kube
    reconciler: Reconciler
    profiles: Profiles
    snapshot_source: SnapshotSource
    # The Prometheus URL for a spec's choice (None: the default); raises, with a message
    # for status, when the operator does not allow it.
    prometheus_url: Callable[[str | None], str]
    clock: Callable[[], float] = time.time
    started: float = field(default_factory=time.time)
    # In-memory history between ticks; status holds the copy a restart resumes from.
    histories: dict[tuple[str, str], History] = field(default_factory=dict)
    intervals: dict[tuple[str, str], int] = field(default_factory=dict)

    def tick(self, namespace: str, name: str) -> Decision | None:
        md = self.kube.get_model_deployment(namespace, name)
        if md is None or md["metadata"].get("deletionTimestamp"):
            return None
        try:
            spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
        except ValidationError:
            return None  # the reconciler reports it as Degraded
        self.intervals[(namespace, name)] = spec.optimizer.interval_seconds
        now = self.clock()
        status = md.get("status") or {}
        plan = plans.resume(spec, status.get("stages") or {})
        history = self.histories.get((namespace, name)) or self._restored(status)
        snapshot: Snapshot | None
        problem = None
        try:
            url = self.prometheus_url(spec.prometheus.url)
        except Exception as exc:  # not allowed here: the reconciler reports it as Degraded
            snapshot, problem = None, str(exc)[:500]
        else:
            try:
                snapshot = self.snapshot_source(url, namespace, name, now)
            except Exception as exc:  # any failure to read telemetry means: hold
                snapshot, problem = None, f"Prometheus at {url} unreachable: {exc}"[:500]
        decision = decide(spec, plan, snapshot, history, self.profiles, now)
        self.histories[(namespace, name)] = decision.history
        self._record(md, spec, plan, decision, snapshot, problem, now)
        return decision

    def _restored(self, status: Mapping[str, Any]) -> History:
        """History from status, with an operator start counted as a change: a restart must
        not be followed at once by a scale-down (no decision storm)."""
        history = History.from_status(status.get("optimizerState"))
        started = int(self.started)
        return History(
            {
                s: replace(h, last_change=max(h.last_change or 0, started))
                for s, h in history.stages.items()
            }
        )

    def _record(
        self,
        md: Mapping[str, Any],
        spec: ModelDeploymentSpec,
        plan: plans.Plan,
        decision: Decision,
        snapshot: Snapshot | None,
        problem: str | None,
        now: float,
    ) -> None:
        meta = md["metadata"]
        status = md.get("status") or {}
        gen = meta.get("generation")
        stamp = _rfc3339(now)
        conditions = status.get("conditions") or []
        if decision.hold and spec.optimizer.mode != OptimizerMode.OFF:
            conditions = cond.set_condition(
                conditions,
                "MetricsAvailable",
                "False",
                "PrometheusUnreachable" if problem else "MetricsStale",
                problem or decision.hold or "",
                stamp,
                gen,
            )
        elif snapshot is not None:
            conditions = cond.set_condition(
                conditions,
                "MetricsAvailable",
                "True",
                "MetricsFresh",
                "telemetry is fresh",
                stamp,
                gen,
            )
        if not decision.hold:
            e2e = snapshot.e2e_p95_ms if snapshot else None
            if decision.budget_limited:
                conditions = cond.set_condition(
                    conditions,
                    "SLOMet",
                    "False",
                    "BudgetLimited",
                    decision.budget_limited,
                    stamp,
                    gen,
                )
            elif decision.slo_met is False:
                conditions = cond.set_condition(
                    conditions,
                    "SLOMet",
                    "False",
                    "CapacityExhausted",
                    "; ".join(r for r in decision.reasons if "predict" in r or "capped" in r)
                    or "the SLO cannot be met within the replica bounds",
                    stamp,
                    gen,
                )
            else:
                msg = (
                    f"observed p95 {e2e:.0f} ms <= {spec.slo.latency_p95_ms} ms"
                    if e2e is not None
                    else "every stage is predicted within its budget"
                )
                conditions = cond.set_condition(
                    conditions, "SLOMet", "True", "WithinSLO", msg, stamp, gen
                )

        new_status: dict[str, Any] = {"conditions": conditions}
        if snapshot is not None and snapshot.e2e_p95_ms is not None:
            new_status["observedP95Ms"] = round(snapshot.e2e_p95_ms)
        last = status.get("lastDecision") or {}
        explained = {
            "time": stamp,
            "summary": decision.summary,
            "reasons": list(decision.reasons)[:20],
        }
        news = (last.get("summary"), last.get("reasons")) != (
            explained["summary"],
            explained["reasons"],
        )
        mode = spec.optimizer.mode
        acted = False
        if mode == OptimizerMode.AUTO and decision.changed:
            new_status["optimizerState"] = decision.history.to_status()
            new_status["recommendations"] = []
            acted = True
        elif mode == OptimizerMode.RECOMMEND:
            recs = recommendations(plan, decision.plan, decision.reasons)
            if recs != (status.get("recommendations") or []):
                new_status["recommendations"] = recs
                news = True
        if news or acted:
            new_status["lastDecision"] = explained
        if acted:
            self.kube.event(
                md, "Normal", "Optimized", f"{decision.summary}: " + "; ".join(decision.reasons)
            )
            for _stage, step, message in decision.verifications:
                type_, reason = VERIFICATION_EVENTS[step]
                self.kube.event(md, type_, reason, message)
            # The new plan goes straight to the actuator; status records it in the same write.
            self.reconciler.converge(md, spec, decision.plan, new_status)
            return
        if cond.merge_patch(status, new_status) != status:
            self.kube.patch_status(meta["namespace"], meta["name"], new_status)
        if news and mode == OptimizerMode.RECOMMEND and decision.changed:
            self.kube.event(md, "Normal", "Recommended", "; ".join(decision.reasons)[:1000])
