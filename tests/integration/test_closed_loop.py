"""The closed loop on real pods, as a platform team runs it: ``helm install`` the chart (the
operator runs from its image, as a pod, with the chart's RBAC and live updates on), apply
``examples/local.yaml``, and watch it serve and tune itself on node-1. Traffic goes through
the stages' Services; Prometheus finds the pods by Kubernetes discovery.

The tests share one installation and one ModelDeployment (module scope: the install and the
first Ready cost minutes on a 2-core machine); each leaves it Ready for the next. Figures
(apply -> Ready, load step -> new replica serving, p95 around each decision) are printed and
written to ``.cache/e2e/figures.json``.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import yaml

from modelpilot import contract
from modelpilot.adapters.live import Pod, pod_at
from modelpilot.controller.leadership import LEADER_LABEL
from modelpilot_services.models import calibration
from tests.helpers import (
    BIN,
    KUBECONFIG,
    ROOT,
    kubectl,
    kubectl_json,
    md_ready,
    on_real_node,
    sample,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NAME = "local"
FP32_ONLY = [
    v for v in sample("local")["spec"]["embedding"]["variants"] if v["model"] == "minilm_fp32"
]
FIGURES: dict[str, Any] = {}


def _record(key: str, value: Any) -> None:
    FIGURES[key] = value
    print(f"figure {key}: {value}")
    out = ROOT / ".cache/e2e/figures.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(FIGURES, indent=2))


def helm(*args: str) -> str:
    result = subprocess.run(
        [str(BIN / "helm"), "--kubeconfig", str(KUBECONFIG), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"helm {' '.join(args)}: {result.stderr}"
    return result.stdout


def md(namespace: str) -> dict[str, Any]:
    return dict(kubectl_json("get", "md", NAME, "-n", namespace))


def stage_status(namespace: str, stage: str) -> dict[str, Any]:
    return dict(((md(namespace).get("status") or {}).get("stages") or {}).get(stage) or {})


def ready_pods(namespace: str, selector: str) -> list[dict[str, Any]]:
    """The pods matching ``selector`` that are Ready and not terminating."""
    items = kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]
    return [
        p
        for p in items
        if not p["metadata"].get("deletionTimestamp")
        and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p["status"].get("conditions") or []
        )
    ]


def pods(namespace: str, stage: str) -> list[dict[str, Any]]:
    """The stage's pods that are Ready and not terminating."""
    return ready_pods(namespace, f"app.kubernetes.io/component={stage}")


def service_url(namespace: str, stage: str) -> str:
    ip = kubectl_json("get", "svc", f"{NAME}-{stage}", "-n", namespace)["spec"]["clusterIP"]
    return f"http://{ip}:{contract.SERVICE_PORTS[stage]}"


def admin_token(namespace: str) -> str:
    import base64

    secret = kubectl_json("get", "secret", f"{NAME}-admin", "-n", namespace)
    return base64.b64decode(secret["data"][contract.ADMIN_TOKEN_SECRET_KEY]).decode()


def pod_client(pod: dict[str, Any], token: str | None) -> Pod:
    return pod_at(pod["status"]["podIP"], token)


def events(namespace: str, reason: str) -> list[str]:
    items = kubectl_json("get", "events", "-n", namespace)["items"]
    return [e["message"] for e in items if e.get("reason") == reason]


def wait_for_stage(namespace: str, probe: Any, timeout: float, what: str) -> Any:
    """``wait_for`` a condition on the ModelDeployment; a timeout says what the optimizer
    last decided and why."""
    try:
        return wait_for(probe, timeout, interval=2, what=what)
    except AssertionError as exc:
        status = md(namespace).get("status") or {}
        why = {k: status.get(k) for k in ("lastDecision", "observedP95Ms", "stages")}
        steps = [
            f"{reason}: {message}"
            for reason in ("VerificationStarted", "VerificationFailed", "VariantPromoted")
            for message in events(namespace, reason)
        ]
        raise AssertionError(
            f"{exc}; status: {json.dumps(why)[:3000]}; verification events: {steps}"
        ) from None


