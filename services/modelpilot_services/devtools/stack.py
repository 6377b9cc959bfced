"""``make services-up`` / ``services-down``: Triton and the four services as local processes.

Triton is the genuine ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel, run on an
on-disk model repository (the layout the official Triton image uses in clusters) with the
Python backend and explicit model control, so batching and models change live through its
repository API.

State lives under ``--dir`` (default ``.cache/services``): ``models/`` (the repository),
``backends/``, ``data/`` (retrieval), ``logs/`` and ``pids/``. Ports come from
``MODELPILOT_<NAME>_PORT`` (ingestion 8081, embedding 8082, retrieval 8083, inference 8084,
triton 8000 with gRPC 8001 and metrics 8002, the embedding and inference admin APIs 9082 and
9084).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from modelpilot_services.models import tritonserve

SERVICES = ("embedding", "retrieval", "ingestion", "inference")  # start order
DEFAULT_PORTS = {
    "ingestion": 8081,
    "embedding": 8082,
    "retrieval": 8083,
    "inference": 8084,
    "triton": 8000,
    "triton_grpc": 8001,
    "triton_metrics": 8002,
    # the admin APIs (loopback only: no token locally)
    "embedding_admin": 9082,
    "inference_admin": 9084,
}
STARTUP_MODELS = ("minilm_fp32", "reranker_small", "reranker_large")


def ports_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    return {
        k: int(environ.get(f"MODELPILOT_{k.upper()}_PORT", v)) for k, v in DEFAULT_PORTS.items()
    }


def _wait(probe: Callable[[], bool], timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s\n{tail}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@dataclass
class Stack:
    """The local data plane; every process is detached and recorded in ``pids/``."""

    root: Path
    ports: dict[str, int] = field(default_factory=ports_from_env)
    extra_env: dict[str, str] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def admin_url(self, name: str) -> str:
        """The base URL of a service's admin API."""
        return self.url(f"{name}_admin")

    @property
    def triton_url(self) -> str:
        return self.url("triton")

    def _pidfile(self, name: str) -> Path:
        return self.root / "pids" / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        try:
            pid = int(self._pidfile(name).read_text())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> int:
        for d in ("pids", "logs"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        with open(self.log(name), "ab") as out:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._pidfile(name).write_text(str(proc.pid))
        return proc.pid

    def service_env(self, name: str) -> dict[str, str]:
        p = self.ports
        env = {
            **os.environ,
            "PORT": str(p[name]),
            "MODELPILOT_ADMIN_PORT": str(p.get(f"{name}_admin", 0)),
            "MODELPILOT_EMBEDDING_URL": self.url("embedding"),
            "MODELPILOT_RETRIEVAL_URL": self.url("retrieval"),
            "MODELPILOT_TRITON_URL": f"127.0.0.1:{p['triton']}",
            "MODELPILOT_DATA_DIR": str(self.root / "data" / "retrieval"),
            "MODELPILOT_SERVICE_CONFIG": str(self.root / "none.json"),
        }
        return env | self.extra_env

    def start_triton(self, timeout_s: float = 300) -> None:
        if self.pid("triton"):
            return
        # Build once, before several model instances would race to. In a child process:
        # importing onnxruntime after usearch in one process segfaults (usearch 2.26.6,
        # onnxruntime 1.32.0), and this launcher runs inside pytest beside the store tests.
        build = "from modelpilot_services.models import minilm; minilm.build()"
        subprocess.run([sys.executable, "-c", build], check=True)
        p = self.ports
        argv, env = tritonserve.command(
            [
                f"--model-repository={self.root / 'models'}",
                "--model-control-mode=explicit",
                *(f"--load-model={m}" for m in STARTUP_MODELS),
                f"--http-port={p['triton']}",
                f"--grpc-port={p['triton_grpc']}",
                f"--metrics-port={p['triton_metrics']}",
                "--http-address=127.0.0.1",
                "--grpc-address=127.0.0.1",
                "--allow-metrics=true",
                "--log-verbose=0",
            ],
            self.root,
        )
        self._spawn("triton", argv, env)
        _wait(
            lambda: http_ok(f"{self.triton_url}/v2/health/ready"),
            timeout_s,
            "tritonserver",
            self.log("triton"),
        )

    def start(self, name: str, timeout_s: float = 60) -> None:
        if self.pid(name):
            return
        argv = [sys.executable, "-m", f"modelpilot_services.stages.{name}"]
        self._spawn(name, argv, self.service_env(name))
        _wait(lambda: http_ok(f"{self.url(name)}/readyz"), timeout_s, name, self.log(name))

    def up(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.start_triton()
        for name in SERVICES:
            self.start(name)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        """Signal the process; wait until it is gone (SIGKILL after ``timeout_s``)."""
        pid = self.pid(name)
        if pid is None:
            self._pidfile(name).unlink(missing_ok=True)
            return
        os.killpg(pid, sig)  # its group: Triton's Python-backend stubs go with it
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                # Reap it if it is our child; otherwise poll its existence.
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
            except ChildProcessError:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
            time.sleep(0.05)
        else:
            os.killpg(pid, signal.SIGKILL)
        self._pidfile(name).unlink(missing_ok=True)

    def down(self) -> None:
        for name in (*reversed(SERVICES), "triton"):
            self.stop(name)

    def prometheus_targets(self, path: Path, labels: Mapping[str, str]) -> None:
        """A Prometheus file_sd file naming every service's and Triton's /metrics."""
        targets = [
            {"targets": [f"127.0.0.1:{self.ports[n]}"], "labels": {**labels, "job": n}}
            for n in (*SERVICES, "triton_metrics")
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(targets, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=Path(".cache/services"))
    parser.add_argument("--prometheus-targets", type=Path, help="write a file_sd targets file")
    args = parser.parse_args(argv)
    stack = Stack(args.dir.resolve())
    if args.action == "up":
        stack.up()
        if args.prometheus_targets:
            labels = {"namespace": "local", "app_kubernetes_io_instance": "local"}
            stack.prometheus_targets(args.prometheus_targets, labels)
        for name in (*SERVICES, "triton"):
            print(f"{name:<10} {stack.url(name)}  pid {stack.pid(name)}  log {stack.log(name)}")
    elif args.action == "down":
        stack.down()
    else:
        for name in (*SERVICES, "triton"):
            state = f"pid {stack.pid(name)}" if stack.pid(name) else "stopped"
            print(f"{name:<10} {stack.url(name)}  {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
