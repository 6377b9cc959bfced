"""The local cluster's real node, node-1 (hack/node.sh): pods on it run real containers, with
real networking, DNS, probes, volumes and limits. Every assertion here is about a process that
ran: none of these pods is a kwok pod."""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    BUSYBOX,
    KUBECONFIG,
    ROOT,
    embedding_pod,
    free_port,
    kubectl,
    kubectl_json,
    on_real_node,
    wait_for,
)

pytestmark = pytest.mark.integration


def apply(obj: dict[str, Any]) -> None:
    kubectl("apply", "-f", "-", stdin=json.dumps(obj))


def pod(name: str, namespace: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": on_real_node({"containers": containers, **spec}),
    }


def phase(name: str, namespace: str) -> str:
    return str(kubectl_json("get", "pod", name, "-n", namespace)["status"].get("phase", ""))


def finished(name: str, namespace: str, timeout: float = 120) -> str:
    """Wait for a run-to-completion pod to end; return its logs, failing on a failed pod."""
    end = wait_for(
        lambda: (p := phase(name, namespace)) in ("Succeeded", "Failed") and p,
        timeout,
        what=f"pod {name} to finish",
    )
    logs = kubectl("logs", name, "-n", namespace).stdout
    assert end == "Succeeded", f"pod {name} {end}:\n{logs}"
    return logs


def container_ready(name: str, namespace: str) -> bool:
    statuses = kubectl_json("get", "pod", name, "-n", namespace)["status"].get(
        "containerStatuses", []
    )
    return bool(statuses) and all(s["ready"] for s in statuses)


def test_node_1_is_a_ready_kubelet_node_with_a_taint(real_node: str) -> None:
    node = kubectl_json("get", "node", "node-1")
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.37.2"
    assert info["containerRuntimeVersion"].startswith("containerd://2.")
    assert {"key": "modelpilot.io/real-node", "value": "true", "effect": "NoSchedule"} in node[
        "spec"
    ]["taints"]
    assert {"type": "InternalIP", "address": real_node} in node["status"]["addresses"]
    assert "kwok.x-k8s.io/node" not in node["metadata"].get("annotations", {})


# Cold, the node_images fixture builds and loads the images first (minutes).
@pytest.mark.timeout(40 * 60)
def test_a_pod_lists_pods_through_the_apiserver_service_and_reads_prometheus(
    real_node: str, node_images: str, namespace: str, prometheus_url: str
) -> None:
    """In-cluster config (kubernetes.default.svc, the ServiceAccount token) as the operator's
    pod will use it, and Prometheus at the node IP."""
    kubectl("create", "role", "pod-reader", "--verb=list", "--resource=pods", "-n", namespace)
    kubectl(
        "create",
        "rolebinding",
        "pod-reader",
        "--role=pod-reader",
        f"--serviceaccount={namespace}:default",
        "-n",
        namespace,
    )
    port = prometheus_url.rsplit(":", 1)[1]
    script = textwrap.dedent(f"""
        import json, urllib.request
        from kubernetes import client, config
        config.load_incluster_config()
        api = client.CoreV1Api()
        print("host", api.api_client.configuration.host)
        pods = api.list_namespaced_pod("{namespace}").items
        print("pods", sorted(p.metadata.name for p in pods))
        url = "http://{real_node}:{port}/api/v1/query?query=up%7Bjob%3D%22prometheus%22%7D"
        body = json.load(urllib.request.urlopen(url, timeout=10))
        print("up", body["data"]["result"][0]["value"][1])
    """)
    apply(
        pod(
            "client",
            namespace,
            [
                {
                    "name": "client",
                    "image": f"{node_images}/embedding:test",
                    "command": ["python", "-c", script],
                }
            ],
            restartPolicy="Never",
        )
    )
    logs = finished("client", namespace, timeout=180)
    assert "host https://10.96.0.1:443" in logs, logs
    assert "pods ['client']" in logs, logs
    assert "up 1" in logs, logs


def targets(prometheus_url: str, namespace: str, pod: str) -> dict[str, list[dict[str, Any]]]:
    """Prometheus's active and dropped targets discovered for one pod."""
    url = f"{prometheus_url}/api/v1/targets?state=any"
    data = json.load(urllib.request.urlopen(url, timeout=10))["data"]
    return {
        state: [
            t
            for t in data[f"{state}Targets"]
            if t["discoveredLabels"].get("__meta_kubernetes_namespace") == namespace
            and t["discoveredLabels"].get("__meta_kubernetes_pod_name") == pod
        ]
        for state in ("active", "dropped")
    }


