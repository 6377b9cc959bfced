"""The verification gate for variant switches: a pure verdict on a candidate's shadow traffic.

A candidate variant is promoted only when enough mirrored requests show that its outputs
agree with the serving variant's (mean agreement >= ``minAgreement``) and that its latency
fits the stage's budget; it is rejected when it disagrees, is too slow, fails requests, or
gets too little traffic before ``timeoutSeconds``. Until then the verdict is *wait*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from modelpilot.api.v1alpha1 import Verification
from modelpilot.optimizer.snapshot import ShadowStats

MAX_ERROR_RATIO = 0.01  # a candidate failing more than this share of mirrored requests fails


@dataclass(frozen=True)
class Verdict:
    action: Literal["wait", "promote", "reject"]
    reason: str


def judge(
    rules: Verification,
    stats: ShadowStats | None,
    budget_ms: float,
    started: int,
    now: int,
) -> Verdict:
    """The verdict on a candidate verified since ``started`` (unix seconds)."""
    samples = stats.samples if stats else 0
    errors = stats.errors if stats else 0
    if errors > MAX_ERROR_RATIO * (samples + errors):
        return Verdict("reject", f"it failed {errors} of {samples + errors} mirrored requests")
    if samples < rules.min_samples:
        waited = now - started
        if waited >= rules.timeout_seconds:
            return Verdict(
                "reject",
                f"only {samples} shadow samples in {waited} s (needs {rules.min_samples})",
            )
        return Verdict("wait", f"{samples}/{rules.min_samples} shadow samples after {waited} s")
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
