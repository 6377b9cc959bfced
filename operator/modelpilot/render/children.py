"""Pure rendering: a ModelDeployment and its plan -> the desired Kubernetes objects.

No I/O. Every child carries the ``app.kubernetes.io/*`` labels, an ownerReference to the
ModelDeployment (so deleting it garbage-collects them) and, for pods, a hardened security
context that passes the "restricted" Pod Security Standard. Ports, files and environment
come from :mod:`modelpilot.contract`, which the services read too.

A stage's Service exposes only its API port. The admin API and Triton listen on ports no
Service names, guarded by the per-ModelDeployment admin token (a Secret the reconciler
creates), and a NetworkPolicy admits only the operator to them where the CNI enforces it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from modelpilot import contract
from modelpilot.api.v1alpha1 import (
    GROUP,
    KIND,
    VERSION,
    InferenceStage,
    KnobMode,
    ModelDeploymentSpec,
    ModelStage,
    ResourceRequirements,
    RetrievalStage,
    Stage,
)
from modelpilot.contract import ADMIN_PORT, SERVICE_PORTS, STAGES, TRITON_PORTS
from modelpilot.render.plan import Plan, StagePlan

MANAGED_BY = "modelpilot"
CONFIG_HASH = "modelpilot.io/config-hash"
ADMIN_FINGERPRINT = "modelpilot.io/admin-token"
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
    # and starts Triton (modelpilot_services.models.tritonserve); args are tritonserver's.
    triton_image: str = ""
    extra_labels: dict[str, str] = field(default_factory=dict)
    # Where the operator's pods run: the NetworkPolicy admits them to the admin ports.
    # Unknown (an operator outside the cluster): no pod is admitted there.
    operator_namespace: str = ""
    operator_labels: dict[str, str] = field(default_factory=dict)

    def image(self, stage: str) -> str:
        return f"{self.image_repository}/{stage}:{self.image_tag}"

    def triton(self) -> str:
        return self.triton_image or self.image("triton")


def child_name(owner: str, stage: str) -> str:
    return f"{owner}-{stage}"


def admin_secret_name(owner: str) -> str:
    """The Secret holding the ModelDeployment's admin token (created by the reconciler)."""
    return f"{owner}-admin"


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


