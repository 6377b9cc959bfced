"""An in-memory apiserver behind :class:`modelpilot.adapters.kube.Kube`'s interface, for unit
tests of the reconciler and the optimizer loop. The real adapter stays the only code that
talks to an apiserver; its own behaviour (server-side apply, the /status subresource) is
tested against the local control plane in ``tests/integration``.

Like the apiserver, an apply that changes nothing keeps the resourceVersion, a Deployment's
generation moves with its spec, and status is its own subresource. Any method can be made
to fail with :meth:`FakeKube.fail_on`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes.client.rest import ApiException

from modelpilot.adapters.kube import CHILD_KINDS, Applied
from modelpilot.controller import conditions as cond

Key = tuple[str, str, str]  # (kind, namespace, name)


def api_error(status: int, message: str = "refused") -> ApiException:
    """What the kubernetes client raises for an HTTP error from the apiserver."""
    exc = ApiException(status=status, reason=message)
    exc.body = message
    return exc


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self.events: list[tuple[str, str, str]] = []  # (type, reason, message)
        self.status_writes = 0
        self.applies = 0
        self.pods: dict[str, list[tuple[str, str, dict[str, str]]]] = {}
        self.not_ready: dict[str, list[tuple[str, str, dict[str, str]]]] = {}
        self._failures: dict[str, BaseException] = {}
        self._version = 0

    # -- test controls ------------------------------------------------------------------
    def fail_on(self, method: str, exc: BaseException | None) -> None:
        """Make ``method`` raise ``exc`` from now on (None: work again)."""
        if exc is None:
            self._failures.pop(method, None)
        else:
            self._failures[method] = exc

    def _maybe_fail(self, method: str) -> None:
        if method in self._failures:
            raise self._failures[method]

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def create_model_deployment(self, namespace: str, name: str, spec: Any) -> dict[str, Any]:
        obj = {
            "apiVersion": "modelpilot.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": f"uid-{name}",
                "generation": 1,
                "resourceVersion": self._next_version(),
            },
            "spec": copy.deepcopy(spec),
        }
        self.objects[("ModelDeployment", namespace, name)] = obj
        return obj

    def edit_spec(self, namespace: str, name: str, spec: Any) -> None:
        """A user's edit: the spec changes and the generation moves."""
        obj = self.objects[("ModelDeployment", namespace, name)]
        obj["spec"] = copy.deepcopy(spec)
        obj["metadata"]["generation"] += 1
        obj["metadata"]["resourceVersion"] = self._next_version()

    def roll_out(self, namespace: str) -> None:
        """Every Deployment in ``namespace`` reaches its spec: the controller's job."""
        for (kind, ns, _), obj in self.objects.items():
            if kind == "Deployment" and ns == namespace:
                n = obj["spec"].get("replicas", 1)
                obj["status"] = {
                    "replicas": n,
                    "readyReplicas": n,
                    "updatedReplicas": n,
                    "observedGeneration": obj["metadata"]["generation"],
                }

    def of_kind(self, kind: str, namespace: str) -> dict[str, dict[str, Any]]:
        return {k[2]: o for k, o in self.objects.items() if k[0] == kind and k[1] == namespace}

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.events]

    # -- Kube's interface ---------------------------------------------------------------
    def get_model_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._maybe_fail("get_model_deployment")
        obj = self.objects.get(("ModelDeployment", namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list_children(self, namespace: str, owner: str) -> dict[tuple[str, str], dict[str, Any]]:
        self._maybe_fail("list_children")
        out = {}
        kinds = {kind for _, kind in CHILD_KINDS}  # the kinds the real adapter lists
        for (kind, ns, name), obj in self.objects.items():
            labels = obj["metadata"].get("labels") or {}
            if (
                kind in kinds
                and ns == namespace
                and labels.get("app.kubernetes.io/instance") == owner
                and labels.get("app.kubernetes.io/managed-by") == "modelpilot"
            ):
                out[(kind, name)] = copy.deepcopy(obj)
        return out

    def get_children(
        self, objects: Iterable[Mapping[str, Any]]
    ) -> dict[tuple[str, str], dict[str, Any]]:
        self._maybe_fail("get_children")
        out = {}
        for obj in objects:
            meta = obj["metadata"]
            live = self.objects.get((obj["kind"], meta["namespace"], meta["name"]))
            if live is not None:
                out[(obj["kind"], meta["name"])] = copy.deepcopy(live)
        return out

    def is_own_echo(self, obj: Mapping[str, Any]) -> bool:
        return False

    def apply(self, obj: Mapping[str, Any], before: Mapping[str, Any] | None) -> Applied:
        self._maybe_fail("apply")
        self.applies += 1
        meta = obj["metadata"]
        key = (obj["kind"], meta["namespace"], meta["name"])
        body = {k: copy.deepcopy(v) for k, v in obj.items() if k != "status"}
        live = self.objects.get(key)
        if live is None:
            body["metadata"].update(resourceVersion=self._next_version(), generation=1)
            self.objects[key] = body
            return Applied(obj["kind"], meta["name"], "created")
        stored = {k: v for k, v in live.items() if k != "status"}
        server_set = ("resourceVersion", "generation")
        stored_meta = {k: v for k, v in stored["metadata"].items() if k not in server_set}
        if {**stored, "metadata": stored_meta} == body:
            return Applied(obj["kind"], meta["name"], "unchanged")
        generation = live["metadata"]["generation"] + (live.get("spec") != body.get("spec"))
        body["metadata"].update(resourceVersion=self._next_version(), generation=generation)
        self.objects[key] = {**body, **({"status": live["status"]} if "status" in live else {})}
        return Applied(obj["kind"], meta["name"], "updated")

    def running_pods(
        self, namespace: str, labels: Mapping[str, str]
    ) -> list[tuple[str, str, dict[str, str], bool]]:
        """The ready pods, and the ones in ``not_ready`` (stage -> pods)."""
        self._maybe_fail("running_pods")
        stage = labels.get("app.kubernetes.io/component", "")
        ready = [(*p, True) for p in self.pods.get(stage, [])]
        return ready + [(*p, False) for p in self.not_ready.get(stage, [])]

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._maybe_fail("delete")
        self.objects.pop((kind, namespace, name), None)

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self._maybe_fail("patch_status")
        obj = self.objects[("ModelDeployment", namespace, name)]
        obj["status"] = cond.merge_patch(obj.get("status") or {}, dict(status))
        obj["metadata"]["resourceVersion"] = self._next_version()
        self.status_writes += 1

    def event(self, owner: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))
