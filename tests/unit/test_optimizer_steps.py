"""decide()'s steps one by one, table-driven: variant choice, the verification's progress and
gate, stabilization and the cost budget."""

from __future__ import annotations

from dataclasses import replace

import pytest

from modelpilot.api.v1alpha1 import ModelStage, Verification
from modelpilot.optimizer.budget import enforce_budget
from modelpilot.optimizer.history import StageHistory
from modelpilot.optimizer.sizing import Sizing
from modelpilot.optimizer.snapshot import ShadowStats, Snapshot
from modelpilot.optimizer.stabilize import stabilize
from modelpilot.optimizer.tunables import Tunables
from modelpilot.optimizer.variants import Option, choose
from modelpilot.optimizer.verification import Progress, Verdict, gate_switch, progress
from modelpilot.render import plan as plans
from modelpilot.render.plan import StagePlan
from tests.unit.optimizer_cases import make_spec

pytestmark = pytest.mark.unit

SPEC = make_spec()
EMBEDDING = SPEC.embedding
assert isinstance(EMBEDDING, ModelStage)
VARIANTS = {v.name: v for v in EMBEDDING.variants}  # big (cost 4), small (1), tiny (0.2)
RULES = Verification.model_validate(
    {"sampleRatio": "0.1", "minSamples": 50, "timeoutSeconds": 600, "retryAfterSeconds": 900}
)


def option(name: str, replicas: int, feasible: bool = True, p95: float = 50.0) -> Option:
    v = VARIANTS[name]
    sizing = Sizing(replicas, 8, 1000, p95, 0.5 if feasible else 1.2, feasible)
    return Option(replicas * float(v.cost_value), v, sizing, float(v.quality_value))


# ------------------------------------------------------------------------------- choose
@pytest.mark.parametrize(
    ("options", "serving", "recently", "expected"),
    [
        # the cheapest feasible option serves
        ([("big", 2, True), ("small", 2, True)], None, False, "small"),
        # an infeasible cheaper one does not
        ([("big", 2, True), ("small", 1, False)], None, False, "big"),
        # a switch saving 50% is worth it ...
        ([("big", 1, True), ("small", 2, True)], "big", False, "small"),
        # ... one saving under switch_saving (15%) is not: big 4.0 vs small 3.6
        ([("big", 1, True), ("small", 4, True)], "small", False, "small"),
        ([("big", 1, True), ("small", 4, True), ("tiny", 18, True)], "small", False, "small"),
        # too soon after the last change, even a large saving waits
        ([("big", 2, True), ("tiny", 1, True)], "big", True, "big"),
        # a serving variant that no longer fits is left at once, however recent the change
        ([("big", 2, False), ("small", 2, True)], "big", True, "small"),
        # nothing fits: the least bad (not saturated, lowest p95) serves
        ([("big", 4, False), ("small", 4, False)], "small", False, "big"),
    ],
)
def test_choose_variant(
    options: list[tuple[str, int, bool]], serving: str | None, recently: bool, expected: str
) -> None:
    opts = [option(n, r, f, p95=50.0 if n == "big" else 80.0) for n, r, f in options]
    pick, current = choose(opts, serving, recently, Tunables())
    assert pick[1].name == expected
    assert (current[1].name if current else None) == serving


# ----------------------------------------------------------------------------- progress
T0 = 1_000_000


def snapshot_with(stats: ShadowStats | None) -> Snapshot:
    shadow = {("embedding", "emb_small"): stats} if stats else {}
    return Snapshot(time=T0, newest_sample=T0, stages={}, shadow=shadow)


