"""One optimizer tick against an in-memory apiserver, table-style: what each mode, hold,
budget and verification step writes to the cluster (children, status, Events)."""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import replace
from typing import Any

import kopf
import pytest

from modelpilot.api.v1alpha1 import ModelDeploymentSpec, OptimizerMode, Recommendation
from modelpilot.controller import conditions as cond
from modelpilot.controller import handlers
from modelpilot.controller.actuate import Actuator
from modelpilot.controller.optimizer_loop import OptimizerLoop, recommendations, status_update
from modelpilot.controller.reconcile import Reconciler
from modelpilot.optimizer.history import History
from modelpilot.optimizer.policy import Decision
from modelpilot.optimizer.snapshot import Snapshot
from modelpilot.render import plan as plans
from modelpilot.render.children import Defaults
from tests.unit.fake_kube import FakeKube
from tests.unit.optimizer_cases import PROFILES, SPEC_DOC, snap

pytestmark = pytest.mark.unit
NS, NAME = "ns", "md"
NOW = 2_000_000.0


def spec_doc(mode: str = "Auto", verify: bool = False, **slo: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SPEC_DOC)
    doc["optimizer"].update(mode=mode, verification={"enabled": verify})
    doc["slo"].update(slo)
    return doc


class Cluster:
    """A reconciled ModelDeployment, its rolled-out children and an optimizer over them."""

    def __init__(self, doc: dict[str, Any], rate: float | None = 3000.0) -> None:
        self.kube = FakeKube()
        self.kube.create_model_deployment(NS, NAME, doc)
        actuator = Actuator(self.kube, Defaults(), admin_key=b"k" * 32)  # type: ignore[arg-type]
        self.reconciler = Reconciler(self.kube, actuator)  # type: ignore[arg-type]
        self.reconciler.reconcile(NS, NAME)
        self.kube.roll_out(NS)
        self.reconciler.reconcile(NS, NAME)
        self.rate = rate
        self.telemetry_error: Exception | None = None
        self.url_error: Exception | None = None
        self.now = NOW
        self.optimizer = OptimizerLoop(
            kube=self.kube,  # type: ignore[arg-type]
            reconciler=self.reconciler,
            profiles=PROFILES,
            snapshot_source=self._snapshot,
            prometheus_url=self._url,
            clock=lambda: self.now,
            started=NOW - 3600,
        )

    def _url(self, url: str | None) -> str:
        if self.url_error:
            raise self.url_error
        return url or "http://prometheus:9090"

    def _snapshot(self, url: str, namespace: str, name: str, now: float) -> Snapshot:
        if self.telemetry_error:
            raise self.telemetry_error
        return snap(now, self.rate)

    def tick(self) -> None:
        self.optimizer.tick(NS, NAME)
        self.now += 15

    def status(self) -> dict[str, Any]:
        return dict(self.kube.objects[("ModelDeployment", NS, NAME)].get("status") or {})

    def condition(self, type_: str) -> dict[str, Any]:
        found = cond.get_condition(self.status().get("conditions") or [], type_)
        assert found is not None, f"no {type_} in {self.status()}"
        return dict(found)

    def replicas(self, stage: str) -> int:
        return int(self.kube.of_kind("Deployment", NS)[f"{NAME}-{stage}"]["spec"]["replicas"])


def test_auto_applies_a_decision_explains_it_and_writes_status_once() -> None:
    c = Cluster(spec_doc())
    writes = c.kube.status_writes
    c.tick()
    assert c.replicas("inference") > 1, "more replicas for 3000 requests/s"
    assert c.kube.status_writes == writes + 1, "plan, decision and conditions in one write"
    status = c.status()
    assert status["stages"]["inference"]["replicas"] == c.replicas("inference")
    assert "scale up" in " ".join(status["lastDecision"]["reasons"])
    assert status["optimizerState"], "history kept for a restart"
    assert "Optimized" in c.kube.reasons() and "Updated" in c.kube.reasons()
    assert c.condition("MetricsAvailable")["status"] == "True"


def test_once_settled_a_tick_writes_nothing() -> None:
    c = Cluster(spec_doc())
    for _ in range(20):  # the scale-up takes steps of maxScaleUpStep; then it settles
        writes = c.kube.status_writes
        c.tick()
        c.kube.roll_out(NS)
        c.reconciler.reconcile(NS, NAME)
        if c.kube.status_writes == writes:
            break
    writes, events = c.kube.status_writes, len(c.kube.events)
    c.tick()
    assert (c.kube.status_writes, len(c.kube.events)) == (writes, events)
    assert c.replicas("inference") > 1


def test_recommend_writes_advice_and_touches_no_child() -> None:
    c = Cluster(spec_doc(mode="Recommend"))
    before = c.replicas("inference")
    c.tick()
    assert c.replicas("inference") == before
    recs = {r["stage"]: r for r in c.status()["recommendations"]}
    assert recs["inference"]["replicas"] > before and recs["inference"]["reason"]
    assert "Recommended" in c.kube.reasons() and "Optimized" not in c.kube.reasons()


