"""A paced, bounded load generator for the data-plane services: requests go out at a fixed
rate (open loop) from a fixed pool of workers, so an overloaded service shows up as a missed
rate or as errors, never as an unbounded pile of client threads."""

from __future__ import annotations

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


def paced(request: Request, rps: float, seconds: float, workers: int = 8) -> LoadResult:
    """Send ``request(session, n)`` at ``rps`` for ``seconds``; at most ``workers`` in flight.

    Only a 200 counts as ok; anything else (status or exception) is recorded as an error.
    """
    result = LoadResult(seconds=seconds)
    lock = threading.Lock()
    slots = threading.Semaphore(workers)
    local = threading.local()

    def one(n: int) -> None:
        try:
            session = getattr(local, "session", None) or requests.Session()
            local.session = session
            start = time.perf_counter()
            response = request(session, n)
            elapsed = time.perf_counter() - start
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
        n = 0
        while (due := start + n / rps) < start + seconds:
            time.sleep(max(0.0, due - time.monotonic()))  # pacing, not synchronization
            slots.acquire()
            pool.submit(one, n)
            n += 1
        result.sent = n
    result.seconds = max(seconds, time.monotonic() - start)
    return result
