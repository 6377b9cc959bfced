"""The self-optimizing loop end to end: a real service under bounded load, scraped by the real
Prometheus, read by the real operator, acting on the real control plane."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tests.helpers import ROOT, free_port, kubectl, wait_for

pytestmark = pytest.mark.integration
STAGES = ("ingestion", "embedding", "retrieval", "inference")


class Stage:
    """A real HTTP service that does real work per request and exports our metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "modelpilot_requests", "Requests", ["stage", "code"], registry=self.registry
        )
        self.duration = Histogram(
            "modelpilot_request_duration_seconds",
            "Latency",
            ["stage"],
            registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1),
        )
        stage = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body = generate_latest(stage.registry)
                else:
                    start = time.perf_counter()
                    body = str(sum(i * i for i in range(2000))).encode()  # real work
                    for name in STAGES:
                        stage.requests.labels(name, "200").inc()
                        stage.duration.labels(name).observe(time.perf_counter() - start)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def load(port: int, rps: float, seconds: float, stop: threading.Event) -> None:
    """A bounded open-loop load generator on loopback."""
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < deadline and not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/work", timeout=5) as r:
                r.read()
        except OSError:
            if stop.is_set():  # the fixture shut the server down under us: done
                return
            raise
        next_at += 1 / rps
        time.sleep(max(0.0, next_at - time.monotonic()))


@pytest.fixture
def loaded_stage(prometheus_url: str, namespace: str) -> Iterator[Stage]:
    stage = Stage()
    target = ROOT / ".cache/prometheus/targets" / f"loop-{namespace}.json"
    target.write_text(
        json.dumps(
            [
                {
                    "targets": [f"127.0.0.1:{stage.port}"],
                    "labels": {"namespace": namespace, "pipeline": "loop"},
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
    wait_for(
        lambda: replicas(namespace, "embedding") > 1,
        180,
        what="the optimizer to scale embedding up under load",
    )
    st = status(namespace)
    assert st["stages"]["embedding"]["replicas"] > 1
    assert "scale up" in " ".join(st["lastDecision"]["reasons"])
    metrics = next(c for c in st["conditions"] if c["type"] == "MetricsAvailable")
    assert metrics["status"] == "True"
    assert st["optimizerState"]["embedding"]["recommendations"]
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
