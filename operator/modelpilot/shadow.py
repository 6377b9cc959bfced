"""Shadow adapter: tell a model stage's running pods which candidate to mirror traffic to.

During a variant verification each ready pod of the stage gets
``PUT /v1/admin/shadow {"model", "sampleRatio"}`` (and ``DELETE`` when it ends), so mirroring
starts and stops without a restart; the ConfigMap carries the same setting for pods that
start meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import requests

from modelpilot.api.v1alpha1 import ModelDeploymentSpec, ModelStage
from modelpilot.kube import Kube
from modelpilot.plan import StagePlan
from modelpilot.render import SERVICE_PORTS, selector


def set_shadow(base_url: str, model: str | None, ratio: float, timeout_s: float = 30) -> None:
    """Start mirroring to ``model`` on one service (``None``: stop)."""
    url = f"{base_url}/v1/admin/shadow"
    if model is None:
        response = requests.delete(url, timeout=timeout_s)
    else:
        response = requests.put(url, json={"model": model, "sampleRatio": ratio}, timeout=timeout_s)
    response.raise_for_status()


def shadow_target(spec: Mapping[str, Any], stage: str, plan: StagePlan) -> tuple[str | None, float]:
    """(Triton model to mirror to or None, sample ratio) for the plan's shadow variant."""
    parsed = ModelDeploymentSpec.model_validate(spec)
    model_stage = parsed.stage(stage)
    if not isinstance(model_stage, ModelStage):
        return None, 0.0
    variant = model_stage.variant(plan.shadow_variant or "")
    ratio = parsed.optimizer.verification.sample_ratio_value
    return (variant.model if variant is not None else None), ratio


def push_shadow(kube: Kube) -> Callable[[str, str, str, StagePlan], None]:
    """A pusher that sets the plan's shadow candidate on each ready pod of the stage."""

    def push(namespace: str, owner: str, stage: str, plan: StagePlan) -> None:
        md = kube.get_model_deployment(namespace, owner)
        if md is None:
            return
        model, ratio = shadow_target(md["spec"], stage, plan)
        labels = ",".join(f"{k}={v}" for k, v in selector(owner, stage).items())
        for ip in kube.ready_pod_ips(namespace, labels):
            set_shadow(f"http://{ip}:{SERVICE_PORTS[stage]}", model, ratio)

    return push
