"""``make profile``: measure every embedding variant and write the profile the optimizer and
the simulator read (format: ``modelpilot.optimizer.profiles``).

Re-rankers (the inference stage) are timed per batch of (query, passage) pairs; their quality
is the top-3 overlap with the large re-ranker's after re-ranking the fp32 embedding's 10
nearest candidates (the stage's metric, ``contract.QUALITY_METRICS``, as the shadow traffic
of a verification measures it). ``--quality-only`` re-measures quality into an existing
profile and leaves its latency curves as they are; ``--instances-only`` re-measures the
instance scaling alone.

Latency: each batch size is timed repeatedly on one intra-op thread (one replica = one CPU),
reporting p50/p95 per batch. Instances: 1 to (cores) processes, each a model instance on one
thread as a Triton instance is, run batches of one side by side for the same time; their
summed throughput is each count's row. Quality: on a fixed corpus of real text (paragraphs of this
Python's own help topics, ``calibration.corpus``), the mean overlap of each query's 10
nearest neighbours with the reference variant's (recall@10 vs fp32), and the share of
known-answer queries whose source document ranks in the top 3.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from modelpilot.contract import QUALITY_METRICS
from modelpilot_services.models import minilm
from modelpilot_services.models.calibration import corpus, queries

BATCHES = (1, 2, 4, 8, 16, 32, 64)


def quality(
    ref: NDArray[Any], got: NDArray[Any], ref_q: NDArray[Any], got_q: NDArray[Any]
) -> tuple[float, float]:
    k = 10
    ref_top = np.argsort(-(ref_q @ ref.T), axis=1)[:, :k]
    got_top = np.argsort(-(got_q @ got.T), axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top, got_top, strict=True)])
    hits = np.mean([i in row[:3] for i, row in enumerate(got_top)])
    return float(overlap), float(hits)


def rerank_top3(
    reranker: minilm.Reranker, docs: list[str], qs: list[str], candidates: NDArray[Any]
) -> list[list[int]]:
    """Each query's top 3 documents after re-ranking its candidates."""
    out = []
    for q, cand in zip(qs, candidates, strict=True):
        scores = reranker.score([(q, docs[c]) for c in cand])
        out.append([int(c) for c in cand[np.argsort(-scores, kind="stable")][:3]])
    return out


def measure_quality(directory: Path, docs: list[str], qs: list[str]) -> dict[str, dict[str, Any]]:
    """Every model's quality against its stage's reference model, by the stage's metric."""
    encoders = {n: minilm.load(n, threads=1, directory=directory) for n in minilm.VARIANTS}
    ref = encoders["minilm_fp32"]
    ref_docs, ref_q = ref.encode(docs), ref.encode(qs)
    out: dict[str, dict[str, Any]] = {}
    for name, enc in encoders.items():
        overlap, hits = quality(ref_docs, enc.encode(docs), ref_q, enc.encode(qs))
        out[name] = {"quality": round(overlap, 4), "reference": "minilm_fp32"}
        out[name] |= {"metric": QUALITY_METRICS["embedding"], "top3_hit_rate": round(hits, 4)}
    candidates = np.argsort(-(ref_q @ ref_docs.T), axis=1)[:, :10]
    tops = {}
    for n in minilm.RERANKERS:
        reranker = minilm.load_reranker(n, threads=1, directory=directory)
        tops[n] = rerank_top3(reranker, docs, qs, candidates)
    for name, top in tops.items():
        pairs = zip(top, tops["reranker_large"], strict=True)
        agreement = float(np.mean([len(set(a) & set(b)) / 3 for a, b in pairs]))
        hit_rate = float(np.mean([i in row for i, row in enumerate(top)]))
        out[name] = {"quality": round(agreement, 4), "reference": "reranker_large"}
        out[name] |= {"metric": QUALITY_METRICS["inference"], "top3_hit_rate": round(hit_rate, 4)}
    return out


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


def _instance(name: str, directory: Path, sample: list[Any], start: Any, seconds: float) -> int:
    """One model instance: batches of one for ``seconds`` once every instance is loaded."""
    threadpool_limits(limits=1, user_api="blas")
    if name in minilm.RERANKERS:
        run: Callable[[list[Any]], object] = minilm.load_reranker(name, 1, directory).score
    else:
        run = minilm.load(name, 1, directory).encode
    run(sample[:1])  # warm-up
    start.wait()
    n, i, deadline = 0, 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        run([sample[i % len(sample)]])
        n, i = n + 1, i + 1
    return n


