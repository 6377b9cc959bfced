"""The simulator against queueing theory, and each baseline against hand-computed decisions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelpilot.optimizer import queueing
from modelpilot.optimizer.profiles import BatchPoint, ModelProfile
from modelpilot.sim import traces
from modelpilot.sim.engine import Config, simulate
from modelpilot.sim.policies import HPA, KEDA, KPA, Action, Observation, StaticPeak

pytestmark = pytest.mark.unit


def obs(now: float = 0.0, ready: int = 4, replicas: int = 4, **kw: float | None) -> Observation:
    base: dict[str, float | None] = dict(
        rate_stable=None,
        rate_panic=None,
        rate_short=None,
        p95_ms=None,
        cpu_utilisation=None,
        concurrency_stable=None,
        concurrency_panic=None,
        batch_size=None,
    )
    base.update(kw)
    return Observation(now, ready, replicas, **base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("servers", "lam", "service_ms"), [(1, 7.0, 100.0), (3, 24.0, 100.0), (8, 60.0, 100.0)]
)
def test_mmc_mean_latency_matches_the_closed_form(
    servers: int, lam: float, service_ms: float
) -> None:
    mu = 1000.0 / service_ms
    profile = ModelProfile("exp", "embedding", 1.0, (BatchPoint(1, service_ms, service_ms),))
    seconds = int(150_000 / lam)  # about 150k requests: the mean settles within ~1%
    trace = traces.Trace(
        "const", np.arange(seconds, dtype=float), np.full(seconds, lam), float(seconds)
    )
    cfg = Config(
        slo_ms=1e9,
        variant_costs={"v": 1.0},
        variant_models={"v": profile},
        start=Action(servers, "v", 1, 0),
        min_replicas=servers,
        max_replicas=servers,
        service="exponential",
        seed=11,
    )
    result = simulate(trace, StaticPeak(replicas=servers, interval=float(seconds)), cfg)
    expected_ms = 1000.0 * (queueing.mean_wait(servers, lam, mu) + 1 / mu)
    measured_ms = float(np.nanmean(result.latencies_ms))
    assert measured_ms == pytest.approx(expected_ms, rel=0.05)


def test_cost_is_replica_seconds_times_variant_cost() -> None:
    profile = ModelProfile("m", "embedding", 1.0, (BatchPoint(1, 10.0, 12.0),))
    trace = traces.Trace("quiet", np.arange(3600, dtype=float), np.full(3600, 5.0), 3600.0)
    cfg = Config(
        slo_ms=100,
        variant_costs={"v": 2.5},
        variant_models={"v": profile},
        start=Action(3, "v", 1, 0),
        min_replicas=3,
        max_replicas=3,
    )
    result = simulate(trace, StaticPeak(replicas=3), cfg)
    assert result.cost == pytest.approx(3 * 2.5, rel=1e-6)  # 3 replicas x 1 h x 2.5
    assert result.attainment(100) > 0.99 and result.actions == 0


# ------------------------------------------------------------------ baselines, by hand


def test_hpa_scales_by_the_cpu_ratio_with_tolerance_and_rate_limits() -> None:
    hpa = HPA(min_replicas=1, max_replicas=50)
    assert hpa.decide(obs(cpu_utilisation=0.9), Action(4)).replicas == 6  # ceil(4*0.9/0.7)
    hpa = HPA(min_replicas=1, max_replicas=50)
    assert hpa.decide(obs(cpu_utilisation=0.75), Action(4)).replicas == 4  # within 10%
    hpa = HPA(min_replicas=1, max_replicas=50)
    # from 2 ready at 700% CPU: 20 wanted, but at most max(+4, x2) = 6 per period
    assert hpa.decide(obs(ready=2, replicas=2, cpu_utilisation=7.0), Action(2)).replicas == 6


def test_hpa_scale_down_waits_for_the_stabilization_window() -> None:
    hpa = HPA(min_replicas=1, max_replicas=50)
    assert hpa.decide(obs(0, 4, 4, cpu_utilisation=1.0), Action(4)).replicas == 6  # ceil(5.7)
    low = {"cpu_utilisation": 0.35}
    assert hpa.decide(obs(15, 6, 6, **low), Action(6)).replicas == 6  # max over 300 s is 6
    assert hpa.decide(obs(299, 6, 6, **low), Action(6)).replicas == 6
    assert hpa.decide(obs(316, 6, 6, **low), Action(6)).replicas == 3  # ceil(6 * 0.5)


def test_keda_divides_the_rate_by_its_threshold() -> None:
    keda = KEDA(min_replicas=1, max_replicas=50, threshold=30.0)
    assert keda.decide(obs(replicas=2, ready=2, rate_stable=100.0), Action(2)).replicas == 4
    keda = KEDA(min_replicas=1, max_replicas=50, threshold=30.0)
    assert keda.decide(obs(replicas=2, ready=2, rate_stable=62.0), Action(2)).replicas == 2
    keda = KEDA(min_replicas=1, max_replicas=50, threshold=30.0)
    assert keda.decide(obs(replicas=2, ready=2, rate_stable=None), Action(2)).replicas == 2


def test_kpa_panics_and_never_scales_down_while_panicking() -> None:
    kpa = KPA(min_replicas=1, max_replicas=100, container_concurrency=1.0)
    # stable 7 -> ceil(7/0.7) = 10; panic 14 -> 20; 20/2 ready >= 2: panic, take the max
    first = kpa.decide(obs(0, 2, 2, concurrency_stable=7.0, concurrency_panic=14.0), Action(2))
    assert first.replicas == 20
    calm = kpa.decide(obs(10, 20, 20, concurrency_stable=1.0, concurrency_panic=1.0), Action(20))
    assert calm.replicas == 20  # in panic: never decreases
    later = kpa.decide(obs(61, 20, 20, concurrency_stable=1.0, concurrency_panic=1.0), Action(20))
    assert later.replicas == 10  # panic over; max scale-down is to half the ready pods


def test_trace_csv_round_trip_and_validation(tmp_path: Path) -> None:
    trace = traces.step(seconds=600)
    path = tmp_path / "t.csv"
    traces.write_csv(trace, path)
    again = traces.load_csv(path)
    assert again.duration == trace.duration
    assert np.allclose(again.rps, trace.rps, atol=1e-3)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,rate\n0,1\n")
    with pytest.raises(ValueError, match="header"):
        traces.load_csv(bad)


@pytest.mark.parametrize("name", sorted(traces.BUILTIN))
def test_builtin_traces_are_seeded(name: str) -> None:
    a, b = traces.BUILTIN[name](seconds=900), traces.BUILTIN[name](seconds=900)
    assert np.array_equal(a.rps, b.rps) and a.rps.min() >= 0 and len(a.rps) == 900
