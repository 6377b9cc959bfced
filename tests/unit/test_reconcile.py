"""The reconciler against an in-memory apiserver: what a pass writes, when it writes nothing,
and how failures surface (Degraded, Events, a retry)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from modelpilot.api.v1alpha1 import STAGES
from modelpilot.controller import conditions as cond
from modelpilot.controller.actuate import Actuator
from modelpilot.controller.reconcile import Reconciler, TransientError
from modelpilot.optimizer.profiles import load
from modelpilot.render.children import Defaults
from tests.helpers import ROOT, sample
from tests.unit.fake_kube import FakeKube, api_error

pytestmark = pytest.mark.unit
NS, NAME = "ns", "minimal"
SPEC = sample("minimal")["spec"]


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    fake.create_model_deployment(NS, NAME, SPEC)
    return fake


def reconciler(kube: FakeKube, check: Any = None) -> Reconciler:
    return Reconciler(kube, Actuator(kube, Defaults(), admin_key=b"k" * 32), check_spec=check)  # type: ignore[arg-type]


def status(kube: FakeKube) -> dict[str, Any]:
    return dict(kube.objects[("ModelDeployment", NS, NAME)].get("status") or {})


def condition(kube: FakeKube, type_: str) -> dict[str, Any]:
    found = cond.get_condition(status(kube).get("conditions") or [], type_)
    assert found is not None, f"no {type_} condition in {status(kube)}"
    return dict(found)


def test_a_first_pass_creates_every_child_and_reports_the_rollout() -> None:
    kube = FakeKube()
    kube.create_model_deployment(NS, NAME, SPEC)
    outcome = reconciler(kube).reconcile(NS, NAME)
    assert outcome is not None and outcome.status_written
    deployments = kube.of_kind("Deployment", NS)
    assert set(deployments) == {f"{NAME}-{s}" for s in STAGES}
    assert kube.of_kind("Secret", NS), "the admin token's Secret"
    assert outcome.applied == len([r for r in kube.reasons() if r == "Created"]) >= 8
    assert status(kube)["observedGeneration"] == 1
    assert condition(kube, "Ready")["status"] == "False"
    assert condition(kube, "Progressing")["reason"] == "RollingOut"
    assert condition(kube, "Degraded")["status"] == "False"
    assert condition(kube, "SLOMet")["status"] == "Unknown"  # the optimizer has not run
    assert status(kube)["stages"]["embedding"]["variant"] == "minilm-fp32"


def test_an_unchanged_object_is_a_pass_that_writes_nothing(kube: FakeKube) -> None:
    r = reconciler(kube)
    r.reconcile(NS, NAME)
    writes, events, rv = kube.status_writes, len(kube.events), kube._version
    again = r.reconcile(NS, NAME)
    assert again is not None and again.applied == 0 and not again.status_written
    assert (kube.status_writes, len(kube.events), kube._version) == (writes, events, rv)


def test_ready_deployments_make_the_object_ready_and_stable(kube: FakeKube) -> None:
    r = reconciler(kube)
    r.reconcile(NS, NAME)
    kube.roll_out(NS)
    r.reconcile(NS, NAME)
    assert condition(kube, "Ready")["status"] == "True"
    assert condition(kube, "Progressing")["reason"] == "Stable"
    assert status(kube)["stages"]["embedding"]["readyReplicas"] == 1


def test_a_spec_edit_updates_the_children_and_the_observed_generation(kube: FakeKube) -> None:
    r = reconciler(kube)
    r.reconcile(NS, NAME)
    edited = copy.deepcopy(SPEC)
    edited["embedding"]["replicas"] = {"min": 2, "max": 4}
    kube.edit_spec(NS, NAME, edited)
    outcome = r.reconcile(NS, NAME)
    assert outcome is not None and outcome.applied >= 1
    assert kube.of_kind("Deployment", NS)[f"{NAME}-embedding"]["spec"]["replicas"] == 2
    assert status(kube)["observedGeneration"] == 2
    assert "Updated" in kube.reasons()


def test_a_child_deleted_by_hand_comes_back(kube: FakeKube) -> None:
    r = reconciler(kube)
    r.reconcile(NS, NAME)
    del kube.objects[("Service", NS, f"{NAME}-retrieval")]
    outcome = r.reconcile(NS, NAME)
    assert outcome is not None and outcome.applied == 1
    assert f"{NAME}-retrieval" in kube.of_kind("Service", NS)


@pytest.mark.parametrize(
    ("spec_change", "message"),
    [
        ({"slo": {"latencyP95Ms": -1}}, "spec.slo.latencyP95Ms"),
        ({"embedding": {"variants": []}}, "spec.embedding.variants"),
    ],
)
def test_an_invalid_spec_is_degraded_once_with_the_field_named(
    kube: FakeKube, spec_change: dict[str, Any], message: str
) -> None:
    bad = copy.deepcopy(SPEC)
    for key, value in spec_change.items():
        bad[key] = {**bad.get(key, {}), **value}
    kube.edit_spec(NS, NAME, bad)
    r = reconciler(kube)
    outcome = r.reconcile(NS, NAME)
    assert outcome is not None and outcome.degraded and message in outcome.degraded
    assert condition(kube, "Degraded")["reason"] == "InvalidSpec"
    assert condition(kube, "Ready")["status"] == "False"
    assert not kube.of_kind("Deployment", NS), "nothing applied from an invalid spec"
    r.reconcile(NS, NAME)
    assert kube.reasons().count("InvalidSpec") == 1, "one Event per cause, not per pass"


def test_an_operator_rule_the_spec_breaks_is_degraded_with_its_reason(kube: FakeKube) -> None:
    r = reconciler(kube, check=lambda spec: ("PrometheusNotAllowed", "url not allowed"))
    outcome = r.reconcile(NS, NAME)
    assert outcome is not None and outcome.degraded == "url not allowed"
    assert condition(kube, "Degraded")["reason"] == "PrometheusNotAllowed"


def test_a_child_the_apiserver_rejects_is_degraded_not_retried(kube: FakeKube) -> None:
    kube.fail_on("apply", api_error(422, "spec.replicas: Invalid value"))
    outcome = reconciler(kube).reconcile(NS, NAME)
    assert outcome is not None and outcome.degraded
    assert condition(kube, "Degraded")["reason"] == "ApplyRejected"
    assert "Invalid value" in condition(kube, "Degraded")["message"]


@pytest.mark.parametrize("error", [api_error(500, "etcd timeout"), api_error(409, "conflict")])
def test_a_transient_apiserver_error_is_retried_then_surfaced_on_the_third_attempt(
    kube: FakeKube, error: Exception
) -> None:
    r = reconciler(kube)
    kube.fail_on("get_children", error)
    for attempt in (0, 1):
        with pytest.raises(TransientError):
            r.reconcile(NS, NAME, attempt=attempt)
        assert "Degraded" not in str(status(kube)), "not surfaced before the third attempt"
    with pytest.raises(TransientError):
        r.reconcile(NS, NAME, attempt=2)
    assert condition(kube, "Degraded")["reason"] == "ReconcileFailing"
    kube.fail_on("get_children", None)
    r.reconcile(NS, NAME, attempt=0)
    assert condition(kube, "Degraded")["status"] == "False", "recovery clears it"


def test_a_deleted_or_deleting_object_is_left_to_garbage_collection(kube: FakeKube) -> None:
    md = kube.objects[("ModelDeployment", NS, NAME)]
    md["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert reconciler(kube).reconcile(NS, NAME) is None
    assert not kube.of_kind("Deployment", NS)
    assert reconciler(kube).reconcile(NS, "gone") is None


@pytest.mark.parametrize(("measured", "starts_on"), [(False, "minilm-int8"), (True, "minilm-fp32")])
def test_a_new_deployment_starts_on_a_variant_that_meets_the_floor_by_measurement(
    measured: bool, starts_on: str
) -> None:
    """examples/full.yaml declares int8 0.97 under minQuality 0.9; profiles/cpu.json measured
    0.819. With the profile, the first plan is fp32, never a variant the first optimizer
    tick would have to leave."""
    k = FakeKube()
    k.create_model_deployment(NS, NAME, sample("full")["spec"])
    profiles = load(ROOT / "profiles/cpu.json") if measured else None
    actuator = Actuator(k, Defaults(), admin_key=b"k" * 32)  # type: ignore[arg-type]
    Reconciler(k, actuator, profiles=profiles).reconcile(NS, NAME)  # type: ignore[arg-type]
    assert status(k)["stages"]["embedding"]["variant"] == starts_on