SCRAPE = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": "8082",
    "prometheus.io/path": "/metrics",
}


def test_kwok_pods_route_to_a_blackhole_and_prometheus_drops_them(
    real_node: str, namespace: str, prometheus_url: str
) -> None:
    apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "fake", "namespace": namespace, "annotations": SCRAPE},
            "spec": {"containers": [{"name": "c", "image": "registry.invalid/fake:1"}]},
        }
    )
    ip = wait_for(
        lambda: kubectl_json("get", "pod", "fake", "-n", namespace)["status"].get("podIP"),
        90,
        what="the kwok pod's IP",
    )
    assert kubectl_json("get", "pod", "fake", "-n", namespace)["spec"]["nodeName"] != "node-1"
    route = subprocess.run(["ip", "route", "get", ip], capture_output=True, text=True)
    # The kernel refuses the lookup of a blackholed destination; it never names a device.
    assert "dev eth0" not in route.stdout and " via " not in route.stdout, route.stdout
    table = subprocess.run(
        ["ip", "route", "show", "type", "blackhole"], capture_output=True, text=True
    )
    assert "blackhole 10.244.0.0/16" in table.stdout


# Cold, the node_images fixture builds and loads the images first (minutes).
@pytest.mark.timeout(40 * 60)
def test_the_embedding_image_serves_and_prometheus_discovers_and_scrapes_it(
    node_images: str, namespace: str, prometheus_url: str
) -> None:
    """The project's own images as a pod: Triton (the triton image) beside the embedding
    service, whose readiness probe asks Triton whether its model is ready; kubectl logs,
    exec and port-forward reach it, and Prometheus finds it by its annotations."""
    manifest = embedding_pod("embed", namespace, node_images, "test")
    manifest["metadata"].update(labels={"app": "embed-test"}, annotations=SCRAPE)
    apply(manifest)
    wait_for(lambda: container_ready("embed", namespace), 300, what="the embedding pod Ready")

    assert "minilm_int8" in kubectl("logs", "embed", "-c", "triton", "-n", namespace).stdout
    exec_ = kubectl("exec", "embed", "-c", "embedding", "-n", namespace, "--", "id", "-u")
    assert exec_.stdout.strip() == "65532"

    port = free_port()
    forward = subprocess.Popen(
        [
            str(ROOT / ".cache/bin/kubectl"),
            "--kubeconfig",
            str(KUBECONFIG),
            "port-forward",
            "-n",
            namespace,
            "pod/embed",
            f"{port}:8082",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def embed() -> dict[str, Any]:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/embed",
                data=json.dumps({"texts": ["hello from node-1"]}).encode(),
                headers={"Content-Type": "application/json"},
            )
            return dict(json.load(urllib.request.urlopen(req, timeout=10)))

        assert wait_for(embed, 60, what="an embedding through port-forward")["dims"] == 384
    finally:
        forward.terminate()
        forward.wait(timeout=30)

    # Scraped at its pod IP, with the pod's namespace, name, node and labels as labels.
    query = f'up{{namespace="{namespace}",pod="embed",node="node-1",app="embed-test"}}'
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": query})

    def scraped() -> bool:
        result = json.load(urllib.request.urlopen(url, timeout=10))["data"]["result"]
        return bool(result) and result[0]["value"][1] == "1"

    wait_for(scraped, 60, what="Prometheus to scrape the pod")


def test_a_service_spreads_over_three_pods_by_cluster_ip_and_dns_name(
    real_node: str, namespace: str
) -> None:
    serve = "mkdir /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"
    apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": namespace},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": on_real_node(
                        {
                            "containers": [
                                {
                                    "name": "web",
                                    "image": BUSYBOX,
                                    "command": ["sh", "-c", serve],
                                    "readinessProbe": {
                                        "httpGet": {"path": "/", "port": 8080},
                                        "periodSeconds": 1,
                                    },
                                }
                            ]
                        }
                    ),
                },
            },
        }
    )
    kubectl("expose", "deployment", "web", "--port=80", "--target-port=8080", "-n", namespace)
    wait_for(
        lambda: (
            kubectl_json("get", "deploy", "web", "-n", namespace)["status"].get("readyReplicas")
            == 3
        ),
        180,
        what="3 ready web pods",
    )
    pods = {p["metadata"]["name"] for p in kubectl_json("get", "pods", "-n", namespace)["items"]}
    cluster_ip = kubectl_json("get", "svc", "web", "-n", namespace)["spec"]["clusterIP"]

    def from_host() -> set[str]:
        return {
            urllib.request.urlopen(f"http://{cluster_ip}/", timeout=5).read().decode().strip()
            for _ in range(60)
        }

    # kube-proxy's rules can trail the endpoints by a moment.
    assert wait_for(lambda: from_host() == pods, 60, what="all 3 pods via the ClusterIP")

    name = f"web.{namespace}.svc.cluster.local"
    fetch = f"for i in $(seq 60); do wget -qO- http://{name}/; done"
    apply(
        pod(
            "client",
            namespace,
            [{"name": "c", "image": BUSYBOX, "command": ["sh", "-c", fetch]}],
            restartPolicy="Never",
        )
    )
    assert set(finished("client", namespace).split()) == pods


