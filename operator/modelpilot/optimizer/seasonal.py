"""Scaling ahead of load that recurs: what followed this moment one season ago.

A season is a period over which traffic repeats (a day, a week). For each season the
snapshot carries a stage's request rate at fixed steps over the last hour and over the same
hour one period earlier, continued past "now minus a period" by a few steps
(:class:`~modelpilot.optimizer.snapshot.RateHistory`). The forecast for the start-up horizon
is the highest rate that followed one period ago, times how the last hour compares with that
hour then (a seasonal naive forecast with a level ratio).

A season is trusted only where it explains the last hour better than the rate staying as it
was: its fit (the level times the period-ago rates) must err less than ``season_trust`` times
as much as a persistence forecast over the horizon. Traffic that does not recur, or recurs
with another shape, is sized from the measured rate alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from modelpilot.optimizer.snapshot import RateHistory
from modelpilot.optimizer.tunables import Tunables


@dataclass(frozen=True)
class SeasonalForecast:
    rate: float  # the highest rate the horizon is forecast to reach
    period_s: int
    level: float  # the last hour over the same hour a period ago
    reason: str


def seasonal_forecast(
    history: RateHistory, horizon_s: float, tun: Tunables
) -> SeasonalForecast | None:
    """The rate the next ``horizon_s`` seconds will reach by the best trusted season, or None
    when no season is trusted (see the module)."""
    recent, step = history.recent, history.step_s
    n = len(recent)
    # One step more than the horizon: each step's rate is the mean of the minute before it,
    # so a ramp within the horizon shows in full only at the step after.
    ahead = max(1, math.ceil(horizon_s / step)) + 1
    best: tuple[float, SeasonalForecast] | None = None
    for season in history.seasons:
        then, after = season.past[:n], season.past[n : n + ahead]
        pairs = [(r, p) for r, p in zip(recent, then, strict=False) if r is not None and p]
        coming = [p for p in after if p is not None]
        if len(pairs) < n // 2 or not coming:
            continue
        level = sum(r for r, _ in pairs) / sum(p for _, p in pairs)
        fit = sum(abs(r - level * p) for r, p in pairs) / len(pairs)
        # Persistence over the same horizon: the rate `ahead` steps earlier, held.
        flat = [
            abs(recent[i] - recent[i - ahead])  # type: ignore[operator]
            for i in range(ahead, n)
            if recent[i] is not None and recent[i - ahead] is not None
        ]
        if not flat or fit > tun.season_trust * (sum(flat) / len(flat)):
            continue
        rate = level * max(coming)
        days = season.period_s / 86400
        span = (
            (f"{days:g} day" + ("s" if days != 1 else "")) if days >= 1 else f"{season.period_s}s"
        )
        forecast = SeasonalForecast(
            rate,
            season.period_s,
            level,
            f"{span} ago the next {ahead * step}s reached {max(coming):.1f} requests/s; at "
            f"the level of the last hour against then (x{level:.2f}) sized for {rate:.1f}",
        )
        if best is None or fit < best[0]:
            best = (fit, forecast)
    return best[1] if best else None
