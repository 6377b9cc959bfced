"""A stage's burstiness, end to end: a real service counts its arrivals per second, the real
Prometheus scrapes the counters, and the operator's telemetry reads the index of dispersion
the optimizer sizes queueing for."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from modelpilot import contract
from modelpilot.adapters.prometheus import Telemetry, selector, target_labels
from modelpilot_services.devtools.stack import http_ok
from tests.helpers import ROOT, free_port, start_service, wait_for

pytestmark = pytest.mark.integration

BURST = 40  # requests sent back to back ...
EVERY_S = 4.0  # ... once every this many seconds


def _moments(url: str) -> dict[str, float]:
    """The service's own arrival counters, as it exports them."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    names = {
        contract.METRIC_ARRIVAL_SECONDS + "_total",
        contract.METRIC_ARRIVALS + "_total",
        contract.METRIC_ARRIVALS_SQUARED + "_total",
    }
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name in names
    }


def test_bursty_arrivals_read_through_prometheus_as_a_high_index_of_dispersion(
    data_plane: Any, prometheus_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = data_plane.service_env("retrieval") | {
        "PORT": str(port),
        contract.ENV_ADMIN_PORT: str(free_port()),
        "MODELPILOT_DATA_DIR": str(tmp_path / "retrieval"),
    }
    proc = start_service("retrieval", env)
    name = f"bursts-{port}"
    target = ROOT / ".cache/prometheus/targets" / f"{name}.json"
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{url}/readyz"), 120, what="the retrieval service")
        target.write_text(
            json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": target_labels("bs", name)}])
        )
        sel = selector("bs", name)

        def scraped() -> bool:
            r = requests.get(f"{prometheus_url}/api/v1/query", params={"query": f"up{{{sel}}}"})
            return any(row["value"][1] == "1" for row in r.json()["data"]["result"])

        wait_for(scraped, 60, what="Prometheus scraping the service")
        session = requests.Session()
        deadline = time.monotonic() + 48
        while time.monotonic() < deadline:
            burst_at = time.monotonic()
            for _ in range(BURST):
                session.get(f"{url}/v1/stats", timeout=10).raise_for_status()
            # Paced by the clock, not synchronized with anything: the next burst's start.
            time.sleep(max(0.0, burst_at + EVERY_S - time.monotonic()))
        exported = _moments(url)
        seconds = exported[contract.METRIC_ARRIVAL_SECONDS + "_total"]
        arrivals = exported[contract.METRIC_ARRIVALS + "_total"]
        squared = exported[contract.METRIC_ARRIVALS_SQUARED + "_total"]
        mean = arrivals / seconds
        direct = (squared / seconds - mean * mean) / mean
        # A burst of 40 every 4 s (sometimes split over two seconds): an index far above a
        # Poisson stream's 1 at the same mean, about 30.
        assert direct > 10, exported
        telemetry = Telemetry(prometheus_url)

        def read() -> float | None:  # after the scrape that saw the last burst
            got = telemetry.dispersion(sel).get("retrieval")
            return (
                got if got is not None and _scraped_total(prometheus_url, sel) >= arrivals else None
            )

        measured = wait_for(read, 60, interval=2, what="the dispersion in Prometheus")
        print(f"figure dispersion: service {direct:.1f}, through Prometheus {measured:.1f}")
        # increase() extrapolates each counter alike to the window's edges: ratios hold.
        assert measured == pytest.approx(direct, rel=0.35)
    finally:
        target.unlink(missing_ok=True)
        proc.terminate()
        proc.wait(timeout=30)


def _scraped_total(prometheus_url: str, sel: str) -> float:
    """The arrivals total as of Prometheus's latest scrape."""
    query = f"sum({contract.METRIC_ARRIVALS}_total{{{sel}}})"
    r = requests.get(f"{prometheus_url}/api/v1/query", params={"query": query}, timeout=10)
    rows = r.json()["data"]["result"]
    return float(rows[0]["value"][1]) if rows else 0.0
