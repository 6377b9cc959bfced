"""One optimizer tick for one ModelDeployment: telemetry -> decide() -> act and explain.

``Auto`` converges to the new plan through the reconciler (the actuator applies the
children; the plan lands in ``status.stages`` in the same status write), so replicas and
variants change through the Deployments and batching and shadowing through the ConfigMap;
the live sync that follows each tick brings running pods to it. ``Recommend`` writes
``status.recommendations`` only. ``Off`` does nothing. Every applied change gets an Event
and ``status.lastDecision``; status is written only when something changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from modelpilot.adapters.kube import Kube
from modelpilot.api.v1alpha1 import STAGES, ModelDeploymentSpec, OptimizerMode
from modelpilot.contract import MODEL_STAGES
from modelpilot.controller import conditions as cond
from modelpilot.controller.reconcile import Reconciler
from modelpilot.optimizer.history import History
from modelpilot.optimizer.policy import Decision, decide
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
            knobs = {
                "variant": p.variant,
                "maxBatchSize": p.max_batch_size,
                "maxQueueDelayMicroseconds": p.max_queue_delay_us,
                "instances": p.instances,
                "smallShare": p.small_share,
                "cacheThreshold": p.cache_threshold,
            }
            rec.update({k: v for k, v in knobs.items() if v is not None})
        out.append(rec)
    return out


@dataclass(frozen=True)
class Observation:
    """What one tick read: the telemetry (None: none to be had, and ``problem`` says why)."""

    snapshot: Snapshot | None
    problem: str | None
    time: float


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
        """Observe, then act: one whole tick (the handler runs the halves apart)."""
        return self.act(namespace, name, self.observe(namespace, name))

    def observe(self, namespace: str, name: str) -> Observation | None:
        """The telemetry for one tick. Reads nothing that must stay current while it runs,
        so the caller need not hold the object: a slow Prometheus then delays only this
        tick, never a reconcile waiting for the object."""
        if (found := self._current(namespace, name)) is None:
            return None
        spec, now = found[1], self.clock()
        try:
            url = self.prometheus_url(spec.prometheus.url)
        except Exception as exc:  # not allowed here: the reconciler reports it as Degraded
            return Observation(None, str(exc)[:500], now)
        try:
            return Observation(self.snapshot_source(url, namespace, name, now), None, now)
        except Exception as exc:  # any failure to read telemetry means: hold
            return Observation(None, f"Prometheus at {url} unreachable: {exc}"[:500], now)

    def act(self, namespace: str, name: str, observed: Observation | None) -> Decision | None:
        """Decide on ``observed`` from the object as it is now, and act or recommend."""
        if observed is None or (found := self._current(namespace, name)) is None:
            return None
        md, spec = found
        self.intervals[(namespace, name)] = spec.optimizer.interval_seconds
        status = md.get("status") or {}
        plan = plans.resume(spec, status.get("stages") or {}, self.reconciler.quality(spec))
        history = self.histories.get((namespace, name)) or self._restored(status)
        stages = status.get("stages") or {}
        unavailable = {
            s: plans.unavailable(spec.model_stage(s), stages.get(s)) for s in MODEL_STAGES
        }
        snapshot, now = observed.snapshot, observed.time
        decision = decide(
            spec, plan, snapshot, history, self.profiles, now, unavailable=unavailable
        )
        self.histories[(namespace, name)] = decision.history
        self._record(md, spec, plan, decision, snapshot, observed.problem, now)
        return decision

    def _current(
        self, namespace: str, name: str
    ) -> tuple[dict[str, Any], ModelDeploymentSpec] | None:
        """The object and its spec; None when it is gone, going, or its spec is invalid
        (the reconciler reports that as Degraded)."""
        md = self.kube.get_model_deployment(namespace, name)
        if md is None or md["metadata"].get("deletionTimestamp"):
            return None
        try:
            return md, ModelDeploymentSpec.model_validate(md.get("spec") or {})
        except ValidationError:
            return None

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
        """Act on the decision as the mode says, and explain it in status and Events."""
        meta = md["metadata"]
        status = md.get("status") or {}
        stamp = cond.rfc3339(now)
        conditions = cond.decision_conditions(
            status.get("conditions") or [],
            decision,
            snapshot.e2e_p95_ms if snapshot else None,
            snapshot is not None,
            problem,
            spec.optimizer.mode,
            spec.slo.latency_p95_ms,
            stamp,
            meta.get("generation"),
        )
        update = status_update(status, spec.optimizer.mode, plan, decision, snapshot, stamp)
        update.fields["conditions"] = conditions
        for finding in new_quality_findings(status, decision):
            self.kube.event(md, "Warning", "QualityMismatch", finding)
        if update.acted:
            self.kube.event(
                md, "Normal", "Optimized", f"{decision.summary}: " + "; ".join(decision.reasons)
            )
            for _stage, step, message in decision.verifications:
                type_, reason = VERIFICATION_EVENTS[step]
                self.kube.event(md, type_, reason, message)
            # The new plan goes straight to the actuator; status records it in the same write.
            self.reconciler.converge(md, spec, decision.plan, update.fields)
            return
        if cond.merge_patch(status, update.fields) != status:
            self.kube.patch_status(meta["namespace"], meta["name"], update.fields)
        if update.news and spec.optimizer.mode == OptimizerMode.RECOMMEND and decision.changed:
            self.kube.event(md, "Normal", "Recommended", "; ".join(decision.reasons)[:1000])


@dataclass(frozen=True)
class StatusUpdate:
    """What a tick writes to status (conditions aside), and what kind of write it is."""

    fields: dict[str, Any]
    news: bool  # the explanation (or the recommendations) changed
    acted: bool  # Auto mode changes the plan: the reconciler writes status with it


def status_update(
    status: Mapping[str, Any],
    mode: OptimizerMode,
    plan: plans.Plan,
    decision: Decision,
    snapshot: Snapshot | None,
    stamp: str,
) -> StatusUpdate:
    """The status fields a decision sets: observed p95, the explanation when it is news, and
    the history (Auto, on a change) or the recommendations (Recommend)."""
    fields: dict[str, Any] = {}
    if snapshot is not None and snapshot.e2e_p95_ms is not None:
        fields["observedP95Ms"] = round(snapshot.e2e_p95_ms)
    last = status.get("lastDecision") or {}
    explained = {"time": stamp, "summary": decision.summary, "reasons": list(decision.reasons)[:20]}
    news = (last.get("summary"), last.get("reasons")) != (
        explained["summary"],
        explained["reasons"],
    )
    acted = mode == OptimizerMode.AUTO and bool(decision.changed)
    if acted:
        fields["optimizerState"] = decision.history.to_status()
        fields["recommendations"] = []
    elif mode == OptimizerMode.RECOMMEND:
        recs = recommendations(plan, decision.plan, decision.reasons)
        if recs != (status.get("recommendations") or []):
            fields["recommendations"] = recs
            news = True
    if news or acted:
        fields["lastDecision"] = explained
    rows = _quality_rows(decision)
    if rows and rows != (status.get("quality") or []):
        fields["quality"] = rows
    if gateway := _gateway_measurements(status, decision):
        fields["stages"] = {"inference": gateway}
    return StatusUpdate(fields, news, acted)


def _gateway_measurements(status: Mapping[str, Any], decision: Decision) -> dict[str, Any]:
    """status.stages.inference.routing / .cache where their figures (to 2 decimals) changed:
    the sample count alone moving is no reason to write status."""
    have = ((status.get("stages") or {}).get("inference")) or {}
    out: dict[str, Any] = {}
    for name in ("routing", "cache"):
        m = decision.gateway.get(name)
        if m is None:  # Off, or holding: what status showed is no longer in force
            if have.get(name) is not None:
                out[name] = None
            continue
        row = {
            "share": round(m.share, 2),
            "agreement": None if m.agreement is None else round(m.agreement, 2),
            "quality": None if m.quality is None else round(m.quality, 3),
        }
        old = have.get(name) or {}
        if {k: old.get(k) for k in row} != row:
            out[name] = {**row, "samples": m.samples}
    return out


def _quality_rows(decision: Decision) -> list[dict[str, Any]]:
    return [q.to_status(stage) for stage, by in decision.quality.items() for q in by.values()]


def new_quality_findings(status: Mapping[str, Any], decision: Decision) -> list[str]:
    """Declared qualities the measurement contradicts that status does not show yet: each
    becomes one Warning Event, not one per tick."""
    seen = {
        (r.get("stage"), r.get("variant"), r.get("finding"))
        for r in status.get("quality") or []
        if r.get("source") == "measured"
    }
    return [
        f"{stage}/{q.variant}: {q.finding}"
        for stage, by in decision.quality.items()
        for q in by.values()
        if q.source == "measured" and q.finding and (stage, q.variant, q.finding) not in seen
    ]
