"""The Triton Python-backend model behind every ModelPilot model (copied as ``<m>/1/model.py``).

What it serves comes from the model's *name*, not from config parameters: Triton replaces the
whole config on a ``load`` with an override, so the name is the one stable identity.

- ``minilm_fp32`` / ``minilm_int8`` / ``minilm_static``: ``TEXT`` (bytes) -> ``EMBEDDING``.
- ``reranker_large`` / ``reranker_small``: ``QUERY``, ``PASSAGE`` (bytes) -> ``SCORE``.

``auto_complete_config`` fills inputs, outputs and dynamic batching, so an override need only
carry what changes (``max_batch_size``, ``dynamic_batching``), which is what the operator sends.
"""

import json
import os
import site
import sys
from typing import Any

# The stub runs the system interpreter; locally the packages live in the project's venv.
# addsitedir appends, behind the system's dist-packages: a Debian python3-protobuf (pulled in
# by criu, say) would then shadow the protobuf onnx needs and no model would load. The venv's
# directories go first.
_system_path = list(sys.path)
for _path in filter(None, os.environ.get("MODELPILOT_SITE_PACKAGES", "").split(os.pathsep)):
    site.addsitedir(_path)
sys.path[:] = [p for p in sys.path if p not in _system_path] + _system_path

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from modelpilot_services.models import minilm  # noqa: E402

DEFAULT_MAX_BATCH = 64


def _io(name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if name in minilm.RERANKERS:
        inputs = [
            {"name": "QUERY", "data_type": "TYPE_STRING", "dims": [1]},
            {"name": "PASSAGE", "data_type": "TYPE_STRING", "dims": [1]},
        ]
        return inputs, [{"name": "SCORE", "data_type": "TYPE_FP32", "dims": [1]}]
    if name in minilm.VARIANTS:
        inputs = [{"name": "TEXT", "data_type": "TYPE_STRING", "dims": [1]}]
        return inputs, [{"name": "EMBEDDING", "data_type": "TYPE_FP32", "dims": [minilm.HIDDEN]}]
    raise ValueError(f"unknown ModelPilot model {name!r}")


def _texts(request: Any, name: str) -> list[str]:
    array = pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)
    return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in array]


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config: Any) -> Any:
        current = config.as_dict()
        inputs, outputs = _io(current["name"])
        if not current.get("input"):
            for spec in inputs:
                config.add_input(spec)
        if not current.get("output"):
            for spec in outputs:
                config.add_output(spec)
        if not current.get("max_batch_size"):
            config.set_max_batch_size(DEFAULT_MAX_BATCH)
        config.set_dynamic_batching()
        return config

    def initialize(self, args: dict[str, str]) -> None:
        self.name = args["model_name"]
        config = json.loads(args["model_config"])
        threads = int(os.environ.get("MODELPILOT_MODEL_THREADS", "1"))
        # ONNX Runtime runs the model on ``threads``; numpy's products after it (the
        # re-rankers' MaxSim) stay on one thread: a second OpenBLAS thread spins in
        # sched_yield after each product it shares, 60-96 ms of CPU a query in reranker_small.
        threadpool_limits(limits=1, user_api="blas")
        if self.name in minilm.RERANKERS:
            self.reranker = minilm.load_reranker(self.name, threads=threads)
        else:
            self.encoder = minilm.load(self.name, threads=threads)
        self.max_batch = config["max_batch_size"]

    def execute(self, requests: list[Any]) -> list[Any]:
        # Dynamic batching hands over several requests: run them as one model call.
        if self.name in minilm.RERANKERS:
            pairs = [
                list(zip(_texts(r, "QUERY"), _texts(r, "PASSAGE"), strict=True)) for r in requests
            ]
            flat_pairs = [pair for group in pairs for pair in group]
            scores = self.reranker.score(flat_pairs) if flat_pairs else np.zeros(0, np.float32)
            sizes, out_name = [len(p) for p in pairs], "SCORE"
            values = scores.reshape(-1, 1)
        else:
            texts = [_texts(r, "TEXT") for r in requests]
            values = self.encoder.encode([t for group in texts for t in group])
            sizes, out_name = [len(t) for t in texts], "EMBEDDING"
        responses: list[Any] = []
        start = 0
        for size in sizes:
            tensor = pb_utils.Tensor(out_name, values[start : start + size].astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            start += size
        return responses
