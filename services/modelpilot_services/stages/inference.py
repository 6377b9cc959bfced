"""inference: the query gateway. query -> embed -> semantic cache -> retrieve -> re-rank.

``POST /v1/query`` ``{"query", "top_k", "filter", "route"}`` ->
``{"results": [{"document_id", "chunk", "score"}], "variant", "route", "cached"}``.

Routing (:mod:`.routing`): with the spec's ``routing.mode`` Fixed or Auto the small share of
the queries (by a hash of the text) goes to the small re-ranker, the rest to the large one,
and a sampled share is re-ranked by both to measure their agreement; with routing ``Off``
both routes are the planned variant's model. ``route`` in the request forces one.
The semantic cache (:mod:`.cache`) answers repeats; a sample of its answers is checked.
Admin port: ``GET|PATCH /v1/admin/config`` reads or changes the live thresholds
(``smallShare``, ``cacheThreshold``; ``GET`` also shows the routed models) and
``/v1/admin/shadow`` mirrors to a verification candidate.

Env: ``PORT`` (8084), ``MODELPILOT_EMBEDDING_URL``, ``MODELPILOT_RETRIEVAL_URL``,
``MODELPILOT_TRITON_URL``; without service.json (local processes)
``MODELPILOT_SMALL_MODEL`` / ``MODELPILOT_LARGE_MODEL``, ``MODELPILOT_SMALL_SHARE``
(0.5), ``MODELPILOT_SAMPLE_RATIO`` (0.1, both checks) and ``MODELPILOT_CACHE_*``.
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
from modelpilot_services.stages.agreement import answer_overlap, top_overlap
from modelpilot_services.stages.cache import CacheCheck, SemanticCache
from modelpilot_services.stages.routing import Route, Router
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
    smallShare: float | None = Field(default=None, ge=0, le=1)
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
        small_share: float = 0.5,
        cache: SemanticCache,
        sample_ratio: float = 0.1,
        cache_sample_ratio: float = 0.1,
        timeout_s: float = 30.0,
    ):
        super().__init__()
        self.embedding = Upstream(embedding_url, timeout_s=timeout_s)
        self.retrieval = Upstream(retrieval_url, timeout_s=timeout_s)
        self.triton_url, self.timeout_s = triton_url, timeout_s
        self.models = {"small": small_model, "large": large_model}
        self.router = Router(self.stage, self.registry, small_share, sample_ratio)
        self.cache = cache
        self.check = CacheCheck(self.stage, self.registry, cache_sample_ratio)
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
        self.shadow.restore()

    async def stop(self) -> None:
        self.shadow.cancel_restore()
        await self.embedding.close()
        await self.retrieval.close()
        await self.triton.close()

    async def ready(self) -> str | None:
        for model in set(self.models.values()):
            if not await self.triton.ready(model):
                return f"Triton model {model} is not ready"
        return self.shadow.pending()

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
        near = self.cache.nearest(key, vector)
        if near is not None:
            self.check.looked_up(near[0])
        hit = near is not None and near[0] >= self.cache.threshold
        self.cache_requests.labels(self.stage, "hit" if hit else "miss").inc()
        if near is not None and hit:
            similarity, cached = near

            async def recheck() -> float:
                fresh = await self._answer(body, vector, embedded["model"], cached["route"])
                return answer_overlap(cached["results"], fresh["results"])

            self.check.sample_hit(similarity, recheck)
            self.query_duration.labels(self.stage).observe(time.perf_counter() - start)
            return json_response({**cached, "cached": True})

        answer = await self._answer(body, vector, embedded["model"])
        if near is not None and near[1]["route"] == answer["route"]:
            # a near miss: what the cache would have answered, checked at no extra call (on
            # the same route only: a small/large difference is the router's, not the cache's)
            self.check.record(near[0], answer_overlap(near[1]["results"], answer["results"]))
        self.cache.put(key, vector, answer)
        self.query_duration.labels(self.stage).observe(time.perf_counter() - start)
        return json_response({**answer, "cached": False})

    async def _answer(
        self, body: Query, vector: Any, embed_model: str, recheck: Route | None = None
    ) -> dict[str, Any]:
        """Retrieve, route and re-rank. ``recheck``: recompute a cached answer on its route,
        off the response path (no routing, metrics or mirroring)."""
        search = {"embedding": vector.tolist(), "top_k": max(CANDIDATES * body.top_k, 10)}
        if body.filter:
            search["filter"] = body.filter
        candidates = (await self._post(self.retrieval, "/v1/search", search))["results"]
        route = recheck or body.route or self.router.route(body.query)
        model = self.models[route]
        results: list[dict[str, Any]] = []
        if candidates:
            chunks = [c["chunk"] for c in candidates]
            scores = await self.triton.score(model, body.query, chunks)
            if recheck is None:
                self._measure(body.query, chunks, route, scores)
            order = np.argsort(-scores, kind="stable")[: body.top_k]
            results = [
                {
                    "document_id": candidates[i]["document_id"],
                    "chunk": candidates[i]["chunk"],
                    "score": round(float(scores[i]), 6),
                    "metadata": candidates[i]["metadata"],
                }
                for i in order
            ]
        if recheck is None:
            self.routed.labels(self.stage, route).inc()
        return {"results": results, "variant": model, "route": route, "model": embed_model}

    def _measure(self, query: str, chunks: list[str], route: Route, scores: Any) -> None:
        """Off the response path: the shadow candidate's agreement (verification) and, with
        routing on, the other route's model's (the router's tuning)."""

        async def shadow(candidate: str) -> list[float]:
            return [top_overlap(scores, await self.triton.score(candidate, query, chunks))]

        self.shadow.mirror(self.models[route], shadow)
        other = self.models["large" if route == "small" else "small"]
        if other != self.models[route]:

            async def routed() -> float:
                return top_overlap(scores, await self.triton.score(other, query, chunks))

            self.router.sample(routed)

    def _knobs(self) -> dict[str, Any]:
        return {
            "smallShare": self.router.share,
            "cacheThreshold": self.cache.threshold,
            "smallModel": self.models["small"],
            "largeModel": self.models["large"],
        }

    async def get_config(self, request: web.Request) -> web.Response:
        return json_response(self._knobs())

    async def patch_config(self, request: web.Request) -> web.Response:
        """The knobs only: which models serve is the pod template's (a variant switch
        rolls the pods), never a live knob."""
        body = await parse(request, Knobs)
        if body.smallShare is not None:
            self.router.share = body.smallShare
        if body.cacheThreshold is not None:
            self.cache.threshold = body.cacheThreshold
        return json_response(self._knobs())


def routed_models(config: contract.ServiceConfig) -> tuple[str, str] | None:
    """(small, large) Triton models from the operator's config; None without one."""
    if config.model is None:
        return None
    routing = config.routing or {}
    if not routing.get("enabled"):
        return config.model, config.model  # routing off: every query to the planned variant
    small = config.variants.get(str(routing.get("smallVariant")), config.model)
    large = config.variants.get(str(routing.get("largeVariant")), config.model)
    return small, large


def main() -> None:
    config = service_config(Inference.stage)
    cache_cfg = config.semanticCache or {}
    routing = config.routing or {}
    on = env("MODELPILOT_CACHE_ENABLED", str(cache_cfg.get("enabled", True))).lower()
    cache = SemanticCache(
        threshold=config.cacheThreshold or float(env("MODELPILOT_CACHE_THRESHOLD", "0.95")),
        max_entries=int(
            env("MODELPILOT_CACHE_MAX_ENTRIES", str(cache_cfg.get("maxEntries", 10000)))
        )
        if on == "true"
        else 0,
        ttl_s=float(env("MODELPILOT_CACHE_TTL_SECONDS", str(cache_cfg.get("ttlSeconds", 600)))),
        dims=int(env("MODELPILOT_DIMENSIONS", "384")),
    )
    small, large = routed_models(config) or (
        env("MODELPILOT_SMALL_MODEL", "reranker_small"),
        env("MODELPILOT_LARGE_MODEL", "reranker_large"),
    )
    share = config.smallShare
    service = Inference(
        env(contract.stage_url_env("embedding"), "http://127.0.0.1:8082"),
        env(contract.stage_url_env("retrieval"), "http://127.0.0.1:8083"),
        env(contract.ENV_TRITON_URL, "localhost:8000"),
        small_model=small,
        large_model=large,
        small_share=float(env("MODELPILOT_SMALL_SHARE", "0.5")) if share is None else share,
        cache=cache,
        sample_ratio=float(env("MODELPILOT_SAMPLE_RATIO", str(routing.get("sampleRatio", 0.1)))),
        cache_sample_ratio=float(
            env("MODELPILOT_SAMPLE_RATIO", str(cache_cfg.get("sampleRatio", 0.1)))
        ),
        timeout_s=float(env("MODELPILOT_DOWNSTREAM_TIMEOUT", "30")),
    )
    service.shadow.configure(config.shadow)
    run(service, int(env(contract.ENV_PORT, str(contract.SERVICE_PORTS[Inference.stage]))))


if __name__ == "__main__":
    main()