def time_instances(
    name: str, directory: Path, sample: list[Any], seconds: float, most: int
) -> list[dict[str, float]]:
    """Throughput (batches of one) of 1..``most`` instances running side by side."""
    rows = []
    ctx = mp.get_context("spawn")  # a fresh interpreter each: no threads inherited
    for count in range(1, most + 1):
        with ctx.Manager() as manager, ctx.Pool(count) as pool:
            start = manager.Barrier(count)
            args = [(name, directory, sample, start, seconds)] * count
            done = sum(pool.starmap(_instance, args))
        rows.append({"count": count, "throughput_rps": round(done / seconds, 1)})
    return rows


def _instance_rows(
    directory: Path, docs: list[str], qs: list[str], seconds: float
) -> dict[str, list[dict[str, float]]]:
    sample = _sample(docs)
    most = os.cpu_count() or 1
    out = {}
    for name in minilm.VARIANTS:
        out[name] = time_instances(name, directory, sample, seconds, most)
    pairs = [(q, d) for q, d in zip(qs, sample, strict=False)]
    for name in minilm.RERANKERS:
        out[name] = time_instances(name, directory, pairs, seconds, most)
    for name, rows in out.items():
        print(name, "instances", "  ".join(f"{r['count']}:{r['throughput_rps']}/s" for r in rows))
    return out


def _sample(docs: list[str]) -> list[str]:
    # Equal-length inputs (40 words, about 50 tokens) so batch cost is not padding noise.
    return [" ".join(d.split()[:40]) for d in docs if len(d.split()) >= 40][:64]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("profiles/cpu.json"))
    parser.add_argument("--seconds", type=float, default=1.5, help="timing per batch size")
    parser.add_argument(
        "--quality-only", action="store_true", help="re-measure quality into --out, keep timings"
    )
    parser.add_argument(
        "--instances-only",
        action="store_true",
        help="re-measure instance scaling into --out, keep the rest",
    )
    args = parser.parse_args(argv)
    # What a replica runs: one ONNX Runtime thread and one BLAS thread, as the Triton model
    # process does. A second BLAS thread sped MaxSim up 15% here on an idle core that a
    # replica does not have.
    threadpool_limits(limits=1, user_api="blas")

    docs = corpus()
    qs = queries(docs)
    directory = minilm.build()
    if args.instances_only:
        result = json.loads(args.out.read_text())
        for name, rows in _instance_rows(directory, docs, qs, args.seconds * 4).items():
            result["models"][name]["instances"] = rows
        result["measured"]["instances_date"] = _now()
        result["measured"]["instances_cpu"] = machine()["cpu"]
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
    measured = measure_quality(directory, docs, qs)
    if args.quality_only:
        result = json.loads(args.out.read_text())
        for name, q in measured.items():
            result["models"][name].update(q)
        result["measured"]["quality_date"] = _now()
    else:
        result = {
            "schema": "modelpilot.io/profile/v1",
            "measured": {
                **machine(),
                "python": sys.version.split()[0],
                "threads_per_replica": 1,
                "corpus_documents": len(docs),
                "date": _now(),
            },
            "models": _timings(directory, docs, qs, args.seconds, measured),
        }
        for name, rows in _instance_rows(directory, docs, qs, args.seconds * 4).items():
            result["models"][name]["instances"] = rows
        result["measured"]["instances_date"] = result["measured"]["date"]
    print(f"{'model':<15}{'quality':>9}  {'metric':<13}{'vs':<15}{'top3 hit':>9}")
    for name, q in measured.items():
        vs, metric = q["reference"], q["metric"]
        print(f"{name:<15}{q['quality']:>9.3f}  {metric:<13}{vs:<15}{q['top3_hit_rate']:>9.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def machine() -> dict[str, Any]:
    """The machine a measurement was taken on: host, CPU model and cores."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count()}


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _timings(
    directory: Path, docs: list[str], qs: list[str], seconds: float, measured: dict[str, Any]
) -> dict[str, Any]:
    """Every model's batch latency curve, with its measured quality."""
    models: dict[str, Any] = {}
    sample = _sample(docs)
    for name in minilm.VARIANTS:
        enc = minilm.load(name, threads=1, directory=directory)
        rows = time_batches(enc.encode, sample, seconds)
        models[name] = {"stage": "embedding", **measured[name], "dims": enc.dims, "batches": rows}
        print(name, "  ".join(f"{r['batch']}:{r['p50_ms']:.1f}" for r in rows))
    pairs = [(q, d) for q, d in zip(qs, sample, strict=False)]
    for name in minilm.RERANKERS:
        reranker = minilm.load_reranker(name, threads=1, directory=directory)
        rows = time_batches(reranker.score, pairs, seconds)
        models[name] = {"stage": "inference", **measured[name], "batches": rows}
        print(name, "  ".join(f"{r['batch']}:{r['p50_ms']:.1f}" for r in rows))
    return models


if __name__ == "__main__":
    sys.exit(main())
