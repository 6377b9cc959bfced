"""The services' Triton client: embed texts and score pairs through tritonclient's asyncio
HTTP client (binary tensors), and load a model on demand."""

from __future__ import annotations

from collections.abc import Sequence

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

    async def _infer(
        self, model: str, inputs: list[triton.InferInput], output: str
    ) -> NDArray[np.float32]:
        try:
            result = await self.client.infer(
                model,
                inputs,
                outputs=[triton.InferRequestedOutput(output, binary_data=True)],
                timeout=int(self.timeout_s * 1e6),
            )
        except InferenceServerException as e:
            # Triton unreachable, overloaded or the model reloading: retryable for clients.
            raise ApiError(503, "model_unavailable", f"{model}: {e}", retry_after=1) from None
        except OSError as e:
            raise ApiError(503, "triton_unreachable", str(e), retry_after=1) from None
        array: NDArray[np.float32] = result.as_numpy(output)
        return array

    async def embed(self, model: str, texts: Sequence[str]) -> NDArray[np.float32]:
        """(len(texts), dims) float32, L2-normalised."""
        return await self._infer(model, [_bytes_input("TEXT", texts)], "EMBEDDING")

    async def score(self, model: str, query: str, passages: Sequence[str]) -> NDArray[np.float32]:
        """One re-ranking score per passage."""
        inputs = [_bytes_input("QUERY", [query] * len(passages)), _bytes_input("PASSAGE", passages)]
        return (await self._infer(model, inputs, "SCORE")).reshape(-1)
