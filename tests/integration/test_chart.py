"""The Helm chart on the real control plane: lint, schema, install, least-privilege RBAC."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from modelpilot.kube import Kube
from modelpilot.optimize import Optimizer
from modelpilot.optimizer.profiles import Profiles
from modelpilot.reconcile import Reconciler
from tests.helpers import BIN, KUBECONFIG, ROOT, kubectl, token_kubeconfig, wait_for

pytestmark = pytest.mark.integration
CHART = ROOT / "charts/modelpilot"
KUBE_VERSION = "1.37.2"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(BIN / "helm"), "--kubeconfig", str(KUBECONFIG), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr}")
    return result


def test_helm_lint_is_clean() -> None:
    result = helm("lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in result.stdout


def test_helm_is_stamped_as_a_release_and_renders_without_a_kube_version() -> None:
    """An unstamped helm assumes Kubernetes v1.20.0, which fails the chart's kubeVersion."""
    assert helm("version", "--short").stdout.startswith("v3.21.4")
    rendered = helm("template", "t", str(CHART)).stdout
    assert "kind: Deployment" in rendered


@pytest.mark.parametrize(
    ("setting", "field"), [("imagee.tag=x", "imagee"), ("logLevel=loud", "logLevel")]
)
def test_values_schema_rejects_typos(setting: str, field: str) -> None:
    result = helm(
        "template", "t", str(CHART), "--kube-version", KUBE_VERSION, "--set", setting, check=False
    )
    assert result.returncode != 0 and field in result.stderr


def test_chart_crd_matches_the_generated_crd() -> None:
    rendered = helm(
        "template",
        "t",
        str(CHART),
        "--kube-version",
        KUBE_VERSION,
        "--show-only",
        "templates/crd-modeldeployment.yaml",
    ).stdout
    chart_crd = yaml.safe_load(rendered)
    plain = yaml.safe_load((ROOT / "crds/modeldeployment.yaml").read_text())
    assert chart_crd["spec"] == plain["spec"]
    assert chart_crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced", "dashboards"])
def test_rendered_chart_passes_server_side_dry_run(mode: str, namespace: str, crd: str) -> None:
    extra = {
        "cluster-wide": [],
        "dashboards": ["--set", "dashboards.enabled=true"],
        "namespaced": ["--set", f"watchNamespaces={{{namespace}-a,{namespace}-b}}"],
    }[mode]
    watched = [f"{namespace}-a", f"{namespace}-b"] if mode == "namespaced" else []
    for ns in watched:
        kubectl("create", "namespace", ns)
    try:
        rendered = helm(
            "template",
            "mp",
            str(CHART),
            "-n",
            namespace,
            "--kube-version",
            KUBE_VERSION,
            "--set",
            "crds.enabled=false",
            *extra,
        ).stdout
        kinds = [d["kind"] for d in yaml.safe_load_all(rendered) if d]
        assert kinds.count("Role") == len(watched)
        result = kubectl("apply", "--dry-run=server", "-f", "-", stdin=rendered, check=False)
        assert result.returncode == 0, result.stderr
    finally:
        for ns in watched:
            kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _token_client(namespace: str, sa: str, tmp_path: Path) -> client.ApiClient:
    admin = config.new_client_from_config(config_file=str(KUBECONFIG))
    path = token_kubeconfig(admin, namespace, sa, tmp_path / "sa.kubeconfig")
    return config.new_client_from_config(config_file=str(path))


def test_install_and_the_operator_works_with_exactly_the_charts_rbac(
    namespace: str, crd: str, tmp_path: Path
) -> None:
    release = f"mp-{uuid.uuid4().hex[:6]}"
    helm(
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--set",
        "crds.enabled=false",
        "--wait",
        "--timeout",
        "120s",
    )
    try:
        dep = json.loads(
            kubectl(
                "get",
                "deploy",
                "-n",
                namespace,
                "-l",
                f"app.kubernetes.io/instance={release}",
                "-o",
                "json",
            ).stdout
        )
        assert dep["items"][0]["status"].get("readyReplicas") == 1
        sa = f"{release}-modelpilot"
        api = _token_client(namespace, sa, tmp_path)

        # Sufficient: the operator's reconcile and optimizer code, with the SA's token.
        md = yaml.safe_load((ROOT / "examples/full.yaml").read_text())
        md["metadata"]["name"] = "rbac"
        kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(md))
        kube = Kube(api)
        reconciler = Reconciler(kube)
        wait_for(
            lambda: reconciler.reconcile(namespace, "rbac"),
            60,
            what="a reconcile with the chart's ServiceAccount",
        )
        children = kube.list_children(namespace, "rbac")
        assert len(children) == 13  # 4 x (Deployment, Service, ConfigMap) + the index PVC
        optimizer = Optimizer(
            kube,
            reconciler,
            Profiles({}),
            snapshot_source=_no_prometheus,
            default_prometheus_url="x",
        )
        decision = optimizer.tick(namespace, "rbac")
        assert decision is not None and decision.hold
        status: Any = client.CustomObjectsApi(api).get_namespaced_custom_object(
            "modelpilot.io", "v1alpha1", namespace, "modeldeployments", "rbac"
        )["status"]
        assert any(
            c["type"] == "MetricsAvailable" and c["status"] == "False" for c in status["conditions"]
        )

        # Not too broad: what the operator never does is refused.
        who = f"system:serviceaccount:{namespace}:{sa}"
        for verb, resource in [
            ("get", "secrets"),
            ("list", "secrets"),
            ("delete", "namespaces"),
            ("create", "clusterroles"),
            ("patch", "nodes"),
            ("create", "pods"),
            ("delete", "pods"),
            ("update", "modeldeployments.modelpilot.io"),
            ("delete", "modeldeployments.modelpilot.io"),
            ("delete", "customresourcedefinitions"),
        ]:
            result = kubectl(
                "auth", "can-i", verb, resource, "-n", namespace, "--as", who, check=False
            )
            assert result.stdout.strip() == "no", f"{verb} {resource} should be refused"
        with pytest.raises(client.ApiException) as denied:
            client.CoreV1Api(api).list_namespaced_secret(namespace)
        assert denied.value.status == 403
    finally:
        helm("uninstall", release, "-n", namespace, "--wait", check=False)


def _no_prometheus(url: str, namespace: str, name: str, now: float) -> Any:
    raise ConnectionError("no Prometheus in this test")
