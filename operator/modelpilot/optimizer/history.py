"""What the optimizer remembers about each stage between decisions, and its status form."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageHistory:
    """What the policy remembers about a stage between decisions (persisted in status)."""

    scale_down_window: tuple[tuple[int, int], ...] = ()  # (time s, replicas), newest last
    last_change: int | None = None
    calibration_permille: int = 1000
    verification_started: int | None = None  # when the running shadow verification started
    rejected: tuple[tuple[str, int, str], ...] = ()  # (variant, until, why): failed verification
    # (instances, batch, until): no batch this large at that instance count until then
    backoff: tuple[tuple[int, int, int], ...] = ()
    batch_time_permille: int = 1000  # measured / profiled batch time the stage is sized with

    def rejected_at(self, t: int) -> set[str]:
        return {v for v, until, _ in self.rejected if until > t}

    def backoff_at(self, t: int) -> tuple[tuple[int, int, int], ...]:
        """The back-offs still in force at ``t``."""
        return tuple(b for b in self.backoff if b[2] > t)

    def batch_ceilings(self, t: int) -> dict[int, int]:
        """Per instance count, the smallest batch size backed off from at ``t``."""
        out: dict[int, int] = {}
        for k, batch, _ in self.backoff_at(t):
            out[k] = min(out.get(k, batch), batch)
        return out


@dataclass(frozen=True)
class History:
    stages: Mapping[str, StageHistory] = field(default_factory=dict)

    def stage(self, name: str) -> StageHistory:
        return self.stages.get(name, StageHistory())

    def to_status(self) -> dict[str, object]:
        return {
            name: {
                "scaleDownWindow": [list(r) for r in h.scale_down_window],
                "lastChange": h.last_change,
                "calibrationPermille": h.calibration_permille,
                "verificationStarted": h.verification_started,
                "rejected": [
                    {"variant": v, "until": until, "reason": why} for v, until, why in h.rejected
                ],
                "batchingBackoff": [
                    {"instances": k, "maxBatchSize": b, "until": until} for k, b, until in h.backoff
                ],
                "batchTimePermille": h.batch_time_permille,
            }
            for name, h in sorted(self.stages.items())
        }

    @classmethod
    def from_status(cls, raw: Mapping[str, object] | None) -> History:
        stages = {}
        for name, h in (raw or {}).items():
            if not isinstance(h, Mapping):
                continue
            # (older operators wrote these as "recommendations" and "trialStarted")
            pairs = h.get("scaleDownWindow", h.get("recommendations")) or []
            window = tuple((int(t), int(r)) for t, r in pairs)
            rejected = tuple(
                (str(r["variant"]), int(r["until"]), str(r.get("reason") or ""))
                for r in h.get("rejected") or []
                if isinstance(r, Mapping)
            )
            backoff = tuple(
                (int(r["instances"]), int(r["maxBatchSize"]), int(r["until"]))
                for r in h.get("batchingBackoff") or []
                if isinstance(r, Mapping)
            )
            stages[name] = StageHistory(
                window,
                h.get("lastChange"),
                int(h.get("calibrationPermille") or 1000),
                h.get("verificationStarted", h.get("trialStarted")),
                rejected,
                backoff,
                int(h.get("batchTimePermille") or 1000),
            )
        return cls(stages)
