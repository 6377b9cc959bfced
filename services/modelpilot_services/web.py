"""What every ModelPilot service shares: the aiohttp app, health and readiness, Prometheus
metrics by our naming conventions, JSON errors, request validation, size limits, structured
logs, graceful shutdown, and the admin API on a port of its own.

The admin API (``/v1/admin/*``: live settings the operator pushes) listens on
``MODELPILOT_ADMIN_PORT``, which no Service exposes, and requires
``Authorization: Bearer $MODELPILOT_ADMIN_TOKEN`` (the operator's per-ModelDeployment
Secret). Without a token, as in ``make services-up``, it listens on loopback only.

Errors always answer ``{"error": {"code": ..., "message": ...}}`` with a 4xx for bad input;
a 5xx means *we* failed (or a dependency did, then with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import random
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import orjson
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from pydantic import BaseModel, ValidationError
from threadpoolctl import threadpool_limits

from modelpilot import contract
from modelpilot_services.upstream import Upstream

log = logging.getLogger("modelpilot")

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5,
)  # fmt: skip
MAX_BODY_BYTES = int(os.environ.get("MODELPILOT_MAX_BODY_BYTES", str(1 << 20)))
Model = TypeVar("Model", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JSON_HEADERS = {"Content-Type": "application/json"}


class ApiError(Exception):
    """An error the client can act on; ``status`` is the HTTP code."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response through orjson: an embedding's 384 floats serialize in ~12 us against
    ~180 us with the standard library, on the hot path of every embed and query."""
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def error_response(
    status: int, code: str, message: str, retry_after: int | None = None
) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {"error": {"code": code, "message": message}}
    return json_response(body, status=status, headers=headers)


async def parse(request: web.Request, model: type[Model]) -> Model:
    """The request body validated against ``model``; 4xx with the reason otherwise."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
    raw = await request.read()  # bounded by client_max_size: 413 beyond it
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_encoding", f"body is not UTF-8: {e.reason}") from None
    try:
        # pydantic-core parses and validates in one pass, without building Python dicts
        # first: the request path's cheapest way from bytes to a checked model.
        return model.model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, "invalid_json", f"body is not JSON: {first['msg']}") from None
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, "invalid_request", f"{where}: {first['msg']}") from None


async def call_downstream(
    upstream: Upstream, method: str, path: str, body: Any = None, retry_after: int = 1
) -> Any:
    """A JSON call to another service. Its overload, 5xx or absence becomes our 503 with
    ``Retry-After``; its 4xx (our request was bad for it) passes on with its reason."""
    where = f"{upstream.url}{path}"
    try:
        if body is None:
            r = await upstream.request(method, path)
        else:
            payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
            r = await upstream.request(method, path, payload, JSON_HEADERS)
        data = orjson.loads(r.body)
    except (OSError, TimeoutError, ValueError) as e:
        raise ApiError(
            503, "downstream_unavailable", f"{where}: {e!r}", retry_after=retry_after
        ) from None
    if r.status == 429 or r.status >= 500:
        raise ApiError(
            503, "downstream_unavailable", f"{where}: {r.status}", retry_after=retry_after
        )
    if r.status >= 400:
        message = data.get("error", {}).get("message", str(r.status))
        raise ApiError(r.status, "rejected_downstream", message)
    return data


class Metrics:
    """The per-stage RED metrics every service exports (names match the operator's PromQL)."""

    def __init__(self, stage: str, registry: CollectorRegistry):
        self.stage = stage
        self.requests = Counter(
            contract.METRIC_REQUESTS, "Requests by response code.", [contract.STAGE_LABEL, "code"],
            registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            contract.METRIC_REQUEST_DURATION, "Request latency.", ["stage"],
            registry=registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.in_flight = Gauge(
            contract.METRIC_IN_FLIGHT, "Requests being served.", ["stage"], registry=registry
        )
        self.info = Gauge(
            contract.METRIC_SERVING_INFO, "The model each route serves now (value 1).",
            ["stage", "route", "model"], registry=registry,
        )  # fmt: skip
        # Bound once: a labels() lookup takes a lock and a dict probe on every request.
        self.stage_in_flight = self.in_flight.labels(stage)
        self.stage_duration = self.duration.labels(stage)
        self._by_code: dict[int, Any] = {}

    def count(self, status: int) -> None:
        """One more response with HTTP ``status``."""
        child = self._by_code.get(status)
        if child is None:
            child = self._by_code[status] = self.requests.labels(self.stage, str(status))
        child.inc()


class TritonStats(Collector):
    """Achieved batch sizes and queue time, read from Triton's statistics API at scrape time.

    Triton counts executions per batch size and total queue nanoseconds per model; exported as
    ``modelpilot_batch_size`` (histogram) and ``modelpilot_queue_duration_seconds`` (summary).
    """

    def __init__(self, stage: str, triton_url: str, models: Callable[[], Iterable[str]]):
        url = triton_url if "://" in triton_url else f"http://{triton_url}"
        self.stage, self.url, self.models = stage, url.rstrip("/"), models

    def collect(self) -> Iterable[Any]:
        batch = HistogramMetricFamily(
            contract.METRIC_BATCH_SIZE, "Achieved Triton batch sizes.", labels=["stage", "model"]
        )
        queue = SummaryMetricFamily(
            contract.METRIC_QUEUE_DURATION,
            "Time in Triton's queue.",
            labels=["stage", "model"],
        )
        # Items (texts, query-passage pairs) per request: what the optimizer sizes batches in.
        inferences = CounterMetricFamily(
            contract.METRIC_MODEL_INFERENCES,
            "Items Triton ran (texts embedded, pairs re-ranked).",
            labels=["stage", "model"],
        )
        requests = CounterMetricFamily(
            contract.METRIC_MODEL_REQUESTS,
            "Requests Triton completed successfully.",
            labels=["stage", "model"],
        )
        for model in self.models():
            try:
                with urllib.request.urlopen(f"{self.url}/v2/models/{model}/stats", timeout=1) as r:
                    stats = json.load(r)["model_stats"]
            except (OSError, ValueError, KeyError):
                continue  # Triton down or model unloaded: a missing series, never a fake 0
            counts: dict[int, int] = {}
            for version in stats:
                for row in version.get("batch_stats", []):
                    size = int(row["batch_size"])
                    counts[size] = counts.get(size, 0) + int(row["compute_infer"]["count"])
                q = version["inference_stats"]["queue"]
                queue.add_metric([self.stage, model], int(q["count"]), int(q["ns"]) / 1e9)
                inferences.add_metric([self.stage, model], int(version.get("inference_count", 0)))
                ok = version["inference_stats"]["success"]
                requests.add_metric([self.stage, model], int(ok["count"]))
            buckets, running = [], 0
            for le in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                running = sum(c for s, c in counts.items() if s <= le)
                buckets.append((str(le), running))
            buckets.append(("+Inf", sum(counts.values())))
            batch.add_metric([self.stage, model], buckets, sum(s * c for s, c in counts.items()))
        yield batch
        yield queue
        yield inferences
        yield requests


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log shippers parse without rules."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(service: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("MODELPILOT_LOG_LEVEL", "INFO").upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    log.info("starting", extra={"fields": {"service": service, "pid": os.getpid()}})


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
