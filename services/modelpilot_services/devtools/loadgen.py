"""A paced, bounded load generator for the data-plane services: requests go out at a fixed
rate (open loop: evenly spaced, or Poisson arrivals) from a fixed pool of workers, so an
overloaded service shows up as a missed rate or as errors, never as an unbounded pile of
client threads."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

Request = Callable[[requests.Session, int], requests.Response]


@dataclass
class LoadResult:
    seconds: float
    sent: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)

    @property
    def achieved_rps(self) -> float:
        return self.ok / self.seconds

    def p(self, q: float) -> float:
        values = sorted(self.latencies_s)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def paced(
    request: Request,
    rps: float,
    seconds: float,
    workers: int = 8,
    poisson: random.Random | None = None,
) -> LoadResult:
    """Send ``request(session, n)`` at ``rps`` for ``seconds``; at most ``workers`` in flight.

    Evenly spaced, or with ``poisson`` (its random source) exponential gaps: independent
    clients, whose coincidences are what a dynamic batcher batches. A latency runs from when
    its request was due. Only a 200 counts as ok; anything else (status or exception) is
    recorded as an error.
    """
    result = LoadResult(seconds=seconds)
    lock = threading.Lock()
    slots = threading.Semaphore(workers)
    local = threading.local()

    def one(n: int, due: float) -> None:
        try:
            session = getattr(local, "session", None) or requests.Session()
            local.session = session
            response = request(session, n)
            # From when it was due, not when a worker got to it: a client held up by a slow
            # server must not hide the wait (coordinated omission).
            elapsed = time.monotonic() - due
            with lock:
                if response.status_code == 200:
                    result.ok += 1
                    result.latencies_s.append(elapsed)
                else:
                    result.errors.append(f"{response.status_code} {response.text[:200]}")
        except Exception as exc:
            with lock:
                result.errors.append(repr(exc)[:200])
        finally:
            slots.release()

    start = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        n, offset = 0, 0.0
        while (due := start + offset) < start + seconds:
            time.sleep(max(0.0, due - time.monotonic()))  # pacing, not synchronization
            slots.acquire()
            pool.submit(one, n, due)
            n += 1
            offset = poisson.expovariate(rps) + offset if poisson else n / rps
        result.sent = n
    result.seconds = max(seconds, time.monotonic() - start)
    return result
