"""kopf wiring: thin handlers that hand every event to the reconciler.

Run with ``kopf run -m modelpilot.handlers --all-namespaces`` (``make run``). kopf's own
bookkeeping goes into annotations, never into the user's status.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from typing import Any

import kopf

from modelpilot.api.v1alpha1 import GROUP, PLURAL, VERSION
from modelpilot.kube import Kube, new_api_client, owner_of
from modelpilot.optimize import Optimizer
from modelpilot.optimizer import profiles
from modelpilot.optimizer.snapshot import Snapshot
from modelpilot.reconcile import Reconciler, TransientError
from modelpilot.render import Defaults
from modelpilot.shadow import push_shadow
from modelpilot.telemetry import Telemetry
from modelpilot.triton import push_batching

MANAGED = {"app.kubernetes.io/managed-by": "modelpilot"}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = 30  # kopf's own events only for warnings; ours are explicit
    settings.watching.server_timeout = 300
    settings.networking.error_backoffs = [1, 2, 5, 10, 30]
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    kube = Kube(new_api_client(os.environ.get("KUBECONFIG")))
    defaults = Defaults(
        image_repository=os.environ.get("MODELPILOT_IMAGE_REPOSITORY", Defaults.image_repository),
        image_tag=os.environ.get("MODELPILOT_IMAGE_TAG", Defaults.image_tag),
        triton_image=os.environ.get("MODELPILOT_TRITON_IMAGE", Defaults.triton_image),
    )
    memo.reconciler = Reconciler(kube, defaults)
    memo.locks = {}
    memo.queued = set()
    memo.locks_guard = threading.Lock()
    # Handlers are short, blocking API calls: more threads than kopf's default (CPUs + 4).
    settings.execution.max_workers = int(os.environ.get("MODELPILOT_WORKERS", "16"))
    profile_path = os.environ.get("MODELPILOT_PROFILES")
    # Live updates go to pod IPs: off where the operator cannot reach pods (tests on kwok).
    live = os.environ.get("MODELPILOT_LIVE_UPDATES", "true") == "true"
    memo.optimizer = Optimizer(
        kube=kube,
        reconciler=memo.reconciler,
        profiles=profiles.load(profile_path) if profile_path else profiles.Profiles({}),
        snapshot_source=_snapshot,
        default_prometheus_url=os.environ.get(
            "MODELPILOT_PROMETHEUS_URL", "http://prometheus-server.monitoring.svc"
        ),
        push_batching=push_batching(kube) if live else None,
        push_shadow=push_shadow(kube) if live else None,
    )


@functools.lru_cache(maxsize=64)
def _telemetry(url: str) -> Telemetry:
    """One Prometheus client (and its HTTP connection pool) per URL, not one per tick."""
    return Telemetry(url)


def _snapshot(url: str, namespace: str, name: str, now: float) -> Snapshot:
    return _telemetry(url).snapshot(namespace, name, now)


def _lock(memo: kopf.Memo, namespace: str, name: str) -> threading.Lock:
    with memo.locks_guard:
        lock: threading.Lock = memo.locks.setdefault((namespace, name), threading.Lock())
        return lock


def _reconcile(
    memo: kopf.Memo, namespace: str, name: str, retry: int = 0, coalesce: bool = False
) -> None:
    """Reconcile one object, one run at a time per object.

    With ``coalesce`` (child events), a run that would only queue behind another queued run
    is dropped: reconcile is level-triggered, so the queued run sees the newest state. A
    burst of child events (a rollout's status updates) then costs two runs, not one each.
    """
    key = (namespace, name)
    if coalesce:
        with memo.locks_guard:
            if key in memo.queued:
                return
            memo.queued.add(key)
    with _lock(memo, namespace, name):
        if coalesce:
            with memo.locks_guard:
                memo.queued.discard(key)
        try:
            memo.reconciler.reconcile(namespace, name, attempt=retry)
        except TransientError as exc:
            # Exponential backoff, capped: a broken object never becomes a hot loop.
            raise kopf.TemporaryError(str(exc), delay=min(300, 5 * 2**retry)) from exc


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def reconcile_model_deployment(
    namespace: str | None, name: str, memo: kopf.Memo, retry: int, **_: Any
) -> None:
    assert namespace  # the CRD is namespaced
    _reconcile(memo, namespace, name, retry)


def _ours(body: kopf.Body, **_: Any) -> bool:
    return owner_of(body) is not None


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED, when=_ours)
@kopf.on.event("v1", "services", labels=MANAGED, when=_ours)
@kopf.on.event("v1", "configmaps", labels=MANAGED, when=_ours)
@kopf.on.event("v1", "persistentvolumeclaims", labels=MANAGED, when=_ours)
def child_changed(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """A child was edited, deleted or changed status: bring its owner back to the spec."""
    owner = owner_of(body)
    if owner is None or namespace is None or event.get("type") is None:
        return
    if event["type"] != "DELETED" and memo.reconciler.kube.is_own_echo(body):
        return  # the watch echoing our own apply: nothing changed since
    try:
        _reconcile(memo, namespace, owner, coalesce=True)
    except kopf.TemporaryError:
        pass  # the owner's own handlers retry; a child event is only a nudge


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5)
async def optimize(
    stopped: kopf.DaemonStopped,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    logger: Any,
    **_: Any,
) -> None:
    """The self-optimizing loop: one decision every spec.optimizer.intervalSeconds.

    Async on purpose: a sync daemon would hold one of kopf's few executor threads for its
    whole life, so a handful of ModelDeployments would starve every other handler. Only
    each short tick runs in a thread.
    """
    assert namespace
    while not stopped:
        try:
            interval = await asyncio.to_thread(_tick, memo, namespace, name, logger)
        except Exception as exc:  # a failed tick is retried at the next interval
            logger.warning(f"optimizer tick failed: {exc}")
            interval = 30
        await stopped.wait(interval)


def _tick(memo: kopf.Memo, namespace: str, name: str, logger: Any) -> int:
    """One optimizer decision; returns the seconds until the next."""
    with _lock(memo, namespace, name):
        decision = memo.optimizer.tick(namespace, name)
    if decision is not None and decision.changed:
        logger.info(f"optimizer: {decision.summary}: {'; '.join(decision.reasons)}")
    return int(memo.optimizer.intervals.get((namespace, name), 30))
