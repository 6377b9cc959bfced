"""The Helm chart on the real control plane: lint, schema, install, least-privilege RBAC."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.leaderelection import electionconfig, leaderelection

from modelpilot.adapters.kube import Kube
from modelpilot.adapters.prometheus import NotAllowed, PrometheusConfig, target_labels
from modelpilot.controller.actuate import Actuator
from modelpilot.controller.leadership import ElectionLock
from modelpilot.controller.optimizer_loop import OptimizerLoop
from modelpilot.controller.reconcile import Reconciler
from modelpilot.optimizer.profiles import Profiles
from modelpilot.render import children
from modelpilot.render.children import Defaults
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
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        # one per watched namespace, and the leader election's in the release namespace
        roles = [d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"]
        assert sorted(roles) == sorted([*watched, namespace])
        (operator,) = [d for d in docs if d["kind"] == "Deployment"]
        env = {
            e["name"]: e.get("value")
            for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        # with Roles only, the operator must not try to list namespaces cluster-wide
        assert env["MODELPILOT_NAMESPACED"] == ("true" if watched else "false")
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
        assert dep["items"][0]["status"].get("readyReplicas") == 2  # a leader and a standby
        sa = f"{release}-modelpilot"
        api = _token_client(namespace, sa, tmp_path)

        # Sufficient: the operator's reconcile and optimizer code, with the SA's token.
        md = yaml.safe_load((ROOT / "examples/full.yaml").read_text())
        md["metadata"]["name"] = "rbac"
        kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(md))
        kube = Kube(api)
        reconciler = Reconciler(kube, Actuator(kube, Defaults()))
        wait_for(
            lambda: reconciler.reconcile(namespace, "rbac"),
            60,
            what="a reconcile with the chart's ServiceAccount",
        )
        children = kube.list_children(namespace, "rbac")
        # 4 x (Deployment, Service, ConfigMap), the index PVC and the NetworkPolicy
        assert len(children) == 14
        optimizer = OptimizerLoop(
            kube,
            reconciler,
            Profiles({}),
            snapshot_source=_no_prometheus,
            prometheus_url=PrometheusConfig(url="http://x").resolve,
        )
        decision = optimizer.tick(namespace, "rbac")
        assert decision is not None and decision.hold
        status: Any = client.CustomObjectsApi(api).get_namespaced_custom_object(
            "modelpilot.io", "v1alpha1", namespace, "modeldeployments", "rbac"
        )["status"]
        assert any(
            c["type"] == "MetricsAvailable" and c["status"] == "False" for c in status["conditions"]
        )

        # Sufficient for leader election: the Lease, taken and renewed with the SA's token,
        # and the leader label on a pod of its namespace.
        # (a Lease of its own: the release's is the replicas')
        lock = ElectionLock(f"{release}-rbac-probe", namespace, "rbac-test")
        lock.api_instance = client.CoordinationV1Api(api)
        elector = leaderelection.LeaderElection(
            electionconfig.Config(lock, 10, 6, 2, lambda: None, lambda: None)
        )
        assert elector.try_acquire_or_renew() and elector.try_acquire_or_renew()
        who = f"system:serviceaccount:{namespace}:{sa}"
        can = kubectl("auth", "can-i", "patch", "pods", "-n", namespace, "--as", who, check=False)
        assert can.stdout.strip() == "yes"

        # Not too broad: what the operator never does is refused.
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
            ("delete", "leases.coordination.k8s.io"),
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


# -- Prometheus: endpoint, TLS and credentials as operator configuration; target labels ------
# (helm template only: no cluster)


def _render(*settings: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = [a for s in settings for a in ("--set", s)]
    return helm("template", "t", str(CHART), "--kube-version", KUBE_VERSION, *args, check=check)


def _operator_container(*settings: str) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(_render(*settings).stdout) if d]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "operator")
    return pod, container


def _mounted_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume source and item a file path of the container comes from."""
    for mount in container["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            assert mount.get("readOnly") is True and "subPath" not in mount
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            items = next(iter(_source(volume).values()))["items"]
            item = next(i for i in items if i["path"] == path[len(prefix) :])
            return {**_source(volume), "item": item}
    raise AssertionError(f"{path} is not mounted")


def _prometheus_env(container: dict[str, Any]) -> dict[str, str]:
    """The MODELPILOT_PROMETHEUS_* variables: plain values (URLs, flags and file paths),
    never a secret's value, not even by reference."""
    env = [e for e in container["env"] if e["name"].startswith("MODELPILOT_PROMETHEUS_")]
    assert all(set(e) == {"name", "value"} for e in env), env
    return {e["name"]: e["value"] for e in env}


def _source(volume: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in volume.items() if k in ("configMap", "secret")}


def test_prometheus_defaults_verify_tls_and_mount_nothing() -> None:
    pod, container = _operator_container()
    config = PrometheusConfig.from_env(_prometheus_env(container))
    assert config.url == "http://prometheus-server.monitoring.svc"
    assert config.allowed_urls == () and config.verify is True
    assert config.token_file is None and config.username_file is None
    assert not [v for v in pod["volumes"] if v["name"].startswith("prometheus")]
    assert not [m for m in container["volumeMounts"] if "/prometheus" in m["mountPath"]]


def test_prometheus_values_reach_the_operator_as_env_and_mounted_files() -> None:
    pod, container = _operator_container(
        "prometheus.url=https://prom.monitoring.svc:9091/",
        "prometheus.allowedUrls={https://thanos.monitoring.svc,https://other.example/p}",
        "prometheus.caBundle.configMap.name=prom-ca",
        "prometheus.caBundle.configMap.key=root.pem",
        "prometheus.auth.type=bearer",
        "prometheus.auth.secretName=prom-token",
        "prometheus.auth.tokenKey=jwt",
    )
    config = PrometheusConfig.from_env(_prometheus_env(container))
    assert config.resolve(None) == "https://prom.monitoring.svc:9091"
    assert config.resolve("https://thanos.monitoring.svc/") == "https://thanos.monitoring.svc"
    with pytest.raises(NotAllowed):
        config.resolve("http://169.254.169.254")
    assert isinstance(config.verify, str)
    assert _mounted_file(pod, container, config.verify) == {
        "configMap": {"name": "prom-ca", "items": [{"key": "root.pem", "path": "ca.crt"}]},
        "item": {"key": "root.pem", "path": "ca.crt"},
    }
    assert config.token_file is not None
    token = _mounted_file(pod, container, config.token_file)
    assert token["secret"]["secretName"] == "prom-token"
    assert token["item"]["key"] == "jwt"


def test_prometheus_basic_auth_and_a_ca_from_a_secret() -> None:
    pod, container = _operator_container(
        "prometheus.caBundle.secret.name=prom-tls",
        "prometheus.caBundle.secret.key=ca.crt",
        "prometheus.auth.type=basic",
        "prometheus.auth.secretName=prom-basic",
        "prometheus.insecureSkipVerify=true",
    )
    config = PrometheusConfig.from_env(_prometheus_env(container))
    assert config.verify is False and config.ca_file is not None
    assert _mounted_file(pod, container, config.ca_file)["secret"]["secretName"] == "prom-tls"
    assert config.username_file is not None and config.password_file is not None
    user = _mounted_file(pod, container, config.username_file)
    password = _mounted_file(pod, container, config.password_file)
    assert user["secret"]["secretName"] == password["secret"]["secretName"] == "prom-basic"
    assert (user["item"]["key"], password["item"]["key"]) == ("username", "password")


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        (["prometheus.auth.type=bearer"], "secretName"),
        (["prometheus.auth.type=token"], "type"),
        (["prometheus.allowedUrls={file:///etc/passwd}"], "allowedUrls"),
        (["prometheus.insecureSkipVerify=yes"], "insecureSkipVerify"),
        (
            [
                "prometheus.caBundle.configMap.name=a",
                "prometheus.caBundle.configMap.key=k",
                "prometheus.caBundle.secret.name=b",
                "prometheus.caBundle.secret.key=k",
            ],
            "caBundle",
        ),
        (["prometheus.caBundle.configMap.name=a"], "key"),
    ],
)
def test_values_schema_rejects_bad_prometheus_settings(settings: list[str], error: str) -> None:
    result = _render(*settings, check=False)
    assert result.returncode != 0 and error in result.stderr, result.stderr


