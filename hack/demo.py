"""`make demo`: the whole loop on this machine, watched live.

Brings up (or reuses) the local control plane and Prometheus, starts the data plane on the
real `tritonserver` with the real models, runs the operator on `examples/full.yaml`, and
drives a load that ramps up and down. A live table shows per stage the request rate, p95
against the SLO, replicas, batch size, variant and the optimizer's last reason. At the end
(or on Ctrl-C) it prints a summary, writes a PNG and tears down what it started.

The cluster's pods are kwok's (no kubelet runs containers): the data plane runs once, as
local processes. The demo stands in for the pods when the operator acts: it applies the
plan in status (variant, Triton batching, shadow candidate) to the local data plane with
the operator's own adapters, so each decision reaches the real Triton.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]

from modelpilot.plan import StagePlan  # noqa: E402
from modelpilot.shadow import set_shadow, shadow_target  # noqa: E402
from modelpilot.telemetry import Telemetry  # noqa: E402
from modelpilot.triton import load_with_config  # noqa: E402
from modelpilot_services.loadgen import paced  # noqa: E402
from modelpilot_services.stack import Stack  # noqa: E402

NAMESPACE, NAME = "demo", "full"
STAGES = ("ingestion", "embedding", "retrieval", "inference")
KUBECTL = [str(ROOT / ".cache/bin/kubectl"), "--kubeconfig", str(ROOT / ".cache/kubeconfig")]
OUT = ROOT / ".cache/demo"
VOCABULARY = """operators scale triton models on kubernetes while prometheus scrapes latency
histograms of batches queues replicas variants quality budgets and costs per hour"""
WORDS = VOCABULARY.split()


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> str:
    r = subprocess.run([*KUBECTL, *args], input=stdin, capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def sentence(n: int, words: int = 20) -> str:
    return " ".join(WORDS[(n * 7 + i * 3) % len(WORDS)] for i in range(words)) + f" {n}"


def ramp(t: float, seconds: float, low: float, high: float) -> float:
    """Up and down once: low -> high at the middle -> low."""
    return low + (high - low) * math.sin(math.pi * min(max(t / seconds, 0.0), 1.0))


@dataclass
class Load:
    """Paced load that follows the ramp in 10 s steps: embedding requests and queries."""

    stack: Stack
    seconds: float
    peak: float
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)

    def _embed(self, session: requests.Session, n: int) -> requests.Response:
        body = {"texts": [sentence(n)]}
        return session.post(self.stack.url("embedding") + "/v1/embed", json=body, timeout=30)

    def _query(self, session: requests.Session, n: int) -> requests.Response:
        body = {"query": sentence(10**6 + n, 8), "top_k": 3}
        return session.post(self.stack.url("inference") + "/v1/query", json=body, timeout=30)

    def _ingest(self, session: requests.Session, n: int) -> requests.Response:
        body = {"documents": [{"id": f"demo-{n}", "text": sentence(n, 80)}]}
        return session.post(self.stack.url("ingestion") + "/v1/documents", json=body, timeout=30)

    def run(self) -> None:
        start, step = time.monotonic(), 0
        with ThreadPoolExecutor(3) as pool:
            while not self.stop.is_set() and (t := time.monotonic() - start) < self.seconds:
                rate = ramp(t + 5, self.seconds, 2.0, self.peak)
                base = step * 100_000  # distinct texts and queries: no cache hits by repetition
                futures = [
                    pool.submit(paced, lambda s, i, b=base: self._embed(s, b + i), rate, 10),
                    pool.submit(
                        paced, lambda s, i, b=base: self._query(s, b + i), max(0.5, rate / 20), 10
                    ),
                    pool.submit(paced, lambda s, i, b=base: self._ingest(s, b + i), 1.0, 10),
                ]
                for future in futures:
                    result = future.result()
                    self.sent += result.sent
                    self.ok += result.ok
                    self.errors += result.errors
                step += 1


class PodStandIn:
    """Applies the plan in status to the local data plane, as the pods would see it."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.applied: dict[str, tuple[Any, ...]] = {}

    def sync(self, md: dict[str, Any]) -> None:
        stages = (md.get("status") or {}).get("stages") or {}
        for stage in ("embedding", "inference"):
            st = stages.get(stage) or {}
            models = {v["name"]: v["model"] for v in md["spec"][stage]["variants"]}
            model = models.get(st.get("variant", ""))
            key = (model, st.get("maxBatchSize"), st.get("maxQueueDelayMicroseconds"))
            if model is None:
                continue
            if self.applied.get(stage) != key and key[1]:
                plan = StagePlan(1, st["variant"], key[1], key[2])
                load_with_config(self.stack.triton_url, model, plan)
                if stage == "embedding":
                    requests.put(
                        self.stack.url("embedding") + "/v1/admin/model",
                        json={"model": model},
                        timeout=60,
                    ).raise_for_status()
                self.applied[stage] = key
            plan = StagePlan(1, st["variant"], shadow_variant=st.get("shadowVariant"))
            target = shadow_target(md["spec"], stage, plan)
            if self.applied.get(f"{stage}-shadow") != target:
                set_shadow(self.stack.url(stage), *target)
                self.applied[f"{stage}-shadow"] = target


