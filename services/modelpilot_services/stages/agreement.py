"""How a candidate's outputs agree with the serving variant's, by the stage's quality metric
(``contract.QUALITY_METRICS``): what ``make profile`` measures against the reference, here
measured on mirrored live requests.

- embedding, neighbour recall@10: a text's 10 nearest neighbours among recent distinct
  mirrored texts by the serving model's vectors, against the same by the candidate's.
  Neighbours need a corpus: the pod keeps a ring of the last ``RING`` distinct texts under
  both models, and measures only once it holds ``MIN_RING`` (a ring of 11 would make every
  text a neighbour of every other, recall 1 whatever the model); the embedding stage seeds
  it with ``MIN_RING`` calibration texts, so live texts are measured from the first one.
- re-ranker, top-3 overlap: the share of the serving variant's top 3 that the candidate also
  ranks in its top 3, over the same candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

NEIGHBOURS = 10
TOP_RERANKED = 3
RING = 400  # as many texts as make profile's corpus
MIN_RING = 100


def _unit(vectors: NDArray[Any]) -> NDArray[np.float32]:
    v = np.asarray(vectors, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)  # type: ignore[no-any-return]


class NeighbourRecall:
    """Recall@k of one candidate's neighbours against the serving model's, over a ring of
    recent distinct texts (both models' vectors of each)."""

    def __init__(self, dims: int, size: int = RING, k: int = NEIGHBOURS, warm: int = MIN_RING):
        self.size, self.k, self.warm = size, k, max(warm, k + 1)
        self.served = np.zeros((size, dims), dtype=np.float32)
        self.candidate = np.zeros((size, dims), dtype=np.float32)
        self.slot: dict[str, int] = {}  # text -> its row
        self.texts: list[str | None] = [None] * size
        self.filled = self.next = 0

    def measure(
        self, texts: Sequence[str], served: NDArray[Any], candidate: NDArray[Any]
    ) -> list[float]:
        """Recall@k for each text once the ring is warm, then the new texts join the ring."""
        served, candidate = _unit(served), _unit(candidate)
        out: list[float] = []
        for text, s, c in zip(texts, served, candidate, strict=True):
            own = self.slot.get(text)
            if self.filled >= self.warm:
                out.append(self._recall(s, c, own))
            if own is None:
                self._add(text, s, c)
        return out

    def _recall(self, s: NDArray[Any], c: NDArray[Any], own: int | None) -> float:
        n = self.filled
        by_served, by_candidate = self.served[:n] @ s, self.candidate[:n] @ c
        if own is not None:  # a text seen before is not its own neighbour
            by_served[own] = by_candidate[own] = -np.inf
        k = min(self.k, n - (own is not None))
        top_s = np.argpartition(-by_served, k - 1)[:k]
        top_c = np.argpartition(-by_candidate, k - 1)[:k]
        return len(set(top_s.tolist()) & set(top_c.tolist())) / k

    def _add(self, text: str, s: NDArray[Any], c: NDArray[Any]) -> None:
        row = self.next
        if (old := self.texts[row]) is not None:
            del self.slot[old]
        self.served[row], self.candidate[row] = s, c
        self.texts[row], self.slot[text] = text, row
        self.next = (row + 1) % self.size
        self.filled = min(self.filled + 1, self.size)


def top_overlap(
    served_scores: NDArray[Any], candidate_scores: NDArray[Any], k: int = TOP_RERANKED
) -> float:
    """The share of the serving ranking's top ``k`` that the candidate's top ``k`` holds."""
    k = min(k, len(served_scores))
    if k == 0:
        return 1.0
    top_s = np.argsort(-np.asarray(served_scores), kind="stable")[:k]
    top_c = np.argsort(-np.asarray(candidate_scores), kind="stable")[:k]
    return len(set(top_s.tolist()) & set(top_c.tolist())) / k


def answer_overlap(
    served: Sequence[dict[str, Any]], fresh: Sequence[dict[str, Any]], k: int = TOP_RERANKED
) -> float:
    """The share of a served answer's top ``k`` results that a fresh answer's top ``k``
    holds (results are the gateway's, best first; a result is its document and chunk)."""

    def top(results: Sequence[dict[str, Any]]) -> set[tuple[Any, Any]]:
        return {(r["document_id"], r["chunk"]) for r in results[:k]}

    want = top(served)
    return len(want & top(fresh)) / len(want) if want else float(not fresh)
