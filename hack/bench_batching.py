"""``make bench-batching``: ModelPilot's batching tuner against an exhaustive sweep, on a real
tritonserver (a benchmark, not a test).

One embedding replica as a pod runs it: the wheel's ``tritonserver`` (Python backend,
explicit model control) and the embedding service in front, started by ``devtools.stack``.
Open-loop Poisson arrivals of one-query embed requests go to the service.

The objective, fixed before measuring: the highest request rate the replica sustains with
p95 within the budget (``--budget-ms``). A rate is sustained when a step of ``--step-s`` at it
has no error and keeps its p95 (timed from when each request was due) within the budget. A
setting's sustainable rate is found by stepping the offered load from the previous point's
result in growing steps until the verdict flips, then bisecting to 5%.

- **The sweep**: every point of Model Analyzer's space that fits this machine:
  ``max_batch_size`` 1..128 (powers of two) x ``max_queue_delay_microseconds`` {0, 100, 500,
  1000, 2000, 5000, 10000} x instance count {1, 2}, each set through Triton's model-control
  API. Results go to ``bench/batching-<cores>cpu-<cpu>.json`` with the date and the machine,
  point by point (an interrupted sweep resumes); later runs on that kind of machine reuse
  them unless ``--sweep``.
- **The tuner**: the operator's own ``decide()`` every ``--interval-s`` on the snapshots the
  operator's Prometheus adapter makes of the service's metrics (our Prometheus scraping it),
  applied with the operator's live adapter (``live.Pod.sync``), starting from the spec's
  batching and allowed the sweep's instance counts. The offered load climbs x1.25 a minute
  while it adapts, until two steps in a row fail; then a stationary phase at 80% of the
  highest passed step counts its reconfigurations and failed requests.
- **Side by side**: the sweep's best and the tuner's final setting measured again,
  interleaved, ``--rounds`` times each (one sweep point is a noisy maximum of many).

``--sweep-from FILE`` takes the sweep another kind of machine stored instead of measuring
this one's: the sweep's best setting is then what a user would deploy from it, and the
side-by-side rematch, measured here, compares it with the tuner's on this machine.

Usage: .venv/bin/python hack/bench_batching.py [--models minilm_int8,minilm_fp32] [--sweep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from modelpilot.adapters.live import LiveSettings, Pod
from modelpilot.adapters.prometheus import Telemetry, target_labels
from modelpilot.api.v1alpha1 import ModelDeploymentSpec
from modelpilot.contract import QUERY_PATH
from modelpilot.optimizer import profiles as profiles_mod
from modelpilot.optimizer.history import History
from modelpilot.optimizer.policy import decide
from modelpilot.optimizer.sizing import stage_budgets
from modelpilot.optimizer.snapshot import Snapshot, StageTelemetry
from modelpilot.optimizer.tunables import Tunables
from modelpilot.render import plan as plans
from modelpilot_services.devtools.loadgen import LoadResult, paced
from modelpilot_services.devtools.profile import machine
from modelpilot_services.devtools.stack import Stack
from modelpilot_services.models import calibration

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
DELAYS_US = (0, 100, 500, 1000, 2000, 5000, 10000)
INSTANCES = (1, 2)
RAMP = 1.25  # the tuner's offered load, step to step
NAMESPACE, NAME = "bench", "batching"
PROMETHEUS = f"http://127.0.0.1:{os.environ.get('MODELPILOT_PROMETHEUS_PORT', '19090')}"


@dataclass(frozen=True)
class Setting:
    batch: int
    delay_us: int
    instances: int = 1

    def __str__(self) -> str:
        return f"batch {self.batch}, delay {self.delay_us} us, {self.instances} inst."


@dataclass
class Step:
    rate: float
    achieved: float
    p95_ms: float
    errors: int
    ok: bool


def judge(rate: float, r: LoadResult, budget_ms: float) -> Step:
    """A step passes with no error and its p95 within the budget. Latencies run from when
    each request was due, so a replica that falls behind shows in the p95, whatever the
    Poisson count of the step happened to be."""
    p95 = r.p(0.95) * 1000 if r.latencies_s else math.inf
    ok = not r.errors and p95 <= budget_ms
    return Step(round(rate, 2), round(r.achieved_rps, 2), round(p95, 1), len(r.errors), ok)


def sustainable(
    measure: Callable[[float], Step], start: float, floor: float = 0.5, top: float = 2000
) -> tuple[float, list[Step]]:
    """The highest rate ``measure`` passes, to within 5%: from ``start`` (a neighbouring
    point's result) up or down in growing steps (+10%, +20%, +40%, ...) until the verdict
    flips, then geometric bisection. 0 when even ``floor`` fails."""
    steps: list[Step] = []

    def ok(rate: float) -> bool:
        steps.append(measure(rate))
        return steps[-1].ok

    factor, rate = 1.1, start
    lo: float | None = start if ok(start) else None
    hi: float | None = None if lo else start
    while lo is None or hi is None:  # growing steps until one passes and one fails
        rate = rate * factor if hi is None else rate / factor
        factor = 2 * factor - 1  # +10%, +20%, +40%, ...
        if rate > top or rate < floor:
            return round(lo or 0.0, 2), steps
        if ok(rate):
            lo = rate
        else:
            hi = rate
    while hi / lo > 1.05:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return round(lo, 2), steps


class Replica:
    """Triton and the embedding service serving ``model``, and open-loop load on them."""

    def __init__(self, stack: Stack, model: str, budget_ms: float, step_s: float, seed: int):
        self.stack, self.model, self.budget_ms, self.step_s = stack, model, budget_ms, step_s
        self.url = stack.url("embedding") + "/v1/embed"
        self.random = random.Random(seed)
        self.texts = calibration.queries(calibration.corpus(200))

    def configure(self, s: Setting) -> None:
        """Reload the model with this setting (instance count included) and warm it."""
        config = {
            "max_batch_size": s.batch,
            "dynamic_batching": {"max_queue_delay_microseconds": s.delay_us},
            "instance_group": [{"kind": "KIND_CPU", "count": s.instances}],
        }
        r = requests.post(
            f"{self.stack.triton_url}/v2/repository/models/{self.model}/load",
            json={"parameters": {"config": json.dumps(config)}},
            timeout=300,
        )
        r.raise_for_status()
        self.load(5.0, 2.0)  # every instance's first runs, off the record

    def request(self, session: requests.Session, n: int) -> requests.Response:
        text = self.texts[n % len(self.texts)]
        return session.post(self.url, json={"texts": [text]}, timeout=30)

    def load(self, rate: float, seconds: float) -> LoadResult:
        return paced(self.request, rate, seconds, workers=64, poisson=self.random)

    def step(self, rate: float) -> Step:
        return judge(rate, self.load(rate, self.step_s), self.budget_ms)


def sweep_file(out: Path, m: dict[str, Any]) -> Path:
    """Where this kind of machine's sweep is kept: by cores and CPU model."""
    cpu = re.sub(r"[^a-z0-9]+", "-", m["cpu"].lower()).strip("-")
    return out / f"batching-{m['cores']}cpu-{cpu}.json"


def sweep(replica: Replica, path: Path, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every setting's sustainable rate for ``replica.model``; saved after each point."""
    points: list[dict[str, Any]] = doc["models"].setdefault(replica.model, [])
    done = {(p["batch"], p["delay_us"], p["instances"]) for p in points}
    space = [Setting(b, d, n) for n in INSTANCES for b in BATCHES for d in DELAYS_US]
    start = max((p["rate"] for p in points), default=10.0) or 10.0
    for s in tqdm(space, desc=f"sweep {replica.model}", unit="point"):
        if (s.batch, s.delay_us, s.instances) in done:
            continue
        began = time.monotonic()
        replica.configure(s)
        rate, steps = sustainable(replica.step, start)
        start = rate or start
        points.append(
            asdict(s)
            | {
                "rate": rate,
                "p95_ms": next((t.p95_ms for t in steps if t.rate == rate), None),
                "steps": len(steps),
                "seconds": round(time.monotonic() - began, 1),
            }
        )
        path.write_text(json.dumps(doc, indent=1))
    return points


def spec_for(model: str, budget_ms: float, interval_s: int) -> ModelDeploymentSpec:
    """One embedding replica whose share of the SLO is ``budget_ms``: with only the
    embedding stage measured the operator splits the SLO evenly over the query path."""
    slo = math.ceil(budget_ms * len(QUERY_PATH) / Tunables().slo_headroom)
    variant = {"name": "served", "model": model, "precision": "fp32", "quality": "1", "cost": "1"}
    stage = {"replicas": {"min": 1, "max": 1}}
    spec = ModelDeploymentSpec.model_validate(
        {
            "slo": {"latencyP95Ms": slo, "minQuality": "0.5"},
            "optimizer": {"mode": "Auto", "intervalSeconds": interval_s},
            "ingestion": stage,
            "embedding": stage
            | {
                "batching": {
                    "maxBatchSize": max(BATCHES),
                    "maxQueueDelayMicroseconds": max(DELAYS_US),
                    "maxInstances": max(INSTANCES),
                },
                "variants": [variant],
            },
            "retrieval": stage,
            "inference": stage | {"variants": [variant | {"name": "r", "model": "reranker_small"}]},
        }
    )
    only = Snapshot(time.time(), time.time(), {"embedding": StageTelemetry(p95_ms=1.0)})
    got = stage_budgets(spec, only, Tunables())["embedding"]
    assert abs(got - budget_ms) / budget_ms < 0.02, (got, budget_ms)
    return spec


@contextmanager
def scraped(stack: Stack) -> Iterator[Telemetry]:
    """Our Prometheus scraping the embedding service as the cluster's scrapes a pod."""
    subprocess.run([str(ROOT / "hack/prometheus.sh"), "up"], check=True)
    target = ROOT / ".cache/prometheus/targets" / f"{NAME}.json"
    port = stack.ports["embedding"]
    labels = target_labels(NAMESPACE, NAME) | {"job": "embedding"}
    target.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": labels}]))
    try:
        yield Telemetry(PROMETHEUS)
    finally:
        target.unlink(missing_ok=True)


class Tuner:
    """The operator's optimizer tick for the replica, on a thread: decide() on the snapshot,
    the live adapter makes Triton match."""

    def __init__(self, replica: Replica, telemetry: Telemetry, spec: ModelDeploymentSpec):
        self.replica, self.telemetry, self.spec = replica, telemetry, spec
        self.profiles = profiles_mod.load(ROOT / "profiles/cpu.json")
        self.plan = plans.initial(spec)
        self.history = History()
        self.pod = Pod(replica.stack.triton_url, replica.stack.admin_url("embedding"), None)
        self.path: list[tuple[float, Setting, str]] = []  # (s since start, setting, why)
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.apply("the spec's batching")

    @property
    def setting(self) -> Setting:
        e = self.plan["embedding"]
        return Setting(e.max_batch_size or 1, e.max_queue_delay_us or 0, e.instances or 1)

    def apply(self, why: str) -> None:
        s = self.setting
        live = LiveSettings((self.replica.model,), s.batch, s.delay_us, None, instances=s.instances)
        self.pod.sync(live)
        self.path.append((round(time.monotonic() - self.started, 1), s, why))

    def tick(self) -> None:
        now = time.time()
        snapshot = self.telemetry.snapshot(NAMESPACE, NAME, now)
        before = self.setting
        decision = decide(self.spec, self.plan, snapshot, self.history, self.profiles, now)
        self.plan, self.history = decision.plan, decision.history
        if self.setting != before:
            why = [r for r in decision.reasons if r.startswith("embedding")]
            self.apply("; ".join(why)[:300])

    def _run(self) -> None:
        while not self._stop.wait(self.spec.optimizer.interval_seconds):
            try:
                self.tick()
            except (requests.RequestException, ValueError) as e:  # as the operator: next tick
                print(f"  tick failed: {e}")

    def __enter__(self) -> Tuner:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def tune(
    replica: Replica, telemetry: Telemetry, args: argparse.Namespace, start: float
) -> dict[str, Any]:
    """The tuner live under a climbing load, then a stationary phase; its final setting's
    sustainable rate measured as a sweep point's."""
    replica.configure(Setting(1, 0))  # a known start; the tuner then applies the spec's
    spec = spec_for(replica.model, args.budget_ms, args.interval_s)
    ramp: list[dict[str, Any]] = []
    with Tuner(replica, telemetry, spec) as tuner:
        rate, failed, passed = start, 0, 0.0
        while failed < 2:
            replica.load(rate, args.ramp_s - args.step_s)  # the tuner adapts meanwhile
            step = judge(rate, replica.load(rate, args.step_s), args.budget_ms)
            ramp.append(asdict(step) | {"setting": str(tuner.setting)})
            print(f"  ramp {step} under {tuner.setting}")
            if step.ok:
                passed, failed, rate = rate, 0, rate * RAMP
            else:
                failed += 1
        ramp_s = round(time.monotonic() - tuner.started, 1)
        final = tuner.setting
        changes = len(tuner.path) - 1
        stationary_rate = 0.8 * passed
        held = replica.load(stationary_rate, args.stationary_s) if passed else None
        stationary_changes = len(tuner.path) - 1 - changes
    return {
        "final": asdict(final),
        "live_rate": round(passed, 2),
        "ramp": ramp,
        "ramp_seconds": ramp_s,
        "reconfigurations": changes,
        "path": [{"t": t, **asdict(s), "why": why} for t, s, why in tuner.path],
        "stationary": {
            "rate": round(stationary_rate, 2),
            "seconds": args.stationary_s,
            "reconfigurations": stationary_changes,
            "failed": len(held.errors) if held else None,
            "p95_ms": round(held.p(0.95) * 1000, 1) if held and held.latencies_s else None,
        },
    }


def rematch(replica: Replica, settings: dict[str, Setting], rounds: int, start: float) -> Any:
    """Each setting's sustainable rate measured again, ``rounds`` times, interleaved so that
    drift hits all alike: the sweep's best is the highest of 112 noisy measurements, so it is
    compared with the tuner's only as measured side by side (median of the rounds)."""
    rates: dict[str, list[float]] = {name: [] for name in settings}
    p95s: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(rounds):
        for name, setting in settings.items():
            replica.configure(setting)
            rate, steps = sustainable(replica.step, start)
            rates[name].append(rate)
            p95s[name] += [t.p95_ms for t in steps if t.rate == rate]
    return {
        name: {
            "setting": asdict(settings[name]),
            "rates": rates[name],
            "rate": statistics.median(rates[name]),
            "p95_ms": statistics.median(p95s[name]) if p95s[name] else None,
        }
        for name in settings
    }


def best_point(points: list[dict[str, Any]]) -> tuple[Setting, float]:
    best = max(points, key=lambda p: p["rate"])
    return Setting(best["batch"], best["delay_us"], best["instances"]), best["rate"]


def table(doc: dict[str, Any], tuned: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| model | sweep's best setting (its sweep rate) | sweep time | tuner's final setting | "
        "tuner time (ramp) | side by side: sweep best / tuner, req/s (p95 ms) | ratio | "
        "reconfigurations: ramp / stationary | failed requests (stationary) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, t in tuned.items():
        points = doc["models"][model]
        best, rate = best_point(points)
        sweep_s = sum(p["seconds"] for p in points)
        a, b = t["rematch"]["sweep"], t["rematch"]["tuner"]
        rows.append(
            f"| {model} | {best} ({rate:.1f}/s) | {sweep_s / 60:.0f} min, {len(points)} points | "
            f"{Setting(**t['final'])} | {t['ramp_seconds'] / 60:.1f} min "
            f"({t['ramp_seconds'] / sweep_s:.2f}x) | {a['rate']:.1f} ({a['p95_ms']}) / "
            f"{b['rate']:.1f} ({b['p95_ms']}) | {b['rate'] / a['rate']:.2f} | "
            f"{t['reconfigurations']} / {t['stationary']['reconfigurations']} | "
            f"{t['stationary']['failed']} |"
        )
    machines = {f"sweep on {doc['machine']['cpu']} ({doc['date']})"} | {
        f"tuner and side by side on {t['machine']['cpu']}" for t in tuned.values()
    }
    return "\n".join([*rows, "", "; ".join(sorted(machines))])


def plot(doc: dict[str, Any], model: str, tuned: dict[str, Any], out: Path) -> None:
    """The sweep's heat map per instance count, the tuner's path over it (each setting on
    its instance count's map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points = doc["models"][model]
    fig, axes = plt.subplots(1, len(INSTANCES), figsize=(11, 4), sharey=True)
    top = max(p["rate"] for p in points) or 1.0
    for ax, n in zip(axes, INSTANCES, strict=True):
        grid = np.full((len(DELAYS_US), len(BATCHES)), np.nan)
        for p in points:
            if p["instances"] == n:
                grid[DELAYS_US.index(p["delay_us"]), BATCHES.index(p["batch"])] = p["rate"]
        image = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=top, aspect="auto")
        ax.set_xticks(range(len(BATCHES)), [str(b) for b in BATCHES])
        ax.set_yticks(range(len(DELAYS_US)), [str(d) for d in DELAYS_US])
        ax.set_xlabel("max_batch_size")
        ax.set_title(f"{model}, {n} instance{'s' if n > 1 else ''}: sustainable req/s")
        if n == INSTANCES[0]:
            ax.set_ylabel("max_queue_delay_microseconds")
        path = [p for p in tuned["path"] if p["instances"] == n]
        xs = [BATCHES.index(p["batch"]) if p["batch"] in BATCHES else np.nan for p in path]
        ys = [
            DELAYS_US.index(p["delay_us"]) if p["delay_us"] in DELAYS_US else np.nan for p in path
        ]
        ax.plot(xs, ys, "o-", color="white", label="tuner's settings")
        if tuned["final"]["instances"] == n:
            final = tuned["final"]
            x, y = BATCHES.index(final["batch"]), DELAYS_US.index(final["delay_us"])
            ax.plot([x], [y], "*", color="red", markersize=14, label="tuner's final")
        ax.legend(loc="upper left", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8)
    sweep_cpu = doc["machine"]["cpu"]
    fig.suptitle(f"sweep: {sweep_cpu}, {doc['date']}; tuner: {tuned['machine']['cpu']}", y=1.02)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", default="minilm_int8,minilm_fp32")
    parser.add_argument("--budget-ms", type=float, default=100.0)
    parser.add_argument("--step-s", type=float, default=6.0, help="one measured step")
    parser.add_argument("--ramp-s", type=float, default=60.0, help="one tuner ramp step")
    parser.add_argument("--interval-s", type=int, default=10, help="the optimizer's interval")
    parser.add_argument("--stationary-s", type=float, default=600.0)
    parser.add_argument("--sweep", action="store_true", help="measure the sweep again")
    parser.add_argument("--sweep-only", action="store_true")
    parser.add_argument(
        "--sweep-from", type=Path, help="use this stored sweep (another machine's), measure none"
    )
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side measurements")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.sweep_from or sweep_file(args.out, machine())
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() and not args.sweep else {}
    if args.sweep_from and not doc:
        raise SystemExit(f"{path}: no stored sweep")
    if doc.get("budget_ms") not in (None, args.budget_ms) or doc.get("step_s") not in (
        None,
        args.step_s,
    ):
        raise SystemExit(f"{path} was measured with another budget or step: rerun with --sweep")
    doc = {
        "date": doc.get("date") or datetime.date.today().isoformat(),
        "machine": doc.get("machine") or machine(),
        "budget_ms": args.budget_ms,
        "step_s": args.step_s,
        "models": doc.get("models") or {},
    }
    tuned: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        for model in args.models.split(","):
            config = Path(tmp) / "service.json"
            config.write_text(json.dumps({"stage": "embedding", "model": model}))
            stack = Stack(Path(tmp) / model, extra_env={"MODELPILOT_SERVICE_CONFIG": str(config)})
            try:
                stack.start_triton()
                requests.post(
                    f"{stack.triton_url}/v2/repository/models/{model}/load", timeout=300
                ).raise_for_status()
                stack.start("embedding")
                replica = Replica(stack, model, args.budget_ms, args.step_s, seed=7)
                points = doc["models"][model] if args.sweep_from else sweep(replica, path, doc)
                if args.sweep_only:
                    continue
                best, rate = best_point(points)
                with scraped(stack) as telemetry:
                    t = tuned[model] = tune(replica, telemetry, args, start=max(rate / 4, 1.0))
                t["machine"], t["sweep_machine"] = machine(), doc["machine"]
                contenders = {"sweep": best, "tuner": Setting(**t["final"])}
                t["rematch"] = rematch(replica, contenders, args.rounds, rate)
                plot(doc, model, t, args.out / f"batching-{model}.png")
            finally:
                stack.down()
    if tuned:
        (args.out / "batching-tuner.json").write_text(json.dumps(tuned, indent=1))
        print(table(doc, tuned))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
