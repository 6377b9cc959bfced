"""The gateway's two knobs, tuned from what the gateway measured (a pure step).

Routing: ``smallShare`` of the queries go to the small re-ranker (by a hash of the query),
the rest to the large one. The gateway re-ranks a sample with both models and measures
their agreement ``a`` (top-3 overlap); large being the measure of quality, a share ``s``
predicts

    quality(s) = q_large * (1 - s * (1 - a))

and Auto sets the highest share, in steps of ``Tunables.share_step`` within the spec's
bounds, whose predicted quality stays at or above ``slo.minQuality``.

Cache: a lookup whose nearest entry's similarity is at or above the cache threshold is a hit.
The gateway counts lookups by similarity band and compares cached answers with fresh ones
(sampled hits, every near miss); Auto sets the lowest threshold (the most hits) whose hits
agree with a fresh answer at ``slo.minQuality`` or better. A band's agreement is shrunk
toward the mean of the bands a threshold in bounds can reach by ``Tunables.band_prior``
samples (a band with few samples is judged mostly by its neighbours' pool).

Neither measurement depends on the knob's value in force, so a change is predicted, not
tried. With fewer than ``gateway_min_samples`` a knob holds. ``knob_margin`` is a deadband:
a knob moves toward more small-routed queries or more hits only when the prediction clears
the floor by the margin, and back only when it falls below the floor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from modelpilot.api.v1alpha1 import KnobMode, Routing, SemanticCache
from modelpilot.optimizer.snapshot import Agreement, Band
from modelpilot.optimizer.tunables import Tunables

_EPS = 1e-9


@dataclass(frozen=True)
class Measured:
    """A knob's value's effect: what was measured and what the value is expected to give."""

    share: float  # expected share routed small, or of lookups (with an entry) that hit
    agreement: float | None  # measured: small vs large; expected: hits vs fresh answers
    samples: int  # the sampled comparisons behind it
    quality: float | None = None  # routing: the expected blended quality


@dataclass(frozen=True)
class KnobStep:
    value: float | None  # the share or threshold to run; None when the knob is Off
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
    return [
        ((b.agreement or 0.0) * b.samples + pooled * k) / (b.samples + k)
        if b.samples + k
        else pooled
        for b in bands
    ], n


def _candidates(edges: Sequence[float], low: float, high: float) -> list[float]:
    return sorted({low, high} | {e for e in edges if low - _EPS <= e <= high + _EPS})


def routing_quality(share: float, agreement: float, q_large: float) -> float:
    """Predicted quality when ``share`` of the queries go small."""
    return q_large * (1.0 - share * (1.0 - agreement))


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


def _hold(
    knob: Routing | SemanticCache, cur: float, holds: str, compared: str, tun: Tunables
) -> KnobStep:
    """Keep ``cur`` for want of samples; in Auto, say so (without a running count: a reason
    that changed every tick would be a status write every tick)."""
    n = tun.gateway_min_samples
    why = f"inference: {holds} until {n} {compared} comparisons are sampled"
    return KnobStep(cur, why if knob.mode == KnobMode.AUTO else None)


def _fixed_or_hold(knob: Routing | SemanticCache, current: float | None) -> float:
    return knob.start if knob.mode == KnobMode.FIXED or current is None else current


def tune_routing(
    routing: Routing,
    current: float | None,
    measured: Agreement | None,
    floor: float,
    q_large: float,
    tun: Tunables,
) -> KnobStep:
    """The small share to run (see the module docstring)."""
    if routing.mode == KnobMode.OFF:
        return KnobStep(None)
    cur = _fixed_or_hold(routing, current)
    n = measured.samples if measured else 0
    if measured is None or measured.mean is None or n < max(1, tun.gateway_min_samples):
        return _hold(routing, cur, f"small share holds at {cur:.0%}", "small/large", tun)
    a = measured.mean

    def quality(s: float) -> float:
        return routing_quality(s, a, q_large)

    new = cur
    if routing.mode == KnobMode.AUTO:
        low, high = routing.bounds
        steps = round(1 / tun.share_step)
        options = _candidates([i / steps for i in range(steps + 1)], low, high)
        if quality(cur) < floor - _EPS:  # lower until it holds (quality falls as s rises)
            new = max((s for s in options if quality(s) >= floor - _EPS), default=low)
        else:
            up = max((s for s in options if quality(s) >= floor + tun.knob_margin), default=low)
            new = max(cur, up)
    reason = None
    if new != cur:
        reason = (
            f"inference: small share {cur:.0%} -> {new:.0%}: expected quality "
            f"{quality(new):.3f} vs minQuality {floor:g} (was {quality(cur):.3f}); the small "
            f"re-ranker agrees with the large one {a:.3f} on {n} sampled queries"
        )
    return KnobStep(new, reason, Measured(new, a, n, quality(new)))


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
        return _hold(cache, cur, f"cache threshold holds at {cur:g}", "cached/fresh", tun)
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
            f"an entry (was {was:.0%}), expected hit agreement "
            f"{_fmt(agreement)} (was {_fmt(was_agreement)}) vs minQuality {floor:g} "
            f"from {n} cached/fresh comparisons"
        )
    return KnobStep(new, reason, Measured(share, agreement, n))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
