"""The reference every policy is measured against.

The oracle knows every arrival of the trace (the very Poisson draw the replay uses) and, for
each minute, pays the least replica cost whose *simulated* p95 meets the SLO in that minute,
with its pods ready the moment it asks. "Meets in that minute" is the bench's own measure:
the p95 of the requests that arrive in the minute, end to end.

The search, per minute:
1. a candidate plan is judged by replaying the minute under it, preceded by ``WARMUP_S`` of
   the arrivals before it (the queues a minute inherits), in the same simulator and with the
   same service-time noise as every policy;
2. the queueing model sizes the pipeline for the minute's peak 10-second mean rate; where
   the replay misses the SLO, for a rate ``ESCALATE`` times higher, until it meets it or
   every stage is at its maximum (then the oracle misses that minute too, and says so).
   This fixes variants and batching;
3. each stage's replicas are then bisected down, the costliest stage first, to the fewest
   that still meet the SLO with the other stage held;
4. the whole trace is replayed under the schedule; a minute that misses the SLO there (a
   queue inherited from a leaner minute, other noise draws) gets ``REPAIR_STEP`` more
   replicas in every stage, for up to ``REPAIR_ROUNDS`` rounds.
A minute without arrivals keeps each stage at its minimum. Minutes are searched in parallel,
each on its own; the result is the least cost this search finds, not a proven optimum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from modelpilot.render.plan import StagePlan
from modelpilot.sim.engine import Config, StageConfig, simulate
from modelpilot.sim.policies import ModelSized, Observation
from modelpilot.sim.traces import Trace

MINUTE_S = 60.0
WARMUP_S = 20.0
ESCALATE = 1.25
REPAIR_STEP = 0.1
REPAIR_ROUNDS = 4

Schedule = list[dict[str, StagePlan]]


class _Hold:
    """Keeps the plan it starts with: never ticks within a replay."""

    name = "hold"
    interval = math.inf
    ready_at_once = True

    def decide_all(
        self,
        obs: Mapping[str, Observation],
        current: Mapping[str, StagePlan],
        e2e_p95_ms: float | None,
    ) -> dict[str, StagePlan]:
        return dict(current)


@dataclass(frozen=True)
class MinuteJudge:
    """Replays one minute of arrivals under a fixed plan and tells whether it meets the SLO."""

    cfg: Config

    def p95_ms(
        self, arrivals: npt.NDArray[np.float64], start: float, plan: Mapping[str, StagePlan]
    ) -> float:
        """p95 of the requests arriving in [start, start + 1 min) under ``plan``; ``arrivals``
        holds them and those of the warm-up before."""
        t0 = max(start - WARMUP_S, 0.0)
        shifted = arrivals - t0
        stages = [replace(s, start=plan[s.name]) for s in self.cfg.stages]
        span = float(shifted[-1]) + 1.0 if len(shifted) else 1.0
        window = Trace("minute", np.zeros(1), np.zeros(1), span)
        result = simulate(window, _Hold(), replace(self.cfg, stages=stages), arrivals=shifted)
        mine = result.latencies_ms[shifted >= start - t0]
        return float(np.percentile(mine, 95)) if len(mine) else 0.0

    def meets(
        self, arrivals: npt.NDArray[np.float64], start: float, plan: Mapping[str, StagePlan]
    ) -> bool:
        return self.p95_ms(arrivals, start, plan) <= self.cfg.slo_ms


def _stage_cost(stage: StageConfig, plan: StagePlan) -> float:
    return plan.replicas * stage.variant_costs.get(plan.variant or "", 1.0)


def cost(plan: Mapping[str, StagePlan], cfg: Config) -> float:
    """Replica cost per hour of ``plan``."""
    return sum(_stage_cost(s, plan[s.name]) for s in cfg.stages)


def _clamped(plan: Mapping[str, StagePlan], cfg: Config) -> dict[str, StagePlan]:
    return {
        s.name: replace(
            plan[s.name], replicas=min(max(plan[s.name].replicas, s.min_replicas), s.max_replicas)
        )
        for s in cfg.stages
    }


def plan_minute(
    judge: MinuteJudge,
    sizer: ModelSized,
    arrivals: npt.NDArray[np.float64],
    start: float,
    peak_rate: float,
) -> dict[str, StagePlan]:
    """The cheapest plan that meets the SLO in the minute from ``start`` (see the module)."""
    cfg = judge.cfg
    names = [s.name for s in cfg.stages]
    limits = {s.name: (s.min_replicas, s.max_replicas) for s in cfg.stages}
    in_minute = arrivals[arrivals >= start]
    if not len(in_minute):
        base = sizer.plans(1, names) or {s.name: s.start for s in cfg.stages}
        return {n: replace(p, replicas=limits[n][0]) for n, p in base.items()}
    rate = max(peak_rate, 1.0)
    plan: dict[str, StagePlan] | None = None
    while True:
        sized = sizer.plans(math.ceil(rate), names)
        if sized is None:  # beyond what the model can size: every stage at its maximum
            base = plan or {s.name: s.start for s in cfg.stages}
            plan = {n: replace(p, replicas=limits[n][1]) for n, p in base.items()}
            if not judge.meets(arrivals, start, plan):
                return plan
            break
        plan = _clamped(sized, cfg)
        if judge.meets(arrivals, start, plan):
            break
        if all(plan[n].replicas >= limits[n][1] for n in names):
            return plan
        rate *= ESCALATE
    held: dict[str, StagePlan] = plan
    by_cost = sorted(cfg.stages, key=lambda s: -_stage_cost(s, held[s.name]))
    for stage in by_cost:
        name = stage.name
        lo, hi = limits[name][0] - 1, plan[name].replicas  # lo fails (or is below min), hi meets
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = {**plan, name: replace(plan[name], replicas=mid)}
            if judge.meets(arrivals, start, trial):
                hi = mid
            else:
                lo = mid
        plan = {**plan, name: replace(plan[name], replicas=hi)}
    return plan


_WORKER: tuple[MinuteJudge, ModelSized] | None = None


def _init_worker(cfg: Config, sizer: ModelSized) -> None:
    global _WORKER
    _WORKER = (MinuteJudge(cfg), sizer)


def _plan_task(task: tuple[float, npt.NDArray[np.float64], float]) -> dict[str, StagePlan]:
    assert _WORKER is not None
    start, arrivals, peak = task
    return plan_minute(_WORKER[0], _WORKER[1], arrivals, start, peak)


def schedule(trace: Trace, cfg: Config, sizer: ModelSized, workers: int = 1) -> Schedule:
    """The oracle's plan for every minute of ``trace``, searched in ``workers`` processes."""
    arrivals = trace.arrivals(cfg.seed)
    peak = trace.peak_mean(10.0)
    tasks = []
    for m in range(math.ceil(trace.duration / MINUTE_S)):
        start = m * MINUTE_S
        lo, hi = np.searchsorted(arrivals, [start - WARMUP_S, start + MINUTE_S])
        tasks.append((start, arrivals[lo:hi], peak(start, start + MINUTE_S)))
    if workers <= 1:
        _init_worker(cfg, sizer)
        plans = [_plan_task(t) for t in tasks]
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(cfg, sizer)) as pool:
            plans = list(pool.map(_plan_task, tasks, chunksize=4))
    limits = {s.name: s.max_replicas for s in cfg.stages}
    for _ in range(REPAIR_ROUNDS):
        missed = [m for m in replay_misses(trace, cfg, plans) if m < len(plans)]
        bump = [m for m in missed if any(p.replicas < limits[n] for n, p in plans[m].items())]
        if not bump:
            break
        for m in bump:
            plans[m] = {
                n: replace(
                    p,
                    replicas=min(
                        limits[n], p.replicas + max(1, math.ceil(p.replicas * REPAIR_STEP))
                    ),
                )
                for n, p in plans[m].items()
            }
    return plans


def replay_misses(trace: Trace, cfg: Config, plans: Schedule) -> list[int]:
    """The minutes whose p95 misses the SLO when the whole trace replays under ``plans``."""
    stages = [replace(s, start=plans[0][s.name]) for s in cfg.stages]
    result = simulate(trace, Oracle(plans), replace(cfg, stages=stages))
    return [m for m, p95 in result.window_p95(MINUTE_S).items() if p95 > cfg.slo_ms]


class Oracle:
    """Replays a :func:`schedule`: each minute's plan from the minute's first second, ready
    at once."""

    name = "oracle"
    ready_at_once = True
    interval = MINUTE_S

    def __init__(self, plans: Sequence[dict[str, StagePlan]]) -> None:
        self.plans = list(plans)

    def decide_all(
        self,
        obs: Mapping[str, Observation],
        current: Mapping[str, StagePlan],
        e2e_p95_ms: float | None,
    ) -> dict[str, StagePlan]:
        minute = int(next(iter(obs.values())).now // MINUTE_S)
        return dict(self.plans[minute]) if minute < len(self.plans) else dict(current)