def owner_references(owner: Owner) -> list[dict[str, Any]]:
    """The ModelDeployment as controller: deleting it garbage-collects the object."""
    return [
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": owner.name,
            "uid": owner.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _meta(owner: Owner, stage: str, defaults: Defaults, name: str | None = None) -> dict[str, Any]:
    return {
        "name": name or child_name(owner.name, stage),
        "namespace": owner.namespace,
        "labels": {**defaults.extra_labels, **labels(owner.name, stage)},
        "ownerReferences": owner_references(owner),
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
# A terminating pod stays in its Service's endpoints until the endpoint controller and every
# node's kube-proxy have caught up; until then new connections still reach it. Each container
# keeps serving this long before its SIGTERM, so a rollout or scale-down refuses nothing.
DRAIN = {"preStop": {"sleep": {"seconds": 10}}}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": NON_ROOT_UID,
    "runAsGroup": NON_ROOT_UID,
    "fsGroup": NON_ROOT_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _probe(path: str, port: str) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": 10, "failureThreshold": 3}


def _admin_token_env(owner: Owner) -> dict[str, Any]:
    ref = {"name": admin_secret_name(owner.name), "key": contract.ADMIN_TOKEN_SECRET_KEY}
    return {"name": contract.ENV_ADMIN_TOKEN, "valueFrom": {"secretKeyRef": ref}}


def _env(owner: Owner, stage: Stage) -> list[dict[str, Any]]:
    urls = [
        {
            "name": contract.stage_url_env(s),
            "value": f"http://{child_name(owner.name, s)}:{SERVICE_PORTS[s]}",
        }
        for s in STAGES
    ]
    user = [e.model_dump(by_alias=True, exclude_none=True) for e in stage.env or []]
    return urls + user


CONFIG_MOUNT = {"name": "config", "mountPath": contract.CONFIG_DIR, "readOnly": True}


def _service_container(owner: Owner, name: str, stage: Stage, defaults: Defaults) -> dict[str, Any]:
    env = _env(owner, stage)
    ports = [{"name": "http", "containerPort": SERVICE_PORTS[name]}]
    if isinstance(stage, ModelStage):
        env += [
            {"name": contract.ENV_ADMIN_PORT, "value": str(ADMIN_PORT)},
            _admin_token_env(owner),
        ]
        ports.append({"name": "admin", "containerPort": ADMIN_PORT})
    return {
        "name": name,
        "image": stage.image or defaults.image(name),
        "ports": ports,
        "env": env,
        "resources": _resources(stage.resources),
        "readinessProbe": _probe("/readyz", "http"),
        "livenessProbe": _probe("/healthz", "http"),
        "securityContext": CONTAINER_SECURITY,
        "lifecycle": DRAIN,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, CONFIG_MOUNT],
    }


def served_models(spec: ModelDeploymentSpec, name: str, plan: StagePlan) -> list[str]:
    """The Triton models a model stage serves under ``plan`` (its sidecar loads them at
    start): the planned variant's, and while the plan routes (a small share) the gateway's
    small and large."""
    stage = spec.stage(name)
    if not isinstance(stage, ModelStage):
        return []
    variant = stage.variant(plan.variant or "") or stage.variants[0]
    models = [variant.model]
    if isinstance(stage, InferenceStage) and plan.small_share is not None:
        for routed in (stage.routing.small_variant, stage.routing.large_variant):
            if (v := stage.variant(routed or "")) is not None and v.model not in models:
                models.append(v.model)
    return models


def _triton_container(
    owner: Owner, stage: ModelStage, plan: StagePlan, models: list[str], defaults: Defaults
) -> dict[str, Any]:
    variant = stage.variant(plan.variant or "") or stage.variants[0]
    restricted = ",".join(contract.TRITON_RESTRICTED_APIS)
    header = f"{contract.TRITON_ADMIN_HEADER}=$({contract.ENV_ADMIN_TOKEN})"
    return {
        "name": "triton",
        "image": defaults.triton(),
        "args": [
            "--model-repository=/models",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in models),
            # A model that does not load leaves the others serving and the pod not Ready
            # (the service's readiness names the model), not a crash loop: the operator's
            # load check reads Triton's reason and moves the plan off the variant.
            "--exit-on-error=false",
            "--allow-metrics=true",
            # Model control only with the admin token, on both protocols.
            f"--http-restricted-api={restricted}:{header}",
            f"--grpc-restricted-protocol={restricted}:{header}",
        ],
        "env": [
            _admin_token_env(owner),
            {
                "name": contract.ENV_SERVICE_CONFIG,
                "value": f"{contract.CONFIG_DIR}/{contract.SERVICE_CONFIG_FILE}",
            },
        ],
        "ports": [{"name": f"triton-{k}", "containerPort": v} for k, v in TRITON_PORTS.items()],
        "resources": _resources(variant.resources or stage.resources),
        "readinessProbe": _probe("/v2/health/ready", "triton-http"),
        "livenessProbe": _probe("/v2/health/live", "triton-http"),
        "securityContext": CONTAINER_SECURITY,
        "lifecycle": DRAIN,
        "volumeMounts": [
            {"name": "models", "mountPath": "/models"},
            {"name": "tmp", "mountPath": "/tmp"},
            CONFIG_MOUNT,
        ],
    }


def service_config(spec: ModelDeploymentSpec, name: str, plan: StagePlan) -> contract.ServiceConfig:
    """What the stage's containers read from ``service.json``."""
    stage = spec.stage(name)
    config = contract.ServiceConfig(stage=name)
    if isinstance(stage, ModelStage):
        variant = stage.variant(plan.variant or "") or stage.variants[0]
        shadow = stage.variant(plan.shadow_variant or "")
        models = served_models(spec, name, plan)
        config = config.model_copy(
            update={
                "variant": variant.name,
                "model": variant.model,
                # only the served ones: a variant added to the spec rolls no pods
                "variants": {v.name: v.model for v in stage.variants if v.model in models},
                "models": models,
                "maxBatchSize": plan.max_batch_size,
                "maxQueueDelayMicroseconds": plan.max_queue_delay_us,
                "instances": plan.instances,
                # restored by a pod that starts mid-verification
                "shadow": None
                if shadow is None
                else contract.Shadow(
                    model=shadow.model,
                    sampleRatio=spec.optimizer.verification.sample_ratio_value,
                ),
            }
        )
    if isinstance(stage, RetrievalStage):
        config = config.model_copy(
            update={
                "dimensions": stage.index.dimensions,
                "metric": stage.index.metric,
                "topK": stage.top_k,
                "dataDir": "/data",
            }
        )
    if isinstance(stage, InferenceStage):
        config = config.model_copy(
            update={
                # On or off, not Fixed or Auto (a mode change then rolls no pod); numbers,
                # not quantities: the services parse plain JSON.
                "routing": {
                    "enabled": plan.small_share is not None,
                    **stage.routing.model_dump(
                        by_alias=True,
                        exclude_none=True,
                        include={"small_variant", "large_variant"},
                    ),
                    "sampleRatio": stage.routing.sample_ratio_value,
                },
                "semanticCache": {
                    "enabled": stage.semantic_cache.mode != KnobMode.OFF,
                    **stage.semantic_cache.model_dump(
                        by_alias=True, include={"max_entries", "ttl_seconds"}
                    ),
                    "sampleRatio": stage.semantic_cache.sample_ratio_value,
                },
                "smallShare": plan.small_share,
                "cacheThreshold": plan.cache_threshold,
            }
        )
    return config


