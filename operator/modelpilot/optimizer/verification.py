"""Verification of a variant switch: a candidate serves only after shadow traffic shows it fits.

A candidate variant is promoted only when enough mirrored requests show that its outputs
agree with the serving variant's (mean agreement >= ``minAgreement``) and that its latency
fits the stage's budget; it is rejected when it disagrees, is too slow, fails requests, or
cannot get ``minSamples`` before ``timeoutSeconds``. Until then the verdict is *wait*.

Too few samples always come with their cause: the stage had no requests to mirror, its
pods are not mirroring (no shadow series at all, or series without samples, while the
stage's rate says there should be some), or the rate x ``sampleRatio`` is too low to reach
``minSamples`` in time. The verdict does not wait for the timeout once the minimum is out
of reach.

Two steps of a decision use it: :func:`progress` judges the verification running on a stage,
:func:`gate_switch` lets the variant the sizing picked serve, start its verification, or
keep the serving one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from modelpilot.api.v1alpha1 import ModelStage, Verification
from modelpilot.optimizer.history import StageHistory
from modelpilot.optimizer.snapshot import RATE_WINDOW_S, ShadowStats, Snapshot
from modelpilot.optimizer.tunables import Tunables
from modelpilot.optimizer.variants import Option
from modelpilot.render.plan import StagePlan

DEFAULTS = Tunables()
Event = tuple[str, str]  # ("started" | "promoted" | "rejected", message)


@dataclass(frozen=True)
class Verdict:
    action: Literal["wait", "promote", "reject"]
    reason: str


def expected_samples(
    rules: Verification, rate_rps: float | None, per_request: float, seconds: float
) -> float:
    """Samples the stage's request rate brings the candidate in ``seconds``.

    ``per_request`` is the samples one mirrored request gives (a recall per embedded text,
    one top-3 overlap per re-ranked query)."""
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
    tun: Tunables = DEFAULTS,
    min_quality: float = 1.0,
) -> Verdict:
    """The verdict on a candidate verified since ``started`` (unix seconds), while the stage
    serves ``rate_rps`` requests/s (None: no rate measured). The agreement it needs is
    ``minAgreement``, by default ``min_quality`` (the spec's floor)."""
    samples = stats.samples if stats else 0
    errors = stats.errors if stats else 0
    if errors > tun.max_error_ratio * (samples + errors):
        return Verdict("reject", f"it failed {errors} of {samples + errors} mirrored requests")
    if samples < rules.min_samples:
        return _too_few(rules, stats, samples, started, now, rate_rps, per_request, tun)
    assert stats is not None
    floor = rules.min_agreement_value
    floor = min_quality if floor is None else floor
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
    tun: Tunables,
) -> Verdict:
    """Wait for more samples, or reject when the minimum is out of reach; either way, why."""
    need, timeout = rules.min_samples, rules.timeout_seconds
    waited = now - started
    left = max(timeout - waited, 0)
    # Mirrored requests (not samples: a failed call gives none) that should show by now.
    mirrored = expected_samples(rules, rate_rps, 1.0, waited - tun.mirror_lag_s)
    # The pace is the better of what the rate predicts and what arrived so far: the verdict
    # gives up only when even the faster one cannot reach the minimum.
    pace = max(
        expected_samples(rules, rate_rps, per_request, 1.0), samples / waited if waited else 0.0
    )
    cause = ""
    if not rate_rps or rate_rps <= 0:
        cause = f"the stage had no requests in the last {RATE_WINDOW_S} s, so none to mirror"
    elif waited >= tun.verification_settle_s and samples == 0 and mirrored >= tun.mirror_evidence:
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
    if waited >= tun.verification_settle_s and samples + more < need:
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


@dataclass(frozen=True)
class Progress:
    """Where a stage's verification stands after :func:`progress`."""

    shadow: str | None  # the candidate still verified (None: none, or it just ended)
    verdict: Verdict | None  # None: no verification was running
    history: StageHistory
    reason: str | None = None
    event: Event | None = None
    candidate: str | None = None  # the candidate judged


