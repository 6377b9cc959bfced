"""The simulator against queueing theory, and each baseline against hand-computed decisions."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpilot.optimizer import profiles, queueing
from modelpilot.optimizer.profiles import BatchPoint, ModelProfile
from modelpilot.render.plan import StagePlan
from modelpilot.sim import bench, oracle, traces
from modelpilot.sim.engine import Config, StageConfig, simulate
from modelpilot.sim.policies import (
    HPA,
    KEDA,
    KPA,
    ModelSized,
    Observation,
    PerStage,
    Reactive,
    StaticPeak,
)
from tests.helpers import ROOT

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


def one_stage(profile: ModelProfile, replicas: int, cost: float = 1.0, **kw: Any) -> StageConfig:
    return StageConfig(
        "embedding",
        {"v": profile},
        {"v": cost},
        StagePlan(replicas, "v", kw.pop("max_batch", 1), 0),
        min_replicas=replicas,
        max_replicas=replicas,
        **kw,
    )


def static(seconds: float, **stages: int) -> PerStage:
    return PerStage({s: StaticPeak(replicas=n, interval=seconds) for s, n in stages.items()})


def constant(lam: float, seconds: int) -> traces.Trace:
    return traces.Trace(
        "const", np.arange(seconds, dtype=float), np.full(seconds, lam), float(seconds)
    )


@pytest.mark.parametrize(
    ("servers", "lam", "service_ms"), [(1, 7.0, 100.0), (3, 24.0, 100.0), (8, 60.0, 100.0)]
)
def test_mmc_mean_latency_matches_the_closed_form(
    servers: int, lam: float, service_ms: float
) -> None:
    mu = 1000.0 / service_ms
    profile = ModelProfile("exp", "embedding", 1.0, (BatchPoint(1, service_ms, service_ms),))
    seconds = int(150_000 / lam)  # about 150k requests: the mean settles within ~1%
    cfg = Config(slo_ms=1e9, stages=[one_stage(profile, servers)], service="exponential", seed=11)
    result = simulate(constant(lam, seconds), static(seconds, embedding=servers), cfg)
    expected_ms = 1000.0 * (queueing.mean_wait(servers, lam, mu) + 1 / mu)
    measured_ms = float(np.nanmean(result.latencies_ms))
    assert measured_ms == pytest.approx(expected_ms, rel=0.05)


def test_two_stages_in_tandem_match_the_jackson_network() -> None:
    """M/M/1 -> fixed hop -> M/M/1: by Burke's theorem the first stage's departures are
    Poisson, so the mean end-to-end time is the sum of the two M/M/1 sojourns plus the hop."""
    lam, s1, s2, hop = 6.0, 100.0, 80.0, 5.0
    first = ModelProfile("a", "embedding", 1.0, (BatchPoint(1, s1, s1),))
    second = ModelProfile("b", "inference", 1.0, (BatchPoint(1, s2, s2),))
    stages = [
        one_stage(first, 1, hop_ms=hop),
        replace(one_stage(second, 1), name="inference"),
    ]
    seconds = 25_000
    cfg = Config(slo_ms=1e9, stages=stages, service="exponential", seed=5)
    # Ticks every 15 s: the stages hand requests over tick by tick, as in the bench.
    policy = PerStage({"embedding": StaticPeak(1), "inference": StaticPeak(1)})
    result = simulate(constant(lam, seconds), policy, cfg)
    expected_ms = 1000 / (1000 / s1 - lam) + 1000 / (1000 / s2 - lam) + hop
    assert float(np.mean(result.latencies_ms)) == pytest.approx(expected_ms, rel=0.05)


def test_a_request_of_several_items_takes_its_whole_batch_time() -> None:
    """A re-ranked query is one Triton request of all its pairs: 4 items take the profile's
    4-item time, and max_batch_size (in items) caps how many requests share a batch."""
    affine = tuple(BatchPoint(b, 10.0 + 5.0 * b, 10.0 + 5.0 * b) for b in (1, 2, 4, 8, 16))
    profile = ModelProfile("pairs", "inference", 1.0, affine)
    sparse = simulate(
        constant(1.0, 4000),
        static(4000.0, embedding=1),
        Config(slo_ms=1e9, stages=[one_stage(profile, 1, items=4, max_batch=8)], seed=3),
    )
    assert float(np.median(sparse.latencies_ms)) == pytest.approx(30.0, rel=0.02)
    busy = simulate(
        constant(30.0, 600),
        static(600.0, embedding=1),
        Config(slo_ms=1e9, stages=[one_stage(profile, 1, items=4, max_batch=8)], seed=3),
    )
    # Under load batches fill to 2 requests (8 items, 50 ms), never more.
    assert float(np.max(busy.latencies_ms)) < 10 * 50.0
    assert float(np.percentile(busy.latencies_ms, 50)) >= 50.0


def test_cost_is_replica_seconds_times_variant_cost() -> None:
    profile = ModelProfile("m", "embedding", 1.0, (BatchPoint(1, 10.0, 12.0),))
    trace = traces.Trace("quiet", np.arange(3600, dtype=float), np.full(3600, 5.0), 3600.0)
    cfg = Config(slo_ms=100, stages=[one_stage(profile, 3, cost=2.5)])
    result = simulate(trace, static(15.0, embedding=3), cfg)
    assert result.cost == pytest.approx(3 * 2.5, rel=1e-6)  # 3 replicas x 1 h x 2.5
    assert result.attainment(100) > 0.99 and result.actions == 0


def test_bench_prints_every_policy_and_one_json_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = traces.Trace("short", np.array([0.0, 300.0]), np.array([4.0, 12.0]), 600.0)
    traces.write_csv(trace, tmp_path / "short.csv")
    code = bench.main(
        ["--trace", str(tmp_path / "short.csv"), "--out", str(tmp_path), "--no-progress"]
    )
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last)
    assert report["trace"] == "short"
    policies = report["policies"]
    assert set(policies) == {
        "modelpilot", "static-peak", "hpa", "keda", "kpa", "oracle", "reactive",
        "hpa-cheapest", "keda-cheapest", "kpa-cheapest",
    }  # fmt: skip
    for figures in policies.values():
        assert set(figures) == {
            "attainment", "window_attainment", "cost", "cost_vs_hpa", "cost_vs_oracle",
            "quality", "actions",
        }  # fmt: skip
        assert figures["cost"] > 0 and 0 <= figures["attainment"] <= 1
    hpa_cost, oracle_cost = policies["hpa"]["cost"], policies["oracle"]["cost"]
    for figures in policies.values():  # the ratios are those of the printed costs
        assert figures["cost_vs_hpa"] == pytest.approx(figures["cost"] / hpa_cost, rel=0.01)
        assert figures["cost_vs_oracle"] == pytest.approx(figures["cost"] / oracle_cost, rel=0.01)
    assert (tmp_path / "short.png").stat().st_size > 10_000
    # ModelPilot and HPA replayed on service times off the profile, each mismatch once
    assert set(report["mismatch"]) == {f"short {m}" for m in bench.MISMATCHES}
    for row in report["mismatch"].values():
        assert set(row) == {"modelpilot", "hpa", "hpa-cheapest"}
        assert row["hpa"]["cost_vs_hpa"] == 1.0
    assert set(report["goal"]["short"]) == {
        ">=99% where static does", ">= every peer", "<=0.6x hpa", "<=1.2x oracle",
    }  # fmt: skip


# ------------------------------------------------------------------ baselines, by hand


def test_hpa_scales_by_the_cpu_ratio_with_tolerance_and_rate_limits() -> None:
    hpa = HPA(min_replicas=1, max_replicas=50)
    assert hpa.decide(obs(cpu_utilisation=0.9), StagePlan(4)).replicas == 6  # ceil(4*0.9/0.7)
    hpa = HPA(min_replicas=1, max_replicas=50)
    assert hpa.decide(obs(cpu_utilisation=0.75), StagePlan(4)).replicas == 4  # within 10%
    hpa = HPA(min_replicas=1, max_replicas=50)
    # from 2 ready at 700% CPU: 20 wanted, but at most max(+4, x2) = 6 per period
    assert hpa.decide(obs(ready=2, replicas=2, cpu_utilisation=7.0), StagePlan(2)).replicas == 6


def test_hpa_scale_down_waits_for_the_stabilization_window() -> None:
    hpa = HPA(min_replicas=1, max_replicas=50)
    assert hpa.decide(obs(0, 4, 4, cpu_utilisation=1.0), StagePlan(4)).replicas == 6  # ceil(5.7)
    low = {"cpu_utilisation": 0.35}
    assert hpa.decide(obs(15, 6, 6, **low), StagePlan(6)).replicas == 6  # max over 300 s is 6
    assert hpa.decide(obs(299, 6, 6, **low), StagePlan(6)).replicas == 6
    assert hpa.decide(obs(316, 6, 6, **low), StagePlan(6)).replicas == 3  # ceil(6 * 0.5)


def test_keda_divides_the_rate_by_its_threshold() -> None:
    keda = KEDA(min_replicas=1, max_replicas=50, threshold=30.0)
    assert keda.decide(obs(replicas=2, ready=2, rate_stable=100.0), StagePlan(2)).replicas == 4
    keda = KEDA(min_replicas=1, max_replicas=50, threshold=30.0)
    assert keda.decide(obs(replicas=2, ready=2, rate_stable=62.0), StagePlan(2)).replicas == 2
    keda = KEDA(min_replicas=1, max_replicas=50, threshold=30.0)
    assert keda.decide(obs(replicas=2, ready=2, rate_stable=None), StagePlan(2)).replicas == 2


def test_kpa_panics_and_never_scales_down_while_panicking() -> None:
    kpa = KPA(min_replicas=1, max_replicas=100, container_concurrency=1.0)
    # stable 7 -> ceil(7/0.7) = 10; panic 14 -> 20; 20/2 ready >= 2: panic, take the max
    first = kpa.decide(obs(0, 2, 2, concurrency_stable=7.0, concurrency_panic=14.0), StagePlan(2))
    assert first.replicas == 20
    calm = kpa.decide(obs(10, 20, 20, concurrency_stable=1.0, concurrency_panic=1.0), StagePlan(20))
    assert calm.replicas == 20  # in panic: never decreases
    later = kpa.decide(
        obs(61, 20, 20, concurrency_stable=1.0, concurrency_panic=1.0), StagePlan(20)
    )
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


def test_the_oracles_peak_is_the_highest_forward_mean() -> None:
    # 10/s for 10 s, one 1 s spike to 100/s, then 20/s; rows of uneven length.
    trace = traces.Trace("t", np.array([0.0, 10.0, 11.0]), np.array([10.0, 100.0, 20.0]), 30.0)
    peak = trace.peak_mean(5.0)
    assert peak(0, 1) == pytest.approx(10.0)  # [0, 5): no spike yet
    assert peak(0, 8) == pytest.approx((3 * 10 + 100 + 20) / 5)  # [7, 12) holds the spike
    assert trace.max_rate(0, 8) == 10.0 and trace.max_rate(0, 11) == 100.0
    assert peak(20, 30) == pytest.approx(20.0)  # near the end: the mean of what is left
    assert peak(29, 40) == pytest.approx(20.0)


def test_reactive_sizes_for_the_seconds_behind_it_the_model_sized_for_those_ahead() -> None:
    # 20/s for 100 s, then 80/s.
    trace = traces.Trace("step", np.array([0.0, 100.0]), np.array([20.0, 80.0]), 200.0)
    past = trace.past_mean(10.0)
    assert past(0, 1) == pytest.approx(20.0) and past(100, 101) == pytest.approx(20.0)
    assert past(105, 106) == pytest.approx(50.0)  # 5 s at 20/s, 5 s at 80/s
    assert past(150, 151) == pytest.approx(80.0) and past(500, 501) == pytest.approx(80.0)

    spec, prof = bench.bench_spec(1000), profiles.load(ROOT / "profiles" / "cpu.json")
    items = {"embedding": 1.0, "inference": 10.0}
    at_step = {"embedding": obs(now=100.0), "inference": obs(now=100.0)}

    def sized_for(rate: float) -> dict[str, StagePlan]:
        return ModelSized(spec, prof, lambda s, e: rate, items, 2.0).decide_all(at_step, {}, None)

    reactive = Reactive(spec, prof, past, items, 2.0, interval=1.0)
    ahead = ModelSized(spec, prof, trace.peak_mean(10.0), items, 2.0, interval=1.0)
    assert reactive.decide_all(at_step, {}, None) == sized_for(20.0)
    assert ahead.decide_all(at_step, {}, None) == sized_for(80.0)
    assert sized_for(80.0)["inference"].replicas > sized_for(20.0)["inference"].replicas
    assert not reactive.ready_at_once  # the reactive bound pays start-up


# ------------------------------------------------------------------ the oracle


def two_stage_config(slo_ms: float = 300.0) -> Config:
    """Embedding (10 ms a request) -> re-ranker (40 ms a request), one variant each."""
    emb = ModelProfile("e", "embedding", 1.0, (BatchPoint(1, 10.0, 14.0),))
    rr = ModelProfile("r", "inference", 1.0, (BatchPoint(1, 40.0, 56.0),))
    stages = [
        StageConfig("embedding", {"e": emb}, {"e": 1.0}, StagePlan(1, "e", 1, 0), max_replicas=60),
        StageConfig("inference", {"r": rr}, {"r": 2.0}, StagePlan(1, "r", 1, 0), max_replicas=60),
    ]
    return Config(slo_ms=slo_ms, stages=stages, startup_s=20.0)


class FixedSizer(ModelSized):
    """A stand-in for the queueing model's first guess: replicas in proportion to the rate
    (the search must correct it either way)."""

    def __init__(self, per_replica: dict[str, float]) -> None:
        self.per_replica = per_replica

    def plans(self, rate: int, stages: list[str]) -> dict[str, StagePlan] | None:
        return {
            n: StagePlan(max(1, rate // int(self.per_replica[n])), v, 1, 0)
            for n, v in zip(stages, ("e", "r"), strict=True)
        }


def test_the_oracles_minute_is_the_fewest_replicas_that_meet_the_slo() -> None:
    cfg = two_stage_config()
    judge = oracle.MinuteJudge(cfg)
    trace = constant(100.0, 120)
    arrivals = trace.arrivals(cfg.seed)
    window = arrivals[arrivals >= 60.0 - oracle.WARMUP_S]
    # A guess far too small (escalated) and one far too big (bisected down) agree.
    for per_replica in (
        {"embedding": 1000.0, "inference": 1000.0},
        {"embedding": 2.0, "inference": 2.0},
    ):
        plan = oracle.plan_minute(judge, FixedSizer(per_replica), window, 60.0, 100.0)
        assert judge.meets(window, 60.0, plan)
        for stage in ("embedding", "inference"):
            fewer = {**plan, stage: replace(plan[stage], replicas=plan[stage].replicas - 1)}
            assert not judge.meets(window, 60.0, fewer), (per_replica, stage, plan)
    # 100 requests/s of 40 ms need more than 4 re-rankers busy; a p95 of 300 ms a few more.
    assert 5 <= plan["inference"].replicas <= 8 and 1 <= plan["embedding"].replicas <= 3


def test_the_oracle_meets_every_minute_static_peak_meets_for_less() -> None:
    cfg = two_stage_config()
    # 5 quiet minutes at 20/s, 5 at 120/s with 1-second spikes to 400/s, 5 quiet again.
    rps = np.full(900, 20.0)
    rps[300:600] = 120.0
    rps[300:600:37] = 400.0
    trace = traces.Trace("spiky", np.arange(900.0), rps, 900.0)
    plans = oracle.schedule(trace, cfg, FixedSizer({"embedding": 50.0, "inference": 10.0}))
    assert len(plans) == 15
    stages = [replace(s, start=plans[0][s.name]) for s in cfg.stages]
    ran = simulate(trace, oracle.Oracle(plans), replace(cfg, stages=stages))
    static_cfg = replace(
        cfg, stages=[replace(s, start=replace(s.start, replicas=20)) for s in cfg.stages]
    )
    peak = simulate(trace, static(15.0, embedding=20, inference=20), static_cfg)
    assert peak.window_attainment(cfg.slo_ms) == 1.0
    assert ran.window_attainment(cfg.slo_ms) == 1.0
    assert ran.cost < 0.6 * peak.cost
    # It pays for what each minute needs: the busy minutes hold more re-rankers.
    assert min(p["inference"].replicas for p in plans[5:10]) > max(
        p["inference"].replicas for p in plans[:5]
    )


def test_a_cheapest_variant_peer_takes_the_lowest_cost_per_request_above_the_floor() -> None:
    spec, prof = bench.bench_spec(1000), profiles.load(ROOT / "profiles" / "cpu.json")
    stage = spec.embedding
    models = {v.name: prof.models[v.model] for v in stage.variants}
    quality = {"minilm-fp32": 1.0, "minilm-int8": 0.82, "minilm-static": 0.35}
    fast = min(("minilm-fp32", "minilm-int8"), key=lambda v: 1 / models[v].throughput_rps(1))
    assert bench.cheapest_variant(stage, models, quality, 0.8, 1) == fast
    assert bench.cheapest_variant(stage, models, quality, 0.9, 1) == "minilm-fp32"
    assert bench.cheapest_variant(stage, models, quality, 0.3, 1) == min(
        models, key=lambda v: 1 / models[v].throughput_rps(1)
    )


def test_a_mismatched_truth_scales_each_batch_by_factor_and_batch_power() -> None:
    prof = profiles.Profiles(
        {
            "m": ModelProfile(
                "m", "embedding", 1.0, (BatchPoint(1, 10.0, 12.0), BatchPoint(8, 40.0, 50.0))
            )
        }
    )
    off = bench.mismatched(prof, 2.0, 0.5).models["m"]
    assert off.points[0].p50_ms == pytest.approx(20.0) and off.points[0].p95_ms == pytest.approx(
        24.0
    )
    assert off.points[1].p50_ms == pytest.approx(40.0 * 2.0 * 8**0.5)
    assert prof.models["m"].points[1].p50_ms == 40.0  # the profile itself is untouched


@pytest.mark.parametrize("name", ["azure-code", "azure-conv", "mooncake-conv"])
def test_the_real_traces_load_as_an_hour_of_seconds(name: str) -> None:
    trace = traces.load_csv(ROOT / "bench" / "traces" / f"{name}.csv")
    assert 3400 <= trace.duration <= 3600
    assert np.array_equal(np.diff(trace.t), np.ones(len(trace.t) - 1))
    assert 40 <= trace.rps.mean() <= 60  # scaled into the range the profiles serve


def test_a_public_request_log_converts_to_per_second_rates(tmp_path: Path) -> None:
    azure = tmp_path / "azure.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,4808,10\n"
        "2023-11-16 18:17:04.0319600,3180,8\n"
        "2023-11-16 18:17:06.5000000,110,27\n"
    )
    mooncake = tmp_path / "mooncake.jsonl"
    mooncake.write_text(
        "\n".join(json.dumps({"timestamp": ms, "input_length": 1}) for ms in (0, 0, 999, 2500))
    )
    for source, expected in ((azure, [20.0, 0.0, 10.0]), (mooncake, [30.0, 0.0, 10.0])):
        out = tmp_path / f"{source.stem}.csv"
        subprocess.run(
            [sys.executable, str(ROOT / "hack" / "convert_trace.py"), str(source),
             "--scale", "10", "--out", str(out)],
            check=True, capture_output=True,
        )  # fmt: skip
        trace = traces.load_csv(out)
        assert trace.rps.tolist() == expected, source.name


def test_a_stage_sees_the_dispersion_of_its_per_second_arrivals() -> None:
    profile = ModelProfile("m", "embedding", 1.0, (BatchPoint(1, 1.0, 1.2),))
    cfg = Config(slo_ms=1e9, stages=[one_stage(profile, 4)], seed=2)
    on_off = np.where(np.arange(400) % 4 == 0, 200.0, 0.0)  # 200/s one second in four
    bursty = traces.Trace("on-off", np.arange(400.0), on_off, 400.0)

    def seen(trace: traces.Trace) -> float | None:
        views: list[float | None] = []

        class Watch(StaticPeak):
            def decide(self, obs: Observation, current: StagePlan) -> StagePlan:
                views.append(obs.arrival_dispersion)
                return super().decide(obs, current)

        simulate(trace, PerStage({"embedding": Watch(4, interval=400.0)}), cfg)
        return views[-1]

    poisson = seen(constant(50.0, 400))
    assert poisson is not None and 0.7 < poisson < 1.3
    # counts 0 or ~200: mean 50, variance about 3 x 50^2 + 50: index about 151
    lumpy = seen(bursty)
    assert lumpy is not None and 120 < lumpy < 180


def test_a_stage_reports_the_mean_time_of_its_recent_batches() -> None:
    profile = ModelProfile("m", "embedding", 1.0, (BatchPoint(1, 20.0, 30.0),))
    cfg = Config(slo_ms=1e9, stages=[one_stage(profile, 4)], seed=4)
    views: list[Observation] = []

    class Watch(StaticPeak):
        def decide(self, obs: Observation, current: StagePlan) -> StagePlan:
            views.append(obs)
            return super().decide(obs, current)

    simulate(constant(40.0, 600), PerStage({"embedding": Watch(4, interval=300.0)}), cfg)
    last = views[-1]
    assert last.batch_size == 1.0  # one request a batch: max_batch 1
    assert last.exec_ms == pytest.approx(profile.mean_ms(1), rel=0.05)


def test_a_policy_sees_the_rate_history_of_each_season_it_is_given() -> None:
    profile = ModelProfile("m", "embedding", 1.0, (BatchPoint(1, 1.0, 1.2),))
    cfg = replace(Config(slo_ms=1e9, stages=[one_stage(profile, 2)], seed=6), seasons=(1800,))
    rps = np.where((np.arange(5400) % 1800) < 900, 10.0, 40.0)  # a half-hour "season"
    views: list[Observation] = []

    class Watch(StaticPeak):
        def decide(self, obs: Observation, current: StagePlan) -> StagePlan:
            views.append(obs)
            return super().decide(obs, current)

    trace = traces.Trace("halves", np.arange(5400.0), rps, 5400.0)
    simulate(trace, PerStage({"embedding": Watch(2, interval=4500.0)}), cfg)
    h = views[-1].rate_history  # at t = 4500: the last hour, and the hour before it
    assert h is not None and h.step_s == 60
    assert len(h.recent) == 61 and h.recent[-1] == pytest.approx(10.0, rel=0.2)  # 4440-4500 s
    (season,) = h.seasons
    assert season.period_s == 1800 and len(season.past) == 66
    # one season earlier: the same phase (2640-2700 s), then what followed (40/s from 2700 s)
    assert season.past[60] == pytest.approx(10.0, rel=0.2)
    assert season.past[61] == pytest.approx(40.0, rel=0.2)
    assert season.past[15] is None and season.past[16] is not None  # before the trace: None
