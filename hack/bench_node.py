"""Figures for the real node (a benchmark, not a test): `make bench-node`.

Measures, on this machine: `hack/cluster.sh up` from a stopped cluster (tools cached) and
again when it is up; the resident memory of the node's processes; and the time from
`kubectl apply` to Ready for a pod of the embedding image beside Triton, with the images
already in the node (warm) and right after loading them into it (cold load).
Needs the images: `make images IMAGE_REPOSITORY=localhost/modelpilot IMAGE_TAG=test`.
Run from the repository root with PYTHONPATH=. (as `make bench-node` does).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.helpers import embedding_pod

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / ".cache/cluster/run"
NODE_PROCESSES = ("containerd", "kubelet", "kube-proxy", "coredns", "local-path")
IMAGES = ("operator", "ingestion", "retrieval", "inference", "triton", "embedding")


def sh(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, check=True).stdout


def kubectl(*args: str, stdin: str | None = None) -> str:
    return sh(
        str(ROOT / ".cache/bin/kubectl"),
        "--kubeconfig",
        str(ROOT / ".cache/kubeconfig"),
        *args,
        stdin=stdin,
    )


def timed(*args: str) -> float:
    start = time.monotonic()
    sh(*args)
    return time.monotonic() - start


def rss_mib(name: str) -> float:
    pid = (RUN / f"{name}.pid").read_text().strip()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {name}")


def apply_to_ready(namespace: str, repository: str, tag: str, timeout: float = 600) -> float:
    name = f"embed-{uuid.uuid4().hex[:6]}"
    start = time.monotonic()
    kubectl("apply", "-f", "-", stdin=json.dumps(embedding_pod(name, namespace, repository, tag)))
    while time.monotonic() - start < timeout:
        pod = json.loads(kubectl("get", "pod", name, "-n", namespace, "-o", "json"))
        statuses = pod["status"].get("containerStatuses", [])
        if statuses and all(s["ready"] for s in statuses):
            elapsed = time.monotonic() - start
            kubectl("delete", "pod", name, "-n", namespace, "--wait=true")
            return elapsed
        time.sleep(0.2)
    raise TimeoutError(f"{name} not Ready in {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", default="localhost/modelpilot")
    parser.add_argument("--tag", default="test")
    args = parser.parse_args(argv)
    cluster = str(ROOT / "hack/cluster.sh")
    node = str(ROOT / "hack/node.sh")

    sh(cluster, "down")
    print(f"cluster up from stopped (tools cached): {timed(cluster, 'up'):.1f} s")
    print(f"cluster up when already up:            {timed(cluster, 'up'):.1f} s")
    memory = {name: rss_mib(name) for name in NODE_PROCESSES}
    print(
        "node resident memory: "
        + ", ".join(f"{k} {v:.0f} MiB" for k, v in memory.items())
        + f" (total {sum(memory.values()):.0f} MiB)"
    )

    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    try:
        every = [f"{args.repository}/{s}:{args.tag}" for s in IMAGES]
        images = every[-2:]  # triton, embedding
        warm = apply_to_ready(namespace, args.repository, args.tag)
        print(f"apply -> Ready, embedding + Triton, warm: {warm:.1f} s")
        ctr = [
            str(ROOT / ".cache/bin/ctr"),
            "--address",
            "/run/modelpilot-node/containerd.sock",
            "--namespace",
            "k8s.io",
        ]
        # Every image of the tag goes, so that no layer they share stays in the node.
        sh(*ctr, "images", "rm", "--sync", *every)
        for image in every:
            (
                Path("/var/lib/modelpilot-node/loaded") / image.replace("/", "_").replace(":", "_")
            ).unlink(missing_ok=True)
        load = timed(node, "load", *images)
        ready = apply_to_ready(namespace, args.repository, args.tag)
        print(f"cold: load both images {load:.1f} s, then apply -> Ready {ready:.1f} s")
        print(f"load the other images back: {timed(node, 'load', *every):.1f} s")
    finally:
        kubectl("delete", "namespace", namespace, "--wait=false")
    return 0


if __name__ == "__main__":
    sys.exit(main())
