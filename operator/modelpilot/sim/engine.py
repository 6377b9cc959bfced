"""Discrete-event replay of a serving pipeline under a policy.

Requests arrive as a Poisson process from the trace and pass the pipeline's stages in order
(embedding -> retrieval -> re-ranking). Each stage is its own FCFS queue served by its own
replicas (a Service spreading load over Triton pods). A free replica forms a batch with
Triton's dynamic-batching rule: it sends as soon as the batch is full (``max_batch_size``
counts items, and a request carries ``items`` of them: a re-ranked query is all its
candidate pairs), or when the oldest request has waited ``max_queue_delay``. A batch of
``b`` items takes the variant's measured latency at ``b`` times log-normal noise fitted to
that variant's measured p95/p50. A request leaving a stage reaches the next one ``hop_ms`` later
(a fixed-latency step between them, e.g. the ANN search). New replicas are ready only after
``startup_s``; a variant switch is a surge rollout. A stage that routes (the re-ranker with
a small share in its plan) serves that share of each batch's requests with the small
variant's measured latency and the rest with the large one's, one after the other on the
replica's core, as Triton's two models' batchers would. A replica runs one model instance
(a plan of more is refused: the specs it replays leave ``maxInstances`` at 1). Policies
observe each stage's windowed metrics at their own tick interval as of the last scrape, as
they would from Prometheus.

The stages advance together tick by tick: up to a tick, a stage dispatches only batches
whose dispatch time it can already decide, then hands its finished requests to the next
stage. The loop moves a batch at a time (not a request at a time), which is what lets a
4-hour trace at 1 s resolution replay under every policy within a minute.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

from modelpilot.optimizer.profiles import ModelProfile
from modelpilot.optimizer.snapshot import (
    BURST_WINDOW_S,
    HISTORY_AHEAD_S,
    HISTORY_LOOKBACK_S,
    HISTORY_STEP_S,
    SHORT_RATE_WINDOW_S,
    RateHistory,
    SeasonWindow,
)
from modelpilot.render.plan import StagePlan
from modelpilot.sim.policies import Observation
from modelpilot.sim.traces import Trace


@dataclass
class StageConfig:
    name: str
    variant_models: dict[str, ModelProfile]
    variant_costs: dict[str, float]  # variant name -> cost per replica-hour
    start: StagePlan
    items: int = 1  # Triton items per request (texts, query-passage pairs)
    hop_ms: float = 0.0  # fixed latency before the next stage
    min_replicas: int = 1
    max_replicas: int = 64
    routes: tuple[str, str] | None = None  # (small, large) variants, when the stage routes


@dataclass
class Config:
    slo_ms: float
    stages: list[StageConfig]
    startup_s: float = 20.0
    scrape_s: float = 15.0  # policies see metrics as of the last Prometheus scrape
    service: str = "lognormal"  # or "exponential" (M/M/c validation)
    seed: int = 7
    # Seasons (s) whose rate history policies see, as the operator reads its days and weeks
    # from Prometheus; none by default.
    seasons: tuple[int, ...] = ()


class PipelinePolicy(Protocol):
    name: str
    interval: float
    ready_at_once: bool  # its replicas skip the pod start-up delay (the oracle's alone)

    def decide_all(
        self,
        obs: Mapping[str, Observation],
        current: Mapping[str, StagePlan],
        e2e_p95_ms: float | None,
    ) -> dict[str, StagePlan]: ...


@dataclass
class Result:
    policy: str
    latencies_ms: npt.NDArray[np.float64]  # end to end, per request
    arrivals: npt.NDArray[np.float64]
    cost: float  # sum of replica-seconds x variant cost, per hour units
    actions: int
    timeline: dict[str, list[float]] = field(default_factory=dict)
    variant_seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    small_share: dict[str, float] = field(default_factory=dict)  # stage -> share routed small

    def attainment(self, slo_ms: float) -> float:
        return float(np.mean(self.latencies_ms <= slo_ms)) if len(self.latencies_ms) else 1.0

    def window_p95(self, window_s: float = 60.0) -> dict[int, float]:
        """p95 end-to-end latency of the requests arriving in each window (by index from
        0), for the windows that have any."""
        if not len(self.arrivals):
            return {}
        buckets = (self.arrivals // window_s).astype(np.int64)
        order = np.argsort(buckets, kind="stable")
        b, lat = buckets[order], self.latencies_ms[order]
        edges = np.flatnonzero(np.diff(b)) + 1
        return {
            int(chunk_b[0]): float(np.percentile(chunk, 95))
            for chunk_b, chunk in zip(np.split(b, edges), np.split(lat, edges), strict=True)
        }

    def window_attainment(self, slo_ms: float, window_s: float = 60.0) -> float:
        """Share of 1-minute windows (by arrival) whose p95 meets the SLO."""
        p95 = self.window_p95(window_s)
        return float(np.mean([v <= slo_ms for v in p95.values()])) if p95 else 1.0


class _Replica:
    __slots__ = ("created", "ready_at", "retire_at", "variant")

    def __init__(self, variant: str, created: float, ready_at: float) -> None:
        self.variant, self.created, self.ready_at = variant, created, ready_at
        self.retire_at: float | None = None


def _window_stats(
    arr: list[float], start: npt.NDArray[np.float64], end: npt.NDArray[np.float64], now: float
) -> tuple[float | None, float | None]:
    """(p95 ms, mean s) of requests that arrived in the last 90 s and finished in the last 60
    (``arr`` the arrivals as a list for bisect, ``start`` the same as an array)."""
    window = slice(bisect.bisect_left(arr, now - 90.0), bisect.bisect_right(arr, now))
    ends = end[window]
    done = (ends <= now) & (ends > now - 60.0)
    if not done.any():
        return None, None
    recent = (ends[done] - start[window][done]) * 1000
    return float(np.percentile(recent, 95)), float(recent.mean()) / 1000


class _Stage:
    """One stage's queue, replicas and bill."""

    def __init__(
        self, cfg: StageConfig, n: int, seconds: int, noise: dict[str, npt.NDArray[np.float64]]
    ):
        self.cfg = cfg
        self.arr: list[float] = []  # arrival times at this stage, ascending
        self.rid: list[int] = []  # request id of each arrival
        self.arr_np = np.zeros(n)  # the same arrivals as an array
        self.end = np.full(n, np.inf)  # when each arrival left this stage
        self.busy = np.zeros(seconds + 2)  # service seconds of the batches started each second
        self.batches = np.zeros(seconds + 2)  # batches started each second
        self.batch_items_at = np.zeros(seconds + 2)  # their items
        self.noise, self.noise_i = noise, 0
        # (variant, requests in the batch, of them small) -> median service seconds: millions of
        # batches draw from a few hundred distinct sizes, and interpolating each cost a fifth
        # of a run.
        self.service_s: dict[tuple[str, int, int], float] = {}
        self.replicas: dict[int, _Replica] = {}
        self.heap: list[tuple[float, int]] = []  # (free at, replica id)
        self.next_id = 0
        self.current = cfg.start
        self.head = 0
        self.intervals: list[tuple[float, float, str]] = []  # (created, removed, variant)
        self.finished: list[tuple[float, int, int]] = []  # (finish, first index, count)
        self.actions = 0
        self.small = 0  # requests served by the small route
        # which requests route small
        self.route_rng = np.random.default_rng(len(next(iter(noise.values()))))
        self.add(cfg.start.replicas, cfg.start.variant or "", 0.0, 0.0)

    def add(self, count: int, variant: str, now: float, delay: float) -> None:
        for _ in range(count):
            self.replicas[self.next_id] = _Replica(variant, now, now + delay)
            heapq.heappush(self.heap, (now + delay, self.next_id))
            self.next_id += 1

    def live(self, now: float) -> list[_Replica]:
        return [r for r in self.replicas.values() if r.retire_at is None or r.retire_at > now]

    def feed(self, times: list[float], ids: list[int]) -> None:
        self.arr_np[len(self.arr) : len(self.arr) + len(times)] = times
        self.arr.extend(times)
        self.rid.extend(ids)

    def counted(self) -> int:
        """Pods the Deployment counts: those not being retired (every one of them is live)."""
        return sum(1 for r in self.replicas.values() if r.retire_at is None)

    def observe(self, now: float, seasons: tuple[int, ...] = ()) -> Observation:
        arr = self.arr
        hi = bisect.bisect_right(arr, now)
        span = max(now, 1.0)
        rate60 = (hi - bisect.bisect_left(arr, now - 60.0)) / min(60.0, span)
        rate6 = (hi - bisect.bisect_left(arr, now - 6.0)) / min(6.0, span)
        short = float(SHORT_RATE_WINDOW_S)
        rate_short = (hi - bisect.bisect_left(arr, now - short)) / min(short, span)
        p95, mean_lat = _window_stats(arr, self.arr_np, self.end, now)
        live = self.live(now)
        ready = sum(1 for r in live if r.ready_at <= now)
        s0 = max(0, int(now) - 60)
        capacity = max(ready, 1) * (int(now) - s0 if int(now) > s0 else 1)
        busy = float(self.busy[s0 : int(now)].sum())
        util = busy / capacity if now >= 1 else None
        batches = float(self.batches[s0 : int(now)].sum())
        return Observation(
            now,
            ready,
            self.counted(),
            rate60,
            rate6,
            rate_short,
            p95,
            util,
            rate60 * mean_lat if mean_lat is not None else None,
            rate6 * mean_lat if mean_lat is not None else None,
            float(self.batch_items_at[s0 : int(now)].sum()) / batches if batches else None,
            self.dispersion(int(now)),
            1000.0 * busy / batches if batches else None,
            self.rate_history(now, seasons) if seasons else None,
        )

    def rate_history(self, now: float, seasons: tuple[int, ...]) -> RateHistory:
        """The stage's 1-minute rate at ``HISTORY_STEP_S`` steps over the last
        ``HISTORY_LOOKBACK_S`` and the same span each season earlier (``HISTORY_AHEAD_S``
        longer), as the operator's range queries read it; None before the trace began."""
        arr = self.arr_np[: len(self.arr)]
        step = HISTORY_STEP_S
        n = HISTORY_LOOKBACK_S // step + 1
        recent = now - HISTORY_LOOKBACK_S + step * np.arange(n, dtype=float)

        def rates(ends: npt.NDArray[np.float64]) -> tuple[float | None, ...]:
            hi = np.searchsorted(arr, ends, side="right")
            lo = np.searchsorted(arr, ends - 60.0, side="right")
            return tuple(
                None if end < 60.0 or end > now else float(c) / 60.0
                for end, c in zip(ends, hi - lo, strict=True)
            )

        extra = HISTORY_AHEAD_S // step
        past = recent[0] + step * np.arange(n + extra, dtype=float)
        return RateHistory(
            step, rates(recent), tuple(SeasonWindow(p, rates(past - p)) for p in seasons)
        )

    def dispersion(self, now: int) -> float | None:
        """Variance over mean of the per-second arrival counts of the last
        ``BURST_WINDOW_S`` whole seconds before ``now`` (None before a full second)."""
        edges = np.arange(max(0, now - BURST_WINDOW_S), now + 1, dtype=float)
        if len(edges) < 2:
            return None
        counts = np.diff(np.searchsorted(self.arr_np[: len(self.arr)], edges))
        mean = float(counts.mean())
        return float(counts.var()) / mean if mean > 0 else None

    def apply(self, want: StagePlan, now: float, startup: float) -> None:
        cur, cfg = self.current, self.cfg
        if (want.instances or 1) > 1:
            raise ValueError("the simulator replays one model instance per replica")
        want = StagePlan(
            min(max(want.replicas, cfg.min_replicas), cfg.max_replicas),
            want.variant or cur.variant,
            want.max_batch_size or cur.max_batch_size,
            want.max_queue_delay_us
            if want.max_queue_delay_us is not None
            else cur.max_queue_delay_us,
            small_share=want.small_share if cfg.routes else None,
        )
        if want != cur:
            self.actions += 1
        alive = self.live(now)
        if want.variant != cur.variant:
            for r in alive:  # surge rollout: old pods serve until the new ones are ready
                r.retire_at = now + startup
            self.add(want.replicas, want.variant or "", now, startup)
        else:
            # Only the serving generation counts: pods of a finished rollout's old variant
            # are already on their way out.
            serving = [r for r in alive if r.retire_at is None]
            delta = want.replicas - len(serving)
            if delta > 0:
                self.add(delta, want.variant or "", now, startup)
            elif delta < 0:
                # retire the newest first (starting pods go before serving ones)
                for r in sorted(serving, key=lambda r: -r.ready_at)[:-delta]:
                    r.retire_at = now
        self.current = want

    def advance(self, until: float) -> None:
        """Dispatch every batch whose dispatch time is decidable and not after ``until``
        (every arrival up to ``until`` is known)."""
        arr, heap, replicas, items = self.arr, self.heap, self.replicas, self.cfg.items
        n = len(arr)
        cur = self.current
        b = max(1, (cur.max_batch_size or 1) // items)  # whole requests per batch
        delay = (cur.max_queue_delay_us or 0) / 1e6
        service_s = self.service_s
        share = cur.small_share if self.cfg.routes else None
        while True:
            # Retire replicas whose time has come, recording their lifetime.
            while heap:
                free_at, rid = heap[0]
                rep = replicas.get(rid)
                if rep is None:
                    heapq.heappop(heap)
                    continue
                if rep.retire_at is not None and rep.retire_at <= max(free_at, rep.created):
                    heapq.heappop(heap)
                    self.intervals.append(
                        (rep.created, max(rep.retire_at, rep.created), rep.variant)
                    )
                    del replicas[rid]
                    continue
                break
            head = self.head
            if head >= n or not heap:
                return
            free_at, rid = heap[0]
            start = max(free_at, arr[head])
            if start > until:
                return
            rep = replicas[rid]
            if rep.retire_at is not None and rep.retire_at <= start:
                heapq.heappop(heap)
                self.intervals.append((rep.created, rep.retire_at, rep.variant))
                del replicas[rid]
                continue
            k = bisect.bisect_right(arr, start, head) - head
            if k >= b:
                dispatch = start
            else:
                full_at = arr[head + b - 1] if head + b - 1 < n else math.inf
                dispatch = max(start, min(arr[head] + delay, full_at))
                if dispatch > until:
                    return  # arrivals after ``until`` could still join this batch
                k = bisect.bisect_right(arr, dispatch, head) - head
            k = max(1, min(k, b))
            heapq.heappop(heap)
            # Each request of the batch goes small with probability ``share``.
            to_small = -1 if share is None else int(self.route_rng.binomial(k, share))
            self.small += max(0, to_small)
            key = (rep.variant, k, to_small)
            base = service_s.get(key)
            if base is None:
                base = service_s[key] = self._batch_s(rep.variant, k, to_small)
            service = base * self.noise[rep.variant][self.noise_i & 0xFFFF]
            self.noise_i += 1
            finish = dispatch + service
            self.end[head : head + k] = finish
            sec = int(dispatch)
            if sec < len(self.busy):
                self.busy[sec] += service
                self.batches[sec] += 1
                self.batch_items_at[sec] += k * items
            self.head = head + k
            self.finished.append((finish, head, k))
            heapq.heappush(heap, (finish, rid))

    def _batch_s(self, variant: str, k: int, to_small: int) -> float:
        """Median seconds for ``k`` requests: on the variant, or ``to_small`` of them on the
        small route and the rest on the large one (``to_small`` -1: the stage does not route)."""
        models, items = self.cfg.variant_models, self.cfg.items
        if to_small < 0 or self.cfg.routes is None:
            return models[variant].latency_ms(k * items) / 1000
        small, large = self.cfg.routes
        parts = ((small, to_small), (large, k - to_small))
        return sum(models[v].latency_ms(n * items) for v, n in parts if n) / 1000

    def release(self, until: float) -> tuple[list[float], list[int]]:
        """Requests that finished by ``until``, in finishing order: (times, request ids)."""
        done = [f for f in self.finished if f[0] <= until]
        self.finished = [f for f in self.finished if f[0] > until]
        done.sort()
        times: list[float] = []
        ids: list[int] = []
        for finish, first, count in done:
            times.extend([finish] * count)
            ids.extend(self.rid[first : first + count])
        return times, ids

    def close(self, total: float) -> None:
        for rep in self.replicas.values():
            self.intervals.append((rep.created, min(rep.retire_at or total, total), rep.variant))


def simulate(
    trace: Trace,
    policy: PipelinePolicy,
    cfg: Config,
    progress: Callable[[float], None] | None = None,
    arrivals: npt.NDArray[np.float64] | None = None,
) -> Result:
    """Replay ``trace`` under ``policy``; returns end-to-end latencies and the bill.
    ``arrivals``: these request times instead of the trace's Poisson draw (ascending)."""
    rng = np.random.default_rng(cfg.seed)
    if arrivals is None:
        arrivals = trace.arrivals(cfg.seed)
    n = len(arrivals)
    seconds = int(trace.duration)
    stages = [_Stage(s, n, seconds, _noise(rng, cfg, s, 1 << 16)) for s in cfg.stages]
    stages[0].feed(arrivals.tolist(), list(range(n)))
    e2e_end = np.full(n, np.inf)
    first_arr = stages[0].arr
    timeline: dict[str, list[float]] = {"t": [], "rate": [], "replicas": [], "p95": []}
    total = trace.duration
    startup = 0.0 if policy.ready_at_once else cfg.startup_s

    def run_until(until: float) -> None:
        for i, st in enumerate(stages):
            st.advance(until)
            times, ids = st.release(until)
            if not times:
                continue
            if i + 1 < len(stages):
                hop = st.cfg.hop_ms / 1000
                stages[i + 1].feed([t + hop for t in times], ids)
            else:
                e2e_end[np.asarray(ids)] = np.asarray(times) + st.cfg.hop_ms / 1000

    def e2e_p95(now: float) -> float | None:
        return _window_stats(first_arr, arrivals, e2e_end, now)[0]

    next_tick, next_sample = policy.interval, 0.0
    while next_tick <= total:
        run_until(next_tick)
        while next_sample <= next_tick:
            p95 = e2e_p95(next_sample)
            timeline["t"].append(next_sample)
            timeline["rate"].append(trace.rate_at(next_sample))
            timeline["replicas"].append(float(sum(st.counted() for st in stages)))
            timeline["p95"].append(p95 if p95 is not None else math.nan)
            next_sample += 30.0
        scraped = math.floor(next_tick / cfg.scrape_s) * cfg.scrape_s
        views = {
            st.cfg.name: replace(st.observe(scraped, cfg.seasons), now=next_tick) for st in stages
        }
        current = {st.cfg.name: st.current for st in stages}
        wants = policy.decide_all(views, current, e2e_p95(scraped))
        for st in stages:
            st.apply(wants.get(st.cfg.name, st.current), next_tick, startup)
        if progress:
            progress(next_tick)
        next_tick += policy.interval
    run_until(math.inf)

    cost = 0.0
    variant_seconds: dict[tuple[str, str], float] = {}
    for st in stages:
        st.close(total)
        for created, removed, variant in st.intervals:
            span = max(0.0, min(removed, total) - created)
            cost += span * st.cfg.variant_costs.get(variant, 1.0) / 3600
            key = (st.cfg.name, variant)
            variant_seconds[key] = variant_seconds.get(key, 0.0) + span
    return Result(
        policy.name,
        (e2e_end - arrivals) * 1000,
        arrivals,
        cost,
        sum(st.actions for st in stages),
        timeline,
        variant_seconds,
        {st.cfg.name: st.small / max(1, st.head) for st in stages if st.cfg.routes},
    )


def _noise(
    rng: np.random.Generator, cfg: Config, stage: StageConfig, size: int
) -> dict[str, npt.NDArray[np.float64]]:
    """Per variant, ``size`` multipliers of its batch times (drawn from one sequence, so a
    switch changes the spread, not the luck)."""
    if cfg.service == "exponential":
        draws = rng.exponential(1.0, size)
        return {v: draws for v in stage.variant_models}
    # Log-normal with median 1 whose 95th percentile matches the variant's p95/p50 ratio.
    z = rng.standard_normal(size)
    out = {}
    for name, model in stage.variant_models.items():
        ratio = float(np.median([p.p95_ms / p.p50_ms for p in model.points]))
        out[name] = np.exp(math.log(max(ratio, 1.0001)) / 1.645 * z)
    return out
