"""Operator scale (a benchmark, not a test): N ModelDeployments on the local control plane.

Starts its own operator, applies N copies of examples/minimal.yaml, and reports the time
until all are Ready, the operator's resident memory, and the write requests to the
resources only the operator writes (children and ModelDeployments, from the apiserver's
own counters) over a steady-state minute: the goal is none when nothing changes.
Usage: .venv/bin/python hack/bench_scale.py [--count 200]   (needs make cluster-up)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBECONFIG = ROOT / ".cache/kubeconfig"
KUBECTL = [str(ROOT / ".cache/bin/kubectl"), "--kubeconfig", str(KUBECONFIG)]
WRITES = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
OURS = {"deployments", "services", "configmaps", "persistentvolumeclaims", "modeldeployments"}


def kubectl(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        [*KUBECTL, *args], input=stdin, capture_output=True, text=True, check=True
    ).stdout


def operator_writes() -> float:
    """Writes to the resources only the operator writes (deployment status excluded)."""
    total = 0.0
    for line in kubectl("get", "--raw", "/metrics").splitlines():
        m = WRITES.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        if (
            labels.get("verb") in {"POST", "PUT", "PATCH", "APPLY", "DELETE"}
            and labels.get("resource") in OURS
            and (
                labels.get("resource") == "modeldeployments" or labels.get("subresource", "") == ""
            )
        ):
            total += float(m["value"])
    return total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--namespace", default="bench-scale")
    args = parser.parse_args()
    ns = args.namespace
    subprocess.run([*KUBECTL, "create", "namespace", ns], capture_output=True)
    log = (ROOT / ".cache/logs/operator-scale.log").open("wb")
    op = subprocess.Popen(
        [
            str(ROOT / ".venv/bin/modelpilot-operator"),
            "--all-namespaces",
            "--listen=127.0.0.1:0",
            "--lease=modelpilot-bench-scale",
        ],
        env={
            **os.environ,
            "KUBECONFIG": str(KUBECONFIG),
            "MODELPILOT_LIVE_UPDATES": "false",
            "MODELPILOT_PROMETHEUS_URL": os.environ.get(
                "MODELPILOT_PROMETHEUS_URL", "http://127.0.0.1:19090"
            ),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            peak[0] = max(peak[0], rss_mib(op.pid))

    threading.Thread(target=sample, daemon=True).start()
    try:
        base = yaml.safe_load((ROOT / "examples/minimal.yaml").read_text())
        docs = []
        for i in range(args.count):
            md = json.loads(json.dumps(base))
            md["metadata"]["name"] = f"p{i:03d}"
            docs.append(md)
        t0 = time.monotonic()
        kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump_all(docs))
        ready = 0
        while time.monotonic() - t0 < 1800:
            items = json.loads(kubectl("get", "md", "-n", ns, "-o", "json"))["items"]
            ready = sum(
                any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in (m.get("status") or {}).get("conditions") or []
                )
                for m in items
            )
            if ready == args.count:
                break
            time.sleep(2)
        converged = time.monotonic() - t0
        time.sleep(60)  # let the last status writes and the first optimizer ticks settle
        before = operator_writes()
        time.sleep(60)
        steady = operator_writes() - before
        print(
            f"{args.count} ModelDeployments: {ready} Ready after {converged:.0f} s; "
            f"operator RSS now {rss_mib(op.pid):.0f} MiB (peak {peak[0]:.0f} MiB); "
            f"operator writes at steady state: {steady:.0f} in 60 s"
        )
    finally:
        done.set()
        op.terminate()
        op.wait(timeout=30)
        subprocess.run([*KUBECTL, "delete", "namespace", ns, "--wait=false"], capture_output=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