def _relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus's relabeling (the actions these configs use); None: the target is dropped."""
    out = dict(labels)
    for raw in rules:
        rule = {
            {"sourceLabels": "source_labels", "targetLabel": "target_label"}.get(k, k): v
            for k, v in raw.items()
        }
        regex = re.compile(f"^(?:{rule.get('regex', '(.*)')})$")
        replacement = re.sub(r"\$\{?(\d+)\}?", r"\\\1", str(rule.get("replacement", "$1")))
        action = rule.get("action", "replace").lower()
        if action == "labelmap":
            for name, value in list(out.items()):
                if m := regex.match(name):
                    out[m.expand(replacement)] = value
            continue
        value = ";".join(out.get(s, "") for s in rule.get("source_labels", []))
        m = regex.match(value)
        if (action == "keep" and not m) or (action == "drop" and m):
            return None
        if action == "replace" and m:
            new = m.expand(replacement)
            if new:
                out[rule["target_label"]] = new
            else:
                out.pop(rule["target_label"], None)
    return {k: v for k, v in out.items() if not k.startswith("__")}


def test_podmonitor_and_annotation_scraping_give_the_same_target_labels() -> None:
    """The series the optimizer selects (namespace, app_kubernetes_io_instance) exist with
    the chart's PodMonitor and with annotation-based scraping (hack/prometheus.sh's
    kubernetes-pods job: labelmap of the pod's labels, as the prometheus-community chart)."""
    pod_labels = children.labels("rag", "embedding")
    meta = {
        "__address__": "10.0.0.7:8000",
        "__meta_kubernetes_namespace": "team-a",
        "__meta_kubernetes_pod_name": "rag-embedding-5d9f-abcde",
        "__meta_kubernetes_pod_node_name": "node-1",
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_annotation_prometheus_io_port": "8000",
        "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
        **{
            "__meta_kubernetes_pod_label_" + re.sub(r"\W", "_", k): v for k, v in pod_labels.items()
        },
    }
    docs = yaml.safe_load_all(_render("serviceMonitor.enabled=true").stdout)
    monitor = next(
        d
        for d in docs
        if d and d["kind"] == "PodMonitor" and d["metadata"]["name"] == "t-modelpilot-stages"
    )
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    by_monitor = [_relabel(e["relabelings"], meta) for e in endpoints]

    script = (ROOT / "hack/prometheus.sh").read_text()
    job = script[script.index("- job_name: kubernetes-pods") :]
    block = job[job.index("relabel_configs:\n") : job.index("\nEOF")].replace("\\$", "$")
    by_annotations = _relabel(yaml.safe_load(block)["relabel_configs"], meta)

    wanted = target_labels("team-a", "rag")
    assert by_annotations is not None and by_annotations.items() >= wanted.items()
    for labels in by_monitor:
        assert labels is not None and labels.items() >= wanted.items()
        assert labels.items() <= by_annotations.items()  # nothing the other path lacks
        assert {k for k in labels if k.startswith("app_")} == {
            k for k in by_annotations if k.startswith("app_")
        }
    assert "pipeline" not in str(endpoints)