def config_hash(config: contract.ServiceConfig) -> str:
    """Hash of what rolls the pods: service.json without the fields applied live."""
    rolled = config.model_dump(mode="json", exclude=set(contract.LIVE_FIELDS))
    return hashlib.sha256(json.dumps(rolled, sort_keys=True).encode()).hexdigest()[:16]


def _config_map(
    owner: Owner, name: str, config: contract.ServiceConfig, defaults: Defaults
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(owner, name, defaults),
        "data": {contract.SERVICE_CONFIG_FILE: config.json_text()},
    }


def _deployment(
    owner: Owner,
    name: str,
    spec: ModelDeploymentSpec,
    plan: StagePlan,
    defaults: Defaults,
    config: contract.ServiceConfig,
    admin_fingerprint: str,
) -> dict[str, Any]:
    stage = spec.stage(name)
    containers = [_service_container(owner, name, stage, defaults)]
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "config", "configMap": {"name": child_name(owner.name, name)}},
    ]
    if isinstance(stage, ModelStage):
        containers.append(_triton_container(owner, stage, plan, config.models, defaults))
        volumes.append({"name": "models", "emptyDir": {}})
    if isinstance(stage, RetrievalStage):
        volumes.append(
            {"name": "data", "persistentVolumeClaim": {"claimName": child_name(owner.name, name)}}
        )
        containers[0]["volumeMounts"].append({"name": "data", "mountPath": "/data"})
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
                        CONFIG_HASH: config_hash(config),
                        # Pods roll when the admin token changes (the key was rotated).
                        **({ADMIN_FINGERPRINT: admin_fingerprint} if admin_fingerprint else {}),
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": POD_SECURITY,
                    "terminationGracePeriodSeconds": 40,
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


def _service(owner: Owner, name: str, defaults: Defaults) -> dict[str, Any]:
    """The stage's API only: admin and Triton ports are never behind a Service."""
    ports = [{"name": "http", "port": SERVICE_PORTS[name], "targetPort": "http"}]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, name, defaults),
        "spec": {"type": "ClusterIP", "selector": selector(owner.name, name), "ports": ports},
    }


def _network_policy(owner: Owner, defaults: Defaults) -> dict[str, Any]:
    """Defence in depth where the CNI enforces policies: anyone may call a stage's API port
    (the Services); only the operator's pods reach the admin and Triton ports."""
    api = [{"protocol": "TCP", "port": p} for p in sorted(set(SERVICE_PORTS.values()))]
    rules: list[dict[str, Any]] = [{"ports": api}]
    if defaults.operator_namespace and defaults.operator_labels:
        admin = [ADMIN_PORT, *TRITON_PORTS.values()]
        rules.append(
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {
                                "kubernetes.io/metadata.name": defaults.operator_namespace
                            }
                        },
                        "podSelector": {"matchLabels": dict(defaults.operator_labels)},
                    }
                ],
                "ports": [{"protocol": "TCP", "port": p} for p in admin],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(owner, "pipeline", defaults, name=f"{owner.name}-modelpilot"),
        "spec": {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/instance": owner.name,
                    "app.kubernetes.io/managed-by": MANAGED_BY,
                }
            },
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
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
    owner: Owner,
    spec: ModelDeploymentSpec,
    plan: Plan,
    defaults: Defaults | None = None,
    admin_fingerprint: str = "",
) -> list[dict[str, Any]]:
    """Every desired child object, in the order they should be applied. ``admin_fingerprint``
    identifies the admin token (not the token itself) in the pod templates."""
    defaults = defaults or Defaults()
    objects: list[dict[str, Any]] = [
        _network_policy(owner, defaults),
        _pvc(owner, spec.retrieval, defaults),
    ]
    for name in STAGES:
        config = service_config(spec, name, plan[name])
        objects += [
            _config_map(owner, name, config, defaults),
            _service(owner, name, defaults),
            _deployment(owner, name, spec, plan[name], defaults, config, admin_fingerprint),
        ]
    return objects
