"""One optimizer tick against an in-memory apiserver, table-style: what each mode, hold,
budget and verification step writes to the cluster (children, status, Events)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from modelpilot.controller import conditions as cond
from modelpilot.controller.actuate import Actuator
from modelpilot.controller.optimizer_loop import OptimizerLoop
from modelpilot.controller.reconcile import Reconciler
from modelpilot.optimizer.snapshot import Snapshot
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


def test_off_changes_nothing() -> None:
    c = Cluster(spec_doc(mode="Off"))
    objects = copy.deepcopy({k: v for k, v in c.kube.objects.items() if k[0] != "ModelDeployment"})
    c.tick()
    assert {k: v for k, v in c.kube.objects.items() if k[0] != "ModelDeployment"} == objects
    assert "Optimized" not in c.kube.reasons() and not c.status().get("recommendations")


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
