"""Shadow traffic for the variant verification gate.

While the operator verifies a candidate variant, a model stage mirrors a sample of its live
requests to the candidate's Triton model *after* answering with the serving one, and records
how well the candidate's output agrees (embedding: cosine per text; re-ranker: top-k
overlap) and how long it took. The operator reads these from Prometheus and promotes or
rejects the candidate; the client never waits for, nor sees, a shadow call.

``GET|PUT|DELETE /v1/admin/shadow``: ``{"model", "sampleRatio"}`` (the operator pushes it
live; ``shadow`` in service.json restores it when a pod restarts mid-verification).

Metrics (labels ``stage``, ``model`` = the candidate):
  modelpilot_shadow_agreement           histogram, 0..1
  modelpilot_shadow_duration_seconds    histogram
  modelpilot_shadow_errors_total        counter
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiohttp import ClientError, web
from prometheus_client import CollectorRegistry, Counter, Histogram
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from modelpilot import contract
from modelpilot_services.toolkit.http import ApiError, json_response, parse
from modelpilot_services.toolkit.offpath import OffPath

log = logging.getLogger(__name__)
# A candidate that has not loaded by then is dropped: an off-path candidate must not keep a
# serving pod unready (the operator's next push sets it again).
RESTORE_DEADLINE_S = 300
AGREEMENT_BUCKETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)

Compare = Callable[[str], Awaitable[Sequence[float]]]


class NotReady(Exception):
    """Raised by a comparison that cannot run yet (what it compares against is still being
    prepared): the mirrored request is skipped, neither a sample nor an error, and its wait
    is not the candidate's latency."""


class Shadow:
    """Mirrors a sample of requests to a candidate model, off the response path."""

    def __init__(
        self,
        stage: str,
        registry: CollectorRegistry,
        allowed: Iterable[str],
        ensure_loaded: Callable[[str], Awaitable[None]],
    ) -> None:
        self.stage, self.allowed, self.ensure_loaded = stage, tuple(allowed), ensure_loaded
        self.model: str | None = None
        self.ratio = 0.0
        self._restoring: asyncio.Task[None] | None = None
        self.offpath = OffPath()
        self.agreement = Histogram(
            contract.METRIC_SHADOW_AGREEMENT,
            "Agreement of the shadow candidate's output with the serving model's (0..1)",
            ["stage", "model"],
            buckets=AGREEMENT_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            contract.METRIC_SHADOW_DURATION,
            "Time the shadow candidate took for a mirrored request",
            ["stage", "model"],
            registry=registry,
        )
        self.errors = Counter(
            contract.METRIC_SHADOW_ERRORS,
            "Mirrored requests the shadow candidate failed",
            ["stage", "model"],
            registry=registry,
        )

    def routes(self, admin: web.Application) -> None:
        admin.router.add_get(contract.ADMIN_SHADOW_PATH, self.get)
        admin.router.add_put(contract.ADMIN_SHADOW_PATH, self.put)
        admin.router.add_delete(contract.ADMIN_SHADOW_PATH, self.delete)

    def configure(self, config: contract.Shadow | None) -> None:
        """Restore from service.json before start; :meth:`restore` then loads the model."""
        if config is not None and config.model in self.allowed:
            self.model, self.ratio = config.model, config.sampleRatio

    def restore(self) -> None:
        """Load the restored candidate in Triton, in the background (explicit model control
        loads nothing by itself): mirrored calls to an unloaded model would count as the
        candidate's errors, so nothing is mirrored until it is loaded. The pod's Triton may
        start after this service: an unreachable Triton is waited for, never a crash. A
        candidate that cannot load is dropped; the operator's next push sets it again."""
        if self.model is not None:
            model, ratio = self.model, self.ratio
            self.model, self.ratio = None, 0.0
            self._restoring = asyncio.get_running_loop().create_task(self._load(model, ratio))

    async def _load(self, model: str, ratio: float) -> None:
        unreachable = retry_if_exception_type((OSError, asyncio.TimeoutError, ClientError))
        try:
            async for attempt in AsyncRetrying(
                retry=unreachable,
                wait=wait_exponential(multiplier=0.2, max=5),
                stop=stop_after_delay(RESTORE_DEADLINE_S),
                reraise=True,
            ):
                with attempt:
                    await self.ensure_loaded(model)
        except ApiError as exc:
            log.warning("shadow candidate %s not restored: %s", model, exc.message)
            return
        except Exception:  # given up, or unforeseen: the pod serves, without the candidate
            log.exception("shadow candidate %s not restored", model)
            return
        self.model, self.ratio = model, ratio

    def pending(self) -> str | None:
        """Why the pod is not ready yet on the shadow's account: a candidate being restored."""
        if self._restoring is not None and not self._restoring.done():
            return "restoring the shadow candidate"
        return None

    def cancel_restore(self) -> None:
        """An operator's push supersedes a restore still under way; so does shutdown."""
        if self._restoring is not None:
            self._restoring.cancel()
            self._restoring = None

    def _state(self) -> dict[str, Any]:
        return {"model": self.model, "sampleRatio": self.ratio if self.model else 0.0}

    async def get(self, request: web.Request) -> web.Response:
        return json_response(self._state())

    async def put(self, request: web.Request) -> web.Response:
        body = await parse(request, contract.Shadow)
        if body.model not in self.allowed:
            raise ApiError(
                400, "unknown_variant", f"{body.model!r} is not one of {list(self.allowed)}"
            )
        self.cancel_restore()
        await self.ensure_loaded(body.model)  # loaded before the first mirrored request
        self.model, self.ratio = body.model, body.sampleRatio
        return json_response(self._state())

    async def delete(self, request: web.Request) -> web.Response:
        self.cancel_restore()
        self.model, self.ratio = None, 0.0
        return json_response(self._state())

    def mirror(self, serving: str, compare: Compare) -> None:
        """Maybe mirror this request: ``compare(candidate)`` returns agreement values."""
        model = self.model
        if model is not None and model != serving:
            self.offpath.maybe(self.ratio, lambda: self._run(model, compare))

    async def _run(self, model: str, compare: Compare) -> None:
        start = time.perf_counter()
        try:
            values = await compare(model)
        except NotReady:
            return
        except Exception as exc:  # a failing candidate is a finding, not a service error
            self.errors.labels(self.stage, model).inc()
            log.warning("shadow call to %s failed: %s", model, exc)
            return
        self.duration.labels(self.stage, model).observe(time.perf_counter() - start)
        for value in values:
            self.agreement.labels(self.stage, model).observe(min(1.0, max(0.0, float(value))))
