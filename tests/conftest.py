"""Session fixtures: the local control plane and Prometheus, brought up once per run (or
reused when already running), and a fresh namespace per test."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from tests.helpers import KUBECONFIG, PRIVATE_PROMETHEUS_URL, ROOT, wait_for


def _running(script: str) -> bool:
    if script == "cluster":
        return (
            subprocess.run(
                [str(ROOT / "hack/cluster.sh"), "status"], capture_output=True
            ).returncode
            == 0
        )
    pid = ROOT / ".cache/prometheus/prometheus.pid"
    return pid.exists() and Path(f"/proc/{pid.read_text().strip()}").exists()


def _bring_up(script: str) -> bool:
    """Start a component unless it runs already; return whether we started it."""
    if _running(script):
        subprocess.run([str(ROOT / f"hack/{script}.sh"), "up"], check=True)  # re-check ready
        return False
    subprocess.run([str(ROOT / f"hack/{script}.sh"), "up"], check=True)
    return True


@pytest.fixture(scope="session")
def control_plane() -> Iterator[Path]:
    """The local control plane; yields the admin kubeconfig path."""
    started = _bring_up("cluster")
    yield KUBECONFIG
    if started and not os.environ.get("MODELPILOT_KEEP_CLUSTER"):
        subprocess.run([str(ROOT / "hack/cluster.sh"), "down"], check=False)


@pytest.fixture(scope="session")
def prometheus_url(control_plane: Path) -> Iterator[str]:
    """Debian's Prometheus: the cluster's pods by Kubernetes discovery (so the cluster comes
    first), processes outside it by file-based scrape targets."""
    started = _bring_up("prometheus")
    yield f"http://127.0.0.1:{os.environ.get('MODELPILOT_PROMETHEUS_PORT', '19090')}"
    if started and not os.environ.get("MODELPILOT_KEEP_CLUSTER"):
        subprocess.run([str(ROOT / "hack/prometheus.sh"), "down"], check=False)


@pytest.fixture(scope="session")
def real_node(control_plane: Path) -> str:
    """The real node, node-1, Ready; yields its IP (the address pods reach the host at)."""
    from tests.helpers import kubectl_json

    def ready_ip() -> str | None:
        node = kubectl_json("get", "node", "node-1")
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        ips = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
        return ips[0] if ready and ready[0]["status"] == "True" and ips else None

    return wait_for(ready_ip, 120, what="node-1 Ready")


NODE_IMAGES = "localhost/modelpilot"


@pytest.fixture(scope="session")
def node_images(real_node: str) -> str:
    """The project's images (tag ``test``) built with Podman and loaded into node-1's
    containerd; yields their repository. Cached layers and loads make a repeat quick."""
    env = {
        **os.environ,
        "IMAGE_REPOSITORY": NODE_IMAGES,
        "IMAGE_TAG": "test",
        "BASE_FROM_DEBIAN": "1",
    }
    run = subprocess.run(
        [str(ROOT / "hack/build-images.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=40 * 60,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-5000:]}"
    assert "loaded into node-1" in run.stdout, run.stdout[-3000:]
    return NODE_IMAGES


@pytest.fixture(scope="session")
def api_client(control_plane: Path) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(control_plane))


@pytest.fixture
def namespace(api_client: client.ApiClient) -> Iterator[str]:
    """A fresh namespace, with its default ServiceAccount, deleted after the test."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_for(
        lambda: core.read_namespaced_service_account("default", name),
        60,
        what=f"default ServiceAccount in {name}",
    )
    yield name
    core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture(scope="session")
def crd(control_plane: Path) -> str:
    """The ModelDeployment CRD, installed from crds/ and Established."""
    from tests.helpers import kubectl

    def established() -> bool:
        # Polled: a control plane that has just come up may refuse the first apply.
        kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            str(ROOT / "crds/modeldeployment.yaml"),
        )
        kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=20s",
            "crd/modeldeployments.modelpilot.io",
        )
        return True

    wait_for(established, 120, interval=2, what="the ModelDeployment CRD Established")
    return "modeldeployments.modelpilot.io"


OPERATOR_LOG = ROOT / ".cache/logs/operator-test.log"