def patch_spec(namespace: str, patch: dict[str, Any]) -> None:
    kubectl("patch", "md", NAME, "-n", namespace, "--type=merge", "-p", json.dumps(patch))


@dataclass
class Load:
    """Open-loop traffic at a settable rate: each request on its own connection (a client
    pinned to one pod by keep-alive would not follow a rollout), errors counted."""

    url: str
    body: Any  # a request body, or a function of the request's number to one
    rate: float = 2.0
    sent: int = 0
    failed: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def _one(self, n: int) -> None:
        start = time.monotonic()
        body = self.body(n) if callable(self.body) else self.body
        try:
            r = requests.post(self.url, json=body, timeout=30, headers={"Connection": "close"})
            error = None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
        except requests.RequestException as exc:
            error = repr(exc)[:200]
        with self.lock:
            self.latencies.append(time.monotonic() - start)
            if error:
                self.failed.append(error)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            next_at += 1.0 / self.rate
            with self.lock:
                n = self.sent
                self.sent += 1
            threading.Thread(target=self._one, args=(n,), daemon=True).start()
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Load:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        self.threads.append(thread)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        wait_for(lambda: len(self.latencies) >= self.sent, 60, what="in-flight requests")

    def p95_ms(self, last: int = 200) -> float:
        with self.lock:
            window = sorted(self.latencies[-last:])
        return round(window[int(0.95 * (len(window) - 1))] * 1000, 1) if window else float("nan")


@pytest.fixture(scope="module")
def loop(node_images: str, crd: str, prometheus_url: str, real_node: str) -> Iterator[str]:
    """The chart installed in a fresh namespace (the operator watching only it) and
    ``examples/local.yaml`` applied there, with only its fp32 embedding variant, Ready."""
    namespace = f"e2e-{uuid.uuid4().hex[:8]}"
    port = prometheus_url.rsplit(":", 1)[1]
    values = {
        "image": {"repository": f"{node_images}/operator", "tag": "test"},
        "services": {"imageRepository": node_images, "imageTag": "test"},
        "prometheus": {"url": f"http://{real_node}:{port}"},
        "watchNamespaces": [namespace],
        "crds": {"enabled": False},  # the session's CRD, from crds/ (the chart's is the same)
        **on_real_node({}),
    }
    values_file = ROOT / ".cache/e2e" / f"{namespace}-values.yaml"
    values_file.parent.mkdir(parents=True, exist_ok=True)
    values_file.write_text(yaml.safe_dump(values))
    doc = sample("local")
    # fp32 serves first: the variant test then adds int8, a cheaper variant to move to.
    doc["spec"]["embedding"]["variants"] = FP32_ONLY
    kubectl("create", "namespace", namespace)
    try:
        helm("install", "mp", str(ROOT / "charts/modelpilot"), "-n", namespace,
             "-f", str(values_file), "--wait", "--timeout", "300s")  # fmt: skip
        start = time.monotonic()
        kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc))
        wait_for(lambda: md_ready(NAME, namespace), 900, interval=2, what="local Ready")
        _record("apply_to_all_ready_s", round(time.monotonic() - start, 1))
        yield namespace
    finally:
        logs = kubectl(
            "logs",
            "-n",
            namespace,
            "-l",
            "app.kubernetes.io/name=modelpilot",
            "--prefix",
            "--tail=3000",
            check=False,
        )  # both replicas, prefixed
        (ROOT / ".cache/e2e" / f"{namespace}-operator.log").write_text(logs.stdout + logs.stderr)
        kubectl("delete", "md", "--all", "-n", namespace, "--timeout=120s", check=False)
        subprocess.run([str(BIN / "helm"), "--kubeconfig", str(KUBECONFIG), "uninstall", "mp",
                        "-n", namespace, "--wait"], check=False, timeout=300)  # fmt: skip
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_every_stage_serves_from_real_pods_and_known_answers_are_found(loop: str) -> None:
    namespace = loop
    operator = kubectl_json(
        "get", "pods", "-n", namespace, "-l", "app.kubernetes.io/name=modelpilot"
    )["items"]
    assert [p["spec"]["nodeName"] for p in operator] == ["node-1", "node-1"]  # 2 replicas
    for p in operator:  # the chart's RBAC covers all they do, leader and standby alike
        log = kubectl("logs", "-n", namespace, p["metadata"]["name"]).stdout
        assert "Forbidden" not in log, log[-3000:]
    for stage in contract.STAGES:
        (pod,) = pods(namespace, stage)
        assert pod["spec"]["nodeName"] == "node-1"
        statuses = pod["status"]["containerStatuses"]
        assert all(s["ready"] and s["started"] and "running" in s["state"] for s in statuses)
    assert md(namespace)["status"]["stages"]["embedding"]["variant"] == "minilm-fp32"

    docs = calibration.corpus(limit=60)
    ingestion = service_url(namespace, "ingestion") + "/v1/documents"
    for start in range(0, len(docs), 10):
        batch = [{"id": f"ka-{i}", "text": docs[i]} for i in range(start, start + 10)]
        r = requests.post(ingestion, json={"documents": batch}, timeout=120)
        assert r.status_code == 200 and r.json()["acknowledged"] == [d["id"] for d in batch]
    gateway = service_url(namespace, "inference") + "/v1/query"
    hits = 0
    for i, query in enumerate(calibration.queries(docs)):
        answer = requests.post(gateway, json={"query": query, "top_k": 3}, timeout=60)
        assert answer.status_code == 200, answer.text
        hits += f"ka-{i}" in [r["document_id"] for r in answer.json()["results"]]
    _record("known_answer_top3", f"{hits}/{len(docs)}")
    assert hits >= 0.9 * len(docs)


