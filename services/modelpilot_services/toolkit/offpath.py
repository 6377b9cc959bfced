"""Sampled work done after a response (shadow calls, routing and cache checks): never on
the client's path, and never queued up behind itself."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

MAX_IN_FLIGHT = 4  # past this, a sample is skipped rather than queued


class OffPath:
    """Runs a sample of jobs as background tasks, at most ``limit`` at once."""

    def __init__(self, limit: int = MAX_IN_FLIGHT) -> None:
        self.limit = limit
        self.tasks: set[asyncio.Task[None]] = set()

    def maybe(self, ratio: float, job: Callable[[], Awaitable[None]]) -> bool:
        """Start ``job`` with probability ``ratio`` unless ``limit`` jobs run; True if it
        started."""
        if random.random() >= ratio or len(self.tasks) >= self.limit:
            return False
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(_run(job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True


async def _run(job: Callable[[], Awaitable[None]]) -> None:
    await job()
