"""``make bench``: replay traces under every policy, side by side, and print the figures.

Usage: python -m modelpilot.sim.bench [--trace t.csv] [--profiles profiles/cpu.json]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from modelpilot.api.v1alpha1 import ModelDeploymentSpec
from modelpilot.optimizer import profiles as profiles_mod
from modelpilot.optimizer.policy import Tunables, size_model_stage
from modelpilot.sim import traces
from modelpilot.sim.engine import Config, Result, simulate
from modelpilot.sim.policies import HPA, KEDA, KPA, Action, ModelPilot, Oracle, StaticPeak

REFERENCE = "minilm-fp32"


def bench_spec(slo_ms: int) -> ModelDeploymentSpec:
    """The pipeline the bench runs: the measured embedding variants, equal cost per replica
    (each a one-CPU pod), a quality floor that admits int8 but not the static model."""
    variant = [
        {
            "name": "minilm-fp32",
            "model": "minilm_fp32",
            "precision": "fp32",
            "quality": "1",
            "cost": "1",
        },
        {
            "name": "minilm-int8",
            "model": "minilm_int8",
            "precision": "int8",
            "quality": "0.8",
            "cost": "1",
        },
        {
            "name": "minilm-static",
            "model": "minilm_static",
            "precision": "distilled",
            "quality": "0.35",
            "cost": "1",
        },
    ]
    return ModelDeploymentSpec.model_validate(
        {
            "slo": {"latencyP95Ms": slo_ms, "minQuality": "0.8"},
            "optimizer": {
                "intervalSeconds": 15,
                "scaleDownStabilizationSeconds": 300,
                "maxScaleUpStep": 4,
                # The simulator has no model outputs to compare in shadow: it switches
                # variants unverified (the gate's own tests are in test_optimizer.py).
                "verification": {"enabled": False},
            },
            "embedding": {
                "replicas": {"min": 1, "max": 64},
                "batching": {"maxBatchSize": 8, "maxQueueDelayMicroseconds": 2000},
                "variants": variant,
            },
            "inference": {"variants": [variant[0]]},
        }
    )


def run_trace(
    trace: traces.Trace,
    profiles: profiles_mod.Profiles,
    slo_ms: int,
    startup_s: float,
    show_progress: bool,
) -> dict[str, Result]:
    spec = bench_spec(slo_ms)
    stage = spec.embedding
    models = {v.name: profiles.models[v.model] for v in stage.variants}
    ref = models[REFERENCE]
    b, d = stage.batching.max_batch_size, stage.batching.max_queue_delay_microseconds
    per_pod = ref.throughput_rps(1)  # what a user measures for one pod of the reference
    tun = Tunables()
    start_rate = trace.max_rate(0, 60)
    warm = size_model_stage(ref, start_rate, slo_ms * tun.slo_headroom, 1.0, (1, 64), 1, 0, tun)
    start = Action(warm.replicas, REFERENCE, b, d)
    peak = float(trace.rps.max())
    policies = [
        ModelPilot(spec, profiles),
        StaticPeak(replicas=math.ceil(peak / (0.75 * per_pod))),
        HPA(min_replicas=1, max_replicas=64),
        KEDA(min_replicas=1, max_replicas=64, threshold=0.7 * per_pod),
        KPA(min_replicas=1, max_replicas=64, container_concurrency=1.0),
        Oracle(spec, profiles, trace.max_rate),
    ]
    results: dict[str, Result] = {}
    for policy in policies:
        # Static provisioning is in place from the start; the others start warm for the
        # trace's first minute on the reference variant.
        first = (
            Action(policy.replicas, REFERENCE, b, d) if isinstance(policy, StaticPeak) else start
        )
        cfg = Config(
            slo_ms=slo_ms,
            variant_costs={v.name: float(v.cost_value) for v in stage.variants},
            variant_models=models,
            start=first,
            startup_s=startup_s,
        )
        bar = None
        if show_progress:
            from tqdm import tqdm

            bar = tqdm(
                total=int(trace.duration),
                desc=f"{trace.name}:{policy.name}",
                unit="s",
                leave=False,
                file=sys.stderr,
            )
        last = [0.0]

        def progress(now: float, bar: Any = bar, last: list[float] = last) -> None:
            if bar is not None and now - last[0] >= 60:
                bar.update(int(now - last[0]))
                last[0] = now

        results[policy.name] = simulate(trace, policy, cfg, progress)
        if bar is not None:
            bar.close()
    return results


def summarize(results: dict[str, Result], slo_ms: int) -> dict[str, dict[str, float]]:
    hpa, oracle = results["hpa"].cost, results["oracle"].cost
    out = {}
    for name, r in results.items():
        out[name] = {
            "attainment": round(r.attainment(slo_ms), 4),
            "window_attainment": round(r.window_attainment(slo_ms), 4),
            "cost": round(r.cost, 3),
            "cost_vs_hpa": round(r.cost / hpa, 3) if hpa else math.nan,
            "cost_vs_oracle": round(r.cost / oracle, 3) if oracle else math.nan,
            "quality": round(_quality(r), 4),
            "actions": r.actions,
        }
    return out


_QUALITY: dict[str, float] = {}


def _quality(r: Result) -> float:
    total = sum(r.variant_seconds.values())
    if not total:
        return 1.0
    return sum(_QUALITY.get(v, 1.0) * s for v, s in r.variant_seconds.items()) / total


def plot(trace: traces.Trace, results: dict[str, Result], slo_ms: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    axes[0].plot(trace.t / 60, trace.rps, color="black", lw=0.6)
    axes[0].set_ylabel("requests/s")
    axes[0].set_title(f"trace {trace.name}")
    for name, r in results.items():
        t = [x / 60 for x in r.timeline["t"]]
        axes[1].step(t, r.timeline["replicas"], where="post", label=name, lw=1)
        axes[2].plot(t, r.timeline["p95"], label=name, lw=0.8)
    axes[1].set_ylabel("replicas")
    axes[1].legend(ncol=3, fontsize=8)
    axes[2].axhline(slo_ms, color="red", ls="--", lw=1, label="SLO")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("p95 ms (60 s)")
    axes[2].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trace", type=Path, help="CSV t,rps; default: every built-in trace")
    parser.add_argument("--profiles", type=Path, default=Path("profiles/cpu.json"))
    parser.add_argument("--slo-ms", type=int, default=150)
    parser.add_argument("--startup-s", type=float, default=20.0)
    parser.add_argument("--hours", type=float, default=4.0, help="built-in trace length")
    parser.add_argument("--out", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    profiles = profiles_mod.load(args.profiles)
    for v in bench_spec(args.slo_ms).embedding.variants:
        _QUALITY[v.name] = profiles.models[v.model].quality
    if args.trace:
        trace_list = [traces.load_csv(args.trace)]
    else:
        seconds = int(args.hours * 3600)
        trace_list = [gen(seconds=seconds) for gen in traces.BUILTIN.values()]
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    for trace in trace_list:
        t0 = time.perf_counter()
        results = run_trace(trace, profiles, args.slo_ms, args.startup_s, not args.no_progress)
        elapsed = time.perf_counter() - t0
        summary = summarize(results, args.slo_ms)
        png = args.out / f"{trace.name}.png"
        plot(trace, results, args.slo_ms, png)
        print(
            f"\ntrace {trace.name}: {trace.duration / 3600:.1f} h, "
            f"{len(results['hpa'].arrivals)} requests, SLO p95 {args.slo_ms} ms, "
            f"simulated all policies in {elapsed:.1f} s -> {png}"
        )
        print(
            f"{'policy':<12}{'attain':>8}{'win-att':>9}{'cost':>9}{'/hpa':>7}{'/oracle':>9}"
            f"{'quality':>9}{'actions':>9}"
        )
        for name, s in summary.items():
            print(
                f"{name:<12}{s['attainment']:>8.4f}{s['window_attainment']:>9.4f}"
                f"{s['cost']:>9.2f}{s['cost_vs_hpa']:>7.2f}{s['cost_vs_oracle']:>9.2f}"
                f"{s['quality']:>9.3f}{s['actions']:>9d}"
            )
        report[trace.name] = {"trace": trace.name, "policies": summary}
    final = next(iter(report.values())) if len(report) == 1 else {"trace": "all", "traces": report}
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
