"""The request rate to size for: the measured one, or ahead of a climb."""

from __future__ import annotations

from modelpilot.optimizer.snapshot import RATE_WINDOW_S, SHORT_RATE_WINDOW_S
from modelpilot.optimizer.tunables import Tunables


def forecast(long: float, short: float | None, tun: Tunables) -> tuple[float, str | None]:
    """The request rate to size for, and why when it is above what was measured.

    Normally the long-window rate: a short window only a little above it is noise. A surge
    shows in the short window first; when it is more than ``forecast_deadband`` above the
    long one the load is climbing, and replicas ordered now serve only after
    ``forecast_lead_s``, so size for the rate the climb reaches by then (linear from the two
    windows' midpoints), bounded by ``forecast_max_ratio``."""
    if short is None or short <= long * (1 + tun.forecast_deadband):
        return long, None
    long_w, short_w = RATE_WINDOW_S, SHORT_RATE_WINDOW_S
    slope = (short - long) / ((long_w - short_w) / 2)  # requests/s per second
    ahead = min(short + slope * (short_w / 2 + tun.forecast_lead_s), short * tun.forecast_max_ratio)
    why = (
        f"rate climbing {slope:.2f}/s ({short_w}s {short:.1f} vs {long_w}s {long:.1f} "
        f"requests/s): sized for {ahead:.1f} requests/s, the rate in {tun.forecast_lead_s:.0f}s"
    )
    return ahead, why
