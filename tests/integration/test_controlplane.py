"""The local control plane behaves like a real cluster: scheduling, GC, RBAC, validation."""

from __future__ import annotations

import json
import textwrap
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_api_client import PrometheusConnect
from prometheus_client import CollectorRegistry, Gauge, MetricsHandler

from tests.helpers import ROOT, free_port, kubectl, token_kubeconfig, wait_for

pytestmark = pytest.mark.integration


def test_deployment_becomes_ready_on_kwok_nodes(namespace: str) -> None:
    manifest = textwrap.dedent(f"""
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: web, namespace: {namespace}}}
        spec:
          replicas: 3
          selector: {{matchLabels: {{app: web}}}}
          template:
            metadata: {{labels: {{app: web}}}}
            spec:
              containers: [{{name: web, image: registry.invalid/web:1}}]
        """)
    kubectl("apply", "-f", "-", stdin=manifest)

    def ready() -> bool:
        out = kubectl("get", "deploy", "web", "-n", namespace, "-o", "json").stdout
        status = json.loads(out).get("status", {})
        return status.get("readyReplicas") == 3

    wait_for(ready, 90, what="3 ready replicas")
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
    assert {p["spec"]["nodeName"] for p in pods} <= {"kwok-node-1", "kwok-node-2", "kwok-gpu-1"}
    assert all(p["status"]["phase"] == "Running" for p in pods)


def test_deleting_an_owner_garbage_collects_dependents(
    api_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    ref = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="dependent", owner_references=[ref])),
    )
    core.delete_namespaced_config_map("owner", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_config_map("dependent", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, 60, what="the dependent to be garbage-collected")


def _gpu_pod(name: str, gpus: int) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            containers=[
                client.V1Container(
                    name="c",
                    image="registry.invalid/cuda:1",
                    resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": str(gpus)}),
                )
            ]
        ),
    )


def test_gpu_pods_land_on_the_gpu_node_or_stay_pending(
    api_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_pod(namespace, _gpu_pod("fits", 2))
    core.create_namespaced_pod(namespace, _gpu_pod("too-big", 8))

    def running_on_gpu() -> bool:
        pod = core.read_namespaced_pod("fits", namespace)
        return pod.spec.node_name == "kwok-gpu-1" and pod.status.phase == "Running"

    wait_for(running_on_gpu, 90, what="the GPU pod running on kwok-gpu-1")

    def unschedulable() -> Any:
        pod = core.read_namespaced_pod("too-big", namespace)
        return next(
            (
                c
                for c in pod.status.conditions or []
                if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
            ),
            None,
        )

    cond = wait_for(unschedulable, 90, what="PodScheduled=False/Unschedulable")
    assert "nvidia.com/gpu" in cond.message
    assert core.read_namespaced_pod("too-big", namespace).status.phase == "Pending"


def test_rbac_is_enforced_for_a_narrow_service_account(
    api_client: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    core = client.CoreV1Api(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader"))
    )
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="pod-reader"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="reader"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"
            ),
            subjects=[
                client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)
            ],
        ),
    )
    kubeconfig = token_kubeconfig(
        api_client, namespace, "reader", tmp_path / "reader.kubeconfig", context_namespace=namespace
    )
    # The role binding is honoured once the authorizer's cache sees it.
    wait_for(
        lambda: kubectl("get", "pods", kubeconfig=kubeconfig, check=False).returncode == 0,
        30,
        what="the reader to list pods",
    )
    denied = kubectl("create", "configmap", "x", kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "is forbidden" in denied.stderr and "cannot create resource" in denied.stderr
    denied = kubectl("delete", "pod", "anything", kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0 and "cannot delete resource" in denied.stderr


def test_server_side_dry_run_rejects_an_invalid_object(namespace: str) -> None:
    bad = textwrap.dedent(f"""
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: bad, namespace: {namespace}}}
        spec:
          replicas: -1
          selector: {{matchLabels: {{app: bad}}}}
          template:
            metadata: {{labels: {{app: other}}}}
            spec: {{containers: [{{name: c, image: x}}]}}
        """)
    result = kubectl("apply", "--dry-run=server", "-f", "-", stdin=bad, check=False)
    assert result.returncode != 0
    assert "spec.replicas" in result.stderr
    assert "selector` does not match template `labels`" in result.stderr


def test_prometheus_scrapes_a_target_the_test_starts(prometheus_url: str) -> None:
    registry = CollectorRegistry()
    gauge = Gauge("modelpilot_test_probe", "A value the test sets", registry=registry)
    gauge.set(42.5)
    port = free_port()

    class Handler(MetricsHandler):
        pass

    Handler.registry = registry
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = ROOT / ".cache/prometheus/targets" / f"test-{port}.json"
    target.write_text(
        json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": {"test": "scrape"}}])
    )
    try:
        prom = PrometheusConnect(url=prometheus_url, disable_ssl=True)

        def scraped() -> float | None:
            result = prom.custom_query('modelpilot_test_probe{test="scrape"}')
            return float(result[0]["value"][1]) if result else None

        assert wait_for(scraped, 60, what="Prometheus to scrape the probe") == 42.5
    finally:
        target.unlink()
        server.shutdown()