def crictl(command: str, *args: str) -> Any:
    """``crictl COMMAND -o json ARGS`` against node-1, parsed (flags go before arguments)."""
    out = subprocess.run(
        [str(ROOT / "hack/node.sh"), "crictl", command, "-o", "json", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def test_the_kubelet_restarts_a_killed_container_and_one_failing_its_liveness_probe(
    real_node: str, namespace: str
) -> None:
    apply(pod("victim", namespace, [{"name": "c", "image": BUSYBOX, "command": ["sleep", "3600"]}]))
    wait_for(lambda: phase("victim", namespace) == "Running", 120, what="victim running")
    cid = kubectl_json("get", "pod", "victim", "-n", namespace)["status"]["containerStatuses"][0][
        "containerID"
    ].removeprefix("containerd://")
    info = crictl("inspect", cid)
    subprocess.run(["kill", "-9", str(info["info"]["pid"])], check=True)

    def restarts(name: str) -> int:
        status = kubectl_json("get", "pod", name, "-n", namespace)["status"]
        return int(status["containerStatuses"][0]["restartCount"])

    wait_for(lambda: restarts("victim") >= 1, 120, what="the killed container restarted")
    wait_for(lambda: phase("victim", namespace) == "Running", 120, what="victim running again")

    alive_then_not = "touch /tmp/alive && sleep 4 && rm /tmp/alive && exec sleep 3600"
    apply(
        pod(
            "sick",
            namespace,
            [
                {
                    "name": "c",
                    "image": BUSYBOX,
                    "command": ["sh", "-c", alive_then_not],
                    "livenessProbe": {
                        "exec": {"command": ["test", "-f", "/tmp/alive"]},
                        "periodSeconds": 1,
                        "failureThreshold": 2,
                    },
                }
            ],
        )
    )
    wait_for(lambda: restarts("sick") >= 1, 120, what="the unhealthy container restarted")
    events = kubectl("get", "events", "-n", namespace, "--field-selector=involvedObject.name=sick")
    assert "Liveness probe failed" in events.stdout


def test_configmap_emptydir_and_pvc_volumes_are_written_by_a_non_root_pod(
    real_node: str, namespace: str
) -> None:
    kubectl("create", "configmap", "cfg", "--from-literal=greeting=hello", "-n", namespace)
    apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": namespace},
            "spec": {
                "storageClassName": "local-path",
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "64Mi"}},
            },
        }
    )
    script = (
        "id -u; cat /cfg/greeting; echo; "
        "echo scratch > /scratch/f && cat /scratch/f; "
        "echo durable > /data/CURRENT && cat /data/CURRENT"
    )
    apply(
        pod(
            "writer",
            namespace,
            [
                {
                    "name": "c",
                    "image": BUSYBOX,
                    "command": ["sh", "-c", script],
                    "volumeMounts": [
                        {"name": "cfg", "mountPath": "/cfg"},
                        {"name": "scratch", "mountPath": "/scratch"},
                        {"name": "data", "mountPath": "/data"},
                    ],
                }
            ],
            restartPolicy="Never",
            securityContext={
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "fsGroup": 65532,
                "runAsNonRoot": True,
            },
            volumes=[
                {"name": "cfg", "configMap": {"name": "cfg"}},
                {"name": "scratch", "emptyDir": {}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
            ],
        )
    )
    assert finished("writer", namespace, timeout=180).split() == [
        "65532",
        "hello",
        "scratch",
        "durable",
    ]
    pv = kubectl_json("get", "pvc", "data", "-n", namespace)["spec"]["volumeName"]
    affinity = kubectl_json("get", "pv", pv)["spec"]["nodeAffinity"]["required"]
    assert "node-1" in json.dumps(affinity)


def test_memory_limits_oom_kill_and_cpu_limits_throttle(real_node: str, namespace: str) -> None:
    apply(
        pod(
            "hog",
            namespace,
            [
                {
                    "name": "c",
                    "image": BUSYBOX,
                    # dd reads into one 256 MiB buffer: every page of it is touched.
                    "command": ["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=4"],
                    "resources": {"limits": {"memory": "64Mi"}},
                }
            ],
            restartPolicy="Never",
        )
    )

    def terminated() -> dict[str, Any] | None:
        statuses = kubectl_json("get", "pod", "hog", "-n", namespace)["status"].get(
            "containerStatuses", []
        )
        return statuses[0]["state"].get("terminated") if statuses else None

    assert wait_for(terminated, 120, what="the hog to end")["reason"] == "OOMKilled"

    spin = (
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us; "
        "timeout 3 sh -c 'while :; do :; done'; grep nr_throttled /sys/fs/cgroup/cpu/cpu.stat"
    )
    apply(
        pod(
            "spinner",
            namespace,
            [
                {
                    "name": "c",
                    "image": BUSYBOX,
                    "command": ["sh", "-c", spin],
                    "resources": {"limits": {"cpu": "200m", "memory": "64Mi"}},
                }
            ],
            restartPolicy="Never",
        )
    )
    out = finished("spinner", namespace)
    assert out.split()[:2] == ["20000", "100000"], out
    throttled = re.search(r"nr_throttled (\d+)", out)
    assert throttled and int(throttled.group(1)) > 0, f"never throttled: {out}"


def test_a_deleted_pod_leaves_no_container_or_sandbox(real_node: str, namespace: str) -> None:
    apply(pod("short", namespace, [{"name": "c", "image": BUSYBOX, "command": ["sleep", "3600"]}]))
    wait_for(lambda: phase("short", namespace) == "Running", 120, what="pod running")
    label = f"io.kubernetes.pod.namespace={namespace}"
    assert crictl("ps", "-a", "--label", label)["containers"]
    kubectl("delete", "pod", "short", "-n", namespace, "--grace-period=1", "--wait=true")

    def nothing_left() -> bool:
        return (
            not crictl("ps", "-a", "--label", label)["containers"]
            and not crictl("pods", "--label", label)["items"]
        )

    wait_for(nothing_left, 120, what="no container or sandbox of the deleted pod")


@pytest.mark.slow
def test_cluster_down_leaves_nothing_behind_and_up_is_idempotent(real_node: str) -> None:
    """Down removes every process, container, mount, network namespace, veth, bridge and
    iptables rule of ours; up twice in a row is quick and changes nothing."""
    cluster = str(ROOT / "hack/cluster.sh")
    subprocess.run([cluster, "down"], check=True, timeout=300)
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    ours = [
        line
        for line in procs.splitlines()
        # Prometheus is not the cluster's: hack/prometheus.sh starts and stops it.
        if re.search(r"\.cache/bin/(?!prometheus)|containerd-shim-runc-v2|modelpilot-node", line)
    ]
    assert not ours, ours
    mounts = Path("/proc/self/mounts").read_text()
    assert "modelpilot-node" not in mounts, mounts
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "mpbr0" not in links and "veth" not in links, links
    for ipt in ("iptables-save", "ip6tables-save"):
        rules = subprocess.run([ipt], capture_output=True, text=True).stdout
        assert not re.search(r"(KUBE|CNI)-", rules), rules
    assert not subprocess.run(
        ["ip", "route", "show", "type", "blackhole"], capture_output=True, text=True
    ).stdout.strip()

    subprocess.run([cluster, "up"], check=True, timeout=600)
    start = time.monotonic()
    subprocess.run([cluster, "up"], check=True, timeout=120)
    assert time.monotonic() - start < 30
    ready = '{.status.conditions[?(@.type=="Ready")].status}'
    wait_for(
        lambda: kubectl("get", "node", "node-1", "-o", f"jsonpath={ready}").stdout == "True",
        120,
        what="node-1 Ready again",
    )
