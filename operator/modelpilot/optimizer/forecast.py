"""The request rate to size for: the measured one, ahead of a climb, and above a bursty
stream's noise."""

from __future__ import annotations

import math

from modelpilot.optimizer.snapshot import RATE_WINDOW_S, SHORT_RATE_WINDOW_S
from modelpilot.optimizer.tunables import Tunables


def rate_noise(rate: float, dispersion: float, window_s: float, tun: Tunables) -> float:
    """How far a ``window_s`` mean of a stream at ``rate`` with index of dispersion
    ``dispersion`` strays above its true mean beyond what a Poisson stream's would, at the
    one-sided ``burst_noise_z`` quantile: counts over the window vary ``dispersion`` times as
    much as Poisson counts, so the rate's standard deviation is sqrt(D * rate / window); the
    Poisson share of it is left to the queueing model's square-root staffing."""
    excess = max(dispersion - 1.0, 0.0)
    return tun.burst_noise_z * math.sqrt(excess * max(rate, 0.0) / window_s)


def forecast(
    long: float, short: float | None, tun: Tunables, dispersion: float = 1.0
) -> tuple[float, str | None]:
    """The request rate to size for, and why when it is above what was measured.

    Normally the long-window rate: a short window only a little above it is noise. A surge
    shows in the short window first; when it is more than ``forecast_deadband`` above the
    long one, and more than a bursty stream's short-window noise (:func:`rate_noise`), the
    load is climbing, and replicas ordered now serve only after ``forecast_lead_s``, so size
    for the rate the climb reaches by then (linear from the two windows' midpoints), bounded
    by ``forecast_max_ratio``."""
    noise = rate_noise(long, dispersion, SHORT_RATE_WINDOW_S, tun)
    if short is None or short - long <= max(long * tun.forecast_deadband, noise):
        return long, None
    long_w, short_w = RATE_WINDOW_S, SHORT_RATE_WINDOW_S
    slope = (short - long) / ((long_w - short_w) / 2)  # requests/s per second
    ahead = min(short + slope * (short_w / 2 + tun.forecast_lead_s), short * tun.forecast_max_ratio)
    why = (
        f"rate climbing {slope:.2f}/s ({short_w}s {short:.1f} vs {long_w}s {long:.1f} "
        f"requests/s): sized for {ahead:.1f} requests/s, the rate in {tun.forecast_lead_s:.0f}s"
    )
    return ahead, why


def burst_headroom(long: float, dispersion: float, tun: Tunables) -> tuple[float, str | None]:
    """The rate to size a bursty stream for: the long-window rate plus its excess noise
    (:func:`rate_noise`), as the next minute's mean may well be that much higher; and why,
    when it adds anything."""
    band = rate_noise(long, dispersion, RATE_WINDOW_S, tun)
    if band <= 0:
        return long, None
    return long + band, (
        f"sized for {long + band:.1f} requests/s: the {RATE_WINDOW_S}s rate {long:.1f} "
        f"and the {band:.1f} a stream this bursty strays above it"
    )
