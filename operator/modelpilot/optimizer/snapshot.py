"""The telemetry snapshot the optimizer decides from: typed, frozen, ``None`` when missing.

A missing metric is never 0: 0 requests/s and "no data" lead to opposite decisions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

RATE_WINDOW_S = 60  # the stable rate window
SHORT_RATE_WINDOW_S = 15  # the short one, to see a surge early (and its trend)
# How far back the arrivals' burstiness is measured: long enough to hold a few bursts,
# short enough to follow a change of traffic.
BURST_WINDOW_S = 300
# The rate history seasonal forecasts read: the rate at HISTORY_STEP_S steps over the last
# HISTORY_LOOKBACK_S, and over the same span one season earlier, HISTORY_AHEAD_S longer.
HISTORY_STEP_S = 60
HISTORY_LOOKBACK_S = 3600
HISTORY_AHEAD_S = 300
SEASONS_S = (86400, 7 * 86400)  # a day, a week


@dataclass(frozen=True)
class SeasonWindow:
    period_s: int
    # The rate at each step from (now - period - lookback) to (now - period + ahead): its
    # first points are the recent window's one period earlier; None where unmeasured.
    past: tuple[float | None, ...]


@dataclass(frozen=True)
class RateHistory:
    step_s: int
    recent: tuple[float | None, ...]  # the rate at each step from now - lookback to now
    seasons: tuple[SeasonWindow, ...] = ()


@dataclass(frozen=True)
class StageTelemetry:
    rate_rps: float | None = None  # over RATE_WINDOW_S
    rate_short_rps: float | None = None  # over SHORT_RATE_WINDOW_S
    # Variance / mean of the stage's per-second arrival counts over BURST_WINDOW_S
    # (1 for Poisson arrivals, more for bursty ones).
    arrival_dispersion: float | None = None
    rate_history: RateHistory | None = None  # for seasonal forecasts
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    queue_ms: float | None = None
    batch_size: float | None = None  # achieved mean batch size
    exec_ms: float | None = None  # mean time Triton computes one of those batches
    items_per_request: float | None = None  # Triton items (texts, query-passage pairs)/request
    error_ratio: float | None = None
    in_flight: float | None = None
    cpu_utilisation: float | None = None
    gpu_utilisation: float | None = None
    cache_hit_ratio: float | None = None
    small_share: float | None = None  # share of queries routed to the small variant


def dispersion(tele: StageTelemetry) -> float:
    """The arrivals' index of dispersion to size for: as measured, or Poisson's 1 when it
    was not."""
    return tele.arrival_dispersion if tele.arrival_dispersion is not None else 1.0


@dataclass(frozen=True)
class ShadowStats:
    """A candidate variant's mirrored requests over the shadow window."""

    samples: int  # agreement observations (texts embedded, queries re-ranked)
    agreement: float | None  # mean agreement with the serving variant, 0..1
    p95_ms: float | None  # the candidate's latency on the mirrored requests
    errors: int = 0


@dataclass(frozen=True)
class Agreement:
    """Sampled comparisons over the check window and their mean agreement, 0..1."""

    samples: int
    mean: float | None


@dataclass(frozen=True)
class Band:
    """One band of the cache's lookup similarity over the check window: how many lookups
    fell in it and how their checked answers agreed."""

    edge: float  # upper edge; the band is (previous edge, edge]
    count: float  # routed queries, or cache lookups, in the band
    samples: int = 0  # sampled comparisons in the band
    agreement: float | None = None  # their mean agreement, 0..1


@dataclass(frozen=True)
class Snapshot:
    time: float  # seconds, when it was taken
    newest_sample: float | None  # timestamp of the newest sample seen; None if none
    stages: Mapping[str, StageTelemetry] = field(default_factory=dict)
    e2e_p95_ms: float | None = None
    # (stage, candidate model) -> its shadow traffic; absent when none was mirrored.
    shadow: Mapping[tuple[str, str], ShadowStats] = field(default_factory=dict)
    routing: Agreement | None = None  # small vs large on sampled queries; None: not routed
    cache: tuple[Band, ...] = ()  # by the nearest entry's similarity, ascending

    def stale(self, now: float, max_age: float) -> str | None:
        """Why this snapshot must not be acted on, or None when it is fresh enough."""
        if self.newest_sample is None:
            return "no samples in Prometheus"
        age = now - self.newest_sample
        if age > max_age:
            return f"newest sample is {age:.0f}s old (limit {max_age:.0f}s)"
        return None
