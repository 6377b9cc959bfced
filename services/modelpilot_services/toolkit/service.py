"""The service every ModelPilot stage is: an aiohttp app with health and readiness, metrics,
JSON errors, size limits, structured logs, graceful shutdown, and the admin API on a port of
its own.

The admin API (``/v1/admin/*``: live settings the operator pushes) listens on
``MODELPILOT_ADMIN_PORT``, which no Service exposes, and requires
``Authorization: Bearer $MODELPILOT_ADMIN_TOKEN`` (the operator's per-ModelDeployment
Secret). Without a token, as in ``make services-up``, it listens on loopback only.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import random
import time
from typing import Any

import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from threadpoolctl import threadpool_limits

from modelpilot import contract
from modelpilot_services.toolkit.http import (
    MAX_BODY_BYTES,
    ApiError,
    Handler,
    error_response,
    json_response,
)
from modelpilot_services.toolkit.logs import log, setup_logging
from modelpilot_services.toolkit.metrics import Metrics


def _admin_auth(token: str | None) -> Any:
    """Bearer-token check for the admin app (constant-time compare); JSON errors."""
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if expected is not None and not hmac.compare_digest(given, expected):
            return error_response(401, "unauthorized", "the admin API needs the admin token")
        try:
            return await handler(request)
        except ApiError as e:
            return error_response(e.status, e.code, e.message, e.retry_after)
        except web.HTTPException as e:
            return error_response(e.status, e.reason.lower().replace(" ", "_"), e.text or "")

    return middleware


QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _middleware(metrics: Metrics) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in QUIET_PATHS:
            return await handler(request)
        start = time.perf_counter()
        # Correlation ids need not be unpredictable: getrandbits skips uuid4's urandom call.
        request_id = request.headers.get("X-Request-Id") or f"{random.getrandbits(64):016x}"
        metrics.arrivals.arrive()
        metrics.stage_in_flight.inc()
        try:
            try:
                response = await handler(request)
            except ApiError as e:
                response = error_response(e.status, e.code, e.message, e.retry_after)
            except web.HTTPRequestEntityTooLarge:
                response = error_response(
                    413, "body_too_large", f"body exceeds {MAX_BODY_BYTES} bytes"
                )
            except web.HTTPException as e:
                code = e.reason.lower().replace(" ", "_")
                response = error_response(e.status, code, e.text or e.reason)
            except Exception:
                log.exception("unhandled", extra={"fields": {"request_id": request_id}})
                response = error_response(500, "internal", "internal error; see the logs")
        finally:
            metrics.stage_in_flight.dec()
        elapsed = time.perf_counter() - start
        metrics.count(response.status)
        metrics.stage_duration.observe(elapsed)
        response.headers["X-Request-Id"] = request_id
        if response.status >= 400 or log.isEnabledFor(logging.DEBUG):
            fields = {
                "request_id": request_id,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "ms": round(elapsed * 1000, 3),
            }
            log.info("request", extra={"fields": fields})
        return response

    return middleware


class Service:
    """An aiohttp app with the shared endpoints; subclasses add routes and a readiness check."""

    stage = "service"

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.stage, self.registry)
        self.stopping = False
        self.app = web.Application(
            middlewares=[_middleware(self.metrics)], client_max_size=MAX_BODY_BYTES
        )
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.on_startup.append(self._startup)
        self.app.on_shutdown.append(self._on_shutdown)
        self.app.on_cleanup.append(self._cleanup)
        # The admin API: its own app, so that no route of it is reachable on the stage's port.
        self.admin_token = os.environ.get(contract.ENV_ADMIN_TOKEN) or None
        self.admin = web.Application(
            middlewares=[_admin_auth(self.admin_token)], client_max_size=MAX_BODY_BYTES
        )
        self._admin_runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Open clients and load state (override)."""

    async def stop(self) -> None:
        """Flush and close (override); runs after in-flight requests finished."""

    async def ready(self) -> str | None:
        """``None`` when ready to serve, else why not (override)."""
        return None

    async def _startup(self, app: web.Application) -> None:
        await self.start()

    async def serve_admin(self, port: int, host: str) -> None:
        """Listen for the admin API; loopback only when no token guards it."""
        if not self.admin.router.routes():
            return
        self._admin_runner = web.AppRunner(self.admin, access_log=None)
        await self._admin_runner.setup()
        bind = host if self.admin_token else "127.0.0.1"
        await web.TCPSite(self._admin_runner, bind, port).start()

    async def _on_shutdown(self, app: web.Application) -> None:
        self.stopping = True

    async def _cleanup(self, app: web.Application) -> None:
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        await self.stop()

    async def _healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        reason = "shutting down" if self.stopping else await self.ready()
        if reason is None:
            return json_response({"status": "ready"})
        return json_response({"status": "not ready", "reason": reason}, status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        # Collectors may call Triton: keep that off the event loop.
        body = await asyncio.get_running_loop().run_in_executor(
            None, generate_latest, self.registry
        )
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def service_config(stage: str) -> contract.ServiceConfig:
    """The operator-rendered ``service.json`` (``MODELPILOT_SERVICE_CONFIG``); defaults for
    ``stage`` when there is none (a local process)."""
    default = f"{contract.CONFIG_DIR}/{contract.SERVICE_CONFIG_FILE}"
    path = os.environ.get(contract.ENV_SERVICE_CONFIG, default)
    try:
        with open(path) as f:
            return contract.ServiceConfig.model_validate_json(f.read())
    except FileNotFoundError:
        return contract.ServiceConfig(stage=stage)


def run(service: Service, port: int) -> None:
    """Serve until SIGTERM/SIGINT, then stop taking connections, finish in-flight requests
    (up to ``MODELPILOT_SHUTDOWN_SECONDS``) and run the service's ``stop``.

    The event loop is uvloop's: every request crosses two sockets (client, Triton), and
    libuv's I/O path adds less latency than asyncio's (README, "The data plane")."""
    setup_logging(service.stage)
    host = env("MODELPILOT_BIND", "127.0.0.1")
    admin_port = int(env(contract.ENV_ADMIN_PORT, str(contract.ADMIN_PORT)))

    async def admin(app: web.Application) -> None:
        await service.serve_admin(admin_port, host)

    service.app.on_startup.append(admin)
    # A replica has one core. A second OpenBLAS thread spins in sched_yield after each
    # product it shares (the semantic cache's lookup), burning the CPU Triton needs.
    threadpool_limits(limits=1, user_api="blas")
    web.run_app(
        service.app,
        loop=uvloop.new_event_loop(),
        host=host,
        port=port,
        shutdown_timeout=float(env("MODELPILOT_SHUTDOWN_SECONDS", "20")),
        access_log=None,
        print=None,
    )
