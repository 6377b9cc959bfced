"""The policies the simulator compares: ModelPilot's own optimizer (imported, never copied)
and what users run today, re-implemented from their documented rules (the Kubernetes HPA
algorithm, KEDA's Prometheus scaler, Knative's KPA): HPA on CPU, KEDA on a Prometheus rate, the
Knative KPA, a static peak provisioning, and the queueing model's sizing for the exact
recent rate (the reference with perfect foresight is ``oracle.py``)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

from modelpilot.api.v1alpha1 import ModelDeploymentSpec
from modelpilot.optimizer.history import History
from modelpilot.optimizer.policy import decide
from modelpilot.optimizer.profiles import Profiles
from modelpilot.optimizer.quality import assess_all
from modelpilot.optimizer.sizing import stage_sizer
from modelpilot.optimizer.snapshot import Agreement, RateHistory, Snapshot, StageTelemetry
from modelpilot.optimizer.tunables import Tunables
from modelpilot.optimizer.variants import cheapest, variant_options
from modelpilot.render import plan as plans
from modelpilot.render.plan import StagePlan


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
    batch_size: float | None  # items per batch started in the last 60 s
    arrival_dispersion: float | None = None  # per-second counts' variance / mean, 300 s
    exec_ms: float | None = None  # mean service time of the batches started in the last 60 s
    rate_history: RateHistory | None = None  # for seasonal forecasts (Config.seasons)


class Policy:
    name = "policy"
    interval = 15.0

    def decide(self, obs: Observation, current: StagePlan) -> StagePlan:
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

    def decide(self, obs: Observation, current: StagePlan) -> StagePlan:
        return StagePlan(self.stabilize(obs.now, obs.replicas, self.recommend(obs)))


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

    def decide(self, obs: Observation, current: StagePlan) -> StagePlan:
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
        return StagePlan(_clamp(desired, self.min_replicas, self.max_replicas))


@dataclass
class StaticPeak(Policy):
    """Provisioned once for the trace's peak rate at ``utilisation``."""

    replicas: int
    name: str = "static-peak"
    interval: float = 15.0

    def decide(self, obs: Observation, current: StagePlan) -> StagePlan:
        return StagePlan(self.replicas)


class PerStage:
    """One independent autoscaler per stage Deployment, as users run HPA, KEDA or the KPA."""

    def __init__(self, policies: Mapping[str, Policy]) -> None:
        self.policies = dict(policies)
        first = next(iter(self.policies.values()))
        self.name, self.interval = first.name, first.interval
        self.ready_at_once = False

    def decide_all(
        self,
        obs: Mapping[str, Observation],
        current: Mapping[str, StagePlan],
        e2e_p95_ms: float | None,
    ) -> dict[str, StagePlan]:
        return {s: p.decide(obs[s], current[s]) for s, p in self.policies.items()}


class ModelPilot:
    """The operator's optimizer, called exactly as the operator calls it: one decision for
    every stage from every stage's telemetry."""

    name = "modelpilot"
    ready_at_once = False

    def __init__(
        self,
        spec: ModelDeploymentSpec,
        profiles: Profiles,
        items: Mapping[str, float],
        fixed_p95_ms: Mapping[str, float],
    ) -> None:
        self.spec = spec
        self.profiles = profiles
        self.interval = float(spec.optimizer.interval_seconds)
        self.plan = plans.initial(spec)
        self.history = History()
        self.items = dict(items)  # what Triton's statistics report per stage
        self.fixed = dict(fixed_p95_ms)  # stages replayed as a fixed latency (retrieval)
        # What the gateway's sampled comparisons report: the small re-ranker's measured
        # agreement with the large one (the profile's quality against it), once it routes.
        self.routing: Agreement | None = None
        routing = spec.inference.routing
        if routing.mode != "Off" and routing.small_variant:
            small = spec.inference.variant(routing.small_variant)
            prof = profiles.model(small.model) if small else None
            if prof is not None and prof.quality is not None:
                self.routing = Agreement(10_000, prof.quality)

    def snapshot(self, obs: Mapping[str, Observation], e2e_p95_ms: float | None) -> Snapshot:
        now = next(iter(obs.values())).now
        stages = {
            name: StageTelemetry(
                rate_rps=o.rate_stable,
                rate_short_rps=o.rate_short,
                p95_ms=o.p95_ms,
                batch_size=o.batch_size,
                cpu_utilisation=o.cpu_utilisation,
                items_per_request=self.items.get(name),
                arrival_dispersion=o.arrival_dispersion,
                exec_ms=o.exec_ms,
                rate_history=o.rate_history,
            )
            for name, o in obs.items()
        }
        stages.update({name: StageTelemetry(p95_ms=ms) for name, ms in self.fixed.items()})
        return Snapshot(
            time=now,
            newest_sample=now,
            stages=stages,
            e2e_p95_ms=e2e_p95_ms,
            routing=self.routing,
        )

    def decide_all(
        self,
        obs: Mapping[str, Observation],
        current: Mapping[str, StagePlan],
        e2e_p95_ms: float | None,
    ) -> dict[str, StagePlan]:
        snap = self.snapshot(obs, e2e_p95_ms)
        d = decide(self.spec, self.plan, snap, self.history, self.profiles, snap.time)
        self.plan, self.history = d.plan, d.history
        out = {}
        for name in obs:
            p = d.plan[name]
            out[name] = StagePlan(
                p.replicas,
                p.variant,
                p.max_batch_size,
                p.max_queue_delay_us,
                small_share=p.small_share,
            )
        return out


