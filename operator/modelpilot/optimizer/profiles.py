"""Variant profiles: measured batch-size -> latency curves, written by ``make profile``.

File format (JSON, ``schema: modelpilot.io/profile/v1``)::

    {
      "schema": "modelpilot.io/profile/v1",
      "measured": {"host": "...", "cpu": "...", "date": "2026-11-23T06:00:00Z"},
      "models": {
        "<triton model name>": {
          "stage": "embedding",            # which stage serves it
          "quality": 0.82,                 # vs the reference model, by the stage's metric
          "reference": "minilm_fp32",      # the model it was measured against
          "metric": "recall@10",           # contract.QUALITY_METRICS[stage]
          "batches": [                     # one row per measured batch size
            {"batch": 1, "p50_ms": 4.1, "p95_ms": 4.9},
            {"batch": 8, "p50_ms": 12.0, "p95_ms": 13.5}
          ]
        }
      },
      "services": {                        # stages without a model (optional)
        "retrieval": {"capacity_rps": 2500.0, "p95_ms": 2.0}
      }
    }

Latency between measured batch sizes is interpolated linearly; beyond the largest it is
extrapolated from the last two points (batch execution time is close to affine in the batch).
Instance counts a profile did not measure are never planned: how far N instances share a
node's cores is a property of the machine, not something to extrapolate.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SCHEMA = "modelpilot.io/profile/v1"


@dataclass(frozen=True)
class BatchPoint:
    batch: int
    p50_ms: float
    p95_ms: float


@dataclass(frozen=True)
class ModelProfile:
    """How one Triton model's batch execution time grows with the batch size."""

    name: str
    stage: str
    quality: float | None
    points: tuple[BatchPoint, ...]
    reference: str | None = None  # the model ``quality`` was measured against
    # instance count -> throughput of that many instances over one's (measured; 1 -> 1.0)
    speedup: Mapping[int, float] = field(default_factory=lambda: {1: 1.0})

    @functools.cached_property
    def _curves(self) -> dict[str, tuple[list[int], list[float]]]:
        xs = [p.batch for p in self.points]
        return {a: (xs, [getattr(p, a) for p in self.points]) for a in ("p50_ms", "p95_ms")}

    def _interp(self, batch: float, attr: str) -> float:
        xs, ys = self._curves[attr]
        if len(xs) == 1:
            return float(ys[0]) * max(batch, 1) / xs[0]
        i = bisect.bisect_left(xs, batch)
        if i == 0:
            return float(ys[0])
        i = min(i, len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return float(y0 + (y1 - y0) * (batch - x0) / (x1 - x0))

    def latency_ms(self, batch: float, quantile: str = "p50") -> float:
        """Execution time of one batch of ``batch`` requests."""
        return max(self._interp(max(batch, 1.0), f"{quantile}_ms"), 1e-3)

    def mean_ms(self, batch: float) -> float:
        """Mean execution time of one batch: the median's, for log-normal times whose 95th
        percentile is the profile's p95 (as Triton's compute statistics report means)."""
        p50, p95 = self.latency_ms(batch), self.latency_ms(batch, "p95")
        sigma = math.log(max(p95 / p50, 1.0)) / 1.645
        return p50 * math.exp(sigma * sigma / 2)

    def scaled(self, factor: float) -> ModelProfile:
        """This profile with every batch taking ``factor`` times as long."""
        points = tuple(
            replace(p, p50_ms=p.p50_ms * factor, p95_ms=p.p95_ms * factor) for p in self.points
        )
        return replace(self, points=points)

    def throughput_rps(self, batch: float, instances: int = 1) -> float:
        """Requests per second ``instances`` instances sustain with full batches of
        ``batch``."""
        per_instance = 1000.0 * batch / (self.latency_ms(batch) * self.instance_slowdown(instances))
        return instances * per_instance

    def instance_slowdown(self, instances: int) -> float:
        """How much longer each batch takes while ``instances`` instances run side by side
        (they share the replica's cores): ``instances`` over the measured speedup, or over
        none where the count was not measured (the cautious side)."""
        return instances / self.speedup.get(instances, 1.0)


def routed(small: ModelProfile, large: ModelProfile, share: float) -> ModelProfile:
    """The profile of a replica that serves ``share`` of its requests with ``small`` and the
    rest with ``large`` (the gateway's routing): at each batch size the share-weighted
    execution time (close to the two sub-batches run one after the other, as execution time
    is close to affine in the batch)."""
    sizes = sorted({p.batch for p in small.points} | {p.batch for p in large.points})
    points = tuple(
        BatchPoint(
            b,
            share * small.latency_ms(b) + (1 - share) * large.latency_ms(b),
            share * small.latency_ms(b, "p95") + (1 - share) * large.latency_ms(b, "p95"),
        )
        for b in sizes
    )
    speedup = {k: min(v, small.speedup.get(k, v)) for k, v in large.speedup.items()}
    return ModelProfile(large.name, large.stage, large.quality, points, large.reference, speedup)


@dataclass(frozen=True)
class ServiceProfile:
    capacity_rps: float
    p95_ms: float


@dataclass(frozen=True)
class Profiles:
    models: Mapping[str, ModelProfile]
    services: Mapping[str, ServiceProfile] = field(default_factory=dict)
    measured: Mapping[str, Any] = field(default_factory=dict)

    def model(self, name: str) -> ModelProfile | None:
        return self.models.get(name)

    def replacing(self, profile: ModelProfile) -> Profiles:
        """These profiles with ``profile`` in place of the model of the same name."""
        return replace(self, models={**self.models, profile.name: profile})


def parse(doc: Mapping[str, Any]) -> Profiles:
    """Validate and load a profile document."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} document")
    models = {}
    for name, m in doc.get("models", {}).items():
        points = tuple(
            sorted(
                (
                    BatchPoint(int(b["batch"]), float(b["p50_ms"]), float(b["p95_ms"]))
                    for b in m["batches"]
                ),
                key=lambda p: p.batch,
            )
        )
        if not points or any(p.p50_ms <= 0 or p.p95_ms < p.p50_ms for p in points):
            raise ValueError(f"model {name}: batches must have 0 < p50_ms <= p95_ms")
        quality = None if m.get("quality") is None else float(m["quality"])
        reference = None if m.get("reference") is None else str(m["reference"])
        models[name] = ModelProfile(
            name, str(m["stage"]), quality, points, reference, _speedup(name, m)
        )
    services = {
        name: ServiceProfile(float(s["capacity_rps"]), float(s["p95_ms"]))
        for name, s in doc.get("services", {}).items()
    }
    return Profiles(models, services, dict(doc.get("measured", {})))


def _speedup(name: str, m: Mapping[str, Any]) -> dict[int, float]:
    rows = {int(r["count"]): float(r["throughput_rps"]) for r in m.get("instances") or []}
    if not rows:
        return {1: 1.0}
    if 1 not in rows or any(v <= 0 for v in rows.values()) or min(rows) < 1:
        raise ValueError(f"model {name}: instances need count 1 and throughputs > 0")
    # N instances never beat N times one: a ratio above that is the measurement's noise
    return {k: min(v / rows[1], float(k)) for k, v in sorted(rows.items())}


def load(path: str | Path) -> Profiles:
    return parse(json.loads(Path(path).read_text()))