def test_a_batching_decision_reaches_every_triton_and_a_new_pod_starts_with_it(
    loop: str,
) -> None:
    namespace = loop
    token = admin_token(namespace)
    # The spec's new bound moves the plan's batching (clamped to it): the same path as an
    # optimizer decision, to the ConfigMap and, live, to every running Triton.
    patch_spec(namespace, {"spec": {"embedding": {"batching": {"maxBatchSize": 4}}}})

    def every_pod_runs_the_plan() -> bool:
        st = stage_status(namespace, "embedding")
        want = (st.get("maxBatchSize"), st.get("maxQueueDelayMicroseconds"), st.get("instances"))
        model = "minilm_fp32" if st.get("variant") == "minilm-fp32" else "minilm_int8"
        running = pods(namespace, "embedding")
        return (
            want[0] is not None
            and want[0] <= 4
            and bool(running)
            and all(pod_client(p, token).batching(model) == want for p in running)
            and st.get("podsOnPlan") == len(running)
        )

    wait_for(every_pod_runs_the_plan, 120, interval=2, what="every Triton on the planned batching")
    before = {p["metadata"]["name"] for p in pods(namespace, "embedding")}
    victim = sorted(before)[0]
    kubectl("delete", "pod", victim, "-n", namespace, "--wait=false")
    fresh = wait_for(
        lambda: [p for p in pods(namespace, "embedding") if p["metadata"]["name"] not in before],
        300,
        interval=1,
        what="a replacement embedding pod Ready",
    )

    def runs_the_plan_it_started_with() -> bool:
        st = stage_status(namespace, "embedding")
        model = "minilm_fp32" if st["variant"] == "minilm-fp32" else "minilm_int8"
        running = pod_client(fresh[0], token).batching(model)
        # the plan read before and after: an optimizer change in between is a retry
        planned = (st["maxBatchSize"], st["maxQueueDelayMicroseconds"], st["instances"])
        return running == planned and (st == stage_status(namespace, "embedding"))

    wait_for(runs_the_plan_it_started_with, 60, interval=1, what="the new pod on the plan")
    corrected = [m for m in events(namespace, "LiveUpdated") if fresh[0]["metadata"]["name"] in m]
    assert not corrected, f"the new pod needed a live update: {corrected}"
    # The next tests start from the example's bound again.
    bound = sample("local")["spec"]["embedding"]["batching"]["maxBatchSize"]
    patch_spec(namespace, {"spec": {"embedding": {"batching": {"maxBatchSize": bound}}}})