@dataclass
class Row:
    t: float
    rate: dict[str, float | None]
    p95: dict[str, float | None]
    replicas: dict[str, int]
    batch: dict[str, int | None]


def view(md: dict[str, Any], snap: Any, slo_ms: int, load: Load, left: float) -> Table:
    status = md.get("status") or {}
    stages = status.get("stages") or {}
    table = Table(
        title=f"ModelPilot demo: {NAMESPACE}/{NAME}, p95 SLO {slo_ms} ms, {left:.0f} s left "
        f"(Ctrl-C ends)",
        caption=f"load: {load.ok} ok, {len(load.errors)} errors; end-to-end p95 "
        + (f"{snap.e2e_p95_ms:.0f} ms" if snap and snap.e2e_p95_ms else "n/a"),
    )
    for col in ("stage", "req/s", "p95 ms", "replicas", "batch", "variant"):
        table.add_column(col, justify="right" if col not in ("stage", "variant") else "left")
    for stage in STAGES:
        tele = snap.stages.get(stage) if snap else None
        st = stages.get(stage) or {}
        rate = f"{tele.rate_rps:.1f}" if tele and tele.rate_rps is not None else "-"
        p95 = f"{tele.p95_ms:.0f}" if tele and tele.p95_ms is not None else "-"
        variant = st.get("variant") or ""
        if st.get("shadowVariant"):
            variant += f" (verifying {st['shadowVariant']})"
        table.add_row(
            stage,
            rate,
            p95,
            f"{st.get('readyReplicas', 0)}/{st.get('replicas', '-')}",
            str(st.get("maxBatchSize") or "-"),
            variant,
        )
    last = status.get("lastDecision") or {}
    reasons = "; ".join(last.get("reasons") or [])
    table.add_section()
    table.add_row("decision", last.get("summary", "-"), "", "", "", reasons[:160])
    return table


