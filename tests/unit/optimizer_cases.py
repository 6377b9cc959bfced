"""The optimizer's table data shared by its unit tests: a hand-made profile and spec."""

from __future__ import annotations

import copy
from typing import Any

from modelpilot.api.v1alpha1 import ModelDeploymentSpec
from modelpilot.optimizer.profiles import parse
from modelpilot.optimizer.snapshot import Snapshot, StageTelemetry

# A hand-made profile with the shape of a measured one: affine batch cost.
PROFILE_DOC: dict[str, Any] = {
    "schema": "modelpilot.io/profile/v1",
    "models": {
        name: {
            "stage": stage,
            "quality": q,
            "batches": [
                {"batch": b, "p50_ms": base + per * b, "p95_ms": 1.2 * (base + per * b)}
                for b in (1, 2, 4, 8, 16, 32, 64)
            ],
        }
        for name, stage, q, base, per in [
            ("emb_big", "embedding", 1.0, 4.0, 1.0),
            ("emb_small", "embedding", 0.95, 1.0, 0.25),
            ("emb_tiny", "embedding", 0.80, 0.2, 0.02),
            ("inf_big", "inference", 1.0, 6.0, 1.5),
            ("inf_small", "inference", 0.93, 2.0, 0.5),
        ]
    },
    "services": {
        "ingestion": {"capacity_rps": 200.0, "p95_ms": 5.0},
        "retrieval": {"capacity_rps": 500.0, "p95_ms": 2.0},
    },
}
PROFILES = parse(PROFILE_DOC)

SPEC_DOC: dict[str, Any] = {
    "slo": {"latencyP95Ms": 200, "minQuality": "0.9"},
    "optimizer": {"intervalSeconds": 15, "scaleDownStabilizationSeconds": 300, "maxScaleUpStep": 4},
    "ingestion": {"replicas": {"min": 1, "max": 10}},
    "retrieval": {"replicas": {"min": 1, "max": 10}},
    "embedding": {
        "replicas": {"min": 1, "max": 20},
        "batching": {"maxBatchSize": 64, "maxQueueDelayMicroseconds": 5000},
        "variants": [
            {"name": "big", "model": "emb_big", "precision": "fp32", "quality": "1", "cost": "4"},
            {
                "name": "small",
                "model": "emb_small",
                "precision": "int8",
                "quality": "0.95",
                "cost": "1",
            },
            {
                "name": "tiny",
                "model": "emb_tiny",
                "precision": "distilled",
                "quality": "0.8",
                "cost": "0.2",
            },
        ],
    },
    "inference": {
        "replicas": {"min": 1, "max": 20},
        "batching": {"maxBatchSize": 32, "maxQueueDelayMicroseconds": 5000},
        "variants": [
            {"name": "big", "model": "inf_big", "precision": "fp16", "quality": "1", "cost": "8"},
            {
                "name": "small",
                "model": "inf_small",
                "precision": "int8",
                "quality": "0.93",
                "cost": "2",
            },
        ],
    },
}


def make_spec(**slo: Any) -> ModelDeploymentSpec:
    doc = copy.deepcopy(SPEC_DOC)
    doc["slo"].update(slo)
    return ModelDeploymentSpec.model_validate(doc)


def snap(now: float, rate: float | None, **extra: Any) -> Snapshot:
    stages = {
        s: StageTelemetry(rate_rps=rate, **extra)
        for s in ("ingestion", "embedding", "retrieval", "inference")
    }
    return Snapshot(time=now, newest_sample=now, stages=stages)