PROBE = """
import json, sys, urllib.error, urllib.request
out = {}
for name, url, method, headers in json.loads(sys.argv[1]):
    body = b"" if method == "POST" else None
    request = urllib.request.Request(url, method=method, headers=headers, data=body)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            out[name] = r.status
    except urllib.error.HTTPError as e:
        out[name] = e.code
    except OSError as e:
        out[name] = type(e).__name__
print(json.dumps(out))
"""


def test_a_pod_outside_the_deployment_reaches_no_admin_endpoint(
    loop: str, node_images: str
) -> None:
    namespace = loop
    pod_ip = pods(namespace, "embedding")[0]["status"]["podIP"]
    svc = f"http://{NAME}-embedding"
    triton, admin = contract.TRITON_PORTS["http"], contract.ADMIN_PORT
    shadow = contract.ADMIN_SHADOW_PATH
    probes = [
        ("svc-api", f"{svc}:{contract.SERVICE_PORTS['embedding']}/healthz", "GET", {}),
        ("svc-triton", f"{svc}:{triton}/v2/health/ready", "GET", {}),
        ("svc-admin", f"{svc}:{admin}{shadow}", "GET", {}),
        ("pod-load", f"http://{pod_ip}:{triton}/v2/repository/index", "POST", {}),
        ("pod-admin", f"http://{pod_ip}:{admin}{shadow}", "GET", {}),
        ("pod-admin-guess", f"http://{pod_ip}:{admin}{shadow}", "GET",
         {"Authorization": "Bearer guess"}),
    ]  # fmt: skip
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "outsider", "namespace": namespace},
        "spec": on_real_node(
            {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "c",
                        "image": f"{node_images}/operator:test",
                        "command": ["python", "-c", PROBE, json.dumps(probes)],
                    }
                ],
            }
        ),
    }
    kubectl("apply", "-f", "-", stdin=json.dumps(pod))
    wait_for(
        lambda: (
            kubectl_json("get", "pod", "outsider", "-n", namespace)["status"].get("phase")
            in ("Succeeded", "Failed")
        ),
        120,
        what="the outsider's probes",
    )
    logs = kubectl("logs", "outsider", "-n", namespace).stdout
    results = json.loads(logs.strip().splitlines()[-1])
    assert results["svc-api"] == 200, results  # the Service itself answers: the probe works
    for name in ("svc-triton", "svc-admin"):  # no such port behind the Service
        assert not isinstance(results[name], int), f"{name} answered: {results}"
    # At the pod: refused by the token, or not connected at all where the CNI enforces the
    # NetworkPolicy (the local bridge CNI does not).
    blocked = ("ConnectionRefusedError", "TimeoutError", "URLError")
    assert results["pod-load"] in (403, *blocked), results  # Triton's model control
    for name in ("pod-admin", "pod-admin-guess"):
        assert results[name] in (401, *blocked), results


def test_a_prometheus_url_the_chart_does_not_allow_is_degraded(loop: str) -> None:
    namespace = loop
    doc = sample("minimal")
    doc["metadata"]["name"] = "elsewhere"
    doc["spec"]["prometheus"] = {"url": "http://metadata.internal:80"}
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc))
    try:

        def degraded() -> dict[str, Any] | None:
            obj = kubectl_json("get", "md", "elsewhere", "-n", namespace)
            conds = (obj.get("status") or {}).get("conditions") or []
            return next(
                (c for c in conds if c["type"] == "Degraded" and c["status"] == "True"), None
            )

        condition = wait_for(degraded, 60, what="Degraded")
        assert condition["reason"] == "PrometheusNotAllowed"
        assert "metadata.internal" in condition["message"]
        children = kubectl(
            "get",
            "deploy,svc,cm",
            "-n",
            namespace,
            "-l",
            "app.kubernetes.io/instance=elsewhere",
            "-o",
            "name",
        ).stdout
        assert children.strip() == ""  # nothing was created for it
    finally:
        kubectl("delete", "md", "elsewhere", "-n", namespace, check=False)


