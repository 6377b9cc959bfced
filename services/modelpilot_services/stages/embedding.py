"""embedding: texts -> vectors through the serving variant's Triton model.

``POST /v1/embed`` ``{"texts": [...]}`` -> ``{"embeddings", "model", "dims"}``.
Admin port: ``GET|PUT|DELETE /v1/admin/shadow`` mirrors a sample of requests to a candidate
variant and records its neighbour recall@10 against the serving model over recent mirrored
texts, the ring seeded with calibration texts (see ``shadow`` and ``agreement``).

The serving model is ``model`` from the operator's service.json (a variant switch rolls the
pods); local processes take ``MODELPILOT_MODEL`` (``minilm_fp32``). Until Triton serves it
the service is not ready, and says which model it waits for. Env: ``PORT`` (8082),
``MODELPILOT_TRITON_URL`` (localhost:8000), ``MODELPILOT_MODELS`` (the models a shadow may
name, comma-separated; default every embedding model).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from modelpilot import contract
from modelpilot_services.models import calibration, minilm
from modelpilot_services.stages.agreement import MIN_RING, NeighbourRecall
from modelpilot_services.stages.shadow import NotReady, Shadow
from modelpilot_services.toolkit.http import json_response, parse
from modelpilot_services.toolkit.metrics import TritonStats
from modelpilot_services.toolkit.service import Service, env, run, service_config
from modelpilot_services.toolkit.triton import Triton

MAX_TEXTS = 256
MAX_CHARS = 20_000
Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHARS)]


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)


class Embedding(Service):
    stage = "embedding"

    def __init__(self, triton_url: str, model: str, allowed: tuple[str, ...]):
        """``model`` serves whatever it is: a model Triton does not serve keeps the service
        up and not ready (the operator's load check reports it), never a crash loop.
        ``allowed``: the models the admin API may name as a shadow candidate."""
        super().__init__()
        self.triton_url, self.model, self.allowed = triton_url, model, allowed
        self.registry.register(TritonStats(self.stage, triton_url, lambda: [self.model]))
        self.app.router.add_post("/v1/embed", self.embed)
        self.shadow = Shadow(
            self.stage, self.registry, allowed, lambda m: self.triton.ensure_loaded(m)
        )
        self.shadow.routes(self.admin)
        # (candidate, its ring of recent texts, being seeded or seeded)
        self.recall: tuple[str, asyncio.Task[NeighbourRecall]] | None = None

    def _ring(self, candidate: str) -> NeighbourRecall:
        """The candidate's ring, seeded once with calibration texts under both models, so
        that the first text measured already has neighbours. Until the seeding is done,
        mirrored requests are skipped (NotReady); a failed seeding is the candidate's error,
        and the next mirrored request seeds again."""
        if self.recall is None or self.recall[0] != candidate:
            seeding = asyncio.get_running_loop().create_task(self._seeded(candidate))
            self.recall = (candidate, seeding)
        task = self.recall[1]
        if not task.done():
            raise NotReady(f"seeding the neighbour ring of {candidate}")
        if task.exception() is not None:
            self.recall = None
        return task.result()

    async def _seeded(self, candidate: str) -> NeighbourRecall:
        texts = calibration.corpus(limit=MIN_RING)
        served = await self.triton.embed(self.model, texts)
        other = await self.triton.embed(candidate, texts)
        ring = NeighbourRecall(int(served.shape[1]))
        ring.measure(texts, served, other)  # the seeds only fill the ring
        return ring

    async def start(self) -> None:
        self.triton = Triton(self.triton_url, admin_token=self.admin_token)
        self._publish()
        self.shadow.restore()

    async def stop(self) -> None:
        self.shadow.cancel_restore()
        await self.triton.close()

    async def ready(self) -> str | None:
        if not await self.triton.ready(self.model):
            return f"Triton model {self.model} is not ready"
        return self.shadow.pending()

    def _publish(self) -> None:
        self.metrics.info.clear()
        self.metrics.info.labels(self.stage, "default", self.model).set(1)

    async def embed(self, request: web.Request) -> web.Response:
        body = await parse(request, EmbedRequest)
        model = self.model  # one request, one model, even if a switch lands meanwhile
        vectors = await self.triton.embed(model, body.texts)

        async def recall(candidate: str) -> list[float]:
            ring = self._ring(candidate)
            other = await self.triton.embed(candidate, body.texts)
            return ring.measure(body.texts, vectors, other)

        self.shadow.mirror(model, recall)
        return json_response({"embeddings": vectors, "model": model, "dims": int(vectors.shape[1])})


def main() -> None:
    config = service_config(Embedding.stage)
    allowed = tuple(env("MODELPILOT_MODELS", ",".join(minilm.VARIANTS)).split(","))
    model = config.model or env("MODELPILOT_MODEL", "minilm_fp32")
    service = Embedding(env(contract.ENV_TRITON_URL, "localhost:8000"), model, allowed)
    service.shadow.configure(config.shadow)
    run(service, int(env(contract.ENV_PORT, str(contract.SERVICE_PORTS[Embedding.stage]))))


if __name__ == "__main__":
    main()
