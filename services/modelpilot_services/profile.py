"""``make profile``: measure every embedding variant and write the profile the optimizer and
the simulator read (format: ``modelpilot.optimizer.profiles``).

Re-rankers (the inference stage) are timed per batch of (query, passage) pairs; their quality
is the top-3 hit rate after re-ranking the reference's 10 nearest candidates, relative to the
large re-ranker's.

Latency: each batch size is timed repeatedly on one intra-op thread (one replica = one CPU),
reporting p50/p95 per batch. Quality: on a fixed corpus of real text (the module docstrings
of this Python's standard library), the mean overlap of each query's 10 nearest neighbours
with the reference variant's (recall@10 vs fp32), and the share of known-answer queries
whose source document ranks in the top 3.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from modelpilot_services import models

BATCHES = (1, 2, 4, 8, 16, 32, 64)


def corpus(limit: int = 400) -> list[str]:
    """Paragraphs of Python's own help topics (pydoc_data): real, offline, deterministic."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            text = " ".join(para.split())
            if len(text.split()) >= 25 and text.count(".") >= 2 and not text.startswith(">>>"):
                docs.append(text)
    step = max(1, len(docs) // limit)
    return docs[::step][:limit]


def queries(docs: list[str]) -> list[str]:
    """A known-answer query per document: one of its inner sentences, not its opening."""
    out = []
    for d in docs:
        sentences = [x.strip() for x in d.split(". ") if len(x.split()) >= 5]
        out.append(sentences[len(sentences) // 2] if sentences else d)
    return out


def quality(
    ref: NDArray[Any], got: NDArray[Any], ref_q: NDArray[Any], got_q: NDArray[Any]
) -> tuple[float, float]:
    k = 10
    ref_top = np.argsort(-(ref_q @ ref.T), axis=1)[:, :k]
    got_top = np.argsort(-(got_q @ got.T), axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top, got_top, strict=True)])
    hits = np.mean([i in row[:3] for i, row in enumerate(got_top)])
    return float(overlap), float(hits)


def rerank_hits(
    reranker: models.Reranker, docs: list[str], qs: list[str], candidates: NDArray[Any]
) -> float:
    """Share of queries whose source document is in the top 3 after re-ranking."""
    hits = 0
    for i, (q, cand) in enumerate(zip(qs, candidates, strict=True)):
        scores = reranker.score([(q, docs[c]) for c in cand])
        hits += i in cand[np.argsort(-scores, kind="stable")][:3]
    return hits / len(qs)


def time_batches(
    run: Callable[[list[Any]], object], items: list[Any], seconds: float
) -> list[dict[str, float]]:
    rows = []
    for b in BATCHES:
        batch = (items * (b // len(items) + 1))[:b]
        run(batch)  # warm-up
        samples: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(samples) < 5:
            t0 = time.perf_counter()
            run(batch)
            samples.append((time.perf_counter() - t0) * 1000)
        p50, p95 = np.percentile(samples, [50, 95])
        rows.append(
            {
                "batch": b,
                "p50_ms": round(float(p50), 3),
                "p95_ms": round(float(p95), 3),
                "throughput_rps": round(1000 * b / float(p50), 1),
                "runs": len(samples),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("profiles/cpu.json"))
    parser.add_argument("--seconds", type=float, default=1.5, help="timing per batch size")
    args = parser.parse_args(argv)
    # What a replica runs: one ONNX Runtime thread and one BLAS thread, as the Triton model
    # process does. A second BLAS thread sped MaxSim up 15% here on an idle core that a
    # replica does not have.
    threadpool_limits(limits=1, user_api="blas")

    docs = corpus()
    qs = queries(docs)
    directory = models.build()
    encoders = {n: models.load(n, threads=1, directory=directory) for n in models.VARIANTS}
    ref = encoders["minilm_fp32"]
    ref_docs, ref_q = ref.encode(docs), ref.encode(qs)
    result: dict[str, object] = {
        "schema": "modelpilot.io/profile/v1",
        "measured": {
            "host": platform.node(),
            "cpu": platform.processor() or platform.machine(),
            "python": sys.version.split()[0],
            "threads_per_replica": 1,
            "corpus_documents": len(docs),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "models": {},
    }
    # Equal-length inputs (40 words, about 50 tokens) so batch cost is not padding noise.
    sample = [" ".join(d.split()[:40]) for d in docs if len(d.split()) >= 40][:64]
    print(f"{'variant':<15}{'recall@10':>10}{'top3 hit':>10}  batch: p50 ms (rps)")
    for name, enc in encoders.items():
        overlap, hits = quality(ref_docs, enc.encode(docs), ref_q, enc.encode(qs))
        rows = time_batches(enc.encode, sample, args.seconds)
        result["models"][name] = {  # type: ignore[index]
            "stage": "embedding",
            "quality": round(overlap, 4),
            "top3_hit_rate": round(hits, 4),
            "dims": enc.dims,
            "batches": rows,
        }
        cells = "  ".join(
            f"{r['batch']}:{r['p50_ms']:.1f}({r['throughput_rps']:.0f})" for r in rows
        )
        print(f"{name:<15}{overlap:>10.3f}{hits:>10.3f}  {cells}")
    candidates = np.argsort(-(ref_q @ ref_docs.T), axis=1)[:, :10]
    rerankers = {
        n: models.load_reranker(n, threads=1, directory=directory) for n in models.RERANKERS
    }
    hit_rates = {n: rerank_hits(r, docs, qs, candidates) for n, r in rerankers.items()}
    pairs = [(q, d) for q, d in zip(qs, sample, strict=False)]
    for name, reranker in rerankers.items():
        rows = time_batches(reranker.score, pairs, args.seconds)
        relative = hit_rates[name] / hit_rates["reranker_large"]
        result["models"][name] = {  # type: ignore[index]
            "stage": "inference",
            "quality": round(relative, 4),
            "top3_hit_rate": round(hit_rates[name], 4),
            "batches": rows,
        }
        cells = "  ".join(
            f"{r['batch']}:{r['p50_ms']:.1f}({r['throughput_rps']:.0f})" for r in rows
        )
        print(f"{name:<15}{relative:>10.3f}{hit_rates[name]:>10.3f}  {cells}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