class Operator:
    """The operator as a real process (``modelpilot-operator``) that a test may crash and
    restart. One Lease per ``lease``: processes that share it elect one leader; a process
    restarted with its ``identity`` (a container restarted in its pod) resumes at once."""

    def __init__(
        self,
        prometheus_url: str,
        identity: str = "test-operator",
        lease: str = "modelpilot-test-operator",
        namespaces: tuple[str, ...] = ("!e2e-*",),
        log_path: Path = OPERATOR_LOG,
    ) -> None:
        from tests.helpers import free_port

        self.prometheus_url, self.identity, self.lease = prometheus_url, identity, lease
        # Every namespace but those of the chart's in-cluster operator (the closed-loop
        # tests) by default: two operators on one object would race.
        self.namespaces = namespaces
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = log_path
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{free_port()}"

    def start(self, wait_healthy: bool = True) -> None:
        import urllib.request

        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(ROOT / ".venv/bin/modelpilot-operator"),
                    *(f"--namespace={n}" for n in self.namespaces),
                    f"--listen={self.url.removeprefix('http://')}",
                    f"--lease={self.lease}",
                    "--lease-namespace=default",
                    f"--identity={self.identity}",
                ],
                env={
                    **os.environ,
                    "KUBECONFIG": str(KUBECONFIG),
                    "MODELPILOT_PROFILES": str(ROOT / "tests/fixtures/slow-profile.json"),
                    "MODELPILOT_PROMETHEUS_URL": self.prometheus_url,
                    "MODELPILOT_PROMETHEUS_ALLOWED_URLS": PRIVATE_PROMETHEUS_URL,
                    "MODELPILOT_LIVE_UPDATES": "false",
                    "MODELPILOT_ADMIN_KEY": "test-operator-key",
                },
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        if wait_healthy:
            wait_for(
                lambda: urllib.request.urlopen(f"{self.url}/healthz", timeout=2),
                60,
                what="the operator's health endpoint",
            )

    def kill(self) -> None:
        """SIGKILL: no cleanup, no finally blocks, as a node failure would do."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def operator_process(crd: str, prometheus_url: str) -> Iterator[Operator]:
    """The operator, watching all namespaces, reading the test Prometheus with the test
    fixture profile. Tests that crash it must leave it running again."""
    op = Operator(prometheus_url)
    op.start()
    yield op
    op.stop()


@contextlib.contextmanager
def stack_on_free_ports(root: Path) -> Iterator[Any]:
    """Real tritonserver (from the nvidia-pytriton wheel) and the four services on free
    ports under ``root``. A missing part fails here, loudly: never a skip."""
    from modelpilot_services.devtools.stack import DEFAULT_PORTS, Stack
    from tests.helpers import free_port

    stack = Stack(root, ports={name: free_port() for name in DEFAULT_PORTS})
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="session")
def data_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The data plane shared by the session's tests (they leave its settings as found)."""
    with stack_on_free_ports(tmp_path_factory.mktemp("data-plane")) as stack:
        yield stack


@pytest.fixture(scope="module")
def fresh_data_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A data plane of the module's own, for tests that crash, fuzz or load it."""
    with stack_on_free_ports(tmp_path_factory.mktemp("fresh-data-plane")) as stack:
        yield stack


_OPERATOR_LOG_AT = pytest.StashKey[int]()


# A container's restarts and why its last run ended, for a failed test's report.
RESTARTS = (
    "jsonpath={range .items[*]}{.metadata.name}{range .status.containerStatuses[*]}"
    " {.name}:restarts={.restartCount}:{.lastState.terminated.reason}"
    ":exit={.lastState.terminated.exitCode}{end}{'\\n'}{end}"
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """When a test that ran an operator fails, its report carries what CI needs to tell
    why: the test namespace's objects, its containers' restarts and the operator's log
    lines (the test operator's from the test's run; the chart's operator's last ones)."""
    outcome = yield
    report = outcome.get_result()
    log = OPERATOR_LOG
    if call.when == "setup":
        item.stash[_OPERATOR_LOG_AT] = log.stat().st_size if log.exists() else 0
        return
    args = getattr(item, "funcargs", {})
    chart = isinstance(args.get("loop"), str)  # test_closed_loop: the chart's operator
    if call.when != "call" or not report.failed:
        return
    if not chart and "operator_process" not in item.fixturenames:
        return
    from tests.helpers import kubectl

    namespace = args.get("loop") if chart else args.get("namespace")
    if isinstance(namespace, str):
        objects = kubectl(
            "get", "md,deploy,pods,events", "-n", namespace, "-o", "wide", check=False
        )
        status = kubectl(
            "get", "md", "-n", namespace, "-o", "jsonpath={.items[*].status}", check=False
        )
        restarts = kubectl("get", "pods", "-n", namespace, "-o", RESTARTS, check=False)
        report.sections.append(
            (
                f"namespace {namespace}",
                f"{objects.stdout}{objects.stderr}\n{status.stdout}\n{restarts.stdout}",
            )
        )
    if chart and isinstance(namespace, str):
        logs = kubectl("logs", "-n", namespace, "-l", "app.kubernetes.io/name=modelpilot",
                       "--prefix", "--tail=150", check=False)  # fmt: skip
        report.sections.append(("operator log (last lines)", logs.stdout + logs.stderr))
    elif log.exists():
        with log.open("rb") as f:
            f.seek(item.stash.get(_OPERATOR_LOG_AT, 0))
            lines = f.read().decode(errors="replace").splitlines()
        report.sections.append(("operator log (this test)", "\n".join(lines[-150:])))
