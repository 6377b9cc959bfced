"""The variant verification gate at its edges.

1. Measuring: the operator's shadow adapter turns mirroring on in the real embedding service
   (real Triton, real models); the real Prometheus scrapes it; the operator's telemetry
   reads the candidates' agreement; the gate promotes int8 and rejects the static model.
2. Acting: the operator's optimizer, against the local control plane, starts a verification
   (shadow in status and ConfigMap, no pod restart), then promotes (a rollout) or rejects
   (a Warning Event, the candidate barred), with an Event and reasons at every step.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from modelpilot import contract
from modelpilot.adapters.kube import Kube, new_api_client
from modelpilot.adapters.live import Pod
from modelpilot.adapters.prometheus import Telemetry, selector, target_labels
from modelpilot.api.v1alpha1 import Verification
from modelpilot.controller.actuate import Actuator
from modelpilot.controller.optimizer_loop import OptimizerLoop
from modelpilot.controller.reconcile import Reconciler
from modelpilot.optimizer.profiles import load as load_profiles
from modelpilot.optimizer.snapshot import ShadowStats, Snapshot, StageTelemetry
from modelpilot.optimizer.verification import judge
from modelpilot.render.children import Defaults
from modelpilot_services.models import calibration
from tests.dataplane.client import ok
from tests.helpers import KUBECONFIG, ROOT, kubectl, kubectl_json, sample, wait_for

pytestmark = pytest.mark.integration
# Live traffic of distinct real texts: neighbour recall needs a corpus of recent texts.
CORPUS = calibration.corpus()


@pytest.fixture
def scraped_plane(data_plane: Any, prometheus_url: str) -> Iterator[tuple[Any, str]]:
    """The session data plane as a Prometheus target of its own pipeline labels."""
    name = f"gate-{int(time.time())}"
    target = ROOT / ".cache/prometheus/targets" / f"{name}.json"
    data_plane.prometheus_targets(target, target_labels("verify", name))
    try:
        yield data_plane, selector("verify", name)
    finally:
        target.unlink()
        _pod(data_plane).set_shadow(None)


def _pod(plane: Any) -> Pod:
    """The operator's live-settings adapter on the embedding service."""
    return Pod(plane.triton_url, plane.admin_url("embedding"), None)


def test_shadow_agreement_is_measured_through_prometheus_and_judged(
    scraped_plane: tuple[Any, str], prometheus_url: str
) -> None:
    plane, sel = scraped_plane
    telemetry = Telemetry(prometheus_url)
    serving = ok("POST", plane.url("embedding") + "/v1/embed", {"texts": ["which model?"]})
    assert serving["model"] == "minilm_fp32"
    rules = Verification.model_validate({"minSamples": 40, "minAgreement": "0.7"})
    verdicts = {}
    for candidate in ("minilm_int8", "minilm_static"):
        _pod(plane).set_shadow(contract.Shadow(model=candidate, sampleRatio=1.0))
        assert ok("GET", plane.admin_url("embedding") + "/v1/admin/shadow")["model"] == candidate
        stop = threading.Event()

        def traffic(stop: threading.Event = stop) -> None:
            n = 0
            while not stop.is_set():
                texts = [CORPUS[(2 * n) % len(CORPUS)], CORPUS[(2 * n + 1) % len(CORPUS)]]
                ok("POST", plane.url("embedding") + "/v1/embed", {"texts": texts})
                n += 1
                stop.wait(0.1)  # a steady trickle of live requests

        worker = threading.Thread(target=traffic, daemon=True)
        worker.start()
        try:
            stats: ShadowStats = wait_for(
                lambda c=candidate: (
                    (s := telemetry.shadow(sel).get(("embedding", c))) and s.samples >= 40 and s
                ),
                180,
                interval=1,
                what=f"40 shadow samples of {candidate} in Prometheus (after a warm ring)",
            )
        finally:
            stop.set()
            worker.join(timeout=30)
        assert stats.agreement is not None and stats.p95_ms is not None and stats.errors == 0
        verdicts[candidate] = (stats, judge(rules, stats, 500.0, 0, 10))
    _pod(plane).set_shadow(None)
    assert ok("GET", plane.admin_url("embedding") + "/v1/admin/shadow")["model"] is None
    int8, static = verdicts["minilm_int8"], verdicts["minilm_static"]
    print(
        f"shadow recall@10 vs fp32: int8 {int8[0].agreement:.3f} "
        f"(p95 {int8[0].p95_ms:.0f} ms), static {static[0].agreement:.3f} "
        f"(p95 {static[0].p95_ms:.1f} ms)"
    )
    assert int8[1].action == "promote", int8
    assert static[1].action == "reject" and "agreement" in static[1].reason, static
    # the same metric as make profile's (recall@10 0.819 and 0.338 against fp32)
    assert 0.7 < int8[0].agreement < 0.95 and static[0].agreement < 0.5  # type: ignore[operator]


