"""Pure tests: API models, CRD generation, plan, rendering and conditions."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from modelpilot import contract
from modelpilot.api import crdgen
from modelpilot.api.v1alpha1 import ModelDeploymentSpec
from modelpilot.controller import conditions as cond
from modelpilot.render import plan
from modelpilot.render.children import Defaults, Owner, config_hash, render
from modelpilot.render.children import service_config as render_service_config
from modelpilot_services.models import tritonserve
from modelpilot_services.stages.inference import routed_models
from tests.helpers import sample, spec_of

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


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
    # routing on: the large variant's replicas serve both routes
    assert p["inference"].variant == "reranker-large-gpu"
    off = sample("full")["spec"]
    off["inference"]["routing"] = {"mode": "Off"}
    p_off = plan.initial(ModelDeploymentSpec.model_validate(off))
    assert p_off["inference"].variant == "reranker-small"  # the cheapest over the floor
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
    assert kinds.count(("NetworkPolicy", "full-modelpilot")) == 1
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
    raw = objects[("ConfigMap", "full-inference")]["data"]["service.json"]
    config = contract.ServiceConfig.model_validate_json(raw)
    assert (config.maxBatchSize, config.maxQueueDelayMicroseconds) == (8, 500)
    assert config.model == "reranker_large"


def _deployment(objects: list[dict[str, Any]], stage: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == stage)


def test_services_expose_only_the_stage_api_and_admin_ports_need_the_token() -> None:
    spec = spec_of("full")
    objects = render(OWNER, spec, plan.initial(spec))
    for svc in (o for o in objects if o["kind"] == "Service"):
        stage = svc["metadata"]["name"].removeprefix("full-")
        assert [p["port"] for p in svc["spec"]["ports"]] == [contract.SERVICE_PORTS[stage]]
    for stage in contract.MODEL_STAGES:
        pod = _deployment(objects, f"full-{stage}")["spec"]["template"]["spec"]
        service, triton = pod["containers"]
        token = {
            "name": contract.ENV_ADMIN_TOKEN,
            "valueFrom": {
                "secretKeyRef": {"name": "full-admin", "key": contract.ADMIN_TOKEN_SECRET_KEY}
            },
        }
        assert token in service["env"] and token in triton["env"]
        assert {"name": "admin", "containerPort": contract.ADMIN_PORT} in service["ports"]
        restricted = [a for a in triton["args"] if a.startswith("--http-restricted-api=")]
        assert restricted == [
            "--http-restricted-api=model-repository,shared-memory,trace,logging:"
            f"{contract.TRITON_ADMIN_HEADER}=$({contract.ENV_ADMIN_TOKEN})"
        ]


def test_network_policy_admits_only_the_operator_to_admin_and_triton_ports() -> None:
    spec = spec_of("full")
    defaults = Defaults(operator_namespace="ops", operator_labels={"app": "op"})
    policy = next(
        o for o in render(OWNER, spec, plan.initial(spec), defaults) if o["kind"] == "NetworkPolicy"
    )
    api_rule, admin_rule = policy["spec"]["ingress"]
    assert "from" not in api_rule
    assert {p["port"] for p in api_rule["ports"]} == set(contract.SERVICE_PORTS.values())
    assert {p["port"] for p in admin_rule["ports"]} == {
        contract.ADMIN_PORT,
        *contract.TRITON_PORTS.values(),
    }
    (source,) = admin_rule["from"]
    assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ops"}
    assert source["podSelector"]["matchLabels"] == {"app": "op"}
    unknown = next(
        o for o in render(OWNER, spec, plan.initial(spec)) if o["kind"] == "NetworkPolicy"
    )
    assert len(unknown["spec"]["ingress"]) == 1  # no operator identity: nobody on admin ports


@pytest.mark.parametrize(
    ("routing", "models"),
    [
        ({"mode": "Auto", "smallVariant": "reranker-small", "largeVariant": "reranker-large-gpu"},
         ["reranker_large", "reranker_small"]),
        ({"mode": "Off"}, ["reranker_small"]),
    ],
)  # fmt: skip
def test_the_gateway_sidecar_loads_every_model_it_routes_to(
    routing: dict[str, str], models: list[str]
) -> None:
    raw = sample("full")["spec"]
    raw["inference"]["routing"] = routing
    spec = ModelDeploymentSpec.model_validate(raw)
    p = plan.initial(spec)
    on = routing["mode"] == "Auto"
    assert p["inference"].variant == ("reranker-large-gpu" if on else "reranker-small")
    dep = _deployment(render(OWNER, spec, p), "full-inference")
    triton = dep["spec"]["template"]["spec"]["containers"][1]
    assert [
        a.removeprefix("--load-model=") for a in triton["args"] if "--load-model" in a
    ] == models
    config = render_service_config(spec, "inference", p["inference"])
    assert config.models == models
    assert routed_models(config) == (
        ("reranker_small", "reranker_large") if on else ("reranker_small", "reranker_small")
    )


def test_a_starting_triton_runs_the_planned_batching_from_the_mounted_config() -> None:
    """Both sides of service.json: what render writes is what the sidecar starts with."""
    spec = spec_of("full")
    p = plan.initial(spec)
    p["inference"] = plan.StagePlan(1, "reranker-large-gpu", 4, 250, small_share=0.5, instances=2)
    config = render_service_config(spec, "inference", p["inference"])
    batching = tritonserve.planned_batching(
        contract.ServiceConfig.model_validate_json(config.json_text())
    )
    assert batching["reranker_small"] == batching["reranker_large"] == (4, 250, 2)
    assert batching["minilm_fp32"] == tritonserve.BATCHING["minilm_fp32"]  # not served here
    verifying = plan.StagePlan(1, "minilm-fp32", 4, 250, shadow_variant="minilm-int8")
    config = render_service_config(spec, "embedding", verifying)
    assert config.models == ["minilm_fp32"]
    assert tritonserve.planned_batching(config)["minilm_int8"] == (4, 250, 1)  # the candidate


def test_the_model_repository_carries_the_planned_instance_count(tmp_path: Path) -> None:
    tritonserve.write_repository(tmp_path, {"minilm_int8": (8, 500, 3)})
    text = (tmp_path / "minilm_int8" / "config.pbtxt").read_text()
    assert "max_batch_size: 8" in text and "max_queue_delay_microseconds: 500" in text
    assert "count: 3" in text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("maxBatchSize", 3),
        ("maxQueueDelayMicroseconds", 7),
        ("instances", 2),
        ("shadow", contract.Shadow(model="minilm_static", sampleRatio=0.5)),
        ("model", "minilm_static"),
        ("models", ["minilm_static"]),
        ("routing", {"mode": "Auto"}),
        ("topK", 99),
    ],
)
def test_only_the_live_fields_leave_the_pods_running(field: str, value: Any) -> None:
    spec = spec_of("full")
    base = render_service_config(spec, "embedding", plan.initial(spec)["embedding"])
    changed = base.model_copy(update={field: value})
    same = config_hash(changed) == config_hash(base)
    assert same is (field in contract.LIVE_FIELDS)


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


@pytest.mark.parametrize(
    ("stored", "patch", "after"),
    [
        ({"a": 1}, {"a": 1}, {"a": 1}),
        ({"a": 1}, {"b": None}, {"a": 1}),  # deleting an absent key: no change
        ({"s": {"x": 1, "y": 2}}, {"s": {"x": 1, "z": None}}, {"s": {"x": 1, "y": 2}}),
        ({"s": {"x": 1}}, {"s": {"x": None}}, {"s": {}}),
        ({"l": [1, 2]}, {"l": [1]}, {"l": [1]}),  # lists are replaced, not merged
    ],
)
def test_status_is_compared_as_the_apiserver_merges_it(
    stored: dict[str, Any], patch: dict[str, Any], after: dict[str, Any]
) -> None:
    """A stage's shadowVariant: None never lands in status; comparing the patch itself with
    status would then see a change, and write, on every reconcile."""
    assert cond.merge_patch(stored, patch) == after


def test_a_variant_added_to_the_spec_rolls_no_pods_of_a_stage_that_does_not_serve_it() -> None:
    doc = sample("full")
    variants = doc["spec"]["embedding"]["variants"]
    fewer = ModelDeploymentSpec.model_validate({**doc["spec"], "embedding": {
        **doc["spec"]["embedding"], "variants": variants[:1]}})  # fmt: skip
    more = ModelDeploymentSpec.model_validate(doc["spec"])
    p = plan.initial(fewer)
    assert p["embedding"].variant == variants[0]["name"]

    def template(spec: ModelDeploymentSpec) -> Any:
        objs = render(OWNER, spec, p)
        return next(
            o
            for o in objs
            if o["kind"] == "Deployment" and o["metadata"]["name"] == "full-embedding"
        )["spec"]["template"]

    assert template(more) == template(fewer)


def test_every_container_drains_before_its_sigterm_within_the_grace_period() -> None:
    """A terminating pod still gets new connections until kube-proxy drops it from the
    Service: each container sleeps first, and the grace period covers the sleep plus the
    services' own shutdown (finishing in-flight requests)."""
    spec = spec_of("full")
    deployments = [o for o in render(OWNER, spec, plan.initial(spec)) if o["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {f"full-{s}" for s in contract.STAGES}
    for dep in deployments:
        pod = dep["spec"]["template"]["spec"]
        for c in pod["containers"]:
            sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert sleep >= 5, (dep["metadata"]["name"], c["name"])
            assert pod["terminationGracePeriodSeconds"] >= sleep + 20
