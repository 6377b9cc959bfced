"""inference: the query gateway. query -> embed -> semantic cache -> retrieve -> re-rank.

``POST /v1/query`` ``{"query", "top_k", "filter", "route"}`` ->
``{"results": [{"document_id", "chunk", "score"}], "variant", "route", "cached"}``.

Routing: with the spec's ``routing.mode: Auto`` a cheap difficulty score, ``1 - best
retrieval similarity`` (a query far from everything indexed is hard), sends a query to the
large re-ranker when it is >= the threshold, else to the small one; with routing ``Off``
both routes are the planned variant's model. ``route`` in the request forces one.
Admin port: ``GET|PATCH /v1/admin/config`` reads or changes the live thresholds
(``routingThreshold``, ``cacheThreshold``; ``GET`` also shows the routed models) and
``/v1/admin/shadow`` mirrors to a verification candidate.

Env: ``PORT`` (8084), ``MODELPILOT_EMBEDDING_URL``, ``MODELPILOT_RETRIEVAL_URL``,
``MODELPILOT_TRITON_URL``; without service.json (local processes)
``MODELPILOT_SMALL_MODEL`` / ``MODELPILOT_LARGE_MODEL``, ``MODELPILOT_ROUTING_THRESHOLD``
(0.5) and ``MODELPILOT_CACHE_*``.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

import numpy as np
from aiohttp import web
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from modelpilot import contract
from modelpilot_services.models import minilm
from modelpilot_services.stages.agreement import top_overlap
from modelpilot_services.stages.cache import SemanticCache
from modelpilot_services.stages.shadow import Shadow
from modelpilot_services.toolkit.http import call_downstream, json_response, parse
from modelpilot_services.toolkit.metrics import LATENCY_BUCKETS, TritonStats
from modelpilot_services.toolkit.schemas import Filter
from modelpilot_services.toolkit.service import Service, env, run, service_config
from modelpilot_services.toolkit.triton import Triton
from modelpilot_services.toolkit.upstream import Upstream

MAX_TOP_K = 100
CANDIDATES = 2  # re-rank this many candidates per requested result (at least 10)


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    query: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    filter: Filter | None = None
    route: Literal["small", "large"] | None = None


class Knobs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    routingThreshold: float | None = Field(default=None, ge=0, le=1)
    cacheThreshold: float | None = Field(default=None, ge=0, le=1)


class Inference(Service):
    stage = "inference"

    def __init__(
        self,
        embedding_url: str,
        retrieval_url: str,
        triton_url: str,
        *,
        small_model: str = "reranker_small",
        large_model: str = "reranker_large",
        routing_threshold: float = 0.5,
        cache: SemanticCache,
        timeout_s: float = 30.0,
    ):
        super().__init__()
        self.embedding = Upstream(embedding_url, timeout_s=timeout_s)
        self.retrieval = Upstream(retrieval_url, timeout_s=timeout_s)
        self.triton_url, self.timeout_s = triton_url, timeout_s
        self.models = {"small": small_model, "large": large_model}
        self.threshold = routing_threshold
        self.cache = cache
        self.query_duration = Histogram(
            contract.METRIC_QUERY_DURATION, "End-to-end query latency at the gateway.",
            ["stage"], registry=self.registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.cache_requests = Counter(
            contract.METRIC_CACHE_REQUESTS, "Semantic cache lookups.", ["stage", "result"],
            registry=self.registry,
        )  # fmt: skip
        self.routed = Counter(
            contract.METRIC_ROUTED_REQUESTS, "Queries by re-ranker route.", ["stage", "route"],
            registry=self.registry,
        )  # fmt: skip
        self.registry.register(
            TritonStats(self.stage, triton_url, lambda: sorted(set(self.models.values())))
        )
        self.app.router.add_post("/v1/query", self.query)
        self.admin.router.add_get(contract.ADMIN_CONFIG_PATH, self.get_config)
        self.admin.router.add_patch(contract.ADMIN_CONFIG_PATH, self.patch_config)
        self.shadow = Shadow(
            self.stage, self.registry, minilm.RERANKERS, lambda m: self.triton.ensure_loaded(m)
        )
        self.shadow.routes(self.admin)

    async def start(self) -> None:
        self.triton = Triton(self.triton_url, self.timeout_s, admin_token=self.admin_token)
        self._publish()
        await self.shadow.load()

    async def stop(self) -> None:
        await self.embedding.close()
        await self.retrieval.close()
        await self.triton.close()

    async def ready(self) -> str | None:
        for model in set(self.models.values()):
            if not await self.triton.ready(model):
                return f"Triton model {model} is not ready"
        return None

    def _publish(self) -> None:
        self.metrics.info.clear()
        for route, model in self.models.items():
            self.metrics.info.labels(self.stage, route, model).set(1)

    async def _post(self, upstream: Upstream, path: str, body: Any) -> Any:
        return await call_downstream(upstream, "POST", path, body, retry_after=1)

    async def query(self, request: web.Request) -> web.Response:
        start = time.perf_counter()
        body = await parse(request, Query)
        embedded = await self._post(self.embedding, "/v1/embed", {"texts": [body.query]})
        vector = np.asarray(embedded["embeddings"][0], dtype=np.float32)
        key = json.dumps([body.top_k, body.filter, body.route], sort_keys=True)
        cached = self.cache.get(key, vector)
        self.cache_requests.labels(self.stage, "hit" if cached else "miss").inc()
        if cached is not None:
            self.query_duration.labels(self.stage).observe(time.perf_counter() - start)
            return json_response({**cached, "cached": True})

        search = {"embedding": vector.tolist(), "top_k": max(CANDIDATES * body.top_k, 10)}
        if body.filter:
            search["filter"] = body.filter
        candidates = (await self._post(self.retrieval, "/v1/search", search))["results"]
        route = body.route or self.route(candidates)
        self.routed.labels(self.stage, route).inc()
        model = self.models[route]
        results: list[dict[str, Any]] = []
        if candidates:
            scores = await self.triton.score(model, body.query, [c["chunk"] for c in candidates])
            order = np.argsort(-scores, kind="stable")[: body.top_k]
            chunks = [c["chunk"] for c in candidates]

            async def overlap(candidate: str) -> list[float]:
                other = await self.triton.score(candidate, body.query, chunks)
                return [top_overlap(scores, other)]

            self.shadow.mirror(model, overlap)
            results = [
                {
                    "document_id": candidates[i]["document_id"],
                    "chunk": candidates[i]["chunk"],
                    "score": round(float(scores[i]), 6),
                    "metadata": candidates[i]["metadata"],
                }
                for i in order
            ]
        answer = {"results": results, "variant": model, "route": route, "model": embedded["model"]}
        self.cache.put(key, vector, answer)
        self.query_duration.labels(self.stage).observe(time.perf_counter() - start)
        return json_response({**answer, "cached": False})

    def route(self, candidates: list[dict[str, Any]]) -> Literal["small", "large"]:
        """``large`` when the best match is weak (difficulty = 1 - best similarity)."""
        best = candidates[0]["score"] if candidates else 0.0
        return "large" if 1.0 - best >= self.threshold else "small"

    def _knobs(self) -> dict[str, Any]:
        return {
            "routingThreshold": self.threshold,
            "cacheThreshold": self.cache.threshold,
            "smallModel": self.models["small"],
            "largeModel": self.models["large"],
        }

    async def get_config(self, request: web.Request) -> web.Response:
        return json_response(self._knobs())

    async def patch_config(self, request: web.Request) -> web.Response:
        """The thresholds only: which models serve is the pod template's (a variant switch
        rolls the pods), never a live knob."""
        body = await parse(request, Knobs)
        if body.routingThreshold is not None:
            self.threshold = body.routingThreshold
        if body.cacheThreshold is not None:
            self.cache.threshold = body.cacheThreshold
        return json_response(self._knobs())


def routed_models(config: contract.ServiceConfig) -> tuple[str, str] | None:
    """(small, large) Triton models from the operator's config; None without one."""
    if config.model is None:
        return None
    routing = config.routing or {}
    if routing.get("mode") != "Auto":
        return config.model, config.model  # routing off: every query to the planned variant
    small = config.variants.get(str(routing.get("smallVariant")), config.model)
    large = config.variants.get(str(routing.get("largeVariant")), config.model)
    return small, large


