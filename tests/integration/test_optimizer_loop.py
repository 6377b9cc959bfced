"""The self-optimizing loop end to end: a real service under bounded load, scraped by the real
Prometheus, read by the real operator, acting on the real control plane."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from modelpilot.adapters.prometheus import target_labels
from tests.helpers import ROOT, kubectl, wait_for
from tests.loadgen import Stage, load

pytestmark = pytest.mark.integration
STAGES = ("ingestion", "embedding", "retrieval", "inference")


@pytest.fixture
def loaded_stage(prometheus_url: str, namespace: str) -> Iterator[Stage]:
    stage = Stage()
    target = ROOT / ".cache/prometheus/targets" / f"loop-{namespace}.json"
    target.write_text(
        json.dumps(
            [
                {
                    "targets": [f"127.0.0.1:{stage.port}"],
                    "labels": target_labels(namespace, "loop"),
                }
            ]
        )
    )
    stop = threading.Event()
    threading.Thread(target=load, args=(stage.port, 60, 600, stop), daemon=True).start()
    yield stage
    stop.set()
    target.unlink()
    stage.server.shutdown()


def model_deployment(mode: str) -> dict[str, Any]:
    # slow_model's profile is tests/fixtures/slow-profile.json, loaded by the test operator.
    variant = [
        {"name": "slow", "model": "slow_model", "precision": "fp32", "quality": "1", "cost": "1"}
    ]
    return {
        "apiVersion": "modelpilot.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "loop"},
        "spec": {
            "slo": {"latencyP95Ms": 500, "minQuality": "0.9"},
            "optimizer": {"mode": mode, "intervalSeconds": 5, "scaleDownStabilizationSeconds": 600},
            "embedding": {
                "replicas": {"min": 1, "max": 8},
                "batching": {"maxBatchSize": 8, "maxQueueDelayMicroseconds": 1000},
                "variants": variant,
            },
            "inference": {
                "replicas": {"min": 1, "max": 8},
                "batching": {"maxBatchSize": 8, "maxQueueDelayMicroseconds": 1000},
                "variants": variant,
            },
        },
    }


def status(namespace: str) -> dict[str, Any]:
    out = kubectl("get", "md", "loop", "-n", namespace, "-o", "json").stdout
    return json.loads(out).get("status") or {}


def replicas(namespace: str, stage: str) -> int:
    out = kubectl("get", "deploy", f"loop-{stage}", "-n", namespace, "-o", "json").stdout
    return int(json.loads(out)["spec"]["replicas"])


def test_auto_mode_scales_the_loaded_stage_and_explains_why(
    namespace: str, loaded_stage: Stage, operator_process: Any
) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(model_deployment("Auto")))
    # The Deployment is scaled and the plan recorded in status by two writes: wait for both.
    wait_for(
        lambda: (
            replicas(namespace, "embedding") > 1
            and status(namespace).get("stages", {}).get("embedding", {}).get("replicas", 0) > 1
        ),
        180,
        what="the optimizer to scale embedding up under load, in the Deployment and status",
    )
    st = status(namespace)
    assert "scale up" in " ".join(st["lastDecision"]["reasons"])
    metrics = next(c for c in st["conditions"] if c["type"] == "MetricsAvailable")
    assert metrics["status"] == "True"
    assert st["optimizerState"]["embedding"]["scaleDownWindow"]
    events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json").stdout)
    assert any(e["reason"] == "Optimized" and "scale up" in e["message"] for e in events["items"])


def test_recommend_mode_changes_nothing_but_status(
    namespace: str, loaded_stage: Stage, operator_process: Any
) -> None:
    kubectl(
        "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(model_deployment("Recommend"))
    )

    def scale_up_recommended() -> dict[str, Any] | None:
        recs = status(namespace).get("recommendations") or []
        emb = next((r for r in recs if r["stage"] == "embedding"), None)
        return emb if emb and emb["replicas"] > 1 else None

    emb = wait_for(scale_up_recommended, 180, what="a scale-up recommendation in status")
    assert "scale up" in emb["reason"]
    assert replicas(namespace, "embedding") == 1
    assert status(namespace)["stages"]["embedding"]["replicas"] == 1
