"""The gateway's two thresholds, tuned from what the gateway measured (a pure step).

Routing: a query whose difficulty is above the routing threshold goes to the large
re-ranker, any other to the small one. The gateway counts queries by difficulty band and
re-ranks a sample with both models; from those, the quality of any threshold ``t`` is
predicted, large being the measure of quality:

    quality(t) = q_large * (1 - sum over bands <= t of share_b * (1 - agreement_b))

Auto sets the highest threshold (the most queries to the small model) whose predicted quality
stays at or above ``slo.minQuality``, within the spec's bounds.

Cache: a lookup whose nearest entry's similarity is at or above the cache threshold is a hit.
The gateway counts lookups by similarity band and compares cached answers with fresh ones
(sampled hits, every near miss); Auto sets the lowest threshold (the most hits) whose hits
agree with a fresh answer at ``slo.minQuality`` or better.

Neither measurement depends on the threshold in force, so a change is predicted, not tried.
A band's agreement is shrunk toward the pooled mean by ``Tunables.band_prior`` samples (a
band with few samples is judged mostly by the others; the cache pools only the bands above
its lowest threshold); with fewer than ``gateway_min_samples`` in the pool the threshold
holds. ``knob_margin`` is a deadband: a
threshold moves toward more small-routed queries or hits only when the prediction clears the
floor by the margin, and back only when it falls below the floor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from modelpilot.api.v1alpha1 import KnobMode, Routing, SemanticCache
from modelpilot.optimizer.snapshot import Band
from modelpilot.optimizer.tunables import Tunables

_EPS = 1e-9


@dataclass(frozen=True)
class Measured:
    """A threshold's effect as predicted from the bands: share of queries routed small (or
    answered from the cache) and their quality (blended quality, or hit agreement)."""

    share: float
    agreement: float | None
    samples: int


@dataclass(frozen=True)
class KnobStep:
    value: float | None  # the threshold to run; None when the knob is Off
    reason: str | None = None  # set when it changes, or holds for want of samples
    measured: Measured | None = None  # at ``value``; None without measurements


def _agreements(
    bands: Sequence[Band], tun: Tunables, above: float = 0.0
) -> tuple[list[float], int] | None:
    """Each band's agreement, shrunk toward the mean of the bands above ``above`` (those a
    threshold in bounds can reach); None with too few samples there."""
    pool = [b for b in bands if b.edge > above + _EPS]
    n = sum(b.samples for b in pool)
    if n < max(1, tun.gateway_min_samples):
        return None
    pooled = sum(b.samples * (b.agreement or 0.0) for b in pool) / n
    k = tun.band_prior
    return [((b.agreement or 0.0) * b.samples + pooled * k) / (b.samples + k) for b in bands], n


def _candidates(edges: Sequence[float], low: float, high: float) -> list[float]:
    return sorted({low, high} | {e for e in edges if low - _EPS <= e <= high + _EPS})


def routing_quality(
    bands: Sequence[Band], agreements: Sequence[float], t: float, q_large: float
) -> tuple[float, float]:
    """(share of queries routed small, predicted quality) at threshold ``t``."""
    total = sum(b.count for b in bands) or 1.0
    small = [i for i, b in enumerate(bands) if b.edge <= t + _EPS]
    share = sum(bands[i].count for i in small) / total
    loss = sum(bands[i].count / total * (1.0 - agreements[i]) for i in small)
    return share, q_large * (1.0 - loss)


def cache_quality(
    bands: Sequence[Band], agreements: Sequence[float], c: float
) -> tuple[float, float | None]:
    """(share of lookups that hit, their mean agreement) at threshold ``c``: a band hits
    when its lower edge is at or above ``c``. Agreement None: nothing would hit."""
    total = sum(b.count for b in bands) or 1.0
    lower = [0.0, *(b.edge for b in bands[:-1])]
    hits = [i for i in range(len(bands)) if lower[i] >= c - _EPS and bands[i].count > 0]
    n = sum(bands[i].count for i in hits)
    if n <= 0:
        return 0.0, None
    return n / total, sum(bands[i].count * agreements[i] for i in hits) / n


def _fixed_or_hold(knob: Routing | SemanticCache, current: float | None) -> float:
    return knob.threshold_value if knob.mode == KnobMode.FIXED or current is None else current


def tune_routing(
    routing: Routing,
    current: float | None,
    bands: Sequence[Band],
    floor: float,
    q_large: float,
    tun: Tunables,
) -> KnobStep:
    """The routing threshold to run (see the module docstring)."""
    if routing.mode == KnobMode.OFF:
        return KnobStep(None)
    cur = _fixed_or_hold(routing, current)
    measured = _agreements(bands, tun)
    if measured is None:
        n = sum(b.samples for b in bands)
        why = None
        if routing.mode == KnobMode.AUTO:
            why = (
                f"inference: routing threshold holds at {cur:g}, {n} of "
                f"{tun.gateway_min_samples} small/large agreement samples"
            )
        return KnobStep(cur, why)
    agreements, n = measured

    def quality(t: float) -> float:
        return routing_quality(bands, agreements, t, q_large)[1]

    new = cur
    if routing.mode == KnobMode.AUTO:
        low, high = routing.bounds
        options = _candidates([b.edge for b in bands], low, high)
        if quality(cur) < floor - _EPS:  # lower until it holds (quality falls as t rises)
            new = max((t for t in options if quality(t) >= floor - _EPS), default=low)
        else:
            up = max((t for t in options if quality(t) >= floor + tun.knob_margin), default=low)
            new = max(cur, up)
    share, q = routing_quality(bands, agreements, new, q_large)
    reason = None
    if new != cur:
        was, _ = routing_quality(bands, agreements, cur, q_large)
        reason = (
            f"inference: routing threshold {cur:g} -> {new:g}: {share:.0%} of queries to the "
            f"small re-ranker (was {was:.0%}), predicted quality {q:.3f} vs minQuality "
            f"{floor:g} from {n} sampled small/large comparisons"
        )
    return KnobStep(new, reason, Measured(share, q, n))


def tune_cache(
    cache: SemanticCache,
    current: float | None,
    bands: Sequence[Band],
    floor: float,
    tun: Tunables,
) -> KnobStep:
    """The cache's similarity threshold to run (see the module docstring)."""
    if cache.mode == KnobMode.OFF:
        return KnobStep(None)
    cur = _fixed_or_hold(cache, current)
    low, high = cache.bounds
    # Near misses far below the lowest threshold say nothing of the bands a hit can be in.
    measured = _agreements(bands, tun, above=low)
    if measured is None:
        n = sum(b.samples for b in bands if b.edge > low + _EPS)
        why = None
        if cache.mode == KnobMode.AUTO:
            why = (
                f"inference: cache threshold holds at {cur:g}, {n} of "
                f"{tun.gateway_min_samples} cached/fresh comparisons"
            )
        return KnobStep(cur, why)
    agreements, n = measured

    def ok(c: float, margin: float = 0.0) -> bool:
        agreement = cache_quality(bands, agreements, c)[1]
        return agreement is None or agreement >= floor + margin - _EPS

    new = cur
    if cache.mode == KnobMode.AUTO:
        options = _candidates([b.edge for b in bands], low, high)
        if not ok(cur):  # tighten to the first threshold whose hits hold the floor
            new = min((c for c in options if c > cur and ok(c)), default=high)
        else:  # loosen while every step down keeps the margin
            for c in sorted((c for c in options if c < cur), reverse=True):
                if not ok(c, tun.knob_margin):
                    break
                new = c
    share, agreement = cache_quality(bands, agreements, new)
    reason = None
    if new != cur:
        was, was_agreement = cache_quality(bands, agreements, cur)
        reason = (
            f"inference: cache threshold {cur:g} -> {new:g}: hits {share:.0%} of lookups with "
            f"an entry (was {was:.0%}), predicted hit agreement "
            f"{_fmt(agreement)} (was {_fmt(was_agreement)}) vs minQuality {floor:g} "
            f"from {n} cached/fresh comparisons"
        )
    return KnobStep(new, reason, Measured(share, agreement, n))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