@pytest.mark.parametrize(
    ("stats", "waited", "action", "shadow_after", "rejected"),
    [
        (ShadowStats(samples=80, errors=0, agreement=0.99, p95_ms=20.0), 120, "promote", None, []),
        (
            ShadowStats(samples=80, errors=0, agreement=0.5, p95_ms=20.0),
            120,
            "reject",
            None,
            ["small"],
        ),
        (
            ShadowStats(samples=80, errors=0, agreement=0.99, p95_ms=500.0),
            120,
            "reject",
            None,
            ["small"],
        ),
        (ShadowStats(samples=10, errors=0, agreement=0.99, p95_ms=20.0), 120, "wait", "small", []),
        (
            ShadowStats(samples=10, errors=0, agreement=0.99, p95_ms=20.0),
            700,
            "reject",
            None,
            ["small"],
        ),
        (
            ShadowStats(samples=80, errors=5, agreement=0.99, p95_ms=20.0),
            120,
            "reject",
            None,
            ["small"],
        ),
        # without minAgreement, the candidate needs the quality floor (0.9 here)
        (ShadowStats(80, 0.91, 20.0), 120, "promote", None, []),
        (ShadowStats(80, 0.89, 20.0), 120, "reject", None, ["small"]),
    ],
)
def test_progress_of_a_running_verification(
    stats: ShadowStats,
    waited: int,
    action: str,
    shadow_after: str | None,
    rejected: list[str],
) -> None:
    cur = StagePlan(2, "big", 8, 1000, "small")
    hist = StageHistory(verification_started=T0 - waited)
    got = progress(
        "embedding",
        EMBEDDING,
        cur,
        hist,
        snapshot_with(stats),
        100.0,
        10.0,
        1.0,
        T0,
        RULES,
        Tunables(),
        0.9,
    )
    assert got.verdict is not None and got.verdict.action == action
    assert got.shadow == shadow_after
    assert got.candidate == "small"
    assert sorted(got.history.rejected_at(T0)) == rejected
    if action == "wait":
        assert got.history.verification_started == T0 - waited
        assert got.event is None
    else:
        assert got.history.verification_started is None
    if rejected:
        assert got.event is not None and got.event[0] == "rejected"
        assert got.history.rejected[0][1] == T0 + RULES.retry_after_seconds


def test_progress_without_a_verification_changes_nothing() -> None:
    hist = StageHistory(last_change=5)
    got = progress(
        "embedding",
        EMBEDDING,
        StagePlan(2, "big", 8, 1000),
        hist,
        snapshot_with(None),
        100.0,
        10.0,
        1.0,
        T0,
        RULES,
        Tunables(),
        0.9,
    )
    assert (got.shadow, got.verdict, got.history, got.reason) == (None, None, hist, None)


def test_a_restored_verification_without_its_start_starts_counting_now() -> None:
    got = progress(
        "embedding",
        EMBEDDING,
        StagePlan(2, "big", 8, 1000, "small"),
        StageHistory(),
        snapshot_with(None),
        100.0,
        10.0,
        1.0,
        T0,
        RULES,
        Tunables(),
        0.9,
    )
    assert got.verdict is not None and got.verdict.action == "wait"
    assert got.history.verification_started == T0


# -------------------------------------------------------------------------- gate_switch
BIG, SMALL, TINY = option("big", 2), option("small", 2), option("tiny", 2)


def running(action: str | None, shadow: str | None = None) -> Progress:
    verdict = Verdict(action, "because") if action else None  # type: ignore[arg-type]
    return Progress(shadow, verdict, StageHistory(), candidate="small" if action else None)


@pytest.mark.parametrize(
    ("pick", "current", "run", "gated", "rate", "serves", "shadow", "started", "event"),
    [
        # a better variant starts its verification; the serving one stays
        (SMALL, BIG, running(None), True, 10.0, "big", "small", True, "started"),
        # ... unless verification is off (Recommend mode, or disabled): it serves at once
        (SMALL, BIG, running(None), False, 10.0, "small", None, False, None),
        # ... or the rate cannot bring minSamples by the timeout: stay, with the reason
        (SMALL, BIG, running(None), True, 0.0, "big", None, False, None),
        # while a verification runs, the serving variant stays, whatever the sizing picked
        (TINY, BIG, running("wait", "small"), True, 10.0, "big", "small", False, None),
        # a promoted candidate serves
        (BIG, BIG, running("promote"), True, 10.0, "small", None, False, "promoted"),
        # after a rejection, the next better variant may start (the rejected one is excluded
        # from the options upstream)
        (TINY, BIG, running("reject"), True, 10.0, "big", "tiny", True, "started"),
        # nothing to switch: nothing starts
        (BIG, BIG, running(None), True, 10.0, "big", None, False, None),
        # no serving option (e.g. under the quality floor): the pick serves unverified
        (SMALL, None, running(None), True, 10.0, "small", None, False, None),
    ],
)
def test_gate_switch(
    pick: Option,
    current: Option | None,
    run: Progress,
    gated: bool,
    rate: float,
    serves: str,
    shadow: str | None,
    started: bool,
    event: str | None,
) -> None:
    got = gate_switch(
        "embedding",
        pick,
        current,
        [BIG, SMALL, TINY],
        run,
        "big",
        RULES,
        gated,
        rate,
        1.0,
        100.0,
    )
    assert got.pick[1].name == serves
    assert got.shadow == shadow
    assert got.started == started
    assert (got.event[0] if got.event else None) == event
    blocked = gated and rate == 0.0 and run.verdict is None and pick is not current
    assert (got.reason is not None) == (event is not None or blocked)
    if blocked:
        assert got.reason is not None and "cannot be verified now" in got.reason


