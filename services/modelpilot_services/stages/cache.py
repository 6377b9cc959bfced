"""The gateway's semantic cache: a query hits when a cached query with the same top_k and
filter has an embedding within cosine ``threshold`` of it and is younger than its TTL.

Entries live in one preallocated matrix used as a ring (the oldest entry is overwritten when
full), so a lookup is one matrix-vector product over the rows filled so far.

:class:`CacheCheck` measures what the cache answers: every lookup's nearest similarity by
band, and the agreement of a cached answer with a fresh one, by the similarity's band — on
a sampled share of hits (recomputed off the response path) and on every near miss (its fresh
answer against the nearest entry's, at no extra cost). Neither depends on the threshold, so
the optimizer can predict any threshold's hit ratio and hit agreement from them.

Metrics (label ``stage``): ``modelpilot_cache_similarity`` histogram over
``contract.CACHE_BANDS``; ``modelpilot_cache_agreement`` summary by ``band``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Histogram, Summary

from modelpilot import contract
from modelpilot_services.toolkit.offpath import OffPath

log = logging.getLogger(__name__)


class SemanticCache:
    def __init__(
        self,
        threshold: float,
        max_entries: int,
        ttl_s: float,
        dims: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.threshold, self.ttl_s, self.clock = threshold, ttl_s, clock
        self.capacity = max(0, max_entries)
        self.vectors = np.zeros((self.capacity, dims), np.float32)
        self.expires = np.full(self.capacity, -np.inf)
        self.keys = np.zeros(self.capacity, np.int64)
        self.values: list[Any] = [None] * self.capacity
        self.next = 0

    @staticmethod
    def _key(key: str) -> int:
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little", signed=True)

    def nearest(self, key: str, vector: NDArray[np.float32]) -> tuple[float, Any] | None:
        """(similarity, value) of the most similar live entry with this key, or ``None``."""
        filled = min(self.next, self.capacity)  # the ring fills rows 0, 1, ... in order
        if filled == 0:
            return None
        # One product over the filled rows, a view: gathering the live rows first would copy
        # them on every lookup (README, "The data plane", has the timings).
        sims = self.vectors[:filled] @ vector
        live = (self.keys[:filled] == self._key(key)) & (self.expires[:filled] > self.clock())
        if not live.any():
            return None
        i = int(np.argmax(np.where(live, sims, -np.inf)))
        return float(sims[i]), self.values[i]

    def get(self, key: str, vector: NDArray[np.float32]) -> Any | None:
        """The cached value of the most similar live entry above the threshold, or ``None``."""
        near = self.nearest(key, vector)
        return near[1] if near is not None and near[0] >= self.threshold else None

    def put(self, key: str, vector: NDArray[np.float32], value: Any) -> None:
        if self.capacity == 0:
            return
        i = self.next % self.capacity
        self.vectors[i], self.keys[i], self.values[i] = vector, self._key(key), value
        self.expires[i] = self.clock() + self.ttl_s
        self.next += 1

    def __len__(self) -> int:
        return int((self.expires > self.clock()).sum())


class CacheCheck:
    """Measures the cache's answers against fresh ones, by the similarity's band."""

    def __init__(self, stage: str, registry: CollectorRegistry, sample_ratio: float) -> None:
        self.stage, self.sample_ratio = stage, sample_ratio
        self.offpath = OffPath()
        self.similarity = Histogram(
            contract.METRIC_CACHE_SIMILARITY, "Cache lookups by their nearest entry's similarity.",
            ["stage"], buckets=contract.CACHE_BANDS, registry=registry,
        )  # fmt: skip
        self.agreement = Summary(
            contract.METRIC_CACHE_AGREEMENT,
            "Top-3 overlap of a cached answer with a fresh one, by the cached entry's similarity.",
            ["stage", "band"], registry=registry,
        )  # fmt: skip
        # Every series exists from the start at 0: increase() does not count the first value
        # of a series Prometheus has not seen before, so a band's first checks would be lost.
        self.similarity.labels(stage)
        for edge in contract.CACHE_BANDS:
            self.agreement.labels(stage, contract.band_of(edge, contract.CACHE_BANDS))

    def looked_up(self, similarity: float) -> None:
        # float32 puts a repeat's own similarity a hair over 1: it belongs in the top band
        self.similarity.labels(self.stage).observe(min(similarity, 1.0))

    def record(self, similarity: float, agreement: float) -> None:
        band = contract.band_of(min(similarity, 1.0), contract.CACHE_BANDS)
        self.agreement.labels(self.stage, band).observe(agreement)

    def sample_hit(self, similarity: float, compare: Callable[[], Awaitable[float]]) -> None:
        """Maybe recompute a hit off the response path; ``compare`` returns the agreement."""

        async def job() -> None:
            try:
                self.record(similarity, await compare())
            except Exception as exc:  # a failed check is a missing sample, not an error
                log.warning("cache check failed: %s", exc)

        self.offpath.maybe(self.sample_ratio, job)
