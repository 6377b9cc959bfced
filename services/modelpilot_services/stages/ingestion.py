"""ingestion: documents -> chunks -> embeddings -> the retrieval index.

``POST /v1/documents`` ``{"documents": [{"id", "text", "metadata"}]}`` answers 200 only when
every document's chunks are durably written (retrieval fsyncs before it answers); posting an
id again replaces it. ``DELETE /v1/documents/{id}``.

Back-pressure: at most ``MODELPILOT_MAX_CONCURRENT`` requests run and ``MODELPILOT_MAX_QUEUE``
wait; beyond that 429 + ``Retry-After``. A slow or failing downstream gives 503 + Retry-After.

Env: ``PORT`` (8081), ``MODELPILOT_EMBEDDING_URL``, ``MODELPILOT_RETRIEVAL_URL``,
``CHUNK_SIZE`` / ``CHUNK_OVERLAP`` (words; 200 / 40), ``MODELPILOT_DOWNSTREAM_TIMEOUT`` (s).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from modelpilot import contract
from modelpilot_services.toolkit.http import ApiError, call_downstream, json_response, parse
from modelpilot_services.toolkit.schemas import DocumentId, Metadata, document_id
from modelpilot_services.toolkit.service import Service, env, run
from modelpilot_services.toolkit.upstream import Upstream

MAX_DOCUMENTS = 64
EMBED_BATCH = 32


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: DocumentId
    text: Annotated[str, StringConstraints(min_length=1, max_length=200_000)]
    metadata: Metadata = Field(default_factory=dict)


class PostDocuments(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    documents: list[DocumentIn] = Field(min_length=1, max_length=MAX_DOCUMENTS)


def chunk(text: str, size: int, overlap: int) -> list[str]:
    """Windows of ``size`` words that overlap by ``overlap`` words; whitespace normalised."""
    words = text.split()
    if not words:
        return []
    step = max(1, size - overlap)
    out = []
    for start in range(0, len(words), step):
        out.append(" ".join(words[start : start + size]))
        if start + size >= len(words):
            break
    return out


class Ingestion(Service):
    stage = "ingestion"

    def __init__(
        self,
        embedding_url: str,
        retrieval_url: str,
        *,
        chunk_size: int = 200,
        overlap: int = 40,
        max_concurrent: int = 4,
        max_queue: int = 32,
        timeout_s: float = 30.0,
    ):
        super().__init__()
        if not 0 <= overlap < chunk_size:
            raise SystemExit("CHUNK_OVERLAP must be >= 0 and < CHUNK_SIZE")
        self.embedding = Upstream(embedding_url, timeout_s=timeout_s)
        self.retrieval = Upstream(retrieval_url, timeout_s=timeout_s)
        self.chunk_size, self.overlap = chunk_size, overlap
        self.slots = asyncio.Semaphore(max_concurrent)
        self.max_waiting = max_concurrent + max_queue
        self.admitted = 0
        self.app.router.add_post("/v1/documents", self.post)
        self.app.router.add_delete("/v1/documents/{id}", self.delete)

    async def stop(self) -> None:
        await self.embedding.close()
        await self.retrieval.close()

    async def ready(self) -> str | None:
        for name, upstream in (("embedding", self.embedding), ("retrieval", self.retrieval)):
            try:
                if (await upstream.request("GET", "/readyz", timeout_s=2)).status != 200:
                    return f"{name} is not ready"
            except (OSError, TimeoutError):
                return f"{name} is unreachable"
        return None

    async def _call(self, upstream: Upstream, method: str, path: str, body: Any = None) -> Any:
        return await call_downstream(upstream, method, path, body, retry_after=2)

    async def _ingest(self, doc: DocumentIn) -> int:
        pieces = chunk(doc.text, self.chunk_size, self.overlap)
        if not pieces:
            raise ApiError(422, "invalid_request", f"document {doc.id!r} has no words")
        vectors: list[list[float]] = []
        for start in range(0, len(pieces), EMBED_BATCH):
            out = await self._call(
                self.embedding,
                "POST",
                "/v1/embed",
                {"texts": pieces[start : start + EMBED_BATCH]},
            )
            vectors.extend(out["embeddings"])
        chunks = [
            {"text": p, "metadata": {**doc.metadata, "chunk": i}} for i, p in enumerate(pieces)
        ]
        await self._call(
            self.retrieval,
            "PUT",
            f"/v1/documents/{doc.id}",
            {"chunks": chunks, "embeddings": vectors},
        )
        return len(pieces)

    async def post(self, request: web.Request) -> web.Response:
        if self.admitted >= self.max_waiting:
            raise ApiError(429, "overloaded", "ingestion queue is full", retry_after=1)
        self.admitted += 1
        try:
            body = await parse(request, PostDocuments)
            ids = [d.id for d in body.documents]
            if len(set(ids)) != len(ids):
                raise ApiError(422, "invalid_request", "document ids repeat within the request")
            async with self.slots:
                counts = await asyncio.gather(*(self._ingest(d) for d in body.documents))
        finally:
            self.admitted -= 1
        return json_response({"acknowledged": ids, "chunks": sum(counts)})

    async def delete(self, request: web.Request) -> web.Response:
        doc = document_id(request.match_info["id"])
        await self._call(self.retrieval, "DELETE", f"/v1/documents/{doc}")
        return json_response({"id": doc, "deleted": True})


def main() -> None:
    service = Ingestion(
        env(contract.stage_url_env("embedding"), "http://127.0.0.1:8082"),
        env(contract.stage_url_env("retrieval"), "http://127.0.0.1:8083"),
        chunk_size=int(env("CHUNK_SIZE", "200")),
        overlap=int(env("CHUNK_OVERLAP", "40")),
        max_concurrent=int(env("MODELPILOT_MAX_CONCURRENT", "4")),
        max_queue=int(env("MODELPILOT_MAX_QUEUE", "32")),
        timeout_s=float(env("MODELPILOT_DOWNSTREAM_TIMEOUT", "30")),
    )
    run(service, int(env(contract.ENV_PORT, str(contract.SERVICE_PORTS[Ingestion.stage]))))


if __name__ == "__main__":
    main()
