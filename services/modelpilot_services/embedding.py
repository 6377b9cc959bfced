"""embedding: texts -> vectors through the serving variant's Triton model.

``POST /v1/embed`` ``{"texts": [...]}`` -> ``{"embeddings", "model", "dims"}``.
Admin port: ``GET|PUT|DELETE /v1/admin/shadow`` mirrors a sample of requests to a candidate
variant and records the cosine of its vectors with the served ones (see ``shadow``).

The serving model is ``model`` from the operator's service.json (a variant switch rolls the
pods); local processes take ``MODELPILOT_MODEL`` (``minilm_fp32``). Env: ``PORT`` (8082),
``MODELPILOT_TRITON_URL`` (localhost:8000), ``MODELPILOT_MODELS`` (the models a shadow may
name, comma-separated; default every embedding model).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from modelpilot import contract
from modelpilot_services import models
from modelpilot_services.shadow import Shadow
from modelpilot_services.triton import Triton
from modelpilot_services.web import (
    Service,
    TritonStats,
    env,
    json_response,
    parse,
    run,
    service_config,
)

MAX_TEXTS = 256
MAX_CHARS = 20_000
Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHARS)]


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)


class Embedding(Service):
    stage = "embedding"

    def __init__(self, triton_url: str, model: str, allowed: tuple[str, ...]):
        super().__init__()
        if model not in allowed:
            raise SystemExit(f"model {model!r} is not one of {allowed}")
        self.triton_url, self.model, self.allowed = triton_url, model, allowed
        self.registry.register(TritonStats(self.stage, triton_url, lambda: [self.model]))
        self.app.router.add_post("/v1/embed", self.embed)
        self.shadow = Shadow(
            self.stage, self.registry, allowed, lambda m: self.triton.ensure_loaded(m)
        )
        self.shadow.routes(self.admin)

    async def start(self) -> None:
        self.triton = Triton(self.triton_url, admin_token=self.admin_token)
        self._publish()
        await self.shadow.load()

    async def stop(self) -> None:
        await self.triton.close()

    async def ready(self) -> str | None:
        ok = await self.triton.ready(self.model)
        return None if ok else f"Triton model {self.model} is not ready"

    def _publish(self) -> None:
        self.metrics.info.clear()
        self.metrics.info.labels(self.stage, "default", self.model).set(1)

    async def embed(self, request: web.Request) -> web.Response:
        body = await parse(request, EmbedRequest)
        model = self.model  # one request, one model, even if a switch lands meanwhile
        vectors = await self.triton.embed(model, body.texts)

        async def cosine(candidate: str) -> list[float]:
            other = await self.triton.embed(candidate, body.texts)
            norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(other, axis=1)
            return list((vectors * other).sum(axis=1) / np.maximum(norms, 1e-12))

        self.shadow.mirror(model, cosine)
        return json_response({"embeddings": vectors, "model": model, "dims": int(vectors.shape[1])})


def main() -> None:
    config = service_config(Embedding.stage)
    allowed = tuple(env("MODELPILOT_MODELS", ",".join(models.VARIANTS)).split(","))
    model = config.model or env("MODELPILOT_MODEL", "minilm_fp32")
    service = Embedding(env(contract.ENV_TRITON_URL, "localhost:8000"), model, allowed)
    service.shadow.configure(config.shadow)
    run(service, int(env(contract.ENV_PORT, str(contract.SERVICE_PORTS[Embedding.stage]))))


if __name__ == "__main__":
    main()