class ModelSized:
    """Sizes the pipeline for a known rate with the optimizer's queueing model: the cheapest
    allowed variants and fewest replicas the model says meet the SLO, over every split of the
    latency budget between the stages (10% steps). ``rate(start, end)`` tells it the rate to
    size each interval for; as a policy its pods pay the start-up delay."""

    name = "model-sized"
    ready_at_once = False

    def __init__(
        self,
        spec: ModelDeploymentSpec,
        profiles: Profiles,
        rate: Callable[[float, float], float],
        items: Mapping[str, float],
        fixed_ms: float = 0.0,
        interval: float = 15.0,
    ) -> None:
        self.spec = spec
        self.profiles = profiles
        self.rate = rate
        self.items = dict(items)
        self.fixed_ms = fixed_ms  # latency of the stages not replayed as queues
        self.interval = interval
        self.tun = Tunables()
        # the variants' qualities as ModelPilot assesses them
        self.quality = assess_all(spec, profiles, self.tun)
        # (stage, rate, budget) -> its cheapest sizing: whole-rps rates repeat a lot.
        self._sized: dict[tuple[str, int, float], tuple[float, StagePlan]] = {}

    def _cheapest(self, stage_name: str, rate: int, budget_ms: float) -> tuple[float, StagePlan]:
        key = (stage_name, rate, budget_ms)
        if key not in self._sized:
            self._sized[key] = self._size(stage_name, rate, budget_ms)
        return self._sized[key]

    def _size(self, stage_name: str, rate: int, budget_ms: float) -> tuple[float, StagePlan]:
        stage = self.spec.model_stage(stage_name)
        size = stage_sizer(stage, budget_ms, 1.0, self.tun, self.items.get(stage_name, 1.0))
        floor = float(self.spec.slo.min_quality_value)
        sized = partial(size, rate=rate)
        quality = self.quality[stage_name]
        options = cheapest(variant_options(stage, self.profiles, floor, sized, quality=quality))
        if not options:
            return math.inf, StagePlan(stage.replicas.max)
        best = options[0]
        s = best.sizing
        return best.cost, StagePlan(
            s.replicas,
            best.variant.name,
            s.max_batch_size,
            s.max_queue_delay_us,
            instances=s.instances,
        )

    def plans(self, rate: int, stages: list[str]) -> dict[str, StagePlan] | None:
        """The cheapest plan per stage for ``rate`` requests/s (whole, rounded up: sizings
        are reused), or None where no allowed variant meets the SLO at any replica count."""
        total = self.spec.slo.latency_p95_ms * self.tun.slo_headroom - self.fixed_ms
        splits = [(1.0,)] if len(stages) == 1 else [(s / 10, 1 - s / 10) for s in range(1, 10)]
        best: tuple[float, dict[str, StagePlan]] | None = None
        for shares in splits:
            picks = [
                self._cheapest(n, rate, round(total * f, 3))
                for n, f in zip(stages, shares, strict=True)
            ]
            cost = sum(c for c, _ in picks)
            if best is None or cost < best[0]:
                best = (cost, {n: a for n, (_, a) in zip(stages, picks, strict=True)})
        assert best is not None
        return None if math.isinf(best[0]) else best[1]

    def decide_all(
        self,
        obs: Mapping[str, Observation],
        current: Mapping[str, StagePlan],
        e2e_p95_ms: float | None,
    ) -> dict[str, StagePlan]:
        now = next(iter(obs.values())).now
        sized = self.plans(math.ceil(self.rate(now, now + self.interval)), list(obs))
        return dict(current) if sized is None else sized


class Reactive(ModelSized):
    """The queueing model's sizing for the exact mean rate of the last seconds
    (``Trace.past_mean``): no scrape lag, no noise, no foresight, and pods that take the
    start-up delay every online policy's take. What reacting perfectly attains when a burst
    cannot be seen coming, at the queueing model's cost."""

    name = "reactive"
