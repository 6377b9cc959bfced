"""How many replicas, with which batching, a model stage needs: the queueing model.

A model stage replica runs Triton with dynamic batching. Triton batches *items* (texts to
embed, query-passage pairs to re-rank), and one request may carry several: a query is
re-ranked as one request of all its candidates. At an item rate lambda (request rate x
measured items per request) over ``c`` replicas, the batch a replica forms is about the items
that arrive while it waits (queue delay) or executes the previous batch; batch execution time
comes from the measured profile; waiting for a free replica follows M/M/c on batches, its
waits scaled for arrivals burstier than Poisson (:func:`burst_factor`).
A replica may run several model instances (Triton's instance_group count): each is a server
of its own, slower by the share of the cores it gives up (the profile's measured speedup).
Replicas are the fewest that keep the predicted p95 inside the stage's share of the SLO and
utilisation under a safety margin, which shrinks for large pools (square-root staffing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from modelpilot.api.v1alpha1 import ModelDeploymentSpec, ModelStage
from modelpilot.contract import QUERY_PATH
from modelpilot.optimizer.profiles import ModelProfile
from modelpilot.optimizer.queueing import wait_quantile
from modelpilot.optimizer.snapshot import Snapshot, StageTelemetry
from modelpilot.optimizer.tunables import Tunables

# What the batching tuner sets on a replica's Triton: (max batch, queue delay us, instances).
Setting = tuple[int, int, int]


@dataclass(frozen=True)
class Sizing:
    replicas: int
    max_batch_size: int
    max_queue_delay_us: int
    p95_ms: float
    utilisation: float
    feasible: bool
    instances: int = 1

    @property
    def setting(self) -> Setting:
        return (self.max_batch_size, self.max_queue_delay_us, self.instances)


def _powers_of_two(limit: int) -> list[int]:
    out = [1]
    while out[-1] * 2 <= limit:
        out.append(out[-1] * 2)
    if out[-1] != limit:
        out.append(limit)
    return out


def _delays(limit: int, tun: Tunables) -> list[int]:
    return [d for d in tun.queue_delays_us if d < limit] + [limit]


def predict(
    profile: ModelProfile,
    rate: float,
    replicas: int,
    max_batch: int,
    delay_us: int,
    items: float = 1.0,
    latency_factor: float = 1.0,
    instances: int = 1,
    dispersion: float = 1.0,
) -> tuple[float, float]:
    """(p95 latency ms, utilisation) of a model stage under the batching model above.

    ``rate`` is in requests/s, each of ``items`` items; ``max_batch`` counts items, so a
    request larger than it cannot be served (Triton rejects it). ``latency_factor`` scales
    the modelled waits and batch times, not the configured queue delay. ``instances`` per
    replica must be a count the profile measured. ``dispersion``: the arrivals' index of
    dispersion (1 for Poisson; see :func:`burst_factor`).
    """
    items = max(items, 1.0)
    if replicas <= 0 or max_batch < items:
        return (math.inf, math.inf) if rate > 0 else (0.0, 0.0)
    servers = replicas * instances
    slow = profile.instance_slowdown(instances)
    per_server = rate * items / servers
    delay_ms = delay_us / 1000.0
    # Triton batches whole requests: a batch holds as many as fit in max_batch items.
    full = items * math.floor(max_batch / items)
    batch = items
    for _ in range(8):  # fixed point: the batch is what arrives while waiting + executing
        exec_ms = profile.latency_ms(batch) * slow
        batch = min(full, max(items, per_server * (delay_ms + exec_ms) / 1000.0))
    exec_ms = profile.latency_ms(batch) * slow
    utilisation = per_server * exec_ms / (1000.0 * batch)
    if utilisation >= 1.0:
        return math.inf, utilisation
    wait_ms = 1000.0 * wait_quantile(servers, rate * items / batch, 1000.0 / exec_ms, 0.95)
    wait_ms *= burst_factor(dispersion)
    room = full - items
    fill_ms = min(delay_ms, 1000.0 * room / per_server) if per_server > 0 else 0
    # The tail is set by the large batches, not the mean one: a request shares its batch with
    # the requests that reached the replica while it waited or ran the previous batch
    # (Poisson), up to max_batch. On hardware where a batch costs its size in time (CPU), a
    # few coinciding requests double the p95.
    extra = _poisson_quantile(rate / servers * (delay_ms + exec_ms) / 1000.0, 0.95)
    tail_batch = min(full, max(batch, items * (1 + extra)))
    modelled = wait_ms + profile.latency_ms(tail_batch, "p95") * slow
    return modelled * latency_factor + max(fill_ms, 0.0), utilisation


def burst_factor(dispersion: float) -> float:
    """How much longer queues wait under arrivals of index of dispersion ``dispersion`` (the
    variance over the mean of per-second arrival counts) than under Poisson arrivals.

    The Allen-Cunneen approximation for G/G/c scales the M/M/c wait by (ca^2 + cs^2) / 2;
    for the arrivals' squared coefficient of variation ca^2 it takes the index of dispersion
    of their counts (as Whitt's queueing network analyser does), and it keeps cs^2 = 1 (the
    service times of the M/M/c base). Never below Poisson: a measured index under 1 (an
    evenly paced load) is not trusted to stay so."""
    return (max(dispersion, 1.0) + 1.0) / 2.0


def _poisson_quantile(mean: float, q: float) -> int:
    """The smallest k with P(Poisson(mean) <= k) >= q."""
    if mean <= 0:
        return 0
    k, term = 0, math.exp(-mean)
    total = term
    while total < q and k < 10_000:
        k += 1
        term *= mean / k
        total += term
    return k


def calibrated(
    profile: ModelProfile, calibration: float, tun: Tunables
) -> tuple[ModelProfile, float]:
    """The profile to predict from and the factor on its predicted p95, for ``calibration``.

    A factor near 1 is the model's own error, in the tail it predicts: down to
    ``calibration_latency_floor`` it scales the latency alone. Beyond that, or above 1, the
    stage's batches themselves take longer or shorter than profiled (another machine), so
    capacity changes with latency: the profile's batch times are scaled by what the latency
    factor leaves. Above 1 all of it goes to the batch times, the cautious side: a stage
    slower than profiled is short of replicas, not only of latency."""
    floor = tun.calibration_latency_floor
    if floor <= calibration <= 1.0:
        return profile, calibration
    latency = floor if calibration < floor else 1.0
    return profile.scaled(calibration / latency), latency


def max_utilisation(offered: float, tun: Tunables, dispersion: float = 1.0) -> float:
    """The highest utilisation to plan for ``offered`` busy replicas (arrival rate / one
    replica's capacity).

    Square-root staffing (Halfin-Whitt): random arrivals need spare capacity in proportion to
    the square root of the load, not to the load itself, so a large pool runs hotter than a
    small one at the same risk; bursty arrivals need that spare capacity times the square
    root of :func:`burst_factor` (the QED regime's G/G/c form). Never below
    ``target_utilisation``."""
    if offered <= 0:
        return tun.target_utilisation
    beta = tun.staffing_beta * math.sqrt(burst_factor(dispersion))
    return max(tun.target_utilisation, offered / (offered + beta * math.sqrt(offered)))


def size_model_stage(
    profile: ModelProfile,
    rate: float,
    budget_ms: float,
    calibration: float,
    bounds: tuple[int, int],
    max_batch: int,
    max_delay_us: int,
    tun: Tunables,
    prefer: Setting | None = None,
    items: float = 1.0,
    max_instances: int = 1,
    ceilings: Mapping[int, int] | None = None,
    dispersion: float = 1.0,
) -> Sizing:
    """The fewest replicas (then lowest p95) meeting utilisation and latency targets.

    ``prefer`` is the current setting: tried first, so a setting only replaces it by
    needing fewer replicas or predicting a lower p95. ``items`` is the mean number of
    items per request; batch sizes below it are never proposed. Instance counts go up to
    ``max_instances``, among those the profile measured; ``ceilings`` (instance count ->
    batch size) rules out that batch size and larger ones at that count, but never the
    smallest. ``calibration`` applies as :func:`calibrated` says; ``dispersion`` as
    :func:`predict` and :func:`max_utilisation` say.
    """
    lo, hi = bounds
    profile, factor = calibrated(profile, calibration, tun)
    best: Sizing | None = None
    batches = [b for b in _powers_of_two(max_batch) if b >= items] or [max_batch]
    counts = [k for k in sorted(profile.speedup) if k <= max_instances] or [1]
    ceiling = ceilings or {}
    configs = [
        (b, d, k)
        for k in counts
        for b in batches
        if b == batches[0] or b < ceiling.get(k, b + 1)
        for d in _delays(max_delay_us, tun)
    ]
    if prefer in configs:
        configs.remove(prefer)
        configs.insert(0, prefer)
    for b, d, k in configs:
        # However many replicas, a request still takes its own batch's time plus the queue
        # delay when the batch has room: skip settings that cannot fit at any count.
        own = profile.latency_ms(items, "p95") * profile.instance_slowdown(k) * factor
        floor = own + (d / 1000.0 if b > items else 0.0)
        if floor > budget_ms:
            continue
        start = max(lo, 1 if rate > 0 else lo)
        offered = rate * max(items, 1.0) / profile.throughput_rps(b, k)  # busy replicas
        limit = max_utilisation(offered, tun, dispersion)
        if rate > 0:
            start = max(start, math.ceil(offered / limit))
        top = hi if best is None else min(hi, best.replicas)

        def fits(c: int, b: int = b, d: int = d, k: int = k, limit: float = limit) -> Sizing:
            p95, util = predict(profile, rate, c, b, d, items, factor, k, dispersion)
            ok = util <= limit and p95 <= budget_ms
            return Sizing(c, b, d, p95, util, ok, k)

        # The first few counts one by one (exact where it matters most), then bisection:
        # more replicas never raise the p95 by more than the queue delay.
        found = next(
            (z for c in range(start, min(top, start + 8) + 1) if (z := fits(c)).feasible), None
        )
        if found is None and start + 8 < top and fits(top).feasible:
            low, high = start + 9, top
            while low < high:
                mid = (low + high) // 2
                if fits(mid).feasible:
                    high = mid
                else:
                    low = mid + 1
            found = fits(low)
        if found is not None and (
            best is None or (found.replicas, found.p95_ms) < (best.replicas, best.p95_ms - 1e-9)
        ):
            best = found
    if best is not None:
        return best
    # Nothing fits the latency budget: the batch's own time is over it, so more replicas
    # would not help. Serve at the utilisation target with the fastest setting (the smallest
    # batch, no queue delay, the instance count of the most throughput) rather than buy every
    # replica allowed.
    b = batches[0]
    k = max(counts, key=lambda k: profile.throughput_rps(b, k))
    capacity = profile.throughput_rps(b, k) * tun.target_utilisation
    need = math.ceil(rate * max(items, 1.0) / capacity)
    c = min(hi, max(lo, need, 1 if rate > 0 else lo))
    p95, util = predict(profile, rate, c, b, 0, items, factor, k, dispersion)
    return Sizing(c, b, 0, p95, util, False, k)


def stage_sizer(
    stage: ModelStage,
    budget_ms: float,
    calibration: float,
    tun: Tunables,
    items: float,
    ceilings: Mapping[int, int] | None = None,
    dispersion: float = 1.0,
) -> Callable[..., Sizing]:
    """``size_model_stage`` bound to the stage's bounds, batching limits, back-offs and
    arrivals' dispersion: call it as ``size(profile, rate=..., prefer=...)``."""
    return partial(
        size_model_stage,
        budget_ms=budget_ms,
        calibration=calibration,
        bounds=(stage.replicas.min, stage.replicas.max),
        max_batch=stage.batching.max_batch_size,
        max_delay_us=stage.batching.max_queue_delay_microseconds,
        tun=tun,
        items=items,
        max_instances=stage.batching.max_instances,
        ceilings=ceilings,
        dispersion=dispersion,
    )


def stage_budgets(spec: ModelDeploymentSpec, snapshot: Snapshot, tun: Tunables) -> dict[str, float]:
    """Split the end-to-end SLO over the query-path stages by their measured p95 shares."""
    total = spec.slo.latency_p95_ms * tun.slo_headroom
    measured = {s: (snapshot.stages.get(s) or StageTelemetry()).p95_ms for s in QUERY_PATH}
    if all(v is not None and v > 0 for v in measured.values()):
        weights = {s: float(v or 0) for s, v in measured.items()}
    else:
        weights = {s: 1.0 for s in QUERY_PATH}
    norm = sum(weights.values())
    shares = {s: max(w / norm, tun.min_stage_share) for s, w in weights.items()}
    norm = sum(shares.values())
    return {s: total * shares[s] / norm for s in QUERY_PATH}
