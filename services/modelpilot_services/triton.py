"""The services' Triton client: embed texts and score pairs through tritonclient's asyncio
HTTP client (binary tensors), and load a model on demand."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np
import tritonclient.http.aio as triton
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from modelpilot_services.web import ApiError


def _bytes_input(name: str, values: Sequence[str]) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(values), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[v.encode()] for v in values], dtype=object))
    return tensor


class Triton:
    """One Triton server, e.g. the pod's sidecar or the local ``tritonserver``."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        self.url = url.removeprefix("http://").rstrip("/")
        self.timeout_s = timeout_s
        self.client = triton.InferenceServerClient(self.url, conn_limit=256)
        self.max_batch: dict[str, int] = {}

    async def close(self) -> None:
        await self.client.close()

    async def ready(self, model: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(model))
        except (InferenceServerException, OSError):
            return False

    async def ensure_loaded(self, model: str) -> None:
        """Load ``model`` (explicit model control) unless it is ready already."""
        if await self.ready(model):
            return
        try:
            await self.client.load_model(model)
        except InferenceServerException as e:
            raise ApiError(422, "model_unavailable", f"Triton cannot load {model!r}: {e}") from None

    async def _max_batch(self, model: str, refresh: bool = False) -> int:
        """The model's live max_batch_size (the operator retunes it without telling us)."""
        if refresh or model not in self.max_batch:
            try:
                config = await self.client.get_model_config(model)
                self.max_batch[model] = int(config.get("max_batch_size") or 0) or 1 << 30
            except (InferenceServerException, OSError):
                return self.max_batch.get(model, 1 << 30)
        return self.max_batch[model]

    async def _infer(
        self, model: str, inputs: Callable[[slice], list[triton.InferInput]], n: int, output: str
    ) -> NDArray[np.float32]:
        """Run ``n`` items, split into requests no larger than the model's max batch size:
        a retuned, smaller max_batch_size must never fail a request that used to fit."""
        try:
            try:
                return await self._in_parts(model, inputs, n, output, await self._max_batch(model))
            except InferenceServerException as e:
                if "batch-size must be" not in str(e):
                    raise
                limit = await self._max_batch(model, refresh=True)  # retuned since we read it
                return await self._in_parts(model, inputs, n, output, limit)
        except InferenceServerException as e:
            # Triton unreachable, overloaded or the model reloading: retryable for clients.
            raise ApiError(503, "model_unavailable", f"{model}: {e}", retry_after=1) from None
        except OSError as e:
            raise ApiError(503, "triton_unreachable", str(e), retry_after=1) from None

    async def _in_parts(
        self,
        model: str,
        inputs: Callable[[slice], list[triton.InferInput]],
        n: int,
        output: str,
        limit: int,
    ) -> NDArray[np.float32]:
        parts = [slice(i, min(i + limit, n)) for i in range(0, n, limit)] or [slice(0, 0)]
        arrays = await asyncio.gather(*(self._call(model, inputs(p), output) for p in parts))
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    async def _call(
        self, model: str, inputs: list[triton.InferInput], output: str
    ) -> NDArray[np.float32]:
        result = await self.client.infer(
            model,
            inputs,
            outputs=[triton.InferRequestedOutput(output, binary_data=True)],
            timeout=int(self.timeout_s * 1e6),
        )
        array: NDArray[np.float32] = result.as_numpy(output)
        return array

    async def embed(self, model: str, texts: Sequence[str]) -> NDArray[np.float32]:
        """(len(texts), dims) float32, L2-normalised."""
        return await self._infer(
            model, lambda p: [_bytes_input("TEXT", texts[p])], len(texts), "EMBEDDING"
        )

    async def score(self, model: str, query: str, passages: Sequence[str]) -> NDArray[np.float32]:
        """One re-ranking score per passage."""

        def inputs(p: slice) -> list[triton.InferInput]:
            part = passages[p]
            return [_bytes_input("QUERY", [query] * len(part)), _bytes_input("PASSAGE", part)]

        return (await self._infer(model, inputs, len(passages), "SCORE")).reshape(-1)