# -- acting: the optimizer against the local control plane --------------------------------


class Telemetered:
    """What Prometheus would say: load on every stage, and the candidate's shadow stats."""

    def __init__(self) -> None:
        self.shadow: dict[tuple[str, str], ShadowStats] = {}

    def __call__(self, url: str, namespace: str, name: str, now: float) -> Snapshot:
        stages = {
            s: StageTelemetry(rate_rps=5.0)
            for s in ("ingestion", "embedding", "retrieval", "inference")
        }
        return Snapshot(time=now, newest_sample=now, stages=stages, shadow=dict(self.shadow))


def _get(namespace: str, kind: str, name: str) -> dict[str, Any]:
    return dict(kubectl_json("get", kind, name, "-n", namespace))


def _events(namespace: str, reason: str) -> list[str]:
    items = kubectl_json("get", "events", "-n", namespace)["items"]
    return [e["message"] for e in items if e.get("reason") == reason]


@pytest.fixture
def pipeline(
    namespace: str, crd: str, operator_process: Any
) -> Iterator[tuple[OptimizerLoop, Telemetered, list[float]]]:
    """``examples/full.yaml`` serving fp32 (a strict floor first), then the floor relaxed so
    int8 becomes the cheaper choice; an optimizer driven by a fake clock. It is the only
    operator meanwhile: two operators on one object race, which one operator's per-object
    lock prevents."""
    operator_process.stop()
    md = sample("full")
    md["spec"]["slo"]["minQuality"] = "0.99"
    del md["spec"]["slo"]["maxCostPerHour"]  # a budget switch is forced, not verified
    md["spec"]["optimizer"]["verification"] = {"minSamples": 50, "retryAfterSeconds": 3600}
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(md))
    kube = Kube(new_api_client(str(KUBECONFIG)))
    reconciler = Reconciler(kube, Actuator(kube, Defaults()))
    wait_for(lambda: reconciler.reconcile(namespace, "full"), 60, what="the first reconcile")
    md["spec"]["slo"]["minQuality"] = "0.8"  # admits int8 (measured 0.819), not static (0.338)
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(md))
    reconciler.reconcile(namespace, "full")
    status = _get(namespace, "md", "full")["status"]
    assert status["stages"]["embedding"]["variant"] == "minilm-fp32"
    now = [time.time() + 3600]  # past the restart cooldown of a freshly started operator
    telemetry = Telemetered()
    optimizer = OptimizerLoop(
        kube,
        reconciler,
        load_profiles(str(ROOT / "profiles/cpu.json")),
        snapshot_source=telemetry,
        prometheus_url=lambda url: "http://unused",
        clock=lambda: now[0],
    )
    try:
        yield optimizer, telemetry, now
    finally:
        operator_process.start()


def _tick(optimizer: OptimizerLoop, namespace: str, now: list[float]) -> Any:
    decision = optimizer.tick(namespace, "full")
    now[0] += 15
    return decision


