"""Measure CR edit -> children converged, over N edits (a benchmark, not a test).

Needs the local control plane and the operator running (make cluster-up; make run).
Each edit changes the ingestion stage's replica floor; converged = the Deployment's
spec.replicas and readyReplicas both match. Prints p50/p95/max in milliseconds.
Usage: .venv/bin/python hack/bench_converge.py [--edits 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBECTL = [str(ROOT / ".cache/bin/kubectl"), "--kubeconfig", str(ROOT / ".cache/kubeconfig")]


def kubectl(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        [*KUBECTL, *args], input=stdin, capture_output=True, text=True, check=True
    ).stdout


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--namespace", default="bench-converge")
    args = parser.parse_args()
    ns = args.namespace
    subprocess.run([*KUBECTL, "create", "namespace", ns], capture_output=True)
    md = yaml.safe_load((ROOT / "examples/full.yaml").read_text())
    md["spec"]["ingestion"]["replicas"] = {"min": 1, "max": 4}
    kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(md))
    samples = []
    for i in range(args.edits):
        want = 1 + (i % 3) + 1  # 2, 3, 4, 2, ...
        md["spec"]["ingestion"]["replicas"] = {"min": want, "max": want}  # force the change
        t0 = time.perf_counter()
        kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(md))
        deadline = t0 + 120
        while time.perf_counter() < deadline:
            out = subprocess.run(
                [*KUBECTL, "get", "deploy", "full-ingestion", "-n", ns, "-o", "json"],
                capture_output=True,
                text=True,
            )
            dep = json.loads(out.stdout) if out.returncode == 0 else {"spec": {}}
            if (
                dep["spec"].get("replicas") == want
                and dep.get("status", {}).get("readyReplicas") == want
            ):
                samples.append((time.perf_counter() - t0) * 1000)
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"edit {i} did not converge within 120 s")
    subprocess.run([*KUBECTL, "delete", "namespace", ns, "--wait=false"], capture_output=True)
    p50, p95 = np.percentile(samples, [50, 95])
    print(
        f"CR edit -> children converged over {len(samples)} edits: "
        f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {max(samples):.0f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
