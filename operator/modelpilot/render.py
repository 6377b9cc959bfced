"""Pure rendering: a ModelDeployment and its plan -> the desired Kubernetes objects.

No I/O. Every child carries the ``app.kubernetes.io/*`` labels, an ownerReference to the
ModelDeployment (so deleting it garbage-collects them) and, for pods, a hardened security
context that passes the "restricted" Pod Security Standard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from modelpilot.api.v1alpha1 import (
    GROUP,
    KIND,
    STAGES,
    VERSION,
    ModelDeploymentSpec,
    ModelStage,
    ResourceRequirements,
    RetrievalStage,
    Stage,
)
from modelpilot.plan import Plan, StagePlan

MANAGED_BY = "modelpilot"
SERVICE_PORTS = {"ingestion": 8081, "embedding": 8082, "retrieval": 8083, "inference": 8084}
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
NON_ROOT_UID = 65532


@dataclass(frozen=True)
class Owner:
    """The ModelDeployment's identity, as children reference it."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class Defaults:
    """Operator-wide defaults (from its flags/env) for what the spec leaves unset."""

    image_repository: str = "ghcr.io/modelpilot"
    image_tag: str = "0.1.0"
    # Empty: our `triton` image, whose entrypoint writes the model repository into /models
    # and starts Triton (modelpilot_services.tritonserve); args are tritonserver's.
    triton_image: str = ""
    extra_labels: dict[str, str] = field(default_factory=dict)

    def image(self, stage: str) -> str:
        return f"{self.image_repository}/{stage}:{self.image_tag}"

    def triton(self) -> str:
        return self.triton_image or self.image("triton")


def child_name(owner: str, stage: str) -> str:
    return f"{owner}-{stage}"


def labels(owner: str, stage: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": stage,
        "app.kubernetes.io/instance": owner,
        "app.kubernetes.io/component": stage,
        "app.kubernetes.io/part-of": "modelpilot",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def selector(owner: str, stage: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": owner, "app.kubernetes.io/component": stage}


def _meta(owner: Owner, stage: str, defaults: Defaults, name: str | None = None) -> dict[str, Any]:
    return {
        "name": name or child_name(owner.name, stage),
        "namespace": owner.namespace,
        "labels": {**defaults.extra_labels, **labels(owner.name, stage)},
        "ownerReferences": [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def _resources(res: ResourceRequirements | None) -> dict[str, Any]:
    if res is None:
        return {}
    out = res.model_dump(by_alias=True, exclude_none=True)
    return {k: {r: str(q) for r, q in v.items()} for k, v in out.items()}


CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": NON_ROOT_UID,
    "runAsGroup": NON_ROOT_UID,
    "fsGroup": NON_ROOT_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _probe(path: str, port: str) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": 10, "failureThreshold": 3}


def _env(owner: Owner, stage: Stage) -> list[dict[str, Any]]:
    urls = [
        {
            "name": f"MODELPILOT_{s.upper()}_URL",
            "value": f"http://{child_name(owner.name, s)}:{SERVICE_PORTS[s]}",
        }
        for s in STAGES
    ]
    user = [e.model_dump(by_alias=True, exclude_none=True) for e in stage.env or []]
    return urls + user


def _service_container(
    owner: Owner, name: str, stage: Stage, defaults: Defaults, plan: StagePlan
) -> dict[str, Any]:
    env = _env(owner, stage)
    if plan.variant is not None:
        # The serving variant is part of the pod template: switching it is a rollout.
        env.append({"name": "MODELPILOT_VARIANT", "value": plan.variant})
    return {
        "name": name,
        "image": stage.image or defaults.image(name),
        "ports": [{"name": "http", "containerPort": SERVICE_PORTS[name]}],
        "env": env,
        "resources": _resources(stage.resources),
        "readinessProbe": _probe("/readyz", "http"),
        "livenessProbe": _probe("/healthz", "http"),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }


def _triton_container(stage: ModelStage, plan: StagePlan, defaults: Defaults) -> dict[str, Any]:
    variant = stage.variant(plan.variant or "") or stage.variants[0]
    return {
        "name": "triton",
        "image": defaults.triton(),
        "args": [
            "--model-repository=/models",
            "--model-control-mode=explicit",
            f"--load-model={variant.model}",
            "--allow-metrics=true",
        ],
        "ports": [{"name": f"triton-{k}", "containerPort": v} for k, v in TRITON_PORTS.items()],
        "resources": _resources(variant.resources or stage.resources),
        "readinessProbe": _probe("/v2/health/ready", "triton-http"),
        "livenessProbe": _probe("/v2/health/live", "triton-http"),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "models", "mountPath": "/models"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def triton_config(model: str, plan: StagePlan) -> str:
    """The Triton model configuration (config.pbtxt) for the plan's batching."""
    return (
        f'name: "{model}"\n'
        f"max_batch_size: {plan.max_batch_size}\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {plan.max_queue_delay_us}\n"
        "}\n"
    )


def _config_map(
    owner: Owner,
    name: str,
    stage: Stage,
    plan: StagePlan,
    defaults: Defaults,
    spec: ModelDeploymentSpec,
) -> dict[str, Any]:
    data: dict[str, str] = {}
    service: dict[str, Any] = {"stage": name}
    if isinstance(stage, ModelStage):
        variant = stage.variant(plan.variant or "") or stage.variants[0]
        data["config.pbtxt"] = triton_config(variant.model, plan)
        service.update(
            variant=variant.name,
            model=variant.model,
            # Every variant's Triton model: the gateway routes small/large by variant name.
            variants={v.name: v.model for v in stage.variants},
            maxBatchSize=plan.max_batch_size,
            maxQueueDelayMicroseconds=plan.max_queue_delay_us,
        )
        shadow = stage.variant(plan.shadow_variant or "")
        if shadow is not None:  # restored by a pod that restarts mid-verification
            service["shadow"] = {
                "model": shadow.model,
                "sampleRatio": spec.optimizer.verification.sample_ratio_value,
            }
    if isinstance(stage, RetrievalStage):
        service.update(
            dimensions=stage.index.dimensions,
            metric=stage.index.metric,
            topK=stage.top_k,
            dataDir="/data",
        )
    if name == "inference":
        inf = spec.inference
        service.update(
            routing=inf.routing.model_dump(by_alias=True, exclude_none=True),
            semanticCache=inf.semantic_cache.model_dump(by_alias=True),
        )
    data["service.json"] = json.dumps(service, sort_keys=True, indent=2)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(owner, name, defaults),
        "data": data,
    }


def _deployment(
    owner: Owner,
    name: str,
    stage: Stage,
    plan: StagePlan,
    defaults: Defaults,
    config: dict[str, Any],
) -> dict[str, Any]:
    containers = [_service_container(owner, name, stage, defaults, plan)]
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "config", "configMap": {"name": child_name(owner.name, name)}},
    ]
    containers[0]["volumeMounts"].append(
        {"name": "config", "mountPath": "/etc/modelpilot", "readOnly": True}
    )
    if isinstance(stage, ModelStage):
        containers.append(_triton_container(stage, plan, defaults))
        volumes.append({"name": "models", "emptyDir": {}})
    if isinstance(stage, RetrievalStage):
        volumes.append(
            {"name": "data", "persistentVolumeClaim": {"claimName": child_name(owner.name, name)}}
        )
        containers[0]["volumeMounts"].append({"name": "data", "mountPath": "/data"})
    # Restart pods when the service config changes; batching and shadowing are excluded
    # because the operator applies them live (to Triton, to the service) without a restart.
    service = json.loads(config["data"]["service.json"])
    for key in ("maxBatchSize", "maxQueueDelayMicroseconds", "shadow"):
        service.pop(key, None)
    config_hash = hashlib.sha256(json.dumps(service, sort_keys=True).encode()).hexdigest()[:16]
    port = SERVICE_PORTS[name]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, name, defaults),
        "spec": {
            "replicas": plan.replicas,
            "selector": {"matchLabels": selector(owner.name, name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": {**defaults.extra_labels, **labels(owner.name, name)},
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                        "prometheus.io/path": "/metrics",
                        "modelpilot.io/config-hash": config_hash,
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": POD_SECURITY,
                    "terminationGracePeriodSeconds": 30,
                    "containers": containers,
                    "volumes": volumes,
                    **_placement(stage),
                },
            },
        },
    }


