"""Prometheus adapter: the only module that speaks PromQL.

Reads the services' metrics (names below, Prometheus conventions, seconds) for one
pipeline, selected by the ``namespace`` and ``pipeline`` target labels, and returns a
frozen :class:`~modelpilot.optimizer.snapshot.Snapshot`. Empty results, NaN and +-Inf are
``None`` ("unknown"), never 0. Each query groups ``by (stage)`` so one request serves every
stage.

Metrics read (all labelled ``stage``):
  modelpilot_requests_total{code}              counter
  modelpilot_request_duration_seconds          histogram
  modelpilot_queue_duration_seconds            histogram
  modelpilot_batch_size                        histogram (achieved batch sizes)
  modelpilot_in_flight_requests                gauge
  modelpilot_cache_requests_total{result}      counter (inference: hit|miss)
  modelpilot_routed_requests_total{route}      counter (inference: small|large)
  modelpilot_query_duration_seconds            histogram (end to end, at the gateway)
  modelpilot_shadow_agreement{model}           histogram (shadow candidate vs serving, 0..1)
  modelpilot_shadow_duration_seconds{model}    histogram (shadow candidate latency)
  modelpilot_shadow_errors_total{model}        counter

Shadow statistics cover ``shadow_window`` (10 minutes by default): a verification needs its
samples within that window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from prometheus_api_client import PrometheusConnect

from modelpilot.optimizer.snapshot import (
    RATE_WINDOW_S,
    SHORT_RATE_WINDOW_S,
    ShadowStats,
    Snapshot,
    StageTelemetry,
)


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class Telemetry:
    """Builds snapshots for one pipeline from a Prometheus server."""

    def __init__(
        self,
        url: str,
        window: str = f"{RATE_WINDOW_S}s",
        short_window: str = f"{SHORT_RATE_WINDOW_S}s",
        shadow_window: str = "10m",
        timeout_s: float = 5.0,
        query: Callable[[str], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.window = window
        self.short_window = short_window
        self.shadow_window = shadow_window
        if query is None:
            prom = PrometheusConnect(url=url, disable_ssl=True)
            prom._session.request = _with_timeout(prom._session.request, timeout_s)
            query = prom.custom_query
        self._query = query

    def _by_stage(self, promql: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for row in self._query(promql):
            stage = row.get("metric", {}).get("stage")
            if stage:
                out[stage] = _finite(row["value"][1])
        return out

    def _scalar(self, promql: str) -> float | None:
        rows = self._query(promql)
        return _finite(rows[0]["value"][1]) if rows else None

    def _by_candidate(self, promql: str) -> dict[tuple[str, str], float | None]:
        out: dict[tuple[str, str], float | None] = {}
        for row in self._query(promql):
            labels = row.get("metric", {})
            if labels.get("stage") and labels.get("model"):
                out[(labels["stage"], labels["model"])] = _finite(row["value"][1])
        return out

    def shadow(self, sel: str) -> dict[tuple[str, str], ShadowStats]:
        """Per (stage, candidate model): samples, mean agreement, p95 and errors."""
        w, by = self.shadow_window, "stage, model"
        count = self._by_candidate(
            f"sum by ({by}) (increase(modelpilot_shadow_agreement_count{{{sel}}}[{w}]))"
        )
        total = self._by_candidate(
            f"sum by ({by}) (increase(modelpilot_shadow_agreement_sum{{{sel}}}[{w}]))"
        )
        p95 = self._by_candidate(
            f"histogram_quantile(0.95, sum by ({by}, le) "
            f"(increase(modelpilot_shadow_duration_seconds_bucket{{{sel}}}[{w}])))"
        )
        errors = self._by_candidate(
            f"sum by ({by}) (increase(modelpilot_shadow_errors_total{{{sel}}}[{w}]))"
        )
        out = {}
        for key in set(count) | set(errors):
            n = count.get(key) or 0.0
            s = total.get(key)
            latency = p95.get(key)
            out[key] = ShadowStats(
                samples=round(n),
                agreement=s / n if n > 0 and s is not None else None,
                p95_ms=None if latency is None else latency * 1000.0,
                errors=round(errors.get(key) or 0.0),
            )
        return out

    def snapshot(self, namespace: str, pipeline: str, now: float) -> Snapshot:
        """Query Prometheus once per metric family; missing data stays ``None``."""
        sel = f'namespace="{namespace}",pipeline="{pipeline}"'
        w = self.window

        def quantile(metric: str, q: float, by: str = "stage") -> str:
            return (
                f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}[{w}])))"
            )

        def mean(metric: str) -> str:
            return (
                f"sum by (stage) (rate({metric}_sum{{{sel}}}[{w}])) / "
                f"sum by (stage) (rate({metric}_count{{{sel}}}[{w}]))"
            )

        rate = self._by_stage(f"sum by (stage) (rate(modelpilot_requests_total{{{sel}}}[{w}]))")
        short = self._by_stage(
            f"sum by (stage) (rate(modelpilot_requests_total{{{sel}}}[{self.short_window}]))"
        )
        errors = self._by_stage(
            f'sum by (stage) (rate(modelpilot_requests_total{{{sel},code=~"5.."}}[{w}])) / '
            f"sum by (stage) (rate(modelpilot_requests_total{{{sel}}}[{w}]))"
        )
        p50 = self._by_stage(quantile("modelpilot_request_duration_seconds", 0.5))
        p95 = self._by_stage(quantile("modelpilot_request_duration_seconds", 0.95))
        p99 = self._by_stage(quantile("modelpilot_request_duration_seconds", 0.99))
        queue = self._by_stage(mean("modelpilot_queue_duration_seconds"))
        batch = self._by_stage(mean("modelpilot_batch_size"))
        items = self._by_stage(
            f"sum by (stage) (rate(modelpilot_model_inferences_total{{{sel}}}[{w}])) / "
            f"sum by (stage) (rate(modelpilot_model_requests_total{{{sel}}}[{w}]))"
        )
        in_flight = self._by_stage(f"sum by (stage) (modelpilot_in_flight_requests{{{sel}}})")
        hits = self._by_stage(
            f'sum by (stage) (rate(modelpilot_cache_requests_total{{{sel},result="hit"}}[{w}]))'
            f" / sum by (stage) (rate(modelpilot_cache_requests_total{{{sel}}}[{w}]))"
        )
        small = self._by_stage(
            f'sum by (stage) (rate(modelpilot_routed_requests_total{{{sel},route="small"}}[{w}]))'
            f" / sum by (stage) (rate(modelpilot_routed_requests_total{{{sel}}}[{w}]))"
        )
        e2e = self._scalar(
            f"histogram_quantile(0.95, sum by (le) "
            f"(rate(modelpilot_query_duration_seconds_bucket{{{sel}}}[{w}])))"
        )
        newest = self._scalar(f"max(timestamp(modelpilot_requests_total{{{sel}}}))")

        def ms(v: float | None) -> float | None:
            return None if v is None else v * 1000.0

        stages: dict[str, StageTelemetry] = {}
        for stage in set(rate) | set(p95) | set(in_flight):
            stages[stage] = StageTelemetry(
                rate_rps=rate.get(stage),
                rate_short_rps=short.get(stage),
                p50_ms=ms(p50.get(stage)),
                p95_ms=ms(p95.get(stage)),
                p99_ms=ms(p99.get(stage)),
                queue_ms=ms(queue.get(stage)),
                batch_size=batch.get(stage),
                items_per_request=items.get(stage),
                error_ratio=errors.get(stage),
                in_flight=in_flight.get(stage),
                cache_hit_ratio=hits.get(stage),
                small_share=small.get(stage),
            )
        return Snapshot(
            time=now,
            newest_sample=newest,
            stages=stages,
            e2e_p95_ms=ms(e2e),
            shadow=self.shadow(sel),
        )


def _with_timeout(request: Callable[..., Any], timeout_s: float) -> Callable[..., Any]:
    """requests has no session-wide timeout: a hung Prometheus must not hang the operator."""

    def call(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout_s)
        return request(*args, **kwargs)

    return call
