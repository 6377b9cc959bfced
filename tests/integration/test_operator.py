"""The operator against the real local control plane: apply, converge, restore, GC, reject."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, children, kubectl, md_ready, sample, wait_for

pytestmark = pytest.mark.integration
STAGES = ("ingestion", "embedding", "retrieval", "inference")


def apply(obj: dict[str, Any], namespace: str, *extra: str) -> Any:
    return kubectl("apply", "-n", namespace, *extra, "-f", "-", stdin=json.dumps(obj), check=False)


def get(kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    out = kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def condition(md: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    conditions = ((md or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), None)


@pytest.mark.parametrize("name", ["minimal", "full"])
def test_sample_converges_to_ready_children(
    name: str, namespace: str, operator_process: Any
) -> None:
    assert apply(sample(name), namespace).returncode == 0
    wait_for(lambda: md_ready(name, namespace), 120, what=f"{name} Ready=True")
    md = get("md", name, namespace)
    assert md is not None
    for stage in STAGES:
        for kind in ("deployment", "service", "configmap"):
            child = get(kind, f"{name}-{stage}", namespace)
            assert child is not None, f"{kind} {name}-{stage}"
            ref = child["metadata"]["ownerReferences"][0]
            assert ref["uid"] == md["metadata"]["uid"] and ref["kind"] == "ModelDeployment"
        dep = get("deployment", f"{name}-{stage}", namespace)
        assert dep is not None and dep["status"]["readyReplicas"] == dep["spec"]["replicas"]
    assert get("pvc", f"{name}-retrieval", namespace) is not None
    stages = md["status"]["stages"]
    assert stages["embedding"]["variant"] and stages["inference"]["maxBatchSize"]
    # kopf's bookkeeping stays out of status; ours is there
    assert set(md["status"]) <= {
        "observedGeneration",
        "conditions",
        "stages",
        "observedP95Ms",
        "lastDecision",
        "recommendations",
        "optimizerState",
    }
    events = kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.name={name}",
        "-o",
        "json",
    ).stdout
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert "Created" in reasons


def test_spec_edits_converge_and_hand_edits_are_restored(
    namespace: str, operator_process: Any
) -> None:
    md = sample("full")
    assert apply(md, namespace).returncode == 0
    wait_for(lambda: md_ready("full", namespace), 120, what="Ready")

    md["spec"]["ingestion"]["replicas"] = {"min": 3, "max": 4}
    assert apply(md, namespace).returncode == 0

    def scaled() -> bool:
        dep = get("deployment", "full-ingestion", namespace)
        return bool(
            dep and dep["spec"]["replicas"] == 3 and dep["status"].get("readyReplicas") == 3
        )

    wait_for(scaled, 120, what="ingestion scaled to 3")
    wait_for(lambda: md_ready("full", namespace), 120, what="Ready at generation 2")

    kubectl("scale", "deployment/full-ingestion", "--replicas=1", "-n", namespace)
    wait_for(scaled, 60, what="the hand-scaled Deployment restored")

    kubectl("delete", "service", "full-retrieval", "-n", namespace)
    wait_for(
        lambda: get("service", "full-retrieval", namespace), 60, what="the deleted Service restored"
    )
    kubectl("delete", "configmap", "full-embedding", "-n", namespace)
    wait_for(
        lambda: get("configmap", "full-embedding", namespace),
        60,
        what="the deleted ConfigMap restored",
    )


def test_deleting_the_model_deployment_removes_its_children(
    namespace: str, operator_process: Any
) -> None:
    assert apply(sample("minimal"), namespace).returncode == 0
    wait_for(lambda: get("deployment", "minimal-inference", namespace), 120, what="children")
    kubectl("delete", "md", "minimal", "-n", namespace, "--wait=true")

    wait_for(lambda: children(namespace, "minimal") == [], 120, what="children garbage-collected")


def test_an_accepted_but_unactionable_spec_is_degraded_not_a_crash(
    namespace: str, operator_process: Any
) -> None:
    md = sample("minimal")
    # Accepted by the CRD schema, refused for the Deployment: requests above limits.
    md["spec"]["ingestion"] = {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}
    assert apply(md, namespace).returncode == 0

    def degraded() -> dict[str, Any] | None:
        c = condition(get("md", "minimal", namespace), "Degraded")
        return c if c and c["status"] == "True" else None

    c = wait_for(degraded, 90, what="Degraded=True")
    assert c["reason"] == "ApplyRejected" and "cpu" in c["message"]
    assert operator_process.poll() is None
    md["spec"]["ingestion"] = {}
    assert apply(md, namespace).returncode == 0
    wait_for(
        lambda: md_ready("minimal", namespace),
        120,
        what="recovery once the spec is fixed",
    )
    assert condition(get("md", "minimal", namespace), "Degraded")["status"] == "False"  # type: ignore[index]


def _invalid(mutate: Any) -> dict[str, Any]:
    md = copy.deepcopy(sample("full"))
    mutate(md)
    return md


def _spec(md: dict[str, Any]) -> dict[str, Any]:
    return md["spec"]  # type: ignore[no-any-return]


INVALID = [
    ("latencyP95Ms", lambda m: _spec(m)["slo"].update(latencyP95Ms=0)),
    ("latencyP95Ms", lambda m: _spec(m)["slo"].update(latencyP95Ms="fast")),
    ("minQuality", lambda m: _spec(m)["slo"].update(minQuality="1.5")),
    ("minQuality", lambda m: _spec(m)["slo"].update(minQuality="high")),
    ("maxCostPerHour", lambda m: _spec(m)["slo"].update(maxCostPerHour="-3")),
    ("mode", lambda m: _spec(m)["optimizer"].update(mode="Yolo")),
    ("intervalSeconds", lambda m: _spec(m)["optimizer"].update(intervalSeconds=2)),
    ("min", lambda m: _spec(m)["ingestion"].update(replicas={"min": 5, "max": 2})),
    ("maxBatchSize", lambda m: _spec(m)["embedding"]["batching"].update(maxBatchSize=5000)),
    (
        "maxQueueDelayMicroseconds",
        lambda m: _spec(m)["inference"]["batching"].update(maxQueueDelayMicroseconds=-1),
    ),
    ("variants", lambda m: _spec(m)["embedding"].update(variants=[])),
    (
        "variants",
        lambda m: _spec(m)["embedding"]["variants"].append(
            dict(_spec(m)["embedding"]["variants"][0])
        ),
    ),
    ("precision", lambda m: _spec(m)["embedding"]["variants"][0].update(precision="fp64")),
    ("quality", lambda m: _spec(m)["embedding"]["variants"][0].update(quality="0")),
    ("cost", lambda m: _spec(m)["embedding"]["variants"][0].update(cost="0")),
    ("name", lambda m: _spec(m)["embedding"]["variants"][0].update(name="Not_A_Label")),
    ("smallVariant", lambda m: _spec(m)["inference"]["routing"].update(smallVariant="nope")),
    ("largeVariant", lambda m: _spec(m)["inference"]["routing"].update(largeVariant="nope")),
    ("minQuality", lambda m: [v.update(quality="0.5") for v in _spec(m)["embedding"]["variants"]]),
    ("metric", lambda m: _spec(m)["retrieval"]["index"].update(metric="hamming")),
    (
        "resources.requests.cpu",
        lambda m: _spec(m)["ingestion"].update(resources={"requests": {"cpu": "lots"}}),
    ),
    ("embedding", lambda m: _spec(m).pop("embedding")),
    ("metadata.name", lambda m: m["metadata"].update(name="x" * 60)),
    ("unknown field", lambda m: _spec(m).update(turbo=True)),
]


@pytest.mark.parametrize(("field", "mutate"), INVALID, ids=[f for f, _ in INVALID])
def test_the_apiserver_rejects_invalid_specs_naming_the_field(
    field: str, mutate: Any, namespace: str, crd: str
) -> None:
    result = apply(_invalid(mutate), namespace, "--dry-run=server", "--validate=strict")
    assert result.returncode != 0, f"accepted an invalid {field}"
    assert field in result.stderr, result.stderr


def test_kubectl_shows_columns_and_explains_fields(namespace: str, operator_process: Any) -> None:
    assert apply(sample("minimal"), namespace).returncode == 0
    wait_for(lambda: md_ready("minimal", namespace), 120, what="Ready")
    table = kubectl("get", "md", "-n", namespace).stdout
    header = table.splitlines()[0].split()
    assert header[:3] == ["NAME", "READY", "VARIANT"] and "SLO" in header and "AGE" in header
    row = table.splitlines()[1].split()
    assert row[0] == "minimal" and row[1] == "True" and row[2] == "reranker-fp32"
    explain = kubectl("explain", "md.spec.slo").stdout
    assert "latencyP95Ms" in explain and "95th percentile" in explain
    assert "minQuality" in explain


def test_sample_files_are_valid_for_the_apiserver(namespace: str, crd: str) -> None:
    for path in sorted(Path(ROOT / "examples").glob("*.yaml")):
        result = kubectl(
            "apply",
            "-n",
            namespace,
            "--dry-run=server",
            "--validate=strict",
            "-f",
            str(path),
            check=False,
        )
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