def progress(
    name: str,
    stage: ModelStage,
    cur: StagePlan,
    hist: StageHistory,
    snapshot: Snapshot,
    budget: float,
    rate: float | None,
    per_sample: float,
    t: int,
    rules: Verification,
    tun: Tunables,
    min_quality: float,
) -> Progress:
    """Judge the stage's running verification, if any. A rejection is recorded, not retried
    for ``retryAfterSeconds``; a wait says how far it got and why."""
    shadow = cur.shadow_variant
    if shadow is None or (cand := stage.variant(shadow)) is None:
        return Progress(shadow, None, hist)
    started = hist.verification_started if hist.verification_started is not None else t
    stats = snapshot.shadow.get((name, cand.model))
    verdict = judge(rules, stats, budget, started, t, rate, per_sample, tun, min_quality)
    if verdict.action == "wait":
        why = (
            f"{name}: verifying {shadow} on shadow traffic before switching from "
            f"{cur.variant}: {verdict.reason}"
        )
        # A verification restored without its start time starts counting now, so it still ends.
        return Progress(
            shadow, verdict, replace(hist, verification_started=started), why, None, shadow
        )
    event: Event | None = None
    rejection = None
    if verdict.action == "reject":
        rejection = (
            f"{name}: {shadow} rejected after verification: {verdict.reason}; "
            f"not tried again for {rules.retry_after_seconds} s"
        )
        until = t + rules.retry_after_seconds
        hist = replace(hist, rejected=(*hist.rejected, (shadow, until, rejection)))
        event = ("rejected", rejection)
    ended = replace(hist, verification_started=None)
    return Progress(None, verdict, ended, rejection, event, shadow)


@dataclass(frozen=True)
class Gated:
    """What serves after :func:`gate_switch`, and the verification it starts or ends."""

    pick: Option
    shadow: str | None
    started: bool = False  # a verification of ``shadow`` starts now
    reason: str | None = None
    event: Event | None = None


def gate_switch(
    name: str,
    pick: Option,
    current: Option | None,
    options: list[Option],
    running: Progress,
    serving: str | None,
    rules: Verification,
    gated: bool,
    rate: float | None,
    per_sample: float,
    budget: float,
) -> Gated:
    """The option to serve when sizing chose ``pick`` over ``current`` (the serving
    variant's option): a promoted candidate serves; while one is verified, or when a switch
    cannot be verified in time, the serving variant stays; otherwise a better variant starts
    its verification and the serving one stays until it ends."""
    verdict, shadow = running.verdict, running.shadow
    if verdict is not None and verdict.action == "promote":
        promoted = next((o for o in options if o[1].name == running.candidate), None)
        if promoted is None:
            return Gated(pick, shadow)
        why = f"{name}: {promoted[1].name} promoted after verification: {verdict.reason}"
        return Gated(promoted, shadow, reason=why, event=("promoted", why))
    if verdict is not None and verdict.action == "wait" and current is not None:
        return Gated(current, shadow)  # sized as usual: replicas and batching do not wait
    if not gated or shadow is not None or current is None or pick is current:
        return Gated(pick, shadow)
    if blocked := unverifiable(rules, rate, per_sample):
        why = (
            f"{name}: staying on {serving}: {pick[1].name} would cost/h "
            f"{pick[0]:.2f} vs {current[0]:.2f} but cannot be verified now: {blocked}"
        )
        return Gated(current, None, reason=why)
    why = (
        f"{name}: verifying {pick[1].name} on {rules.sample_ratio_value:g} of live "
        f"traffic before switching from {serving} (cost/h {pick[0]:.2f} vs "
        f"{current[0]:.2f}, predicted p95 {pick[2].p95_ms:.0f} ms, budget "
        f"{budget:.0f} ms)"
    )
    return Gated(current, pick[1].name, started=True, reason=why, event=("started", why))
