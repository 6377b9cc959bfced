"""The Kubernetes API adapter: the only module that talks to the apiserver.

Children are written with server-side apply under one field manager, so a re-apply of an
unchanged object is a no-op (no write, same resourceVersion) and a hand edit of a field we
own is taken back. Status goes through the /status subresource.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

from modelpilot.api.v1alpha1 import GROUP, KIND, PLURAL, VERSION

FIELD_MANAGER = "modelpilot"
CHILD_KINDS = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("v1", "PersistentVolumeClaim"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)


@dataclass(frozen=True)
class Applied:
    kind: str
    name: str
    action: str  # "created", "updated" or "unchanged"


def new_api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig."""
    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    return config.new_client_from_config(config_file=kubeconfig)


class Kube:
    """Thin wrapper over the dynamic client for what the reconciler needs."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.dynamic = DynamicClient(api)
        self._resources: dict[tuple[str, str], Any] = {}
        # (kind, namespace, name) -> (hash of the body we applied, resourceVersion it got).
        self._applied: dict[tuple[str, str, str], tuple[str, str]] = {}

    def _resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        if key not in self._resources:
            self._resources[key] = self.dynamic.resources.get(api_version=api_version, kind=kind)
        return self._resources[key]

    def get_model_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self._resource(f"{GROUP}/{VERSION}", KIND).get(name=name, namespace=namespace)
        except NotFoundError:
            return None
        return dict(obj.to_dict())

    def list_children(self, namespace: str, owner: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Every child object labelled as ours for ``owner``, keyed by (kind, name)."""
        selector = f"app.kubernetes.io/instance={owner},app.kubernetes.io/managed-by=modelpilot"
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for api_version, kind in CHILD_KINDS:
            items = (
                self._resource(api_version, kind)
                .get(namespace=namespace, label_selector=selector)
                .items
            )
            for item in items:
                obj = item.to_dict()
                obj.setdefault("kind", kind)
                out[(kind, obj["metadata"]["name"])] = obj
        return out

    def get_children(
        self, objects: Iterable[Mapping[str, Any]]
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """The live versions of ``objects`` by name, keyed by (kind, name): one GET each,
        independent of how many other objects the namespace holds (a LIST is not)."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for obj in objects:
            meta = obj["metadata"]
            try:
                live = self._resource(obj["apiVersion"], obj["kind"]).get(
                    name=meta["name"], namespace=meta["namespace"]
                )
            except NotFoundError:
                continue
            item = live.to_dict()
            item.setdefault("kind", obj["kind"])
            out[(obj["kind"], meta["name"])] = item
        return out

    def is_own_echo(self, obj: Mapping[str, Any]) -> bool:
        """Whether ``obj`` is exactly what our last apply of it produced (a watch echo)."""
        meta = obj.get("metadata") or {}
        key = (str(obj.get("kind")), str(meta.get("namespace")), str(meta.get("name")))
        seen = self._applied.get(key)
        return seen is not None and seen[1] == meta.get("resourceVersion")

    def apply(self, obj: Mapping[str, Any], before: Mapping[str, Any] | None) -> Applied:
        """Server-side apply ``obj``; ``before`` is the object as last listed (or None).

        Skipped when ``before`` still carries the resourceVersion our last apply of this
        same body produced: nobody changed it since, so the apply could change nothing
        (and an unchanged apply still costs the apiserver a managed-fields merge). Any write
        by anyone moves the resourceVersion, so hand edits are still taken back.
        """
        meta = obj["metadata"]
        key = (obj["kind"], meta["namespace"], meta["name"])
        digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
        if before is not None and self._applied.get(key) == (
            digest,
            before["metadata"]["resourceVersion"],
        ):
            return Applied(obj["kind"], meta["name"], "unchanged")
        res = self._resource(obj["apiVersion"], obj["kind"])
        result = res.server_side_apply(
            body=dict(obj),
            name=meta["name"],
            namespace=meta["namespace"],
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )
        self._applied[key] = (digest, result.metadata.resourceVersion)
        if before is None:
            action = "created"
        elif result.metadata.resourceVersion != before["metadata"]["resourceVersion"]:
            action = "updated"
        else:
            action = "unchanged"
        return Applied(obj["kind"], meta["name"], action)

    def running_pods(
        self, namespace: str, labels: Mapping[str, str]
    ) -> list[tuple[str, str, dict[str, str], bool]]:
        """(name, IP, annotations, Ready) of every pod matching ``labels`` that has an IP and
        is not terminating."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        pods = (
            client.CoreV1Api(self.api).list_namespaced_pod(namespace, label_selector=selector).items
        )
        return [
            (
                p.metadata.name,
                p.status.pod_ip,
                dict(p.metadata.annotations or {}),
                any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []),
            )
            for p in pods
            if p.status.pod_ip and p.metadata.deletion_timestamp is None
        ]

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            self._resource(api_version, kind).delete(name=name, namespace=namespace)
        except NotFoundError:
            pass

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Replace the status fields we own through the /status subresource."""
        client.CustomObjectsApi(self.api).patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)}
        )

    def event(self, owner: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Record a core/v1 Event on the ModelDeployment."""
        meta = owner["metadata"]
        now = dt.datetime.now(dt.UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                name=f"{meta['name']}.{uuid.uuid4().hex[:12]}", namespace=meta["namespace"]
            ),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind=KIND,
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta["uid"],
                resource_version=meta.get("resourceVersion"),
            ),
            type=type_,
            reason=reason,
            message=message[:1024],
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component=FIELD_MANAGER),
            reporting_component=FIELD_MANAGER,
            reporting_instance=FIELD_MANAGER,
        )
        try:
            client.CoreV1Api(self.api).create_namespaced_event(meta["namespace"], body)
        except ApiException:
            pass  # events are best effort: never fail a reconcile over one


def is_client_error(exc: BaseException) -> bool:
    """A 4xx other than conflict/throttling: retrying the same request cannot succeed."""
    status = getattr(exc, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (409, 429)


def owner_of(obj: Mapping[str, Any]) -> str | None:
    """The ModelDeployment that controls ``obj``, if any."""
    refs: Iterable[Mapping[str, Any]] = obj.get("metadata", {}).get("ownerReferences") or []
    for ref in refs:
        if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(GROUP + "/"):
            return str(ref["name"])
    return None
