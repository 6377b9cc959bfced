"""Pure tests: API models, CRD generation, plan, rendering and conditions."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from modelpilot import conditions as cond
from modelpilot import crdgen, plan
from modelpilot.api.v1alpha1 import ModelDeploymentSpec
from modelpilot.render import Owner, render
from tests.helpers import sample

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def spec_of(name: str) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(sample(name)["spec"])


def test_committed_crds_match_the_models() -> None:
    assert crdgen.main(["--root", str(ROOT), "--check"]) == 0, "run `make crds`"


def _walk(node: Any, path: str = "") -> list[str]:
    bad = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$defs", "title") or (
                key == "anyOf" and any(o.get("type") == "null" for o in value)
            ):
                bad.append(f"{path}.{key}")
            if key == "additionalProperties" and "properties" in node:
                bad.append(f"{path}.{key}")
            bad += _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            bad += _walk(value, f"{path}[{i}]")
    return bad


def test_crd_schema_is_structural_and_every_spec_field_is_described() -> None:
    schema = crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []

    def undescribed(node: dict[str, Any], path: str) -> list[str]:
        out = []
        for name, prop in node.get("properties", {}).items():
            if "description" not in prop:
                out.append(f"{path}.{name}")
            out += undescribed(prop, f"{path}.{name}")
            if "items" in prop:
                out += undescribed(prop["items"], f"{path}.{name}[]")
        return out

    assert undescribed(schema["properties"]["spec"], "spec") == []


def test_crd_names_and_columns() -> None:
    spec = crdgen.crd()["spec"]
    assert spec["names"]["shortNames"] == ["md"]
    columns = [c["name"] for c in spec["versions"][0]["additionalPrinterColumns"]]
    assert columns[:2] == ["Ready", "Variant"] and "SLO" in columns and columns[-1] == "Age"
    assert spec["versions"][0]["subresources"] == {"status": {}}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["slo"].update(latencyP95Ms=0), "latencyP95Ms"),
        (lambda s: s["slo"].update(minQuality="lots"), "minQuality"),
        (lambda s: s["embedding"].update(variants=[]), "variants"),
        (
            lambda s: s["embedding"]["variants"].append(dict(s["embedding"]["variants"][0])),
            "unique",
        ),
        (lambda s: s["embedding"]["variants"][0].update(precision="fp64"), "precision"),
        (lambda s: s["embedding"]["variants"][0].update(name="Bad_Name"), "name"),
        (lambda s: s["optimizer"].update(intervalSeconds=1), "intervalSeconds"),
        (lambda s: s.update(surprise=True), "surprise"),
    ],
)
def test_invalid_specs_are_rejected_by_the_models(mutate: Any, message: str) -> None:
    spec = copy.deepcopy(sample("full")["spec"])
    mutate(spec)
    with pytest.raises(ValidationError, match=message):
        ModelDeploymentSpec.model_validate(spec)


def test_initial_plan_picks_the_cheapest_variant_meeting_the_quality_floor() -> None:
    p = plan.initial(spec_of("full"))
    assert p["embedding"].variant == "minilm-int8"  # static (0.86) is below minQuality 0.9
    assert p["inference"].variant == "reranker-small"
    assert p["embedding"].max_batch_size == 64 and p["embedding"].max_queue_delay_us == 2000
    assert {s.replicas for s in p.values()} == {1}


def test_resume_clamps_recorded_state_to_the_current_spec() -> None:
    spec = spec_of("full")
    recorded = {
        "embedding": {
            "replicas": 50,
            "variant": "removed-variant",
            "maxBatchSize": 4096,
            "maxQueueDelayMicroseconds": 10,
        },
        "inference": {"replicas": 0, "variant": "reranker-large-gpu"},
    }
    p = plan.resume(spec, recorded)
    assert p["embedding"].replicas == 8  # max
    assert p["embedding"].variant == "minilm-int8"  # reset to the start
    assert p["embedding"].max_batch_size == 64 and p["embedding"].max_queue_delay_us == 10
    assert p["inference"].replicas == 1 and p["inference"].variant == "reranker-large-gpu"


OWNER = Owner(name="full", namespace="ns", uid="1234")


def test_render_produces_every_child_with_owner_labels_and_restricted_pods() -> None:
    spec = spec_of("full")
    objects = render(OWNER, spec, plan.initial(spec))
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds.count(("PersistentVolumeClaim", "full-retrieval")) == 1
    for stage in ("ingestion", "embedding", "retrieval", "inference"):
        for kind in ("Deployment", "Service", "ConfigMap"):
            assert (kind, f"full-{stage}") in kinds
    for obj in objects:
        ref = obj["metadata"]["ownerReferences"][0]
        assert ref["uid"] == "1234" and ref["controller"] is True
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "modelpilot"
        if obj["kind"] != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
        annotations = obj["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"


def test_render_uses_the_gpu_variant_resources_and_batching_config() -> None:
    spec = spec_of("full")
    p = plan.initial(spec)
    p["inference"] = plan.StagePlan(
        replicas=2, variant="reranker-large-gpu", max_batch_size=8, max_queue_delay_us=500
    )
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render(OWNER, spec, p)}
    dep = objects[("Deployment", "full-inference")]
    assert dep["spec"]["replicas"] == 2
    triton = dep["spec"]["template"]["spec"]["containers"][1]
    assert triton["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert "--load-model=reranker_large" in triton["args"]
    config = objects[("ConfigMap", "full-inference")]["data"]["config.pbtxt"]
    assert "max_batch_size: 8" in config and "max_queue_delay_microseconds: 500" in config


def test_batching_changes_do_not_restart_pods_but_variant_changes_do() -> None:
    spec = spec_of("full")
    base = plan.initial(spec)

    def template(p: plan.Plan) -> Any:
        objs = render(OWNER, spec, p)
        return next(
            o
            for o in objs
            if o["kind"] == "Deployment" and o["metadata"]["name"] == "full-embedding"
        )["spec"]["template"]

    rebatched = dict(base)
    rebatched["embedding"] = plan.StagePlan(1, "minilm-int8", 16, 100)
    assert template(rebatched) == template(base)
    switched = dict(base)
    switched["embedding"] = plan.StagePlan(1, "minilm-fp32", 64, 2000)
    assert template(switched) != template(base)


def test_render_is_deterministic() -> None:
    spec = spec_of("full")
    assert render(OWNER, spec, plan.initial(spec)) == render(OWNER, spec, plan.initial(spec))


def test_condition_transition_time_moves_only_when_status_flips() -> None:
    c = cond.set_condition([], "Ready", "False", "StagesNotReady", "waiting", "t1", 1)
    c = cond.set_condition(c, "Ready", "False", "StagesNotReady", "still waiting", "t2", 1)
    assert c[0]["lastTransitionTime"] == "t1" and c[0]["message"] == "still waiting"
    c = cond.set_condition(c, "Ready", "True", "StagesReady", "ok", "t3", 2)
    assert c[0]["lastTransitionTime"] == "t3" and c[0]["observedGeneration"] == 2


@pytest.mark.parametrize(
    ("observed", "ready", "progressing"),
    [
        ({"a": cond.Observed(2, 2, 2, True)}, True, False),
        ({"a": cond.Observed(2, 1, 2, True)}, False, True),
        ({"a": cond.Observed(2, 2, 2, False)}, False, True),
        ({"a": None}, False, True),
    ],
)
def test_rollout_rollup(observed: dict[str, Any], ready: bool, progressing: bool) -> None:
    got = cond.rollout(observed, {"a": 2})
    assert got[:2] == (ready, progressing)


def test_a_stages_node_selector_tolerations_and_affinity_reach_only_its_pods() -> None:
    raw = copy.deepcopy(sample("full")["spec"])
    gpu_pool = {
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 1,
                        "preference": {
                            "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]
                        },
                    }
                ]
            }
        },
    }
    raw["inference"].update(gpu_pool)
    spec = ModelDeploymentSpec.model_validate(raw)
    objs = render(Owner("p", "ns", "uid-1"), spec, plan.initial(spec))
    pods = {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in objs
        if o["kind"] == "Deployment"
    }
    assert {k: pods["p-inference"][k] for k in gpu_pool} == gpu_pool
    for name in ("p-ingestion", "p-embedding", "p-retrieval"):
        assert not set(gpu_pool) & set(pods[name]), name
