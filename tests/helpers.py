"""Test helpers: condition polling with a deadline (never bare sleeps), kubectl, free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from modelpilot.api.v1alpha1 import ModelDeploymentSpec

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".cache" / "bin"
KUBECONFIG = ROOT / ".cache" / "kubeconfig"
# A second Prometheus a test may start (and a spec name: the test operator allows it).
PRIVATE_PROMETHEUS_PORT = "19091"
PRIVATE_PROMETHEUS_URL = f"http://127.0.0.1:{PRIVATE_PROMETHEUS_PORT}"

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None],
    timeout: float = 60.0,
    interval: float = 0.2,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until it returns a truthy value; fail with ``what`` at the deadline.

    Exceptions from the probe count as "not yet"; the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception as exc:  # a probe may fail until the condition holds
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def kubectl(
    *args: str, check: bool = True, stdin: str | None = None, kubeconfig: Path | str = KUBECONFIG
) -> subprocess.CompletedProcess[str]:
    """Run the pinned kubectl against the local control plane."""
    result = subprocess.run(
        [str(BIN / "kubectl"), "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token_kubeconfig(
    admin: Any, namespace: str, sa: str, path: Path, context_namespace: str | None = None
) -> Path:
    """A kubeconfig for ServiceAccount ``sa`` with a fresh TokenRequest token."""
    from kubernetes import client

    token = (
        client.CoreV1Api(admin)
        .create_namespaced_service_account_token(
            sa,
            namespace,
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
            ),
        )
        .status.token
    )
    ns = f", namespace: {context_namespace}" if context_namespace else ""
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f'clusters: [{{name: c, cluster: {{server: "{admin.configuration.host}", '
        f'certificate-authority: "{ROOT / ".cache/cluster/pki/ca.crt"}"}}}}]\n'
        f'users: [{{name: sa, user: {{token: "{token}"}}}}]\n'
        f"contexts: [{{name: c, context: {{cluster: c, user: sa{ns}}}}}]\n"
        "current-context: c\n"
    )
    return path


def kubectl_json(*args: str) -> Any:
    """``kubectl <args> -o json``, parsed."""
    import json

    return json.loads(kubectl(*args, "-o", "json").stdout)


def sample(name: str) -> dict[str, Any]:
    """One of examples/*.yaml as a dict."""
    import yaml

    return dict(yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text()))


def spec_of(name: str) -> ModelDeploymentSpec:
    """The spec of examples/<name>.yaml, validated."""
    from modelpilot.api.v1alpha1 import ModelDeploymentSpec

    return ModelDeploymentSpec.model_validate(sample(name)["spec"])


def md_ready(name: str, namespace: str) -> bool:
    """Whether a ModelDeployment is Ready=True for its current generation."""
    import json

    out = kubectl("get", "md", name, "-n", namespace, "-o", "json", check=False)
    if out.returncode:
        return False
    md = json.loads(out.stdout)
    conditions = (md.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) and (
        md["status"].get("observedGeneration") == md["metadata"]["generation"]
    )


def children(namespace: str, name: str) -> list[str]:
    """The ModelDeployment's children that still exist, as kubectl ``kind/name`` strings."""
    out = kubectl(
        "get",
        "deploy,svc,cm,pvc",
        "-n",
        namespace,
        "-l",
        f"app.kubernetes.io/instance={name}",
        "-o",
        "name",
    ).stdout
    return out.split()


# The busybox image that hack/node.sh builds from Debian's busybox-static and loads into the
# real node (it also serves the node's local-path helper pods).
BUSYBOX = "localhost/modelpilot/busybox:1.35"
REAL_NODE_TAINT = "modelpilot.io/real-node"


def on_real_node(pod_spec: dict[str, Any]) -> dict[str, Any]:
    """A pod spec placed on the real node, node-1: selected, and tolerating its taint."""
    return {
        **pod_spec,
        "nodeSelector": {"kubernetes.io/hostname": "node-1"},
        "tolerations": [{"key": REAL_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
    }


def embedding_pod(name: str, namespace: str, repository: str, tag: str) -> dict[str, Any]:
    """A pod on node-1 of the project's own images: Triton (the triton image, loading
    ``minilm_int8``) beside the embedding service, whose readiness probe asks Triton whether
    the model is ready."""
    triton_args = [
        "--model-repository=/tmp/models",
        "--model-control-mode=explicit",
        "--load-model=minilm_int8",
        "--http-port=8000",
        "--grpc-port=8001",
        "--metrics-port=8002",
    ]
    env = {
        "PORT": "8082",
        "MODELPILOT_TRITON_URL": "127.0.0.1:8000",
        "MODELPILOT_MODEL": "minilm_int8",
    }
    containers = [
        {"name": "triton", "image": f"{repository}/triton:{tag}", "args": triton_args},
        {
            "name": "embedding",
            "image": f"{repository}/embedding:{tag}",
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8082}, "periodSeconds": 1},
        },
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": on_real_node({"containers": containers}),
    }


def start_service(stage: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A data-plane stage as its image runs it (``python -m``), with exactly ``env``."""
    return subprocess.Popen(
        [sys.executable, "-m", f"modelpilot_services.stages.{stage}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