@pytest.mark.timeout(1500)
def test_under_a_load_ramp_embedding_scales_up_serves_then_scales_down(loop: str) -> None:
    namespace = loop
    # Paragraphs of real text, cut to the profile's length (about 30 words): the cost per
    # text that the optimizer's profile was measured with, so that the baseline calibrates
    # its model for this traffic (earlier tests sent short queries, which cost far less).
    texts = [" ".join(d.split()[:30]) for d in calibration.corpus(limit=4)]
    load = Load(service_url(namespace, "embedding") + "/v1/embed", {"texts": texts}, rate=0.5)
    with load:
        base = stage_status(namespace, "embedding")["replicas"]
        assert base == 1
        wait_for(lambda: len(load.latencies) >= 60, 240, what="baseline traffic")
        p95_before = load.p95_ms(20)
        assert stage_status(namespace, "embedding")["replicas"] == 1, "scaled at the baseline"
        step_at = time.monotonic()
        # The ramp: from 48 texts/s (over what one fp32 replica embeds in the profile, about
        # 40/s) up by half every 45 s until the optimizer scales. How fast one replica is on
        # this machine varies from run to run (the optimizer calibrates for it): the ramp
        # finds the rate one replica cannot serve instead of guessing it.
        load.rate = 12.0
        stepped = [step_at]

        def scaled_or_ramp() -> bool:
            if stage_status(namespace, "embedding")["replicas"] >= 2:
                return True
            if time.monotonic() - stepped[-1] >= 45 and load.rate < 40.0:
                load.rate *= 1.5
                stepped.append(time.monotonic())
            return False

        wait_for_stage(namespace, scaled_or_ramp, 360, what="the optimizer scaling embedding up")
        _record("load_step_scaled_at_texts_per_s", round(load.rate * len(texts)))
        step_at = stepped[-1]  # the reaction is timed from the step that was too much
        decided = time.monotonic() - step_at
        new = wait_for(
            lambda: len(pods(namespace, "embedding")) >= 2 and pods(namespace, "embedding"),
            300,
            interval=1,
            what="the new replica Ready",
        )

        def served_by_all() -> bool:
            for p in new:
                url = f"http://{p['status']['podIP']}:{contract.SERVICE_PORTS['embedding']}/metrics"
                text = requests.get(url, timeout=10).text
                if 'modelpilot_requests_total{code="200",stage="embedding"}' not in text:
                    return False
            return True

        wait_for(served_by_all, 120, interval=2, what="every replica taking traffic")
        _record("load_step_to_new_replica_serving_s", round(time.monotonic() - step_at, 1))
        _record("load_step_to_scale_decision_s", round(decided, 1))
        wait_for(lambda: len(load.latencies) >= 60, 120, what="traffic on the scaled stage")
        p95_after = load.p95_ms(60)
        load.rate = 0.5  # the drop
        wait_for_stage(
            namespace,
            lambda: stage_status(namespace, "embedding")["replicas"] == 1,
            600,
            what="the optimizer scaling embedding back down",
        )
    failed = len(load.failed) / max(load.sent, 1)
    _record("embedding_scale_p95_ms", {"before": p95_before, "scaled": p95_after})
    _record("embedding_scale_failed", f"{len(load.failed)}/{load.sent}")
    assert failed <= 0.001, load.failed[:5]


