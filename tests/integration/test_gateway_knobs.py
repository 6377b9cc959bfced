"""The gateway's knobs at their edges: the real gateway (real Triton, real models) measures,
the real Prometheus scrapes it, the operator's telemetry reads the bands, and the
optimizer's own step (``optimizer.gateway``) decides."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from modelpilot import contract
from modelpilot.adapters.prometheus import Telemetry, selector, target_labels
from modelpilot.api.v1alpha1 import SemanticCache
from modelpilot.optimizer.gateway import tune_cache
from modelpilot.optimizer.tunables import Tunables
from modelpilot_services.devtools.stack import http_ok
from modelpilot_services.models import calibration
from tests.dataplane.client import ok
from tests.helpers import ROOT, free_port, start_service, wait_for

pytestmark = pytest.mark.integration


def test_a_cache_threshold_set_too_loose_is_tightened_once_bad_hits_are_measured(
    data_plane: Any, prometheus_url: str
) -> None:
    """At similarity 0.5 the cache answers a query with another query's cached answer: its
    sampled rechecks disagree. Read through Prometheus, the bands make the optimizer's step
    tighten the threshold to one whose hits agree at the floor (repeats still hit)."""
    docs = calibration.corpus(limit=80)
    for start in range(0, len(docs), 16):
        batch = [
            {"id": f"kn-{i}", "text": docs[i], "metadata": {"corpus": "kn"}}
            for i in range(start, min(start + 16, len(docs)))
        ]
        ok("POST", f"{data_plane.url('ingestion')}/v1/documents", {"documents": batch})
    port = free_port()
    env = data_plane.service_env("inference") | {
        "PORT": str(port),
        contract.ENV_ADMIN_PORT: str(free_port()),
        "MODELPILOT_SAMPLE_RATIO": "1",
        "MODELPILOT_CACHE_THRESHOLD": "0.5",
    }
    proc = start_service("inference", env)
    name = f"knobs-{port}"
    target = ROOT / ".cache/prometheus/targets" / f"{name}.json"
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{url}/readyz"), 120, what="the gateway")
        target.write_text(
            json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": target_labels("kn", name)}])
        )
        sel = selector("kn", name)

        def scraped() -> bool:  # traffic counts from the first scrape on
            r = requests.get(f"{prometheus_url}/api/v1/query", params={"query": f"up{{{sel}}}"})
            return any(row["value"][1] == "1" for row in r.json()["data"]["result"])

        wait_for(scraped, 60, what="Prometheus scraping the gateway")
        queries = calibration.queries(docs)

        def checked() -> int:
            """The gateway's own count of checks (rechecked hits and near misses)."""
            text = requests.get(f"{url}/metrics", timeout=10).text
            return round(
                sum(
                    s.value
                    for f in text_string_to_metric_families(text)
                    if f.name == contract.METRIC_CACHE_AGREEMENT
                    for s in f.samples
                    if s.name.endswith("_count")
                )
            )

        def query(q: str) -> bool:
            body = {"query": q, "top_k": 3, "filter": {"corpus": "kn"}}
            return bool(ok("POST", f"{url}/v1/query", body)["cached"])

        hits = sum(query(q) for q in queries)  # distinct: a hit is another query's answer
        assert hits > 5
        for q in queries[:30]:  # repeats, each recheck recorded before the next
            before = checked()
            assert query(q)
            wait_for(lambda before=before: checked() > before, 30, what="the recheck")
        done = checked()
        telemetry = Telemetry(prometheus_url)
        metrics = (contract.METRIC_CACHE_SIMILARITY, contract.METRIC_CACHE_AGREEMENT)

        def bands() -> Any:  # the gateway's checks, read back through Prometheus (increase()
            # extrapolates at the window's edges: a count may read a little under the total)
            got = telemetry.bands(sel, *metrics)
            return got if sum(b.samples for b in got) >= 0.9 * done else None

        measured = wait_for(bands, 120, interval=2, what="the checks in Prometheus")
        cache = SemanticCache.model_validate(
            {"mode": "Auto", "similarityThreshold": "0.5", "minSimilarityThreshold": "0.5"}
        )
        step = tune_cache(cache, 0.5, measured, 0.8, Tunables())
        print(f"figure cache_tightened: {step.reason}")
        assert step.value is not None and step.value > 0.5, (step, measured)
        assert step.reason is not None and step.reason.startswith("inference: cache threshold")
        assert step.measured is not None and step.measured.agreement is not None
        assert step.measured.agreement >= 0.8 and step.measured.share > 0  # repeats still hit
        loose = [b for b in measured if 0.5 < b.edge <= step.value and b.agreement is not None]
        assert loose and min(b.agreement for b in loose) < 0.8  # what it tightened past
    finally:
        target.unlink(missing_ok=True)
        proc.terminate()
        proc.wait(timeout=30)