def _docs(*settings: str) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(
        _render(*settings).stdout) if d}  # fmt: skip


def test_operator_replicas_are_scraped_spread_and_kept_through_disruptions() -> None:
    """Two replicas by default: scraped by annotations and by the PodMonitor on the health
    port, a PodDisruptionBudget that keeps one, rolling updates that never drop below them;
    one replica has no budget to block a drain."""
    docs = _docs("serviceMonitor.enabled=true")
    dep = docs["Deployment/t-modelpilot"]
    template = dep["spec"]["template"]
    labels = template["metadata"]["labels"]
    (container,) = template["spec"]["containers"]
    port = next(p for p in container["ports"] if p["name"] == "health")["containerPort"]
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    monitor = docs["PodMonitor/t-modelpilot-operator"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in monitor["podMetricsEndpoints"]] == ["health"]
    pdb = docs["PodDisruptionBudget/t-modelpilot"]["spec"]
    assert pdb["minAvailable"] == 1 and pdb["selector"]["matchLabels"].items() <= labels.items()
    spread = template["spec"]["affinity"]["podAntiAffinity"]
    assert spread["preferredDuringSchedulingIgnoredDuringExecution"]
    single = _docs("replicas=1")
    assert "PodDisruptionBudget/t-modelpilot" not in single
    assert "affinity" not in single["Deployment/t-modelpilot"]["spec"]["template"]["spec"]


def test_the_operator_knows_its_labels_and_gets_a_kept_admin_key() -> None:
    """The NetworkPolicy admits pods by MODELPILOT_OPERATOR_LABELS: they must select the
    operator's own pods; its admin key is generated once and survives an uninstall."""
    docs = [d for d in yaml.safe_load_all(_render().stdout) if d]
    pod, container = _operator_container()
    env = {e["name"]: e for e in container["env"]}
    labels = dict(p.split("=", 1) for p in env["MODELPILOT_OPERATOR_LABELS"]["value"].split(","))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert labels and labels.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert env["MODELPILOT_OPERATOR_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.namespace"
    )
    key = _mounted_file(pod, container, env["MODELPILOT_ADMIN_KEY_FILE"]["value"])
    secret = next(
        d
        for d in docs
        if d["kind"] == "Secret" and d["metadata"]["name"] == key["secret"]["secretName"]
    )
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(secret["data"]["key"]) >= 48