@pytest.mark.timeout(1500)
def test_a_variant_switch_is_verified_on_shadow_traffic_then_rolled_out_without_failures(
    loop: str,
) -> None:
    namespace = loop
    token = admin_token(namespace)
    corpus = calibration.corpus()  # distinct real texts: the neighbours recall@10 is measured on

    def body(n: int) -> dict[str, Any]:
        return {"texts": [corpus[(2 * n) % len(corpus)], corpus[(2 * n + 1) % len(corpus)]]}

    load = Load(service_url(namespace, "embedding") + "/v1/embed", body, rate=4.0)
    gateway = Load(
        service_url(namespace, "inference") + "/v1/query",
        {"query": "what does the operator scale", "top_k": 3},
        rate=1.0,
    )
    with load, gateway:
        wait_for(lambda: len(gateway.latencies) >= 10, 120, what="gateway traffic")
        p95_before = gateway.p95_ms(10)
        variants = sample("local")["spec"]["embedding"]["variants"]
        assert [v["name"] for v in variants] == ["minilm-fp32", "minilm-int8"]
        serving = {p["metadata"]["name"] for p in pods(namespace, "embedding")}
        # int8 is cheaper. A verdict on a loaded 2-core machine can go against it once (one CI
        # run saw a rejection); retried after 90 s, as a user would set for a trial run. Its
        # recall@10 against fp32 (0.82 in the profile) is within a 30-sample mean's noise of
        # the 0.8 floor: the test asks 0.7, as a user may, to test the mechanics.
        verification = {"retryAfterSeconds": 90, "minAgreement": "0.7"}
        patch_spec(
            namespace,
            {
                "spec": {
                    "embedding": {"variants": variants},
                    "optimizer": {"verification": verification},
                }
            },
        )
        wait_for_stage(
            namespace,
            lambda: stage_status(namespace, "embedding").get("shadowVariant") == "minilm-int8",
            120,
            what="the verification of minilm-int8 to start",
        )
        # The shadow reaches every serving pod live (read back from each): no restart.
        wait_for(
            lambda: all(
                (s := pod_client(p, token).shadow()) is not None and s.model == "minilm_int8"
                for p in pods(namespace, "embedding")
            ),
            120,
            interval=2,
            what="every embedding pod mirroring to minilm_int8",
        )
        # (the optimizer may add a replica meanwhile; none of the serving ones was replaced)
        assert serving <= {p["metadata"]["name"] for p in pods(namespace, "embedding")}
        wait_for_stage(
            namespace,
            lambda: stage_status(namespace, "embedding").get("variant") == "minilm-int8",
            600,
            what="minilm-int8 promoted",
        )
        assert any("agreement" in m for m in events(namespace, "VariantPromoted"))

        def rolled_out() -> bool:
            running = pods(namespace, "embedding")
            dep = kubectl_json("get", "deploy", f"{NAME}-embedding", "-n", namespace)
            st = dep["status"]
            return (
                st.get("updatedReplicas") == st.get("replicas") == st.get("readyReplicas")
                and st.get("observedGeneration") == dep["metadata"]["generation"]
                and len(running) == st.get("replicas")
            )

        wait_for(rolled_out, 600, interval=2, what="the rollout to minilm-int8")
        # Old pods keep answering while they drain (their preStop sleep), then only int8.
        wait_for(
            lambda: (
                requests.post(load.url, json=body(0), timeout=30).json()["model"] == "minilm_int8"
            ),
            120,
            interval=1,
            what="the Service answering from minilm_int8 only",
        )
        count = len(gateway.latencies)
        wait_for(lambda: len(gateway.latencies) >= count + 10, 120, what="gateway after switch")
        p95_after = gateway.p95_ms(10)
    _record("variant_switch_gateway_p95_ms", {"before": p95_before, "after": p95_after})
    _record(
        "variant_switch_failed",
        f"{len(load.failed) + len(gateway.failed)}/{load.sent + gateway.sent}",
    )
    assert not load.failed and not gateway.failed, (load.failed[:3], gateway.failed[:3])


