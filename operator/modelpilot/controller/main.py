"""The operator process (``modelpilot-operator``): stand for the leader Lease, serve health
and metrics from the start, and run the kopf handlers only while leading.

A standby is healthy and Ready (a PodDisruptionBudget and rolling updates count on it); the
leader is healthy while its event loop answers. Readiness asks only that the election runs."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kopf
from kubernetes import config
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelpilot.controller.leadership import Leadership

# A leader whose event loop does not run a no-op this fast is stuck (the chart's liveness
# probe waits longer than this for an answer).
LOOP_ANSWER_S = 4.0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="modelpilot-operator", description=__doc__)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)"
    )
    scope.add_argument(
        "-n", "--namespace", action="append", default=[],
        help="a namespace (or glob, e.g. 'team-*' or '!e2e-*') to watch; repeatable",
    )  # fmt: skip
    p.add_argument("--listen", default="0.0.0.0:8080", help="host:port of /healthz and /metrics")
    p.add_argument("--lease", default="modelpilot-operator", help="the leader Lease's name")
    p.add_argument(
        "--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"),
        help="the leader Lease's namespace (default: $POD_NAMESPACE, else default)",
    )  # fmt: skip
    p.add_argument(
        "--identity", default=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        help="this replica's name in the Lease (default: $POD_NAME)",
    )  # fmt: skip
    level = p.add_mutually_exclusive_group()
    level.add_argument("--debug", action="store_true")
    level.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


class _Health:
    """What /healthz reports: the election runs, and a leader's event loop answers."""

    def __init__(self, leadership: Leadership) -> None:
        self.leadership = leadership
        self.loop: asyncio.AbstractEventLoop | None = None  # kopf's, once it runs

    def ok(self) -> bool:
        if not self.leadership.alive():
            return False
        loop = self.loop
        if loop is None or not loop.is_running():
            return True  # standing by, or kopf starting
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(LOOP_ANSWER_S)
        except Exception:  # stuck or closing: unhealthy either way
            return False
        return True


def _serve(listen: str, health: _Health) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            if self.path in ("/healthz", "/readyz"):
                ok = health.ok() if self.path == "/healthz" else health.leadership.alive()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", "text/plain")
            elif self.path == "/metrics":
                self._reply(200, generate_latest(), CONTENT_TYPE_LATEST)
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # probes are not news
            pass

    host, port = listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    kopf.configure(debug=args.debug, quiet=args.quiet, verbose=args.debug)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    pod = os.environ.get("POD_NAME")
    leadership = Leadership(
        args.lease,
        args.lease_namespace,
        args.identity,
        pod=(os.environ.get("POD_NAMESPACE", args.lease_namespace), pod) if pod else None,
    )
    health = _Health(leadership)
    _serve(args.listen, health)

    def stop_standing(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    # As a container's PID 1, a signal without a handler is dropped: a standby would wait
    # out the grace period on every rollout. (kopf installs its own handlers once it runs.)
    signal.signal(signal.SIGTERM, stop_standing)
    try:
        leadership.campaign()
        leadership.leading.wait()
    except (SystemExit, KeyboardInterrupt):
        leadership.release()  # elected meanwhile: hand it on
        raise

    import modelpilot.controller.handlers  # noqa: F401 - registers the handlers

    @kopf.on.startup()
    async def remember_loop(**_: Any) -> None:
        health.loop = asyncio.get_running_loop()

    try:
        everywhere = args.all_namespaces or not args.namespace
        kopf.run(standalone=True, clusterwide=everywhere, namespaces=args.namespace)
    finally:
        leadership.release()


if __name__ == "__main__":
    main()