def test_the_optimizer_verifies_then_promotes_a_cheaper_variant(
    namespace: str, pipeline: tuple[OptimizerLoop, Telemetered, list[float]]
) -> None:
    optimizer, telemetry, now = pipeline
    hash_before = _get(namespace, "deploy", "full-embedding")["spec"]["template"]["metadata"][
        "annotations"
    ]["modelpilot.io/config-hash"]
    _tick(optimizer, namespace, now)
    status = _get(namespace, "md", "full")["status"]
    stages = status["stages"]
    assert stages["embedding"]["variant"] == "minilm-fp32", status["lastDecision"]
    assert stages["embedding"]["shadowVariant"] == "minilm-int8"
    config = json.loads(_get(namespace, "cm", "full-embedding")["data"]["service.json"])
    assert config["shadow"] == {"model": "minilm_int8", "sampleRatio": 0.1}
    deploy = _get(namespace, "deploy", "full-embedding")
    template = deploy["spec"]["template"]
    assert template["metadata"]["annotations"]["modelpilot.io/config-hash"] == hash_before
    assert "--load-model=minilm_fp32" in template["spec"]["containers"][1]["args"]
    assert any("verifying minilm-int8" in m for m in _events(namespace, "VerificationStarted"))

    _tick(optimizer, namespace, now)  # no samples yet: still serving fp32
    assert _get(namespace, "md", "full")["status"]["stages"]["embedding"]["variant"] == (
        "minilm-fp32"
    )
    telemetry.shadow = {("embedding", "minilm_int8"): ShadowStats(120, 0.83, 31.0)}
    _tick(optimizer, namespace, now)
    status = _get(namespace, "md", "full")["status"]
    assert status["stages"]["embedding"]["variant"] == "minilm-int8"
    assert "shadowVariant" not in status["stages"]["embedding"]
    assert any("promoted after verification" in r for r in status["lastDecision"]["reasons"])
    assert any("agreement 0.830" in m for m in _events(namespace, "VariantPromoted"))
    template = _get(namespace, "deploy", "full-embedding")["spec"]["template"]
    assert "--load-model=minilm_int8" in template["spec"]["containers"][1]["args"]
    config = json.loads(_get(namespace, "cm", "full-embedding")["data"]["service.json"])
    assert "shadow" not in config and config["model"] == "minilm_int8"


def test_the_optimizer_rejects_a_disagreeing_candidate_and_says_why(
    namespace: str, pipeline: tuple[OptimizerLoop, Telemetered, list[float]]
) -> None:
    optimizer, telemetry, now = pipeline
    _tick(optimizer, namespace, now)
    telemetry.shadow = {("embedding", "minilm_int8"): ShadowStats(120, 0.71, 31.0)}
    _tick(optimizer, namespace, now)
    status = _get(namespace, "md", "full")["status"]
    assert status["stages"]["embedding"]["variant"] == "minilm-fp32"
    assert "shadowVariant" not in status["stages"]["embedding"]
    (rejected,) = status["optimizerState"]["embedding"]["rejected"]
    # (no minAgreement: the candidate needs the quality floor, 0.8)
    assert rejected["variant"] == "minilm-int8" and "agreement 0.710 < 0.8" in rejected["reason"]
    failed = _events(namespace, "VerificationFailed")
    assert failed and "agreement 0.710" in failed[0]
    items = kubectl_json("get", "events", "-n", namespace)["items"]
    assert {e["type"] for e in items if e.get("reason") == "VerificationFailed"} == {"Warning"}
    config = json.loads(_get(namespace, "cm", "full-embedding")["data"]["service.json"])
    assert "shadow" not in config
    for _ in range(4):  # barred for retryAfterSeconds: no new verification of int8
        _tick(optimizer, namespace, now)
    started = [m for m in _events(namespace, "VerificationStarted") if m.startswith("embedding:")]
    assert len(started) == 1, started
    assert _get(namespace, "md", "full")["status"]["stages"]["embedding"]["variant"] == (
        "minilm-fp32"
    )
