"""retrieval: a durable ANN index (usearch HNSW, snapshot + WAL) of document chunks.

``PUT /v1/documents/{id}`` ``{"chunks": [{"text", "metadata"}], "embeddings": [[...]]}``
replaces the document's chunks and answers only once the write is fsynced.
``DELETE|GET /v1/documents/{id}``; ``POST /v1/search`` ``{"embedding", "top_k", "filter"}``;
``GET /v1/stats``.

Env: ``PORT`` (8083), ``MODELPILOT_DATA_DIR`` (else ``dataDir`` from service.json),
``MODELPILOT_DIMENSIONS`` (384), ``MODELPILOT_SNAPSHOT_EVERY`` (2000 writes).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import numpy as np
from aiohttp import web
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from modelpilot import contract
from modelpilot_services.stages.store import Store
from modelpilot_services.toolkit.http import ApiError, json_response, parse
from modelpilot_services.toolkit.schemas import Filter, Metadata, Vector, document_id
from modelpilot_services.toolkit.service import Service, env, run, service_config

MAX_TOP_K = 1000


class ChunkIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: Annotated[str, StringConstraints(min_length=1, max_length=20_000)]
    metadata: Metadata = Field(default_factory=dict)


class PutDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    chunks: list[ChunkIn] = Field(min_length=1, max_length=1024)
    embeddings: list[Vector] = Field(min_length=1, max_length=1024)


class Search(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    embedding: Vector
    top_k: int = Field(default=10, ge=1, le=MAX_TOP_K)
    filter: Filter | None = None


class Retrieval(Service):
    stage = "retrieval"

    def __init__(self, data_dir: Path, dims: int, snapshot_every: int):
        super().__init__()
        self.data_dir, self.dims, self.snapshot_every = data_dir, dims, snapshot_every
        self.write_lock = asyncio.Lock()
        r = self.app.router
        r.add_put("/v1/documents/{id}", self.put)
        r.add_get("/v1/documents/{id}", self.get)
        r.add_delete("/v1/documents/{id}", self.delete)
        r.add_post("/v1/search", self.search)
        r.add_get("/v1/stats", self.stats)

    async def start(self) -> None:
        self.store = await asyncio.to_thread(
            Store, self.data_dir, self.dims, snapshot_every=self.snapshot_every
        )

    async def stop(self) -> None:
        async with self.write_lock:  # a clean stop leaves a snapshot: fast restart
            if self.store.seq != self.store.snapshot_seq:
                await asyncio.to_thread(self.store.snapshot)
            self.store.close()

    def _vector(self, values: list[float]) -> NDArray[np.float32]:
        if len(values) != self.dims:
            raise ApiError(
                422, "dimension_mismatch", f"embedding has {len(values)} values, index {self.dims}"
            )
        return np.asarray(values, dtype=np.float32)

    async def put(self, request: web.Request) -> web.Response:
        doc = document_id(request.match_info["id"])
        body = await parse(request, PutDocument)
        if len(body.embeddings) != len(body.chunks):
            raise ApiError(422, "invalid_request", "one embedding per chunk is required")
        vectors = np.stack([self._vector(v) for v in body.embeddings])
        if not np.all(np.linalg.norm(vectors, axis=1) > 0):
            raise ApiError(422, "invalid_request", "embeddings must be non-zero")
        chunks = [(c.text, c.metadata) for c in body.chunks]
        async with self.write_lock:
            entry = self.store.put_entry(doc, chunks, vectors)
            await asyncio.to_thread(self.store.log, entry)  # durable before visible and acked
            self.store.apply(entry)
            await asyncio.to_thread(self.store.maybe_snapshot)
        return json_response({"id": doc, "chunks": len(chunks)})

    async def get(self, request: web.Request) -> web.Response:
        doc = document_id(request.match_info["id"])
        chunks = self.store.document(doc)
        if chunks is None:
            raise ApiError(404, "not_found", f"no document {doc!r}")
        out = [{"text": c.text, "metadata": c.metadata} for c in chunks]
        return json_response({"id": doc, "chunks": out})

    async def delete(self, request: web.Request) -> web.Response:
        doc = document_id(request.match_info["id"])
        async with self.write_lock:
            if doc not in self.store.documents:
                raise ApiError(404, "not_found", f"no document {doc!r}")
            await asyncio.to_thread(self.store.delete, doc)
        return json_response({"id": doc, "deleted": True})

    async def search(self, request: web.Request) -> web.Response:
        body = await parse(request, Search)
        hits = self.store.search(self._vector(body.embedding), body.top_k, body.filter)
        results = [
            {
                "document_id": h.document_id,
                "chunk": h.chunk,
                "score": h.score,
                "metadata": h.metadata,
            }
            for h in hits
        ]
        return json_response({"results": results})

    async def stats(self, request: web.Request) -> web.Response:
        s = self.store
        return json_response(
            {
                "documents": len(s.documents),
                "chunks": len(s),
                "seq": s.seq,
                "snapshot": s.snapshot_seq,
            }
        )


def main() -> None:
    config = service_config(Retrieval.stage)
    data_dir = Path(env("MODELPILOT_DATA_DIR", config.dataDir or "/data"))
    dims = int(env("MODELPILOT_DIMENSIONS", str(config.dimensions or 384)))
    every = int(env("MODELPILOT_SNAPSHOT_EVERY", "2000"))
    port = int(env(contract.ENV_PORT, str(contract.SERVICE_PORTS[Retrieval.stage])))
    run(Retrieval(data_dir, dims, every), port)


if __name__ == "__main__":
    main()
