"""Small/large routing at the gateway by share, and the measurement the optimizer tunes it from.

A query goes to the small re-ranker when a hash of its text, read as a number in [0, 1),
is below the live small share, else to the large one: the share routed small is the knob,
and a repeated query always takes the same route. (No cheap per-query score predicts
when the two re-rankers disagree: ``make routing-study`` measured the candidates on real
queries; README, "Routing and the semantic cache".) A sampled share of routed queries is
re-ranked by the other model too, off the response path, and the two rankings' top-3
overlap is recorded: the optimizer predicts the quality of any share from it.

Metric (label ``stage``): ``modelpilot_routing_agreement`` summary.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from prometheus_client import CollectorRegistry, Summary

from modelpilot import contract
from modelpilot_services.toolkit.offpath import OffPath

log = logging.getLogger(__name__)
Route = Literal["small", "large"]


def position(query: str) -> float:
    """Where ``query`` falls in [0, 1): a uniform, stable hash of its text."""
    digest = hashlib.blake2b(query.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class Router:
    """Routes ``share`` of the queries small; measures small/large agreement."""

    def __init__(
        self, stage: str, registry: CollectorRegistry, share: float, sample_ratio: float
    ) -> None:
        self.stage, self.share, self.sample_ratio = stage, share, sample_ratio
        self.offpath = OffPath()
        self.agreement = Summary(
            contract.METRIC_ROUTING_AGREEMENT,
            "Top-3 overlap of the small re-ranker with the large one on sampled queries.",
            ["stage"], registry=registry,
        )  # fmt: skip
        self.agreement.labels(stage)  # at 0 from the start: increase() then counts the first

    def route(self, query: str) -> Route:
        return "small" if position(query) < self.share else "large"

    def sample(self, compare: Callable[[], Awaitable[float]]) -> None:
        """Maybe run ``compare`` (small vs large agreement) off the response path."""

        async def job() -> None:
            try:
                value = await compare()
            except Exception as exc:  # a failed check is a missing sample, not an error
                log.warning("routing agreement check failed: %s", exc)
                return
            self.agreement.labels(self.stage).observe(value)

        self.offpath.maybe(self.sample_ratio, job)
