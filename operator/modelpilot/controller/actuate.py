"""The one path that makes the world match a plan.

``Actuator.apply`` server-side applies the rendered children (and prunes those a spec change
made unwanted); ``Actuator.sync_live`` brings every ready pod's live settings (the fields in
:data:`modelpilot.contract.LIVE_FIELDS`) to the plan, and checks on every pod of the plan's
template that Triton serves the plan's models (load checks). Which fields are live and which roll
pods is decided once, in the contract; render's config hash reads the same table.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from modelpilot import contract
from modelpilot.adapters import live
from modelpilot.adapters.kube import Applied as ObjectApplied
from modelpilot.adapters.kube import Kube, is_client_error
from modelpilot.api.v1alpha1 import ModelDeploymentSpec
from modelpilot.render.children import (
    CONFIG_HASH,
    MANAGED_BY,
    Defaults,
    Owner,
    admin_secret_name,
    config_hash,
    owner_references,
    render,
    selector,
    service_config,
)
from modelpilot.render.plan import Plan

log = logging.getLogger(__name__)


class ApplyRejected(Exception):
    """The apiserver refused a child (a 4xx): retrying the same object cannot succeed."""


@dataclass(frozen=True)
class Applied:
    desired: list[dict[str, Any]]
    children: dict[tuple[str, str], dict[str, Any]]  # live objects after the apply
    changes: list[str]  # "created Deployment x", ... (each also an Event)


def admin_token(key: bytes, owner: Owner) -> str:
    """The admin token of one ModelDeployment, derived from the operator's key: the operator
    writes it into the object's Secret and never needs to read a Secret back (its RBAC has
    ``create`` on Secrets, not ``get``). A re-created object (new uid) gets a new token."""
    message = f"{owner.namespace}/{owner.name}/{owner.uid}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def fingerprint(token: str) -> str:
    """Names a token in pod templates without revealing it."""
    return hashlib.sha256(b"fingerprint:" + token.encode()).hexdigest()[:12]


class Actuator:
    """Applies plans: objects through the apiserver, live settings to the pods."""

    def __init__(
        self, kube: Kube, defaults: Defaults, admin_key: bytes | None = None, workers: int = 16
    ) -> None:
        self.kube = kube
        self.defaults = defaults
        # Without a configured key (a developer's operator), tokens last as long as the
        # process: pods created by an earlier run then refuse live updates until they roll.
        self.admin_key = admin_key or secrets.token_bytes(32)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="live")
        self._secrets: dict[str, str] = {}  # uid -> the token last applied

    def apply(
        self, md: Mapping[str, Any], spec: ModelDeploymentSpec, plan: Plan, prune: bool
    ) -> Applied:
        """Server-side apply every child ``plan`` renders to; with ``prune``, delete the
        owned children no longer rendered (only a spec change can make one unwanted)."""
        meta = md["metadata"]
        owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
        token = admin_token(self.admin_key, owner)
        self._apply_secret(md, owner, token)
        desired = render(owner, spec, plan, self.defaults, fingerprint(token))
        children = self.kube.get_children(desired)
        changes = []
        for obj in desired:
            result = self._apply(obj, children.get((obj["kind"], obj["metadata"]["name"])))
            if result.action != "unchanged":
                change = f"{result.action} {result.kind} {result.name}"
                changes.append(change)
                self.kube.event(md, "Normal", result.action.capitalize(), change)
        if prune:
            wanted = {(o["kind"], o["metadata"]["name"]) for o in desired}
            for (kind, child), obj in self.kube.list_children(owner.namespace, owner.name).items():
                if (kind, child) not in wanted and obj["metadata"].get("ownerReferences"):
                    self.kube.delete(obj["apiVersion"], kind, owner.namespace, child)
                    self.kube.event(md, "Normal", "Pruned", f"deleted {kind} {child}")
        if changes:
            children.update(self.kube.get_children(o for o in desired if o["kind"] == "Deployment"))
        return Applied(desired, children, changes)

    def _apply(self, obj: Mapping[str, Any], before: Mapping[str, Any] | None) -> ObjectApplied:
        """Server-side apply one object; a 4xx becomes :class:`ApplyRejected`."""
        try:
            return self.kube.apply(obj, before)
        except Exception as exc:
            if is_client_error(exc):
                body = getattr(exc, "body", "") or str(exc)
                what = f"{obj['kind']} {obj['metadata']['name']}"
                raise ApplyRejected(f"{what} was rejected: {body}"[:1000]) from exc
            raise

    def _apply_secret(self, md: Mapping[str, Any], owner: Owner, token: str) -> None:
        """The admin token's Secret, server-side applied: a token that no longer derives from
        the key (rotated, or a re-created object's leftover) is replaced, and the pods roll
        by the fingerprint in their template. Once per token and process: the operator may
        not read Secrets, so it cannot skip the apply by comparing."""
        if self._secrets.get(owner.uid) == token:
            return
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": admin_secret_name(owner.name),
                "namespace": owner.namespace,
                "labels": {
                    "app.kubernetes.io/instance": owner.name,
                    "app.kubernetes.io/managed-by": MANAGED_BY,
                },
                "ownerReferences": owner_references(owner),
            },
            "type": "Opaque",
            "stringData": {contract.ADMIN_TOKEN_SECRET_KEY: token},
        }
        self._apply(secret, None)
        self._secrets[owner.uid] = token

    def sync_live(
        self, md: Mapping[str, Any], spec: ModelDeploymentSpec, plan: Plan
    ) -> dict[str, live.StageSync]:
        """Read back every ready pod's live settings and correct those off the plan; an
        Event says what was corrected or could not be."""
        meta = md["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        token = admin_token(self.admin_key, Owner(name, namespace, meta["uid"]))
        stages = (md.get("status") or {}).get("stages") or {}
        out = {}
        for stage in contract.MODEL_STAGES:
            config = service_config(spec, stage, plan[stage])
            want = live.LiveSettings.of(config)
            if want is None:
                continue
            current, checked, rolling, template = [], [], 0, config_hash(config)
            for pod, ip, notes, ready in self.kube.running_pods(namespace, selector(name, stage)):
                if notes.get(CONFIG_HASH) != template:
                    rolling += ready  # an older template: the rollout replaces it, not a push
                    continue
                checked.append((pod, live.pod_at(ip, token)))
                if ready:
                    current.append((pod, live.pod_at(ip, token)))
            result = live.sync_pods(current, want, self.pool, rolling=rolling)
            # Load checks: a pod of the plan's template that is not Ready may be one whose
            # model does not load (Triton runs with --exit-on-error=false: no crash loop).
            unavailable = live.check_loads(checked, want.models, self.pool)
            result = replace(result, unavailable=unavailable)
            if result.corrected:
                what = "; ".join(f"{p.pod}: {', '.join(p.corrected)}" for p in result.corrected)
                self.kube.event(md, "Normal", "LiveUpdated", f"{stage}: applied the plan to {what}")
            previous = (stages.get(stage) or {}).get("liveMessage")
            if result.message and result.message != previous:  # a new cause, not every pass
                self.kube.event(md, "Warning", "LiveUpdateFailed", f"{stage}: {result.message}")
                log.warning("%s/%s %s: %s", namespace, name, stage, result.message)
            out[stage] = result
        return out
