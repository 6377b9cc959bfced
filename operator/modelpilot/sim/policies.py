"""The policies the simulator compares: ModelPilot's own optimizer (imported, never copied)
and what users run today, re-implemented from their documented rules
(``shared/reference/autoscaling-baselines.md``): HPA on CPU, KEDA on a Prometheus rate, the
Knative KPA, a static peak provisioning and a perfect-foresight oracle."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from modelpilot import plan as plans
from modelpilot.api.v1alpha1 import ModelDeploymentSpec
from modelpilot.optimizer.policy import History, Tunables, decide, size_model_stage
from modelpilot.optimizer.profiles import Profiles
from modelpilot.optimizer.snapshot import Snapshot, StageTelemetry

STAGE = "embedding"


@dataclass(frozen=True)
class Observation:
    """What a policy can see at a tick, as a cluster would show it."""

    now: float
    ready: int  # ready replicas
    replicas: int  # desired replicas currently set (ready + starting)
    rate_stable: float | None  # requests/s over the stable window (60 s)
    rate_panic: float | None  # requests/s over the panic window (6 s)
    rate_short: float | None  # requests/s over 15 s (what the operator's short query sees)
    p95_ms: float | None  # over the last 60 s
    cpu_utilisation: float | None  # busy / ready capacity over the last 60 s
    concurrency_stable: float | None  # mean in-flight requests (Little's law), 60 s
    concurrency_panic: float | None  # the same over 6 s
    batch_size: float | None


@dataclass(frozen=True)
class Action:
    replicas: int
    variant: str | None = None
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None


class Policy:
    name = "policy"
    interval = 15.0

    def decide(self, obs: Observation, current: Action) -> Action:
        raise NotImplementedError


def _clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


@dataclass
class HPA(Policy):
    """autoscaling/v2 on CPU at ``target`` utilisation with the default behaviour."""

    min_replicas: int
    max_replicas: int
    target: float = 0.7
    tolerance: float = 0.1
    down_window: float = 300.0
    name: str = "hpa"
    interval: float = 15.0
    history: deque[tuple[float, int]] = field(default_factory=deque)

    def recommend(self, obs: Observation) -> int:
        if obs.cpu_utilisation is None:
            return obs.replicas
        ratio = obs.cpu_utilisation / self.target
        if abs(1 - ratio) <= self.tolerance:
            return obs.replicas
        return math.ceil(ratio * obs.ready) if obs.ready else obs.replicas

    def stabilize(self, now: float, current: int, desired: int) -> int:
        if not self.history:  # as upstream: a new autoscaler remembers the current count
            self.history.append((now, current))
        self.history.append((now, desired))
        while self.history and now - self.history[0][0] > self.down_window:
            self.history.popleft()
        if desired < current:  # scale-down: the highest recommendation over the window
            desired = min(current, max(r for _, r in self.history))
        # default rate limits: up max(4 pods, +100%) per 15 s; down 100% per 15 s
        desired = min(desired, max(current + 4, 2 * current))
        return _clamp(desired, self.min_replicas, self.max_replicas)

    def decide(self, obs: Observation, current: Action) -> Action:
        return Action(self.stabilize(obs.now, obs.replicas, self.recommend(obs)))


@dataclass
class KEDA(HPA):
    """The KEDA Prometheus scaler: AverageValue target ``threshold`` requests/s per replica,
    fed to the HPA (same tolerance, stabilization and rate limits), polled every 30 s."""

    threshold: float = 30.0
    name: str = "keda"
    interval: float = 30.0

    def recommend(self, obs: Observation) -> int:
        # ignoreNullValues (the default): a missing value counts as 0
        value = 0.0 if obs.rate_stable is None else obs.rate_stable
        ratio = value / (self.threshold * max(obs.replicas, 1))
        if abs(1 - ratio) <= self.tolerance:
            return obs.replicas
        return math.ceil(value / self.threshold)


@dataclass
class KPA(Policy):
    """Knative's KPA on concurrency: stable 60 s / panic 6 s windows, ticks every 2 s."""

    min_replicas: int
    max_replicas: int
    container_concurrency: float = 1.0
    target_utilisation: float = 0.7
    panic_threshold: float = 2.0
    stable_window: float = 60.0
    name: str = "kpa"
    interval: float = 2.0
    panic_until: float | None = None
    panic_max: int = 0

    def decide(self, obs: Observation, current: Action) -> Action:
        target = self.container_concurrency * self.target_utilisation
        ready = max(1, obs.ready)
        max_up, max_down = math.ceil(1000 * ready), math.floor(ready / 2)
        stable = obs.concurrency_stable or 0.0
        panic = obs.concurrency_panic if obs.concurrency_panic is not None else stable
        dspc = _clamp(math.ceil(stable / target), max_down, max_up)
        dppc = _clamp(math.ceil(panic / target), max_down, max_up)
        if dppc / ready >= self.panic_threshold:
            self.panic_until = obs.now + self.stable_window
        if self.panic_until is not None and obs.now >= self.panic_until:
            self.panic_until, self.panic_max = None, 0
        if self.panic_until is not None:
            self.panic_max = max(self.panic_max, dspc, dppc, obs.replicas)
            desired = self.panic_max
        else:
            desired = dspc
        return Action(_clamp(desired, self.min_replicas, self.max_replicas))