def _placement(stage: Stage) -> dict[str, Any]:
    """The pod spec's scheduling fields that the stage sets."""
    placement: dict[str, Any] = {}
    if stage.node_selector:
        placement["nodeSelector"] = dict(stage.node_selector)
    if stage.tolerations:
        placement["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in stage.tolerations
        ]
    if stage.affinity:
        placement["affinity"] = stage.affinity
    return placement


def _service(owner: Owner, name: str, stage: Stage, defaults: Defaults) -> dict[str, Any]:
    ports = [{"name": "http", "port": SERVICE_PORTS[name], "targetPort": "http"}]
    if isinstance(stage, ModelStage):
        ports += [
            {"name": f"triton-{k}", "port": v, "targetPort": f"triton-{k}"}
            for k, v in TRITON_PORTS.items()
        ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, name, defaults),
        "spec": {"type": "ClusterIP", "selector": selector(owner.name, name), "ports": ports},
    }


def _pvc(owner: Owner, stage: RetrievalStage, defaults: Defaults) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": [stage.storage.access_mode],
        "resources": {"requests": {"storage": stage.storage.size}},
    }
    if stage.storage.storage_class_name:
        spec["storageClassName"] = stage.storage.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(owner, "retrieval", defaults),
        "spec": spec,
    }


def render(
    owner: Owner, spec: ModelDeploymentSpec, plan: Plan, defaults: Defaults | None = None
) -> list[dict[str, Any]]:
    """Every desired child object, in the order they should be applied."""
    defaults = defaults or Defaults()
    objects: list[dict[str, Any]] = [_pvc(owner, spec.retrieval, defaults)]
    for name in STAGES:
        stage = spec.stage(name)
        config = _config_map(owner, name, stage, plan[name], defaults, spec)
        objects += [
            config,
            _service(owner, name, stage, defaults),
            _deployment(owner, name, stage, plan[name], defaults, config),
        ]
    return objects
