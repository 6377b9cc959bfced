"""The verification gate for variant switches: a pure verdict on a candidate's shadow traffic.

A candidate variant is promoted only when enough mirrored requests show that its outputs
agree with the serving variant's (mean agreement >= ``minAgreement``) and that its latency
fits the stage's budget; it is rejected when it disagrees, is too slow, fails requests, or
cannot get ``minSamples`` before ``timeoutSeconds``. Until then the verdict is *wait*.

Too few samples always come with their cause: the stage had no requests to mirror, its
pods are not mirroring (no shadow series at all, or series without samples, while the
stage's rate says there should be some), or the rate x ``sampleRatio`` is too low to reach
``minSamples`` in time. The verdict does not wait for the timeout once the minimum is out
of reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from modelpilot.api.v1alpha1 import Verification
from modelpilot.optimizer.snapshot import RATE_WINDOW_S, ShadowStats

MAX_ERROR_RATIO = 0.01  # a candidate failing more than this share of mirrored requests fails
# Before judging the pace of the samples: the shadow setting reaches the pods, their first
# mirrored calls reach Prometheus (increase() needs two scrapes) and the rate window covers
# the verification.
SETTLE_S = 60
MIRROR_LAG_S = 30  # of which this before a pod's first mirrored call can show at all
# Mirrored requests expected by now above which not one sample means the pods do not mirror
# (a Poisson count with this mean is 0 less than once in 100 times).
MIRROR_EVIDENCE = 5.0


@dataclass(frozen=True)
class Verdict:
    action: Literal["wait", "promote", "reject"]
    reason: str


def expected_samples(
    rules: Verification, rate_rps: float | None, per_request: float, seconds: float
) -> float:
    """Samples the stage's request rate brings the candidate in ``seconds``.

    ``per_request`` is the samples one mirrored request gives (a cosine per embedded text,
    one top-k overlap per re-ranked query)."""
    return max(rate_rps or 0.0, 0.0) * rules.sample_ratio_value * per_request * max(seconds, 0)


def unverifiable(rules: Verification, rate_rps: float | None, per_request: float) -> str | None:
    """Why a verification started now could not reach ``minSamples`` by its timeout, or None."""
    expected = expected_samples(rules, rate_rps, per_request, rules.timeout_seconds)
    if expected >= rules.min_samples:
        return None
    return (
        f"{_pace(rules, rate_rps)} predict about {expected:.0f} shadow samples in "
        f"timeoutSeconds {rules.timeout_seconds}, fewer than minSamples {rules.min_samples} "
        f"(raise sampleRatio or timeoutSeconds, or lower minSamples)"
    )


def _pace(rules: Verification, rate_rps: float | None) -> str:
    return f"{rate_rps or 0.0:.2g} requests/s x sampleRatio {rules.sample_ratio_value:g}"


def judge(
    rules: Verification,
    stats: ShadowStats | None,
    budget_ms: float,
    started: int,
    now: int,
    rate_rps: float | None = None,
    per_request: float = 1.0,
) -> Verdict:
    """The verdict on a candidate verified since ``started`` (unix seconds), while the stage
    serves ``rate_rps`` requests/s (None: no rate measured)."""
    samples = stats.samples if stats else 0
    errors = stats.errors if stats else 0
    if errors > MAX_ERROR_RATIO * (samples + errors):
        return Verdict("reject", f"it failed {errors} of {samples + errors} mirrored requests")
    if samples < rules.min_samples:
        return _too_few(rules, stats, samples, started, now, rate_rps, per_request)
    assert stats is not None
    floor = rules.min_agreement_value
    if stats.agreement is None or stats.agreement < floor:
        seen = "unknown" if stats.agreement is None else f"{stats.agreement:.3f}"
        return Verdict("reject", f"agreement {seen} < {floor:g} over {samples} samples")
    if stats.p95_ms is not None and stats.p95_ms > budget_ms:
        return Verdict(
            "reject", f"shadow p95 {stats.p95_ms:.0f} ms > the stage budget {budget_ms:.0f} ms"
        )
    latency = "" if stats.p95_ms is None else f", shadow p95 {stats.p95_ms:.0f} ms"
    return Verdict(
        "promote",
        f"agreement {stats.agreement:.3f} >= {floor:g} over {samples} samples{latency} "
        f"within the {budget_ms:.0f} ms budget",
    )


def _too_few(
    rules: Verification,
    stats: ShadowStats | None,
    samples: int,
    started: int,
    now: int,
    rate_rps: float | None,
    per_request: float,
) -> Verdict:
    """Wait for more samples, or reject when the minimum is out of reach; either way, why."""
    need, timeout = rules.min_samples, rules.timeout_seconds
    waited = now - started
    left = max(timeout - waited, 0)
    # Mirrored requests (not samples: a failed call gives none) that should show by now.
    mirrored = expected_samples(rules, rate_rps, 1.0, waited - MIRROR_LAG_S)
    # The pace is the better of what the rate predicts and what arrived so far: the verdict
    # gives up only when even the faster one cannot reach the minimum.
    pace = max(
        expected_samples(rules, rate_rps, per_request, 1.0), samples / waited if waited else 0.0
    )
    cause = ""
    if not rate_rps or rate_rps <= 0:
        cause = f"the stage had no requests in the last {RATE_WINDOW_S} s, so none to mirror"
    elif waited >= SETTLE_S and samples == 0 and mirrored >= MIRROR_EVIDENCE:
        pace = 0.0  # the mirror is broken, not slow: nothing more will come
        if stats is None:
            cause = (
                f"no shadow series for the candidate although about {mirrored:.0f} requests "
                f"should have been mirrored: the stage's pods are not mirroring to it (check "
                f"that the candidate loads on them and the operator's shadow push succeeded)"
            )
        else:
            cause = (
                f"the candidate's shadow series show no samples although about "
                f"{mirrored:.0f} requests should have been mirrored: mirroring stopped "
                f"(check the stage's pods and the operator's shadow push)"
            )
    more = pace * left
    have = f"{samples}/{need} shadow samples after {waited} s"
    if waited >= timeout:
        why = f": {cause}" if cause else ""
        return Verdict("reject", f"only {samples} shadow samples in {waited} s (needs {need}){why}")
    if waited >= SETTLE_S and samples + more < need:
        cause = cause or (
            f"{_pace(rules, rate_rps)} bring about {more:.0f} more in the {left} s left "
            f"(raise sampleRatio or timeoutSeconds, or lower minSamples)"
        )
        return Verdict(
            "reject", f"{have}, cannot reach {need} by timeoutSeconds {timeout}: {cause}"
        )
    if cause:
        return Verdict("wait", f"{have}; {cause}")
    return Verdict("wait", f"{have}; about {more:.0f} more expected in the {left} s left")
