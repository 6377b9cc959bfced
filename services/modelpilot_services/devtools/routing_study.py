"""Which cheap difficulty score predicts when the small re-ranker disagrees with the large one?

Offline, on real text: a corpus of pydoc_data paragraphs embedded with the gateway's default
encoder (``minilm_fp32``), queries from three sources of varied difficulty (known-answer
sentences of corpus documents, sentences of pydoc paragraphs left out of the corpus, and first
sentences of standard-library docstrings), each re-ranked over its retrieved candidates by both
re-rankers as the gateway calls them (one scoring call per query). Agreement is ``top_overlap``
of the small ranking with the large one. Every candidate score is oriented (higher = harder)
and thresholded on the tuning half; AUC, Spearman and routed quality are reported on the
held-out half, against a random split at the same share and at the same compute.

``python -m modelpilot_services.devtools.routing_study [--per-source N] [--out PATH]``
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from modelpilot_services.models import calibration, minilm
from modelpilot_services.stages.agreement import top_overlap

TOP_K = 5
CANDIDATES = max(2 * TOP_K, 10)  # the gateway's max(CANDIDATES * top_k, 10)
SHARES = (0.25, 0.5, 0.75)
ENCODER = "minilm_fp32"  # the embedding stage's default model
ENTROPY_T = 0.05  # softmax temperature over MaxSim scores (they differ by hundredths)
NOISE_EVERY = 4  # re-score every 4th query's small ranking in another batch
BOOTSTRAP = 1000
Array = NDArray[Any]


# ------------------------------------------------------------------------------ queries


def stdlib_sentences() -> list[str]:
    """First sentences of the standard library's docstrings, read with ast (nothing imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3"}
    out: dict[str, None] = {}
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node) or ""
                first = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".")
                if 6 <= len(first.split()) <= 40 and ">>>" not in first:
                    out[first] = None
    return list(out)