def main() -> None:
    config = service_config(Inference.stage)
    cache_cfg = config.semanticCache or {}
    enabled = env("MODELPILOT_CACHE_ENABLED", str(cache_cfg.get("enabled", True))).lower()
    cache = SemanticCache(
        threshold=float(
            env("MODELPILOT_CACHE_THRESHOLD", str(cache_cfg.get("similarityThreshold", 0.95)))
        ),
        max_entries=int(
            env("MODELPILOT_CACHE_MAX_ENTRIES", str(cache_cfg.get("maxEntries", 10000)))
        )
        if enabled == "true"
        else 0,
        ttl_s=float(env("MODELPILOT_CACHE_TTL_SECONDS", str(cache_cfg.get("ttlSeconds", 600)))),
        dims=int(env("MODELPILOT_DIMENSIONS", "384")),
    )
    small, large = routed_models(config) or (
        env("MODELPILOT_SMALL_MODEL", "reranker_small"),
        env("MODELPILOT_LARGE_MODEL", "reranker_large"),
    )
    service = Inference(
        env(contract.stage_url_env("embedding"), "http://127.0.0.1:8082"),
        env(contract.stage_url_env("retrieval"), "http://127.0.0.1:8083"),
        env(contract.ENV_TRITON_URL, "localhost:8000"),
        small_model=small,
        large_model=large,
        routing_threshold=float(env("MODELPILOT_ROUTING_THRESHOLD", "0.5")),
        cache=cache,
        timeout_s=float(env("MODELPILOT_DOWNSTREAM_TIMEOUT", "30")),
    )
    service.shadow.configure(config.shadow)
    run(service, int(env(contract.ENV_PORT, str(contract.SERVICE_PORTS[Inference.stage]))))


if __name__ == "__main__":
    main()
