"""`make demo` end to end: it installs the chart, the operator acts on real pods from real
telemetry, and Ctrl-C (SIGINT) ends it with a summary, a PNG and nothing left installed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import requests

from modelpilot import contract
from tests.helpers import ROOT, kubectl, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
OUT = ROOT / ".cache/demo"


def _queries_served(namespace: str) -> float:
    """Queries the gateway Service has answered with 200, from its own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    svc = json.loads(kubectl("get", "svc", "local-inference", "-n", namespace, "-o", "json").stdout)
    port = contract.SERVICE_PORTS["inference"]
    text = requests.get(f"http://{svc['spec']['clusterIP']}:{port}/metrics", timeout=10).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == contract.METRIC_REQUESTS + "_total" and s.labels.get("code") == "200"
    )


def _optimized(namespace: str) -> bool:
    out = kubectl("get", "events", "-n", namespace, "-o", "json", check=False)
    if out.returncode:
        return False
    return any(e.get("reason") == "Optimized" for e in json.loads(out.stdout)["items"])


@pytest.mark.timeout(1800)
def test_make_demo_acts_live_and_ctrl_c_tears_it_down(node_images: str) -> None:
    (OUT / "summary.json").unlink(missing_ok=True)
    (OUT / "demo.png").unlink(missing_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    log = (OUT / "test-demo.log").open("wb")
    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "hack/demo.py"), "--seconds", "600", "--no-live"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def optimized() -> bool:
            if demo.poll() is not None:  # the demo gave up: its log says why, now
                pytest.fail("make demo exited: " + (OUT / "test-demo.log").read_text()[-3000:])
            # a decision, and the load under way (the first decision may come from ingesting)
            return _optimized("demo") and _queries_served("demo") >= 20

        wait_for(optimized, 1500, interval=2, what="an Optimized decision")
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        assert demo.wait(timeout=180) == 0, (OUT / "test-demo.log").read_text()[-3000:]
    finally:
        if demo.poll() is None:
            demo.kill()
        log.close()
    summary = json.loads((OUT / "summary.json").read_text())
    assert summary["decisions_applied"] >= 1
    assert summary["ok"] > 0 and summary["errors"] == 0, summary
    assert (OUT / "demo.png").stat().st_size > 10_000
    assert summary["apply_to_ready_s"] > 0 and summary["final"]["embedding"]["podsOnPlan"] >= 1
    releases = subprocess.run(
        [str(ROOT / ".cache/bin/helm"), "--kubeconfig", str(ROOT / ".cache/kubeconfig"),
         "list", "-A", "-q"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "modelpilot" not in releases
    wait_for(
        lambda: kubectl("get", "ns", "demo", check=False).returncode != 0,
        120,
        what="the demo namespace gone",
    )