def plot(rows: list[Row], slo_ms: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    t = [r.t for r in rows]
    color = dict(zip(STAGES, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))
    for stage in STAGES:
        style = {"label": stage, "color": color[stage]}
        axes[0].plot(t, [r.rate.get(stage) or math.nan for r in rows], **style)
        axes[1].plot(t, [r.p95.get(stage) or math.nan for r in rows], **style)
        axes[2].step(t, [r.replicas.get(stage, 0) for r in rows], where="post", **style)
        if stage in ("embedding", "inference"):
            batch = [r.batch.get(stage) or math.nan for r in rows]
            axes[3].step(t, batch, where="post", **style)
    axes[1].axhline(slo_ms, color="red", linestyle="--", label="SLO (end to end)")
    for ax, label in zip(
        axes, ("requests/s", "p95 (ms)", "replicas", "max batch size"), strict=True
    ):
        ax.set_ylabel(label)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds")
    fig.suptitle("ModelPilot demo: examples/full.yaml under a ramped load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300, help="length of the load ramp")
    parser.add_argument("--peak", type=float, default=30, help="peak embedding requests/s")
    parser.add_argument("--no-live", action="store_true", help="no live view (logs, CI)")
    args = parser.parse_args(argv)
    console = Console()
    OUT.mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    stack = Stack(OUT / "stack")
    operator: subprocess.Popen[bytes] | None = None
    load: Load | None = None
    interrupted = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        interrupted.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    rows: list[Row] = []
    try:
        for script in ("cluster", "prometheus"):
            running = subprocess.run([str(ROOT / f"hack/{script}.sh"), "status"]).returncode == 0
            if not running:
                started.append(script)
            subprocess.run([str(ROOT / f"hack/{script}.sh"), "up"], check=True)
        console.print("[bold]starting the data plane on the real tritonserver...")
        stack.up()
        labels = {"namespace": NAMESPACE, "pipeline": NAME}
        stack.prometheus_targets(ROOT / ".cache/prometheus/targets/demo.json", labels)
        kubectl("apply", "--server-side", "--force-conflicts", "-f", "crds/modeldeployment.yaml")
        kubectl("wait", "--for=condition=Established", "crd/modeldeployments.modelpilot.io")
        if kubectl("get", "ns", NAMESPACE, check=False) == "":
            kubectl("create", "ns", NAMESPACE)
        prom = f"http://127.0.0.1:{os.environ.get('MODELPILOT_PROMETHEUS_PORT', '19090')}"
        with (OUT / "operator.log").open("wb") as log:
            operator = subprocess.Popen(
                [
                    str(ROOT / ".venv/bin/kopf"),
                    "run",
                    "--standalone",
                    f"--namespace={NAMESPACE}",
                    "-m",
                    "modelpilot.handlers",
                ],
                env={
                    **os.environ,
                    "KUBECONFIG": str(ROOT / ".cache/kubeconfig"),
                    "MODELPILOT_PROFILES": str(ROOT / "profiles/cpu.json"),
                    "MODELPILOT_PROMETHEUS_URL": prom,
                    "MODELPILOT_LIVE_UPDATES": "false",  # the pods are kwok's: see PodStandIn
                },
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        md_doc = yaml.safe_load((ROOT / "examples/full.yaml").read_text())
        kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump(md_doc))
        slo_ms = int(md_doc["spec"]["slo"]["latencyP95Ms"])
        load = Load(stack, args.seconds, args.peak)
        load_thread = threading.Thread(target=load.run, daemon=True)
        load_thread.start()
        telemetry = Telemetry(prom)
        stand_in = PodStandIn(stack)
        begin = time.monotonic()
        live = None if args.no_live else Live(console=console, refresh_per_second=1)
        if live:
            live.start()
        while load_thread.is_alive() and not interrupted.is_set():
            now = time.time()
            md = json.loads(kubectl("get", "md", NAME, "-n", NAMESPACE, "-o", "json"))
            try:
                stand_in.sync(md)
            except Exception as exc:  # shown, not fatal: the next round retries
                console.print(f"[yellow]applying the plan locally failed: {exc}")
            try:
                snap = telemetry.snapshot(NAMESPACE, NAME, now)
            except Exception:
                snap = None
            stages = (md.get("status") or {}).get("stages") or {}
            rows.append(
                Row(
                    time.monotonic() - begin,
                    {s: (snap.stages[s].rate_rps if snap and s in snap.stages else None)
                     for s in STAGES},
                    {s: (snap.stages[s].p95_ms if snap and s in snap.stages else None)
                     for s in STAGES},
                    {s: int((stages.get(s) or {}).get("replicas", 0)) for s in STAGES},
                    {s: (stages.get(s) or {}).get("maxBatchSize") for s in STAGES},
                )
            )  # fmt: skip
            left = args.seconds - (time.monotonic() - begin)
            if live:
                live.update(view(md, snap, slo_ms, load, left))
            interrupted.wait(2)  # the view's refresh period
        if live:
            live.stop()
        events = json.loads(kubectl("get", "events", "-n", NAMESPACE, "-o", "json"))["items"]
        optimized = [e for e in events if e.get("reason") == "Optimized"]
        summary = {
            "seconds": round(time.monotonic() - begin),
            "requests": load.sent,
            "ok": load.ok,
            "errors": len(load.errors),
            "decisions_applied": sum(e.get("count") or 1 for e in optimized),
            "final": (md.get("status") or {}).get("stages"),
            "last_decision": (md.get("status") or {}).get("lastDecision"),
        }
        if rows:
            plot(rows, slo_ms, OUT / "demo.png")
            summary["png"] = str(OUT / "demo.png")
        console.print_json(json.dumps(summary))
        (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
        return 0
    finally:
        console.print("[bold]tearing down...")
        if load is not None:
            load.stop.set()
        if operator is not None:
            if operator.poll() is None:  # let it release its finalizer before it goes
                kubectl("delete", "md", NAME, "-n", NAMESPACE, "--timeout=60s", check=False)
            operator.terminate()
            try:
                operator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                operator.kill()
        if "cluster" not in started:  # a cluster we found: leave it as we found it
            kubectl("delete", "ns", NAMESPACE, "--wait=false", check=False)
        (ROOT / ".cache/prometheus/targets/demo.json").unlink(missing_ok=True)
        stack.down()
        for script in reversed(started):
            subprocess.run([str(ROOT / f"hack/{script}.sh"), "down"], check=False)


if __name__ == "__main__":
    sys.exit(main())
