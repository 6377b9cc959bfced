"""The metrics every service exports, by the names the operator's PromQL reads (``contract``):
per-stage RED metrics, the moments of the per-second arrival counts, and Triton's achieved
batching read at scrape time."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from modelpilot import contract

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5,
)  # fmt: skip


class Metrics:
    """The per-stage RED metrics every service exports (names match the operator's PromQL)."""

    def __init__(self, stage: str, registry: CollectorRegistry):
        self.stage = stage
        self.requests = Counter(
            contract.METRIC_REQUESTS, "Requests by response code.", [contract.STAGE_LABEL, "code"],
            registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            contract.METRIC_REQUEST_DURATION, "Request latency.", ["stage"],
            registry=registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.in_flight = Gauge(
            contract.METRIC_IN_FLIGHT, "Requests being served.", ["stage"], registry=registry
        )
        self.info = Gauge(
            contract.METRIC_SERVING_INFO, "The model each route serves now (value 1).",
            ["stage", "route", "model"], registry=registry,
        )  # fmt: skip
        self.arrivals = Arrivals(stage)
        registry.register(self.arrivals)
        # Bound once: a labels() lookup takes a lock and a dict probe on every request.
        self.stage_in_flight = self.in_flight.labels(stage)
        self.stage_duration = self.duration.labels(stage)
        self._by_code: dict[int, Any] = {}

    def count(self, status: int) -> None:
        """One more response with HTTP ``status``."""
        child = self._by_code.get(status)
        if child is None:
            child = self._by_code[status] = self.requests.labels(self.stage, str(status))
        child.inc()


class Arrivals(Collector):
    """Requests counted per whole second of the monotonic clock, exported as three counters:
    the seconds counted, the arrivals in them and the sum of each second's count squared.
    Their increases over a window give the mean and the variance of the per-second counts
    (a second without arrivals counts as 0), which a counter of requests cannot: Prometheus
    scrapes every 15 s. The second under way is counted once it is over."""

    def __init__(self, stage: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.stage, self.clock = stage, clock
        self.lock = threading.Lock()  # arrive() runs on the loop, collect() on the scrape
        self.second = math.floor(clock())
        self.now_count = 0
        self.seconds = self.arrivals = self.squared = 0

    def _close(self, second: int) -> None:
        """Fold every whole second before ``second`` into the totals."""
        if second > self.second:
            self.seconds += second - self.second  # the seconds in between had no arrivals
            self.arrivals += self.now_count
            self.squared += self.now_count * self.now_count
            self.second, self.now_count = second, 0

    def arrive(self) -> None:
        with self.lock:
            self._close(math.floor(self.clock()))
            self.now_count += 1

    def collect(self) -> Iterable[Any]:
        with self.lock:
            self._close(math.floor(self.clock()))
            totals = (self.seconds, self.arrivals, self.squared)
        series = (
            (contract.METRIC_ARRIVAL_SECONDS, "Whole seconds whose arrivals are counted."),
            (contract.METRIC_ARRIVALS, "Requests that arrived in those seconds."),
            (contract.METRIC_ARRIVALS_SQUARED, "Sum of each of those seconds' arrivals squared."),
        )
        for (name, doc), value in zip(series, totals, strict=True):
            family = CounterMetricFamily(name, doc, labels=[contract.STAGE_LABEL])
            family.add_metric([self.stage], value)
            yield family


class TritonStats(Collector):
    """Achieved batch sizes and queue time, read from Triton's statistics API at scrape time.

    Triton counts executions per batch size and total queue nanoseconds per model; exported as
    ``modelpilot_batch_size`` (histogram) and ``modelpilot_queue_duration_seconds`` (summary).
    """

    def __init__(self, stage: str, triton_url: str, models: Callable[[], Iterable[str]]):
        url = triton_url if "://" in triton_url else f"http://{triton_url}"
        self.stage, self.url, self.models = stage, url.rstrip("/"), models

    def collect(self) -> Iterable[Any]:
        batch = HistogramMetricFamily(
            contract.METRIC_BATCH_SIZE, "Achieved Triton batch sizes.", labels=["stage", "model"]
        )
        queue = SummaryMetricFamily(
            contract.METRIC_QUEUE_DURATION,
            "Time in Triton's queue.",
            labels=["stage", "model"],
        )
        # What the optimizer calibrates its profile's batch times against.
        compute = SummaryMetricFamily(
            contract.METRIC_COMPUTE_DURATION,
            "Triton's compute time per batch it executed.",
            labels=["stage", "model"],
        )
        # Items (texts, query-passage pairs) per request: what the optimizer sizes batches in.
        inferences = CounterMetricFamily(
            contract.METRIC_MODEL_INFERENCES,
            "Items Triton ran (texts embedded, pairs re-ranked).",
            labels=["stage", "model"],
        )
        requests = CounterMetricFamily(
            contract.METRIC_MODEL_REQUESTS,
            "Requests Triton completed successfully.",
            labels=["stage", "model"],
        )
        for model in self.models():
            try:
                with urllib.request.urlopen(f"{self.url}/v2/models/{model}/stats", timeout=1) as r:
                    stats = json.load(r)["model_stats"]
            except (OSError, ValueError, KeyError):
                continue  # Triton down or model unloaded: a missing series, never a fake 0
            counts: dict[int, int] = {}
            compute_ns = 0
            for version in stats:
                for row in version.get("batch_stats", []):
                    size = int(row["batch_size"])
                    counts[size] = counts.get(size, 0) + int(row["compute_infer"]["count"])
                    compute_ns += int(row["compute_infer"]["ns"])
                q = version["inference_stats"]["queue"]
                queue.add_metric([self.stage, model], int(q["count"]), int(q["ns"]) / 1e9)
                inferences.add_metric([self.stage, model], int(version.get("inference_count", 0)))
                ok = version["inference_stats"]["success"]
                requests.add_metric([self.stage, model], int(ok["count"]))
            buckets, running = [], 0
            for le in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                running = sum(c for s, c in counts.items() if s <= le)
                buckets.append((str(le), running))
            buckets.append(("+Inf", sum(counts.values())))
            batch.add_metric([self.stage, model], buckets, sum(s * c for s, c in counts.items()))
            compute.add_metric([self.stage, model], sum(counts.values()), compute_ns / 1e9)
        yield batch
        yield queue
        yield compute
        yield inferences
        yield requests
