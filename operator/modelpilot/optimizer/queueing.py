"""Queueing formulas (M/M/c) for sizing replicas from measured service times."""

from __future__ import annotations

import math


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with ``offered`` = lambda/mu Erlangs.

    Computed with the numerically stable Erlang-B recursion. Returns 1.0 when the queue is
    unstable (offered >= servers).
    """
    if servers <= 0 or offered >= servers:
        return 1.0
    if offered <= 0:
        return 0.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    rho = offered / servers
    return b / (1 - rho + rho * b)


def mean_wait(servers: int, arrival: float, service_rate: float) -> float:
    """Mean time in queue (seconds) for M/M/c; ``inf`` when unstable."""
    if arrival <= 0:
        return 0.0
    capacity = servers * service_rate
    if capacity <= arrival:
        return math.inf
    return erlang_c(servers, arrival / service_rate) / (capacity - arrival)


def wait_quantile(servers: int, arrival: float, service_rate: float, q: float = 0.95) -> float:
    """The q-quantile of the time in queue (seconds) for M/M/c; ``inf`` when unstable.

    P(W > t) = C(c, a) * exp(-(c*mu - lambda) * t), so t_q = ln(C / (1 - q)) / (c*mu - lambda).
    """
    if arrival <= 0:
        return 0.0
    capacity = servers * service_rate
    if capacity <= arrival:
        return math.inf
    c = erlang_c(servers, arrival / service_rate)
    if c <= 1 - q:
        return 0.0
    return math.log(c / (1 - q)) / (capacity - arrival)
