"""The operator and the data plane agree: what the services export is what the operator's
queries read, and what render writes is what the services parse."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from modelpilot import contract
from modelpilot.adapters.prometheus import Telemetry
from modelpilot.api.v1alpha1 import ModelDeploymentSpec
from modelpilot.render import plan
from modelpilot.render.children import service_config
from modelpilot_services.stages.cache import SemanticCache
from modelpilot_services.stages.embedding import Embedding
from modelpilot_services.stages.inference import Inference
from modelpilot_services.toolkit.metrics import TritonStats
from tests.helpers import ROOT, sample

pytestmark = pytest.mark.unit


def _exported() -> set[str]:
    """Every sample name the services export (with _bucket, _sum, _count, _total)."""
    embedding = Embedding("127.0.0.1:1", "minilm_fp32", ("minilm_fp32", "minilm_int8"))
    gateway = Inference(
        "http://127.0.0.1:1",
        "http://127.0.0.1:1",
        "127.0.0.1:1",
        cache=SemanticCache(threshold=0.95, max_entries=1, ttl_s=1, dims=4),
    )
    gateway.query_duration.labels("inference").observe(0.1)
    gateway.cache_requests.labels("inference", "hit").inc()
    gateway.routed.labels("inference", "small").inc()
    gateway.router.agreement.labels("inference").observe(1.0)
    gateway.check.looked_up(0.97)
    gateway.check.record(0.97, 1.0)
    names: set[str] = set()
    for service in (embedding, gateway):
        service.metrics.count(200)
        service.metrics.stage_duration.observe(0.01)
        service.shadow.agreement.labels(service.stage, "m").observe(1.0)
        service.shadow.duration.labels(service.stage, "m").observe(0.01)
        service.shadow.errors.labels(service.stage, "m").inc()
        for family in text_string_to_metric_families(generate_latest(service.registry).decode()):
            names |= {s.name for s in family.samples}
    # Triton's statistics become these families at scrape time (no Triton here: names only).
    suffixes = {
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
        "counter": ("_total",),
    }
    for family in TritonStats("embedding", "127.0.0.1:1", lambda: []).collect():
        names |= {family.name + s for s in suffixes[family.type]}
    return names


def test_every_series_the_operator_queries_is_one_the_services_export() -> None:
    queries: list[str] = []

    def record(promql: str) -> list[dict[str, object]]:
        queries.append(promql)
        return []

    Telemetry("http://unused", query=record).snapshot("ns", "name", 0.0)
    read = {name for q in queries for name in re.findall(r"\b(modelpilot_[a-z_]+)\{", q)}
    assert read, queries
    missing = read - _exported()
    assert not missing, f"queried but never exported: {sorted(missing)}"


def test_what_render_writes_is_what_the_services_parse() -> None:
    spec = ModelDeploymentSpec.model_validate(sample("full")["spec"])
    for stage in contract.STAGES:
        config = service_config(spec, stage, plan.initial(spec)[stage])
        parsed = contract.ServiceConfig.model_validate_json(config.json_text())
        assert parsed == config and parsed.stage == stage


def test_every_series_the_chart_dashboard_plots_is_one_the_services_export() -> None:
    doc = json.loads((ROOT / "charts/modelpilot/dashboards/pipeline.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    plotted = {name for e in exprs for name in re.findall(r"\b(modelpilot_[a-z_]+)\{", e)}
    assert {"modelpilot_routing_agreement_sum", "modelpilot_cache_agreement_sum"} <= plotted
    assert not plotted - _exported(), sorted(plotted - _exported())