def test_the_leader_killed_mid_rollout_hands_over_and_the_rollout_converges(loop: str) -> None:
    """The leading operator pod is force-deleted during a rollout: the standby takes the
    Lease (and the leader label) and the rollout it resumes converges."""
    namespace = loop
    generation = md(namespace)["metadata"]["generation"]
    patch_spec(
        namespace,
        {"spec": {"retrieval": {"env": [{"name": "MODELPILOT_LOG_LEVEL", "value": "DEBUG"}]}}},
    )
    wait_for(
        lambda: (
            kubectl_json("get", "deploy", f"{NAME}-retrieval", "-n", namespace)["metadata"][
                "generation"
            ]
            > 1
        ),
        60,
        what="the rollout to start",
    )
    operators = "app.kubernetes.io/name=modelpilot"

    def leaders() -> list[str]:
        selector = f"{operators},{LEADER_LABEL}=true"
        items = kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]
        return [p["metadata"]["name"] for p in items if not p["metadata"].get("deletionTimestamp")]

    # The chart's two replicas: one leads (labelled so), the other stands by, Ready.
    (leader,) = wait_for(leaders, 60, what="one labelled leader")
    assert len(ready_pods(namespace, operators)) == 2
    start = time.monotonic()
    kubectl("delete", "pod", leader, "-n", namespace, "--grace-period=0", "--force")
    (successor,) = wait_for(
        lambda: [n for n in leaders() if n != leader], 90, what="the standby to take over"
    )
    _record("operator_failover_s", round(time.monotonic() - start, 1))
    wait_for(lambda: md_ready(NAME, namespace), 600, interval=2, what="converged after the kill")
    assert md(namespace)["status"]["observedGeneration"] > generation
    # Ready says the stage serves; the rollout itself ends when only new pods are left.
    wanted = {"name": "MODELPILOT_LOG_LEVEL", "value": "DEBUG"}
    wait_for(
        lambda: (
            [p["metadata"]["name"] for p in pods(namespace, "retrieval")]
            and all(
                wanted in p["spec"]["containers"][0]["env"] for p in pods(namespace, "retrieval")
            )
        ),
        300,
        interval=2,
        what="the retrieval rollout finished",
    )
    assert leaders() == [successor]  # the restarted pod stands by; no flapping back


def test_routing_and_the_cache_are_tuned_live_from_what_the_gateway_measured(loop: str) -> None:
    """Routing Auto with the large re-ranker added: the gateway re-ranks sampled queries with
    both models; the optimizer reads their agreement from Prometheus and moves the small
    share as far as minQuality allows, says why in an Event, and the gateway pod runs the
    new share without a restart. The cache, Auto, is loosened toward its lowest threshold
    while its checked hits agree."""
    namespace = loop
    spec = sample("local")["spec"]["inference"]
    large = {"name": "reranker-large", "model": "reranker_large", "precision": "fp32",
             "quality": "1", "cost": "2"}  # fmt: skip
    patch_spec(
        namespace,
        {
            "spec": {
                "inference": {
                    "variants": [*spec["variants"], large],
                    "routing": {
                        "mode": "Auto",
                        "smallVariant": "reranker-small",
                        "largeVariant": "reranker-large",
                        "smallShare": "0.5",
                        "sampleRatio": "1",
                    },
                    "semanticCache": {
                        "mode": "Auto",
                        "similarityThreshold": "0.99",
                        "minSimilarityThreshold": "0.9",
                        "sampleRatio": "1",
                    },
                }
            }
        },
    )
    token = admin_token(namespace)

    def routed_pod() -> dict[str, Any] | None:
        for pod in pods(namespace, "inference"):
            knobs = pod_client(pod, token).knobs()
            if knobs["smallModel"] != knobs["largeModel"]:
                return pod
        return None

    pod = wait_for_stage(namespace, routed_pod, 600, "a gateway pod routing small and large")
    uid = pod["metadata"]["uid"]
    docs = calibration.corpus(limit=60)  # indexed by the first test
    queries = calibration.queries(docs)
    gateway = service_url(namespace, "inference") + "/v1/query"
    with Load(
        gateway, lambda n: {"query": queries[n % len(queries)], "top_k": 3}, rate=2.0
    ) as load:

        def tuned() -> dict[str, Any] | None:
            st = stage_status(namespace, "inference")
            moved = st.get("smallShare") not in (None, 0.5)
            return st if moved and st.get("routing") and st.get("cache") else None

        st = wait_for_stage(namespace, tuned, 900, "the small share tuned")
    assert not load.failed, load.failed[:5]
    _record("routing_small_share_tuned", st["smallShare"])
    _record("routing_measured", st["routing"])
    _record("cache_measured", st["cache"])
    # Small agrees with large on most queries (README: 0.87 top-3 overlap), so under
    # minQuality 0.8 every query may go small; the prediction holds the floor.
    assert st["smallShare"] == 1.0
    assert st["routing"]["share"] == 1.0 and st["routing"]["agreement"] >= 0.8
    assert any("small share 50% -> 100%" in m for m in events(namespace, "Optimized"))
    (now,) = [p for p in pods(namespace, "inference") if p["metadata"]["uid"] == uid]
    assert pod_client(now, token).knobs()["smallShare"] == 1.0  # live, same pod
    assert st["cacheThreshold"] < 0.99 and st["cache"]["agreement"] >= 0.8
    patch_spec(namespace, {"spec": {"inference": {"routing": {"mode": "Off"},
                                                  "semanticCache": {"mode": "Off"}}}})  # fmt: skip
    wait_for(lambda: md_ready(NAME, namespace), 600, interval=2, what="Ready with routing off")


