"""The gateway's semantic cache: a query hits when a cached query with the same top_k and
filter has an embedding within cosine ``threshold`` of it and is younger than its TTL.

Entries live in one preallocated matrix used as a ring (the oldest entry is overwritten when
full), so a lookup is one matrix-vector product over the rows filled so far.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray


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

    def get(self, key: str, vector: NDArray[np.float32]) -> Any | None:
        """The cached value of the most similar live entry above the threshold, or ``None``."""
        filled = min(self.next, self.capacity)  # the ring fills rows 0, 1, ... in order
        if filled == 0:
            return None
        # One product over the filled rows, a view: gathering the live rows first would copy
        # them on every lookup (README, "The data plane", has the timings).
        sims = self.vectors[:filled] @ vector
        hit = (
            (sims >= self.threshold)
            & (self.keys[:filled] == self._key(key))
            & (self.expires[:filled] > self.clock())
        )
        if not hit.any():
            return None
        return self.values[int(np.argmax(np.where(hit, sims, -np.inf)))]

    def put(self, key: str, vector: NDArray[np.float32], value: Any) -> None:
        if self.capacity == 0:
            return
        i = self.next % self.capacity
        self.vectors[i], self.keys[i], self.values[i] = vector, self._key(key), value
        self.expires[i] = self.clock() + self.ttl_s
        self.next += 1

    def __len__(self) -> int:
        return int((self.expires > self.clock()).sum())