@dataclass
class StaticPeak(Policy):
    """Provisioned once for the trace's peak rate at ``utilisation``."""

    replicas: int
    name: str = "static-peak"
    interval: float = 15.0

    def decide(self, obs: Observation, current: Action) -> Action:
        return Action(self.replicas)


class ModelPilot(Policy):
    """The operator's optimizer, called exactly as the operator calls it."""

    name = "modelpilot"

    def __init__(
        self, spec: ModelDeploymentSpec, profiles: Profiles, other_stages_p95_ms: float = 2.0
    ) -> None:
        self.spec = spec
        self.profiles = profiles
        self.interval = float(spec.optimizer.interval_seconds)
        self.plan = plans.initial(spec)
        self.history = History()
        self.other_p95 = other_stages_p95_ms

    def snapshot(self, obs: Observation) -> Snapshot:
        stages = {
            STAGE: StageTelemetry(
                rate_rps=obs.rate_stable,
                rate_short_rps=obs.rate_short,
                p95_ms=obs.p95_ms,
                batch_size=obs.batch_size,
                cpu_utilisation=obs.cpu_utilisation,
            ),
            # The simulator models the embedding stage; the others are fast and held.
            "retrieval": StageTelemetry(p95_ms=self.other_p95),
            "inference": StageTelemetry(p95_ms=self.other_p95),
        }
        return Snapshot(time=obs.now, newest_sample=obs.now, stages=stages, e2e_p95_ms=obs.p95_ms)

    def decide(self, obs: Observation, current: Action) -> Action:
        d = decide(self.spec, self.plan, self.snapshot(obs), self.history, self.profiles, obs.now)
        self.plan, self.history = d.plan, d.history
        p = d.plan[STAGE]
        return Action(p.replicas, p.variant, p.max_batch_size, p.max_queue_delay_us)


class Oracle(Policy):
    """Perfect foresight: every tick, the cheapest allowed variant and fewest replicas that
    the queueing model says meet the SLO for the highest rate of the coming interval, ready
    at once (no start-up delay). A lower bound on cost at full attainment."""

    name = "oracle"

    def __init__(
        self,
        spec: ModelDeploymentSpec,
        profiles: Profiles,
        future_max: object,
        interval: float = 15.0,
    ) -> None:
        self.spec = spec
        self.profiles = profiles
        self.future_max = future_max  # callable (start, end) -> max rate
        self.interval = interval
        self.tun = Tunables()

    def decide(self, obs: Observation, current: Action) -> Action:
        stage = self.spec.embedding
        rate = self.future_max(obs.now, obs.now + self.interval)  # type: ignore[operator]
        floor = float(self.spec.slo.min_quality_value)
        best: tuple[float, Action] | None = None
        budget = self.spec.slo.latency_p95_ms * self.tun.slo_headroom
        for v in stage.variants:
            prof = self.profiles.model(v.model)
            if prof is None or float(v.quality_value) < floor:
                continue
            s = size_model_stage(
                prof,
                rate,
                budget,
                1.0,
                (stage.replicas.min, stage.replicas.max),
                stage.batching.max_batch_size,
                stage.batching.max_queue_delay_microseconds,
                self.tun,
            )
            cost = s.replicas * float(v.cost_value)
            if s.feasible and (best is None or cost < best[0]):
                best = (cost, Action(s.replicas, v.name, s.max_batch_size, s.max_queue_delay_us))
        return best[1] if best else current