# ---------------------------------------------------------------------------- stabilize
@pytest.mark.parametrize(
    ("current", "desired", "window", "last_change", "expected"),
    [
        (2, 9, (), None, 6),  # up at once, at most maxScaleUpStep (4)
        (2, 3, (), None, 3),
        (5, 2, ((T0 - 100, 5),), None, 5),  # down: the window's highest need still 5
        (5, 2, ((T0 - 400, 5),), None, 2),  # ... that need left the 300 s window
        (5, 2, ((T0 - 100, 3),), None, 3),  # down to the window's highest need
        (5, 2, (), T0 - 10, 5),  # not within the cooldown of the last change
        (3, 3, ((T0 - 100, 7),), None, 3),
    ],
)
def test_stabilize(
    current: int,
    desired: int,
    window: tuple[tuple[int, int], ...],
    last_change: int | None,
    expected: int,
) -> None:
    hist = StageHistory(scale_down_window=window, last_change=last_change)
    reasons: list[str] = []
    got, after = stabilize("embedding", current, desired, hist, T0, SPEC, 30, reasons)
    assert got == expected
    assert bool(reasons) == (got != current)
    assert after.scale_down_window[-1] == (T0, desired)
    assert all(T0 - t < 300 for t, _ in after.scale_down_window)


def test_stabilize_remembers_the_measured_need_not_the_forecast() -> None:
    got, after = stabilize("embedding", 2, 6, StageHistory(), T0, SPEC, 30, [], remember=3)
    assert got == 6
    assert after.scale_down_window == ((T0, 3),)


@pytest.mark.parametrize(
    ("current", "desired", "expected"),
    [
        (40, 43, 40),  # within 10%: a need wandering around a steady load moves nothing
        (40, 45, 44),  # beyond it, up at once (at most maxScaleUpStep, 4)
        (40, 37, 40),
        (40, 35, 35),  # down past the tolerance (the window's highest need is 35)
        (3, 4, 4),  # a small stage still moves by one
        (3, 2, 2),
    ],
)
def test_stabilize_ignores_changes_within_the_tolerance(
    current: int, desired: int, expected: int
) -> None:
    got, _ = stabilize("embedding", current, desired, StageHistory(), T0, SPEC, 0, [], None, 0.1)
    assert got == expected


# ------------------------------------------------------------------------------- budget
def budget_plan(emb: tuple[int, str], inf: tuple[int, str]) -> plans.Plan:
    plan = plans.initial(SPEC)
    plan["embedding"] = replace(plan["embedding"], replicas=emb[0], variant=emb[1])
    plan["inference"] = replace(plan["inference"], replicas=inf[0], variant=inf[1])
    return plan


@pytest.mark.parametrize(
    ("emb", "inf", "limit", "excluded", "expected", "cost"),
    [
        # within the budget: untouched
        ((2, "big"), (1, "big"), 20.0, {}, ((2, "big"), (1, "big")), 16.0),
        # over: the cheapest variant at or above the floor (0.9) first; tiny (0.8) is not
        # (stage by stage, only while still over: the embedding's switch is enough here)
        ((2, "big"), (1, "big"), 10.0, {}, ((2, "small"), (1, "big")), 10.0),
        # a variant that failed verification is never forced
        ((2, "big"), (1, "big"), 10.0, {"embedding": {"small"}}, ((2, "big"), (1, "small")), 10.0),
        # then replicas, the costliest replica first, never below min
        ((6, "small"), (4, "small"), 9.0, {}, ((6, "small"), (1, "small")), 8.0),
    ],
)
def test_enforce_budget(
    emb: tuple[int, str],
    inf: tuple[int, str],
    limit: float,
    excluded: dict[str, set[str]],
    expected: tuple[tuple[int, str], tuple[int, str]],
    cost: float,
) -> None:
    plan = budget_plan(emb, inf)
    per_replica = {"big": 4.0, "small": 1.0}, {"big": 8.0, "small": 2.0}  # from SPEC_DOC
    start = per_replica[0][emb[1]] * emb[0] + per_replica[1][inf[1]] * inf[0]
    reasons: list[str] = []
    new, total, note = enforce_budget(SPEC, plan, start, limit, reasons, excluded)
    got = tuple((new[s].replicas, new[s].variant) for s in ("embedding", "inference"))
    assert got == expected
    assert total == pytest.approx(cost)
    assert (note is None) == (start <= limit)
    assert total <= limit or note is not None