def test_a_recommendation_carries_every_knob_the_plan_moves() -> None:
    old = {
        "ingestion": plans.StagePlan(1),
        "retrieval": plans.StagePlan(1),
        "embedding": plans.StagePlan(1, "big", 8, 1000, instances=1),
        "inference": plans.StagePlan(1, "big", 8, 1000, small_share=0.5, cache_threshold=0.9),
    }
    new = {
        **old,
        "embedding": replace(old["embedding"], instances=2),
        "inference": replace(old["inference"], small_share=0.7, cache_threshold=0.95),
    }
    reasons = ("inference: small share 50% -> 70%", "embedding: model instances 1 -> 2")
    recs = {r["stage"]: r for r in recommendations(old, new, reasons)}
    assert recs["embedding"]["instances"] == 2 and "smallShare" not in recs["embedding"]
    assert (recs["inference"]["smallShare"], recs["inference"]["cacheThreshold"]) == (0.7, 0.95)
    assert recs["inference"]["reason"] == "inference: small share 50% -> 70%"
    for r in recs.values():  # what status.recommendations accepts, field for field
        assert Recommendation.model_validate(r).model_dump(by_alias=True, exclude_none=True) == r


def test_off_changes_nothing() -> None:
    c = Cluster(spec_doc(mode="Off"))
    objects = copy.deepcopy({k: v for k, v in c.kube.objects.items() if k[0] != "ModelDeployment"})
    c.tick()
    assert {k: v for k, v in c.kube.objects.items() if k[0] != "ModelDeployment"} == objects
    assert "Optimized" not in c.kube.reasons() and not c.status().get("recommendations")


def test_a_spec_edited_while_telemetry_was_read_is_acted_on_as_edited() -> None:
    c = Cluster(spec_doc())
    before = c.replicas("inference")
    observed = c.optimizer.observe(NS, NAME)  # read in Auto mode, with 3000 requests/s
    c.kube.edit_spec(NS, NAME, spec_doc(mode="Off"))
    c.optimizer.act(NS, NAME, observed)
    assert c.replicas("inference") == before and "Optimized" not in c.kube.reasons()


def test_the_handler_reads_prometheus_without_holding_the_object() -> None:
    """A reconcile (a new object, a child's status) takes the object's lock: it must not
    wait for a slow Prometheus, only for the decision."""
    c = Cluster(spec_doc())
    reading, release = threading.Event(), threading.Event()

    def slow_snapshot(url: str, namespace: str, name: str, now: float) -> Snapshot:
        reading.set()
        assert release.wait(10)
        return snap(now, 3000.0)

    c.optimizer.snapshot_source = slow_snapshot
    memo = kopf.Memo(
        optimizer=c.optimizer, locks={}, locks_guard=threading.Lock(), queued=set(), live=False
    )
    tick = threading.Thread(target=handlers._tick, args=(memo, NS, NAME, logging.getLogger()))
    tick.start()
    try:
        assert reading.wait(10)
        lock = handlers._lock(memo, NS, NAME)
        assert lock.acquire(timeout=1), "the lock was held while Prometheus was read"
        lock.release()
    finally:
        release.set()
        tick.join(10)
    assert c.replicas("inference") > 1, "the tick still decided and acted"


@pytest.mark.parametrize(
    ("failure", "reason", "message"),
    [
        ("telemetry", "PrometheusUnreachable", "unreachable: connection refused"),
        ("url", "PrometheusUnreachable", "not in the operator's allowed list"),
    ],
)
def test_without_telemetry_every_stage_holds_and_status_says_why(
    failure: str, reason: str, message: str
) -> None:
    c = Cluster(spec_doc())
    error = ConnectionError("connection refused") if failure == "telemetry" else None
    c.telemetry_error = error
    c.url_error = None if error else ValueError("not in the operator's allowed list")
    before = c.replicas("inference")
    c.tick()
    assert c.replicas("inference") == before
    available = c.condition("MetricsAvailable")
    assert (available["status"], available["reason"]) == ("False", reason)
    assert message in available["message"]
    assert "Optimized" not in c.kube.reasons()


def test_a_cost_cap_the_load_breaks_is_reported_as_budget_limited() -> None:
    c = Cluster(spec_doc(maxCostPerHour="5"))
    c.tick()
    slo = c.condition("SLOMet")
    assert (slo["status"], slo["reason"]) == ("False", "BudgetLimited")
    assert "maxCostPerHour" in slo["message"]


def test_an_added_cheaper_variant_is_verified_in_shadow_before_it_serves() -> None:
    doc = spec_doc(verify=True, minQuality="0.5")
    variants = doc["embedding"]["variants"]
    doc["embedding"]["variants"] = [v for v in variants if v["name"] == "big"]
    c = Cluster(doc, rate=50.0)
    doc["embedding"]["variants"] = variants  # the user adds the cheaper variants
    c.kube.edit_spec(NS, NAME, doc)
    c.reconciler.reconcile(NS, NAME)
    c.tick()
    embedding = c.status()["stages"]["embedding"]
    assert (embedding["variant"], embedding.get("shadowVariant")) == ("big", "tiny")
    assert "VerificationStarted" in c.kube.reasons()
    config = c.kube.of_kind("ConfigMap", NS)[f"{NAME}-embedding"]["data"]
    assert "emb_tiny" in next(iter(config.values())), "the pods learn the candidate"