def test_a_variant_whose_model_does_not_load_is_excluded_while_another_keeps_serving(
    loop: str,
) -> None:
    """The serving embedding variant is edited to a model Triton does not have: the new pod
    starts but is not Ready (no crash loop), the old ones keep serving, the load check
    reads Triton's message within an interval, a ModelUnavailable Warning says so, and the
    plan moves to the other variant. Putting the model back makes the variant usable."""
    namespace = loop
    variants = md(namespace)["spec"]["embedding"]["variants"]
    names = {v["name"] for v in variants}
    others = [v for v in sample("local")["spec"]["embedding"]["variants"] if v["name"] not in names]
    serving = stage_status(namespace, "embedding")["variant"]
    broken = [
        *(dict(v, model="minilm_missing") if v["name"] == serving else v for v in variants),
        *others,  # a variant to move to (the variant test has added it when it ran first)
    ]
    embed = service_url(namespace, "embedding") + "/v1/embed"
    with Load(embed, {"texts": ["still served while a variant fails to load"]}, rate=2.0) as load:
        start = time.monotonic()
        patch_spec(namespace, {"spec": {"embedding": {"variants": broken}}})

        def recorded() -> dict[str, Any] | None:
            rows = stage_status(namespace, "embedding").get("unavailable") or []
            return next((r for r in rows if r["variant"] == serving), None)

        row = wait_for_stage(namespace, recorded, 300, f"{serving} recorded as not loading")
        _record("model_unavailable_detected_s", round(time.monotonic() - start, 1))
        # The pod that cannot serve runs unready and has not restarted: no crash loop. (Another
        # unready pod may be one the plan's move has just created, still being created.)
        items = kubectl_json(
            "get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=embedding"
        )["items"]
        ready = {p["metadata"]["name"] for p in pods(namespace, "embedding")}
        stuck = [
            p
            for p in items
            if p["metadata"]["name"] not in ready and not p["metadata"].get("deletionTimestamp")
        ]
        for p in stuck:  # (unless the plan's move has already begun to remove it)
            for c in p["status"].get("containerStatuses") or []:
                waiting = c["state"].get("waiting", {}).get("reason")
                assert c["restartCount"] == 0 and "terminated" not in c["state"], c
                assert waiting in (None, "ContainerCreating"), c
        wait_for_stage(
            namespace,
            lambda: (
                md_ready(NAME, namespace)
                and stage_status(namespace, "embedding")["variant"] != serving
            ),
            600,
            "the plan moved to a variant that loads, Ready",
        )
        _record("model_unavailable_to_ready_s", round(time.monotonic() - start, 1))
    assert not load.failed, load.failed[:5]  # the old pods served throughout
    assert row["model"] == "minilm_missing" and "minilm_missing" in row["reason"], row
    (warning,) = [m for m in events(namespace, "ModelUnavailable") if serving in m]
    assert "does not load" in warning and "minilm_missing" in warning
    assert not [m for m in events(namespace, "BackOff") if "embedding" in m]  # no crash loop
    conditions = md(namespace)["status"]["conditions"]
    assert next(c for c in conditions if c["type"] == "Degraded")["status"] == "False"
    patch_spec(namespace, {"spec": {"embedding": {"variants": variants}}})
    wait_for(
        lambda: recorded() is None, 120, what="the record dropped once the variant's model changed"
    )
    wait_for(lambda: md_ready(NAME, namespace), 600, interval=2, what="Ready again")