def _spread(items: list[str], n: int) -> list[str]:
    return items[:: max(1, len(items) // n)][:n]


def query_set(docs: list[str], per_source: int) -> list[tuple[str, str]]:
    """Distinct (source, query) pairs: ``known`` answers are in the corpus, ``near`` ones are
    pydoc text left out of it, ``far`` ones are docstrings of code the corpus barely covers."""
    inside = set(docs)
    rest = [p for p in calibration.corpus(limit=1 << 30) if p not in inside]
    sources = {
        "known": calibration.queries(docs),
        "near": [q for q in calibration.queries(rest) if not any(q in d for d in docs)],
        "far": [q for q in stdlib_sentences() if not any(q in d for d in docs)],
    }
    return [
        (name, q)
        for name, qs in sources.items()
        for q in _spread(list(dict.fromkeys(qs)), per_source)
    ]


# ------------------------------------------------------------------------- measurement


def cached(cache: Path, name: str, key: object, compute: Callable[[], dict[str, Array]]) -> Any:
    """``compute()`` (named arrays), stored under ``cache`` by a digest of ``key``."""
    digest = hashlib.sha256(json.dumps([minilm.BUILD_VERSION, key]).encode()).hexdigest()[:16]
    path = cache / f"{name}-{digest}.npz"
    if path.exists():
        return dict(np.load(path))
    arrays = compute()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def rerank_all(
    queries: list[str], docs: list[str], candidates: Array, cache: Path
) -> dict[str, Array]:
    """Both re-rankers' scores of each query's candidates, one call per query as the gateway
    makes it, the seconds each took, and the small model re-scored in a shared batch (every
    ``NOISE_EVERY``-th query with the next query's pairs, as Triton's dynamic batching does)."""

    def compute() -> dict[str, Array]:
        out: dict[str, Array] = {}
        for name in minilm.RERANKERS:
            model = minilm.load_reranker(name, threads=1)
            scores, seconds = np.zeros(candidates.shape, np.float32), np.zeros(len(queries))
            for i, (q, cand) in enumerate(zip(queries, candidates, strict=True)):
                t0 = time.perf_counter()
                scores[i] = model.score([(q, docs[c]) for c in cand])
                seconds[i] = time.perf_counter() - t0
                if i % 100 == 99:
                    print(f"  {name}: {i + 1}/{len(queries)}", file=sys.stderr)
            out[name], out[f"{name}_seconds"] = scores, seconds
        small = minilm.load_reranker("reranker_small", threads=1)
        rebatched = np.zeros((len(range(0, len(queries) - 1, NOISE_EVERY)), CANDIDATES))
        for row, i in enumerate(range(0, len(queries) - 1, NOISE_EVERY)):
            pairs = [(queries[j], docs[c]) for j in (i, i + 1) for c in candidates[j]]
            rebatched[row] = small.score(pairs)[:CANDIDATES]
        out["small_rebatched"] = rebatched
        return out

    key = [queries, docs, candidates.tolist()]
    return cached(cache, "rerank", key, compute)  # type: ignore[no-any-return]


def difficulty_scores(sims: Array, small: Array, large: Array, tokens: Array) -> dict[str, Array]:
    """Candidate scores, each meant as higher = harder (the tuning half confirms the sign).
    Retrieval-only ones are free; ``small:`` ones need the small model run first (a cascade);
    ``oracle:`` needs the large model and only bounds what a routable score could do. ``mIJ``
    is the gap between the I-th and J-th best: the top-5 (top-3) set changes only when
    candidates cross that boundary."""
    s = np.sort(small, axis=1)[:, ::-1]
    big = np.sort(large, axis=1)[:, ::-1]
    k = TOP_K
    logits = (s - s[:, :1]) / ENTROPY_T
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return {
        "1-best_sim": 1 - sims[:, 0],
        "-retr_m12": -(sims[:, 0] - sims[:, 1]),
        "-retr_m56": -(sims[:, k - 1] - sims[:, k]),
        "-retr_m56/range": -(sims[:, k - 1] - sims[:, k]) / (sims[:, 0] - sims[:, -1]),
        "-retr_std": -sims.std(axis=1),
        "query_tokens": tokens.astype(np.float64),
        "small:-m56": -(s[:, k - 1] - s[:, k]),
        "small:-m56/range": -(s[:, k - 1] - s[:, k]) / (s[:, 0] - s[:, -1]),
        "small:-m34": -(s[:, 2] - s[:, 3]),
        "small:-min_gap_k": -np.abs(np.diff(s[:, k - 2 : k + 2], axis=1)).min(axis=1),
        "small:entropy": -(p * np.log(p)).sum(axis=1),
        "small:-std": -s.std(axis=1),
        "small:-top1": -s[:, 0],
        "oracle:-large_m56": -(big[:, k - 1] - big[:, k]),
    }


# ---------------------------------------------------------------------------- statistics


def ranks(x: Array) -> Array:
    """1-based ranks, ties averaged."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=r) / counts)[inverse]


def auc(score: Array, positive: Array) -> float:
    """P(a positive scores above a negative), ties half (Mann-Whitney)."""
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((ranks(score)[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def spearman(a: Array, b: Array) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def ci(stat: Callable[[Array], float], n: int) -> list[float]:
    """95% bootstrap interval of ``stat(indices)`` over resampled queries."""
    rng = np.random.default_rng(0)
    values = [stat(rng.integers(0, n, n)) for _ in range(BOOTSTRAP)]
    return [round(float(v), 4) for v in np.nanpercentile(values, [2.5, 97.5])]


def routed(small: Array, agree: Array, cost_small: float, cost_large: float) -> dict[str, float]:
    """Blended quality routing ``small`` queries to the small model (large answers = 1.0)
    against random splits at the same share and at the same compute (large-only = 1)."""
    share, mean = float(small.mean()), float(agree.mean())
    quality = float(np.where(small, agree, 1.0).mean())
    random = 1 - share * (1 - mean)
    cost = (cost_small + (1 - share) * cost_large) / cost_large  # cascade: small runs on all
    equal = float(np.clip((1 - cost) * cost_large / (cost_large - cost_small), 0, 1))
    return {
        "share": round(share, 4),
        "quality": round(quality, 4),
        "random": round(random, 4),
        "margin": round(quality - random, 4),
        "cascade_cost": round(cost, 4),
        "random_same_cost": round(1 - equal * (1 - mean), 4),
    }


def needs(score: str) -> str:
    """The model a score needs before routing: none, the small one (a cascade) or the large."""
    return {"small": "small", "oracle": "large"}.get(score.split(":")[0], "none")


def evaluate(
    raw: Array, tune: Array, held: Array, a5: Array, a3: Array, cost_small: float, cost_large: float
) -> dict[str, Any]:
    """One score: its sign and thresholds from the tuning half, its figures on the held-out."""
    sign = 1.0 if auc(raw[tune], a5[tune] < 1) >= 0.5 else -1.0
    x, y = sign * raw, a5[held]
    xh, disagree = x[held], y < 1

    def auc_of(i: Array) -> float:
        return auc(xh[i], disagree[i])

    bands = np.array_split(np.argsort(xh, kind="stable"), 4)
    out: dict[str, Any] = {
        "sign": int(sign),
        "tune_auc5": round(auc(x[tune], a5[tune] < 1), 4),
        "auc5": round(auc(xh, disagree), 4),
        "auc5_ci": ci(auc_of, len(xh)),
        "auc3": round(auc(xh, a3[held] < 1), 4),
        "spearman5": round(spearman(xh, y), 4),
        "spearman3": round(spearman(xh, a3[held]), 4),
        "bands5": [round(float(y[b].mean()), 4) for b in bands],  # easiest quarter first
        "routing": [],
    }
    for share in SHARES:
        to_small = xh <= np.quantile(x[tune], share)

        def margin_of(i: Array, m: Array = to_small) -> float:
            return routed(m[i], y[i], cost_small, cost_large)["margin"]

        row: dict[str, Any] = {"target": share} | routed(to_small, y, cost_small, cost_large)
        row["margin_ci"] = ci(margin_of, len(y))
        out["routing"].append(row)
    return out


# ---------------------------------------------------------------------------------- main


def study(per_source: int, corpus_size: int, cache: Path) -> dict[str, Any]:
    docs = list(dict.fromkeys(calibration.corpus(corpus_size)))  # it repeats some paragraphs
    labelled = query_set(docs, per_source)
    sources, queries = [s for s, _ in labelled], [q for _, q in labelled]
    encoder = minilm.load(ENCODER, threads=1)
    doc_vecs = cached(cache, "docs", [ENCODER, docs], lambda: {"v": encoder.encode(docs)})["v"]
    query_vecs = cached(
        cache, "queries", [ENCODER, queries], lambda: {"v": encoder.encode(queries)}
    )
    sims_all = query_vecs["v"] @ doc_vecs.T
    candidates = np.argsort(-sims_all, axis=1, kind="stable")[:, :CANDIDATES]
    sims = np.take_along_axis(sims_all, candidates, axis=1)
    scored = rerank_all(queries, docs, candidates, cache)
    small, large = scored["reranker_small"], scored["reranker_large"]
    agree = {
        k: np.array([top_overlap(b, s, k) for b, s in zip(large, small, strict=True)])
        for k in (TOP_K, 3)
    }
    noise_rows = np.arange(0, len(queries) - 1, NOISE_EVERY)
    rebatched = zip(small[noise_rows], scored["small_rebatched"], strict=True)
    self_agree = float(np.mean([top_overlap(a, b, TOP_K) for a, b in rebatched]))
    tok = minilm.tokenizer()
    tokens = np.array([len(tok.encode(q).ids) - 2 for q in queries])
    scores = difficulty_scores(sims, small, large, tokens)

    # Tuning / held-out: alternate queries within each source (deterministic, stratified).
    source = np.array(sources)
    position = np.zeros(len(sources), dtype=int)
    for name in set(sources):
        position[source == name] = np.arange(int((source == name).sum()))
    tune, held = position % 2 == 0, position % 2 == 1
    a5, a3 = agree[TOP_K], agree[3]
    cost_s = float(np.median(scored["reranker_small_seconds"]))
    cost_l = float(np.median(scored["reranker_large_seconds"]))
    results = {
        name: {"needs": needs(name)}
        | evaluate(raw, tune, held, a5, a3, cost_s if needs(name) == "small" else 0.0, cost_l)
        for name, raw in scores.items()
    }
    by_source = {
        name: {
            "n": int((source == name).sum()),
            "agreement5": round(float(a5[source == name].mean()), 4),
            "best_sim": round(float(sims[source == name, 0].mean()), 4),
        }
        for name in dict.fromkeys(sources)
    }
    return {
        "queries": len(queries),
        "corpus": len(docs),
        "tune": int(tune.sum()),
        "heldout": int(held.sum()),
        "top_k": TOP_K,
        "candidates": CANDIDATES,
        "mean_agreement5": round(float(a5.mean()), 4),
        "mean_agreement3": round(float(a3.mean()), 4),
        "disagree_rate5": round(float((a5 < 1).mean()), 4),
        "heldout_mean_agreement5": round(float(a5[held].mean()), 4),
        "by_source": by_source,
        "noise_floor": {
            "queries": len(noise_rows),
            "small_vs_small_rebatched5": round(self_agree, 4),
            "small_vs_large5_same_queries": round(float(a5[noise_rows].mean()), 4),
        },
        "median_seconds_per_query": {"small": round(cost_s, 4), "large": round(cost_l, 4)},
        "scores": results,
    }


def table(r: dict[str, Any]) -> str:
    head = f"{'score':<24}{'needs':<6}{'sgn':>4}{'AUC5':>7}{'95% CI':>15}{'AUC3':>7}{'rho5':>7}"
    head += "".join(f"{f'q@{int(s * 100)}%':>9}{'(+rand)':>9}" for s in SHARES)
    lines = [head]
    for name, s in r["scores"].items():
        lo, hi = s["auc5_ci"]
        line = f"{name:<24}{s['needs']:<6}{s['sign']:>+4d}{s['auc5']:>7.3f}"
        line += f"{f'[{lo:.3f},{hi:.3f}]':>15}{s['auc3']:>7.3f}{s['spearman5']:>+7.3f}"
        line += "".join(f"{x['quality']:>9.3f}{x['margin']:>+9.3f}" for x in s["routing"])
        lines.append(line)
    lines += ["", "cascades at equal compute (large-only = 1): share  cost  quality  random"]
    for name, s in r["scores"].items():
        if s["needs"] == "small":
            cells = [
                f"{x['share']:.2f} {x['cascade_cost']:.2f} {x['quality']:.3f} "
                f"{x['random_same_cost']:.3f}"
                for x in s["routing"]
            ]
            lines.append(f"{name:<24}" + "   |  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".cache/routing_study.json"))
    parser.add_argument("--per-source", type=int, default=200, help="queries per source")
    parser.add_argument("--corpus", type=int, default=400, help="corpus paragraphs")
    parser.add_argument("--cache", type=Path, default=Path(".cache/routing_study"))
    args = parser.parse_args(argv)
    threadpool_limits(limits=1, user_api="blas")  # one core, as a replica has
    start = time.perf_counter()
    result = study(args.per_source, args.corpus, args.cache)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(table(result))
    keys = ("queries", "tune", "heldout", "mean_agreement5", "mean_agreement3", "disagree_rate5")
    print("  ".join(f"{k}={result[k]}" for k in keys))
    print("by source:", json.dumps(result["by_source"]))
    print("noise floor:", json.dumps(result["noise_floor"]))
    print("seconds/query:", json.dumps(result["median_seconds_per_query"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wall {result['wall_s']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