# ------------------------------------------------------ the tick's status, table-driven
def _decision(**kw: Any) -> Decision:
    plan = plans.initial(ModelDeploymentSpec.model_validate(SPEC_DOC))
    return Decision(plan, kw.pop("reasons", ("r",)), History(), **kw)


AUTO, OFF = OptimizerMode.AUTO, OptimizerMode.OFF
FRESH = ("True", "MetricsFresh")
SHORT = ("embedding: even 4 replicas of big predict p95 300 ms over its 60 ms",)


@pytest.mark.parametrize(
    ("decision", "e2e", "telemetry", "problem", "mode", "metrics", "slo"),
    [
        (_decision(), 120.0, True, None, AUTO, FRESH, ("True", "WithinSLO")),
        (_decision(hold="stale"), None, True, None, AUTO, ("False", "MetricsStale"), None),
        (
            _decision(hold="h"),
            None,
            False,
            "unreachable",
            AUTO,
            ("False", "PrometheusUnreachable"),
            None,
        ),
        (_decision(hold="optimizer is Off"), None, True, None, OFF, FRESH, None),
        (_decision(hold="optimizer is Off"), None, False, None, OFF, None, None),
        (
            _decision(budget_limited="over"),
            None,
            True,
            None,
            AUTO,
            FRESH,
            ("False", "BudgetLimited"),
        ),
        (
            _decision(slo_met=False, reasons=SHORT),
            400.0,
            True,
            None,
            AUTO,
            FRESH,
            ("False", "CapacityExhausted"),
        ),
    ],
)
def test_decision_conditions(
    decision: Decision,
    e2e: float | None,
    telemetry: bool,
    problem: str | None,
    mode: OptimizerMode,
    metrics: tuple[str, str] | None,
    slo: tuple[str, str] | None,
) -> None:
    got = cond.decision_conditions([], decision, e2e, telemetry, problem, mode, 200, "t", 3)
    for type_, want in (("MetricsAvailable", metrics), ("SLOMet", slo)):
        c = cond.get_condition(got, type_)
        assert (None if c is None else (c["status"], c["reason"])) == want
        assert c is None or c["observedGeneration"] == 3
    if problem:
        assert cond.get_condition(got, "MetricsAvailable")["message"] == problem  # type: ignore[index]
    if slo == ("False", "CapacityExhausted"):
        assert SHORT[0] in cond.get_condition(got, "SLOMet")["message"]  # type: ignore[index]


def test_status_update_by_mode() -> None:
    spec = ModelDeploymentSpec.model_validate(SPEC_DOC)
    plan = plans.initial(spec)
    bigger = dict(plan) | {"embedding": replace(plan["embedding"], replicas=3)}
    changed = Decision(bigger, ("embedding: scale up 1 -> 3",), History(), changed=("embedding",))
    auto = status_update({}, OptimizerMode.AUTO, plan, changed, None, "t")
    assert auto.acted and auto.news
    assert set(auto.fields) == {"optimizerState", "recommendations", "lastDecision"}
    rec = status_update({}, OptimizerMode.RECOMMEND, plan, changed, None, "t")
    assert not rec.acted and rec.news
    assert rec.fields["recommendations"][0]["replicas"] == 3
    # the same advice again is no news: nothing to write
    seen = {k: rec.fields[k] for k in ("recommendations", "lastDecision")}
    again = status_update(seen, OptimizerMode.RECOMMEND, plan, changed, None, "t2")
    assert not again.news and again.fields == {}
    quiet = Decision(plan, ("every stage fits",), History())
    last = {"lastDecision": {"summary": quiet.summary, "reasons": list(quiet.reasons)}}
    measured = Snapshot(time=1, newest_sample=1, e2e_p95_ms=87.4)
    settled = status_update(last, OptimizerMode.AUTO, plan, quiet, measured, "t")
    assert settled.fields == {"observedP95Ms": 87}


def test_a_contradicted_quality_is_one_warning_and_shows_in_status() -> None:
    """'small' is declared 0.5 but the profile measured 0.95 against 'big': one
    QualityMismatch Event, the measured figure in status.quality, and no Event per tick."""
    doc = spec_doc()
    doc["embedding"]["variants"][1]["quality"] = "0.5"
    c = Cluster(doc, rate=5.0)
    for _ in range(3):
        c.tick()
        c.kube.roll_out(NS)
        c.reconciler.reconcile(NS, NAME)
    assert c.kube.reasons().count("QualityMismatch") == 1
    rows = {(r["stage"], r["variant"]): r for r in c.status()["quality"]}
    small = rows[("embedding", "small")]
    assert (small["source"], small["quality"], small["declared"]) == ("measured", 0.95, 0.5)
    assert "declared quality 0.5 but measured recall@10 0.950" in small["finding"]
    assert rows[("embedding", "big")]["source"] == "reference"
    assert "finding" not in rows[("inference", "small")]  # declared 0.93 = measured 0.93
