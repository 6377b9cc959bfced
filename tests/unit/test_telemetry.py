"""The Prometheus adapter's parsing: missing data is None, never 0 (KEDA-style table)."""

from __future__ import annotations

from typing import Any

import pytest

from modelpilot.telemetry import Telemetry

pytestmark = pytest.mark.unit


def fake(answers: dict[str, list[dict[str, Any]]]) -> Any:
    """A query function answering by the first key contained in the PromQL text."""
    seen: list[str] = []

    def query(promql: str) -> list[dict[str, Any]]:
        seen.append(promql)
        for key, rows in answers.items():
            if key in promql:
                return rows
        return []

    query.seen = seen  # type: ignore[attr-defined]
    return query


def row(value: str, stage: str | None = "embedding") -> dict[str, Any]:
    return {"metric": {"stage": stage} if stage else {}, "value": [1700000000, value]}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([], None),  # empty result
        ([row("NaN")], None),
        ([row("+Inf")], None),
        ([row("-Inf")], None),
        ([row("0")], 0.0),  # a real zero stays zero
        ([row("12.5")], 12.5),
        ([row("3", "embedding"), row("4", "inference")], 3.0),  # several series, by stage
    ],
)
def test_rate_parsing(rows: list[dict[str, Any]], expected: float | None) -> None:
    answers = {"rate(modelpilot_requests_total{": rows, "timestamp(": [row("1700000000", None)]}
    snap = Telemetry("http://unused", query=fake(answers)).snapshot("ns", "p", 1700000001.0)
    tele = snap.stages.get("embedding")
    assert (tele.rate_rps if tele else None) == expected


def test_latency_is_converted_to_milliseconds_and_staleness_is_reported() -> None:
    answers = {
        "histogram_quantile(0.95, sum by (stage, le)": [row("0.25")],
        "modelpilot_query_duration_seconds": [row("0.4", None)],
        "timestamp(": [row("1000", None)],
        "rate(modelpilot_requests_total{": [row("10")],
    }
    query = fake(answers)
    snap = Telemetry("http://unused", query=query).snapshot("ns", "pipe", 1100.0)
    assert snap.stages["embedding"].p95_ms == 250.0
    assert snap.e2e_p95_ms == 400.0
    assert snap.stale(1100.0, 60) == "newest sample is 100s old (limit 60s)"
    assert snap.stale(1030.0, 60) is None
    assert all('namespace="ns",pipeline="pipe"' in q for q in query.seen)


def test_no_samples_at_all_is_stale() -> None:
    snap = Telemetry("http://unused", query=fake({})).snapshot("ns", "p", 5.0)
    assert snap.stages == {} and snap.stale(5.0, 60) == "no samples in Prometheus"
