"""`make demo`: the whole loop on real pods, watched live.

Builds (or reuses) the pinned tools, brings up the local cluster (control plane, kwok's fake
nodes and the real node-1) and Prometheus, builds the project's images and loads them into
node-1, installs the chart (the operator runs from its image, as a pod, with the chart's
RBAC and live updates on), applies ``examples/local.yaml``, ingests a corpus through the
ingestion Service and drives a load that ramps up and down through the embedding and
gateway Services. A live table shows per stage the request rate, p95 against the SLO,
replicas, batch size, variant and the optimizer's last reason. At the end (or on Ctrl-C) it
prints a summary, writes a PNG and uninstalls what it installed.
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
from collections import deque
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

from modelpilot.adapters.prometheus import Telemetry  # noqa: E402
from modelpilot.contract import SERVICE_PORTS, STAGES  # noqa: E402
from modelpilot_services.devtools.loadgen import paced  # noqa: E402
from modelpilot_services.models import calibration  # noqa: E402

NAMESPACE, NAME, RELEASE = "demo", "local", "modelpilot"
IMAGES, TAG = "localhost/modelpilot", "test"  # the tag the tests load too: one set of images
BIN = ROOT / ".cache/bin"
KUBECONFIG = ROOT / ".cache/kubeconfig"
OUT = ROOT / ".cache/demo"
NODE_IP = os.environ.get("MODELPILOT_NODE_IP", "10.245.0.1")
VOCABULARY = """operators scale triton models on kubernetes while prometheus scrapes latency
histograms of batches queues replicas variants quality budgets and costs per hour"""
WORDS = VOCABULARY.split()


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> str:
    argv = [str(BIN / "kubectl"), "--kubeconfig", str(KUBECONFIG), *args]
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def step(console: Console, title: str, argv: list[str], env: dict[str, str] | None = None) -> None:
    """Run a long step with progress: elapsed seconds and its latest output line, live;
    its whole output in ``.cache/demo/<first word>.log``."""
    log_path = OUT / f"{title.split()[0]}.log"
    start = time.monotonic()
    last: deque[str] = deque(maxlen=1)
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc,
        console.status(title) as status,
    ):
        assert proc.stdout is not None

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if line.strip():
                    last.append(line.strip()[:100])

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while proc.poll() is None:
            tail = f"  [dim]{last[0]}[/dim]" if last else ""
            status.update(f"{title} ({time.monotonic() - start:.0f} s){tail}")
            time.sleep(1)  # the status line's refresh period
        reader.join(timeout=10)
    took = time.monotonic() - start
    if proc.returncode:
        console.print(f"[red]{title} failed after {took:.0f} s; see {log_path}")
        raise SystemExit(proc.returncode)
    console.print(f"[green]✓[/green] {title} ({took:.0f} s)")


def sentence(n: int, words: int = 20) -> str:
    return " ".join(WORDS[(n * 7 + i * 3) % len(WORDS)] for i in range(words)) + f" {n}"


def ramp(t: float, seconds: float, low: float, high: float) -> float:
    """Up and down once: low -> high at the middle -> low."""
    return low + (high - low) * math.sin(math.pi * min(max(t / seconds, 0.0), 1.0))


def service(stage: str) -> str:
    ip = json.loads(kubectl("get", "svc", f"{NAME}-{stage}", "-n", NAMESPACE, "-o", "json"))
    return f"http://{ip['spec']['clusterIP']}:{SERVICE_PORTS[stage]}"


@dataclass
class Load:
    """Paced load that follows the ramp in 10 s steps, through the Services: embedding
    requests and queries."""

    urls: dict[str, str]
    seconds: float
    peak: float
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def _embed(self, session: requests.Session, n: int) -> requests.Response:
        body = {"texts": [sentence(n + i) for i in range(4)]}
        return session.post(self.urls["embedding"] + "/v1/embed", json=body, timeout=30)

    def _query(self, session: requests.Session, n: int) -> requests.Response:
        body = {"query": sentence(10**6 + n, 8), "top_k": 3}
        return session.post(self.urls["inference"] + "/v1/query", json=body, timeout=30)

    def run(self) -> None:
        step_no = 0
        with ThreadPoolExecutor(2) as pool:
            while not self.stop.is_set() and (t := time.monotonic() - self.started) < self.seconds:
                rate = ramp(t + 5, self.seconds, 1.0, self.peak)
                base = step_no * 100_000  # distinct texts and queries: no cache hits
                futures = [
                    pool.submit(paced, lambda s, i, b=base: self._embed(s, b + i), rate, 10),
                    pool.submit(paced, lambda s, i, b=base: self._query(s, b + i), 1.0, 10),
                ]
                for future in futures:
                    result = future.result()
                    self.sent += result.sent
                    self.ok += result.ok
                    self.errors += result.errors
                step_no += 1


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
        title=f"ModelPilot demo: {NAMESPACE}/{NAME} on node-1, p95 SLO {slo_ms} ms, "
        f"{max(left, 0):.0f} s left (Ctrl-C ends)",
        caption=f"load: {load.ok} ok, {len(load.errors)} errors; end-to-end p95 "
        + (f"{snap.e2e_p95_ms:.0f} ms" if snap and snap.e2e_p95_ms else "n/a"),
    )
    for col in ("stage", "req/s", "p95 ms", "replicas", "batch", "on plan", "variant"):
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
            str(st.get("podsOnPlan", "-")),
            variant,
        )
    last = status.get("lastDecision") or {}
    reasons = "; ".join(last.get("reasons") or [])
    table.add_section()
    table.add_row("decision", last.get("summary", "-"), "", "", "", "", reasons[:160])
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
    fig.suptitle("ModelPilot demo: examples/local.yaml on real pods under a ramped load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def install(console: Console, prometheus: str) -> None:
    """The chart, as a platform team installs it, with the operator on the real node."""
    values = {
        "image": {"repository": f"{IMAGES}/operator", "tag": TAG},
        "services": {"imageRepository": IMAGES, "imageTag": TAG},
        "prometheus": {"url": prometheus},
        "watchNamespaces": [NAMESPACE],
        # The CRD is applied below, not by Helm: it may be there already (an earlier demo,
        # `make run`, the tests), and Helm refuses to adopt what it did not install.
        "crds": {"enabled": False},
        "nodeSelector": {"kubernetes.io/hostname": "node-1"},
        "tolerations": [
            {"key": "modelpilot.io/real-node", "operator": "Exists", "effect": "NoSchedule"}
        ],
    }
    path = OUT / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds/modeldeployment.yaml")
    )
    if not kubectl("get", "ns", NAMESPACE, check=False):
        kubectl("create", "ns", NAMESPACE)
    helm = [str(BIN / "helm"), "--kubeconfig", str(KUBECONFIG)]
    step(
        console,
        "helm install the chart (the operator as a pod)",
        [*helm, "upgrade", "--install", RELEASE, "charts/modelpilot", "-n", NAMESPACE,
         "-f", str(path), "--wait", "--timeout", "300s"],
    )  # fmt: skip


def ingest(console: Console, url: str) -> None:
    docs = calibration.corpus(limit=60)
    with console.status("ingesting a corpus through the ingestion Service"):
        for start in range(0, len(docs), 10):
            batch = [
                {"id": f"doc-{i}", "text": d} for i, d in enumerate(docs[start : start + 10], start)
            ]
            r = requests.post(url + "/v1/documents", json={"documents": batch}, timeout=120)
            r.raise_for_status()
    console.print(f"[green]✓[/green] ingested {len(docs)} documents")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300, help="length of the load ramp")
    parser.add_argument("--peak", type=float, default=10, help="peak embedding requests/s")
    parser.add_argument("--no-live", action="store_true", help="no live view (logs, CI)")
    args = parser.parse_args(argv)
    console = Console()
    OUT.mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    installed = False
    load: Load | None = None
    interrupted = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        interrupted.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    rows: list[Row] = []
    try:
        step(console, "tools: the pinned Go builds (first run: ~20 min)", ["hack/build-tools.sh"])
        for script in ("cluster", "prometheus"):
            if subprocess.run([str(ROOT / f"hack/{script}.sh"), "status"],
                              capture_output=True).returncode:  # fmt: skip
                started.append(script)
            step(console, f"{script} up", [str(ROOT / f"hack/{script}.sh"), "up"])
        step(
            console,
            "images: build and load into node-1 (first run: ~10 min)",
            ["hack/build-images.sh"],
            {"IMAGE_REPOSITORY": IMAGES, "IMAGE_TAG": TAG, "BASE_FROM_DEBIAN": "1"},
        )
        port = os.environ.get("MODELPILOT_PROMETHEUS_PORT", "19090")
        install(console, f"http://{NODE_IP}:{port}")
        installed = True
        md_doc = yaml.safe_load((ROOT / "examples/local.yaml").read_text())
        applied = time.monotonic()
        kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump(md_doc))
        step(
            console,
            "ModelDeployment applied: waiting for every stage's pods",
            [str(BIN / "kubectl"), "--kubeconfig", str(KUBECONFIG), "wait", "-n", NAMESPACE,
             "--for=condition=Ready", f"md/{NAME}", "--timeout=900s"],
        )  # fmt: skip
        ready_s = time.monotonic() - applied
        urls = {s: service(s) for s in STAGES}
        ingest(console, urls["ingestion"])
        slo_ms = int(md_doc["spec"]["slo"]["latencyP95Ms"])
        load = Load(urls, args.seconds, args.peak)
        load_thread = threading.Thread(target=load.run, daemon=True)
        load_thread.start()
        telemetry = Telemetry(f"http://127.0.0.1:{port}")
        live = None if args.no_live else Live(console=console, refresh_per_second=1)
        if live:
            live.start()
        md: dict[str, Any] = {}
        while load_thread.is_alive() and not interrupted.is_set():
            md = json.loads(kubectl("get", "md", NAME, "-n", NAMESPACE, "-o", "json"))
            try:
                snap = telemetry.snapshot(NAMESPACE, NAME, time.time())
            except Exception:  # shown as "-": the next round retries
                snap = None
            stages = (md.get("status") or {}).get("stages") or {}
            rows.append(
                Row(
                    time.monotonic() - load.started,
                    {s: (snap.stages[s].rate_rps if snap and s in snap.stages else None)
                     for s in STAGES},
                    {s: (snap.stages[s].p95_ms if snap and s in snap.stages else None)
                     for s in STAGES},
                    {s: int((stages.get(s) or {}).get("replicas", 0)) for s in STAGES},
                    {s: (stages.get(s) or {}).get("maxBatchSize") for s in STAGES},
                )
            )  # fmt: skip
            left = args.seconds - (time.monotonic() - load.started)
            if live:
                live.update(view(md, snap, slo_ms, load, left))
            interrupted.wait(2)  # the view's refresh period
        if live:
            live.stop()
        events = json.loads(kubectl("get", "events", "-n", NAMESPACE, "-o", "json"))["items"]
        optimized = [e for e in events if e.get("reason") == "Optimized"]
        summary = {
            "seconds": round(time.monotonic() - load.started),
            "apply_to_ready_s": round(ready_s, 1),
            "requests": load.sent,
            "ok": load.ok,
            "errors": len(load.errors),
            "decisions_applied": len(optimized),
            "live_updates": sum(1 for e in events if e.get("reason") == "LiveUpdated"),
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
        if installed:
            kubectl("delete", "md", NAME, "-n", NAMESPACE, "--timeout=120s", check=False)
            subprocess.run([str(BIN / "helm"), "--kubeconfig", str(KUBECONFIG), "uninstall",
                            RELEASE, "-n", NAMESPACE, "--wait"], check=False)  # fmt: skip
        if "cluster" not in started:  # a cluster we found: leave it as we found it
            kubectl("delete", "ns", NAMESPACE, "--wait=false", check=False)
        for script in reversed(started):
            subprocess.run([str(ROOT / f"hack/{script}.sh"), "down"], check=False)


if __name__ == "__main__":
    sys.exit(main())
