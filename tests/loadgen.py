"""A real HTTP stage that does real work per request and exports ModelPilot's metrics, and a
bounded open-loop load generator for it (loopback only)."""

from __future__ import annotations

import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tests.helpers import free_port

STAGES = ("ingestion", "embedding", "retrieval", "inference")


class Stage:
    """A real HTTP service that does real work per request and exports our metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "modelpilot_requests", "Requests", ["stage", "code"], registry=self.registry
        )
        self.duration = Histogram(
            "modelpilot_request_duration_seconds",
            "Latency",
            ["stage"],
            registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1),
        )
        stage = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body = generate_latest(stage.registry)
                else:
                    start = time.perf_counter()
                    body = str(sum(i * i for i in range(2000))).encode()  # real work
                    for name in STAGES:
                        stage.requests.labels(name, "200").inc()
                        stage.duration.labels(name).observe(time.perf_counter() - start)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def load(port: int, rps: float, seconds: float, stop: threading.Event) -> None:
    """A bounded open-loop load generator on loopback."""
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < deadline and not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/work", timeout=5) as r:
                r.read()
        except OSError:
            if stop.is_set():  # the fixture shut the server down under us: done
                return
            raise
        next_at += 1 / rps
        time.sleep(max(0.0, next_at - time.monotonic()))
