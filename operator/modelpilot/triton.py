"""Triton adapter: push dynamic-batching settings to running Triton servers, live.

Triton (``--model-control-mode=explicit``) reloads a model with an overriding config through
its repository API without restarting the process; in-flight requests finish on the old
instance. The operator sends the override to every ready pod of the stage.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import requests

from modelpilot.kube import Kube
from modelpilot.plan import StagePlan
from modelpilot.render import TRITON_PORTS, selector


def batching_override(plan: StagePlan) -> dict[str, object]:
    """The config override body for Triton's ``POST /v2/repository/models/<m>/load``."""
    config = {
        "max_batch_size": plan.max_batch_size,
        "dynamic_batching": {"max_queue_delay_microseconds": plan.max_queue_delay_us},
    }
    return {"parameters": {"config": json.dumps(config)}}


def load_with_config(base_url: str, model: str, plan: StagePlan, timeout_s: float = 30) -> None:
    """Reload ``model`` on one Triton server with the plan's batching."""
    response = requests.post(
        f"{base_url}/v2/repository/models/{model}/load",
        json=batching_override(plan),
        timeout=timeout_s,
    )
    response.raise_for_status()


def push_batching(kube: Kube) -> Callable[[str, str, str, StagePlan], None]:
    """A pusher that reloads the stage's model on each of its ready pods."""

    def push(namespace: str, owner: str, stage: str, plan: StagePlan) -> None:
        md = kube.get_model_deployment(namespace, owner)
        if md is None or plan.variant is None:
            return
        variants = md["spec"][stage]["variants"]
        model = next(v["model"] for v in variants if v["name"] == plan.variant)
        labels = ",".join(f"{k}={v}" for k, v in selector(owner, stage).items())
        for ip in kube.ready_pod_ips(namespace, labels):
            load_with_config(f"http://{ip}:{TRITON_PORTS['http']}", model, plan)

    return push
