"""Small/large routing at the gateway, and the measurement the optimizer tunes it from.

A query's difficulty is a cheap score in [0, 1]; above the threshold it goes to the large
re-ranker, at or below to the small one. A sampled share of routed queries is re-ranked by
the other model too, off the response path, and their top-3 overlap is recorded in the
query's difficulty band. Every query's difficulty is counted by band. Neither depends on
the threshold, so the optimizer can predict the quality of any threshold from them.

Metrics (label ``stage``): ``modelpilot_routing_difficulty`` histogram over
``contract.ROUTING_BANDS``; ``modelpilot_routing_agreement`` summary by ``band``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Histogram, Summary

from modelpilot import contract
from modelpilot_services.toolkit.offpath import OffPath

log = logging.getLogger(__name__)
Route = Literal["small", "large"]


def difficulty(candidates: Sequence[dict[str, Any]]) -> float:
    """1 - the best retrieval similarity: a query far from everything indexed is hard."""
    best = float(candidates[0]["score"]) if candidates else 0.0
    return min(1.0, max(0.0, 1.0 - best))


class Router:
    """Routes by difficulty against a live threshold; measures small/large agreement."""

    def __init__(
        self, stage: str, registry: CollectorRegistry, threshold: float, sample_ratio: float
    ) -> None:
        self.stage, self.threshold, self.sample_ratio = stage, threshold, sample_ratio
        self.offpath = OffPath()
        self.difficulty = Histogram(
            contract.METRIC_ROUTING_DIFFICULTY, "Routed queries by difficulty band.",
            ["stage"], buckets=contract.ROUTING_BANDS, registry=registry,
        )  # fmt: skip
        self.agreement = Summary(
            contract.METRIC_ROUTING_AGREEMENT,
            "Top-3 overlap of the small re-ranker with the large one on sampled queries.",
            ["stage", "band"], registry=registry,
        )  # fmt: skip

    def route(self, score: float) -> Route:
        self.difficulty.labels(self.stage).observe(score)
        return "large" if score > self.threshold else "small"

    def sample(self, score: float, compare: Callable[[], Awaitable[float]]) -> None:
        """Maybe run ``compare`` (small vs large agreement) off the response path."""

        async def job() -> None:
            try:
                value = await compare()
            except Exception as exc:  # a failed check is a missing sample, not an error
                log.warning("routing agreement check failed: %s", exc)
                return
            band = contract.band_of(score, contract.ROUTING_BANDS)
            self.agreement.labels(self.stage, band).observe(value)

        self.offpath.maybe(self.sample_ratio, job)
