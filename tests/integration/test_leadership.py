"""Leader election between real operator processes on the real control plane: exactly one
acts, a healthy standby takes over when the leader is killed (or hands over at once when it
stops), and across the failover nothing is done twice."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelpilot.controller.leadership import LEASE_DURATION_S, RETRY_PERIOD_S
from tests.conftest import Operator
from tests.helpers import ROOT, kubectl, kubectl_json, md_ready, sample, wait_for

pytestmark = pytest.mark.integration


def _holder(lease: str) -> str | None:
    out = kubectl("get", "lease", lease, "-n", "default", "-o", "json", check=False)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)["spec"].get("holderIdentity")  # type: ignore[no-any-return]


def _sample(op: Operator, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with ``labels`` on the operator's /metrics (0 if none)."""
    with urllib.request.urlopen(f"{op.url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def _leading(op: Operator) -> float:
    return _sample(op, "modelpilot_operator_leader")


def _healthy(op: Operator) -> bool:
    with urllib.request.urlopen(f"{op.url}/readyz", timeout=5) as r:
        return bool(r.status == 200)


@pytest.fixture
def ha_namespace() -> Iterator[str]:
    # e2e-*: a namespace the session's test operator leaves alone
    name = f"e2e-ha-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_one_operator_acts_and_a_standby_takes_over_without_doing_anything_twice(
    crd: str, prometheus_url: str, ha_namespace: str
) -> None:
    lease = f"modelpilot-ha-{uuid.uuid4().hex[:6]}"
    ops = {
        n: Operator(
            prometheus_url,
            identity=n,
            lease=lease,
            namespaces=(ha_namespace,),
            log_path=ROOT / f".cache/logs/operator-{lease}-{n}.log",
        )
        for n in ("a", "b")
    }
    try:
        ops["a"].start()
        wait_for(lambda: _holder(lease) == "a", 60, what="a to lead")
        ops["b"].start()  # waits for /healthz: a standby is healthy
        assert _healthy(ops["b"]) and _leading(ops["b"]) == 0 and _leading(ops["a"]) == 1

        doc = sample("minimal")
        kubectl("apply", "-n", ha_namespace, "-f", "-", stdin=json.dumps(doc))
        wait_for(lambda: md_ready("minimal", ha_namespace), 120, what="Ready under a")
        # The leader reconciled and decided; the standby did nothing at all.
        reconciles = "modelpilot_operator_reconcile_duration_seconds_count"
        assert _sample(ops["a"], reconciles, outcome="ok") > 0
        decisions = "modelpilot_operator_decisions_total"
        wait_for(lambda: _sample(ops["a"], decisions) > 0, 60, what="a's first decision")
        assert _sample(ops["b"], reconciles) == 0 and _sample(ops["b"], decisions) == 0
        assert ha_namespace not in ops["b"].log_path.read_text()

        # SIGKILL: the Lease must expire before b may act.
        ops["a"].kill()
        killed = time.monotonic()
        wait_for(lambda: _holder(lease) == "b", 60, interval=0.2, what="b to take over")
        takeover = time.monotonic() - killed
        print(f"figure failover_after_sigkill_s: {takeover:.1f}")
        assert takeover <= LEASE_DURATION_S + 4 * RETRY_PERIOD_S + 10, takeover
        wait_for(lambda: _leading(ops["b"]) == 1, 30, what="b's leader metric")

        # b resumes the object: a spec edit converges, no child is created twice.
        generation = kubectl_json("get", "md", "minimal", "-n", ha_namespace)["metadata"][
            "generation"
        ]
        patch = {"spec": {"embedding": {"replicas": {"min": 1, "max": 3}}}}
        kubectl("patch", "md", "minimal", "-n", ha_namespace, "--type=merge", "-p",
                json.dumps(patch))  # fmt: skip

        def converged() -> bool:
            md: dict[str, Any] = kubectl_json("get", "md", "minimal", "-n", ha_namespace)
            observed = (md.get("status") or {}).get("observedGeneration", 0)
            return observed > generation and md_ready("minimal", ha_namespace)

        wait_for(converged, 120, what="b to reconcile the edit")
        events = kubectl_json("get", "events", "-n", ha_namespace)["items"]
        created = Counter(e["message"] for e in events if e["reason"] == "Created")
        assert created and all(n == 1 for n in created.values()), created
        assert all((e.get("count") or 1) == 1 for e in events if e["reason"] == "Created")

        # A graceful stop hands the Lease over at once instead of letting it expire.
        ops["a"].start()
        wait_for(lambda: _healthy(ops["a"]), 30, what="a back, standing by")
        ops["b"].stop()
        stopped = time.monotonic()
        wait_for(lambda: _holder(lease) == "a", 60, interval=0.2, what="a to take over")
        handover = time.monotonic() - stopped
        print(f"figure handover_after_stop_s: {handover:.1f}")
        assert "handed the Lease" in ops["b"].log_path.read_text()
        assert handover < LEASE_DURATION_S, handover  # not left to expire
    finally:
        for op in ops.values():
            op.stop()
