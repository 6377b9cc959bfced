"""Reliability and security properties that must keep holding as capabilities grow."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT, kubectl, wait_for

pytestmark = pytest.mark.integration


def sample(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text()))


def ready(name: str, namespace: str) -> bool:
    out = kubectl("get", "md", name, "-n", namespace, "-o", "json", check=False)
    if out.returncode:
        return False
    md = json.loads(out.stdout)
    conds = (md.get("status") or {}).get("conditions") or []
    return (
        any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
        and md["status"].get("observedGeneration") == md["metadata"]["generation"]
    )


def test_every_rendered_pod_passes_the_restricted_pod_security_standard(
    namespace: str, operator_process: Any
) -> None:
    kubectl(
        "label",
        "namespace",
        namespace,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )
    kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples/full.yaml"))
    wait_for(
        lambda: ready("full", namespace),
        120,
        what="full Ready in a namespace enforcing the restricted PSS",
    )
    events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json").stdout)
    violations = [
        e["message"] for e in events["items"] if "violates PodSecurity" in e.get("message", "")
    ]
    assert violations == []


def _hostile() -> list[tuple[str, Any]]:
    """(id, mutation of examples/full.yaml) pairs, each hostile or malformed."""
    s = "spec"
    cases: list[tuple[str, Any]] = [
        ("latency-string", lambda m: m[s]["slo"].update(latencyP95Ms="fast")),
        ("latency-negative", lambda m: m[s]["slo"].update(latencyP95Ms=-5)),
        ("latency-huge", lambda m: m[s]["slo"].update(latencyP95Ms=10**12)),
        ("latency-float", lambda m: m[s]["slo"].update(latencyP95Ms=1.5)),
        ("quality-number", lambda m: m[s]["slo"].update(minQuality=0.9)),
        ("quality-above-one", lambda m: m[s]["slo"].update(minQuality="2")),
        ("quality-negative", lambda m: m[s]["slo"].update(minQuality="-0.1")),
        ("quality-garbage", lambda m: m[s]["slo"].update(minQuality="0.9; rm -rf /")),
        ("cost-negative", lambda m: m[s]["slo"].update(maxCostPerHour="-1")),
        ("slo-missing", lambda m: m[s].pop("slo")),
        ("slo-null", lambda m: m[s].update(slo=None)),
        ("spec-list", lambda m: m.update(spec=[1, 2])),
        ("mode-unknown", lambda m: m[s]["optimizer"].update(mode="auto")),
        ("interval-zero", lambda m: m[s]["optimizer"].update(intervalSeconds=0)),
        ("interval-huge", lambda m: m[s]["optimizer"].update(intervalSeconds=10**9)),
        ("step-zero", lambda m: m[s]["optimizer"].update(maxScaleUpStep=0)),
        ("replicas-inverted", lambda m: m[s]["embedding"].update(replicas={"min": 9, "max": 1})),
        ("replicas-negative", lambda m: m[s]["embedding"].update(replicas={"min": -1, "max": 1})),
        ("replicas-huge", lambda m: m[s]["embedding"].update(replicas={"min": 1, "max": 10**6})),
        ("batch-zero", lambda m: m[s]["embedding"]["batching"].update(maxBatchSize=0)),
        ("batch-huge", lambda m: m[s]["embedding"]["batching"].update(maxBatchSize=10**6)),
        (
            "delay-huge",
            lambda m: m[s]["embedding"]["batching"].update(maxQueueDelayMicroseconds=10**9),
        ),
        ("variants-empty", lambda m: m[s]["inference"].update(variants=[])),
        (
            "variants-huge-list",
            lambda m: m[s]["embedding"].update(
                variants=[
                    {
                        "name": f"v{i}",
                        "model": "m",
                        "precision": "fp32",
                        "quality": "1",
                        "cost": "1",
                    }
                    for i in range(500)
                ]
            ),
        ),
        (
            "variant-duplicate",
            lambda m: m[s]["embedding"]["variants"].append(
                copy.deepcopy(m[s]["embedding"]["variants"][0])
            ),
        ),
        (
            "variant-name-unicode",
            lambda m: m[s]["embedding"]["variants"][0].update(name="modèle-ü"),
        ),
        ("variant-name-long", lambda m: m[s]["embedding"]["variants"][0].update(name="v" * 64)),
        ("variant-model-empty", lambda m: m[s]["embedding"]["variants"][0].update(model="")),
        ("variant-model-long", lambda m: m[s]["embedding"]["variants"][0].update(model="m" * 300)),
        ("variant-precision", lambda m: m[s]["embedding"]["variants"][0].update(precision="fp4")),
        ("variant-quality-zero", lambda m: m[s]["embedding"]["variants"][0].update(quality="0")),
        ("variant-cost-zero", lambda m: m[s]["embedding"]["variants"][0].update(cost="0")),
        ("variant-unknown-field", lambda m: m[s]["embedding"]["variants"][0].update(gpu=True)),
        (
            "routing-missing-variant",
            lambda m: m[s]["inference"]["routing"].update(smallVariant="ghost"),
        ),
        ("routing-mode", lambda m: m[s]["inference"]["routing"].update(mode="Maybe")),
        (
            "cache-threshold",
            lambda m: m[s]["inference"]["semanticCache"].update(similarityThreshold="1.5"),
        ),
        ("cache-entries", lambda m: m[s]["inference"]["semanticCache"].update(maxEntries=0)),
        ("index-metric", lambda m: m[s]["retrieval"]["index"].update(metric="jaccard")),
        ("index-dims", lambda m: m[s]["retrieval"]["index"].update(dimensions=0)),
        ("storage-size", lambda m: m[s]["retrieval"]["storage"].update(size="lots")),
        (
            "resources-garbage",
            lambda m: m[s]["ingestion"].update(resources={"limits": {"cpu": "a lot"}}),
        ),
        ("env-bad-name", lambda m: m[s]["ingestion"].update(env=[{"name": "1 BAD", "value": "x"}])),
        (
            "env-huge-list",
            lambda m: m[s]["ingestion"].update(
                env=[{"name": f"E{i}", "value": "x"} for i in range(100)]
            ),
        ),
        (
            "prometheus-url",
            lambda m: (
                m[s]["prometheus"].update(url="file:///etc/passwd")
                if "prometheus" in m[s]
                else m[s].update(prometheus={"url": "file:///etc/passwd"})
            ),
        ),
        ("name-unicode", lambda m: m["metadata"].update(name="mödel")),
        ("name-too-long", lambda m: m["metadata"].update(name="a" * 60)),
        ("name-leading-digit", lambda m: m["metadata"].update(name="1pipeline")),
        ("unknown-top-field", lambda m: m[s].update(superpowers={"enabled": True})),
    ]
    return cases


HOSTILE = _hostile()


def test_forty_hostile_specs_are_rejected_while_a_valid_one_keeps_being_served(
    namespace: str, operator_process: Any
) -> None:
    assert len(HOSTILE) >= 40
    kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples/minimal.yaml"))
    wait_for(lambda: ready("minimal", namespace), 120, what="the valid pipeline Ready")
    accepted = []
    for case_id, mutate in HOSTILE:
        md = copy.deepcopy(sample("full"))
        mutate(md)
        if isinstance(md.get("metadata"), dict) and md["metadata"]["name"] == "full":
            md["metadata"]["name"] = f"h-{case_id}"[:40].rstrip("-")
        result = kubectl(
            "apply",
            "-n",
            namespace,
            "--validate=strict",
            "-f",
            "-",
            stdin=json.dumps(md),
            check=False,
        )
        if result.returncode == 0:
            accepted.append(case_id)
        else:
            assert (
                "Invalid" in result.stderr
                or "invalid" in result.stderr
                or ("unknown field" in result.stderr)
            ), f"{case_id}: {result.stderr}"
    assert accepted == [], f"accepted hostile specs: {accepted}"
    # The valid pipeline is still served: edit it and watch it converge.
    md = sample("minimal")
    md["spec"]["ingestion"] = {"replicas": {"min": 2, "max": 2}}
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(md))
    wait_for(lambda: ready("minimal", namespace), 120, what="the valid pipeline re-converged")
    dep = json.loads(
        kubectl("get", "deploy", "minimal-ingestion", "-n", namespace, "-o", "json").stdout
    )
    assert dep["spec"]["replicas"] == 2
    assert operator_process.poll() is None


def test_no_secret_values_reach_status_events_or_children(
    namespace: str, operator_process: Any
) -> None:
    secret = "s3cr3t-value-that-must-not-leak"
    kubectl(
        "create", "secret", "generic", "creds", "-n", namespace, f"--from-literal=token={secret}"
    )
    md = sample("minimal")
    md["spec"]["ingestion"] = {
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}]
    }
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(md))
    wait_for(lambda: ready("minimal", namespace), 120, what="Ready")
    dumped = kubectl("get", "md,deploy,cm,events", "-n", namespace, "-o", "yaml").stdout
    assert "secretKeyRef" in dumped  # the reference is passed on ...
    assert secret not in dumped  # ... never the value
    assert secret not in (ROOT / ".cache/logs/operator-test.log").read_text()
