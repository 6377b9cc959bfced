"""kopf wiring: thin handlers that hand every event to the reconciler.

``modelpilot-operator`` (``modelpilot.controller.main``, ``make run``) runs them while it leads.
kopf's own bookkeeping goes into annotations, never into the user's status.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from modelpilot.adapters.kube import Kube, new_api_client, owner_of
from modelpilot.adapters.prometheus import NotAllowed, PrometheusConfig, Telemetry
from modelpilot.api.v1alpha1 import GROUP, PLURAL, VERSION, ModelDeploymentSpec
from modelpilot.contract import MODEL_STAGES
from modelpilot.controller import metrics
from modelpilot.controller.actuate import Actuator
from modelpilot.controller.conditions import merge_patch, rfc3339
from modelpilot.controller.optimizer_loop import OptimizerLoop
from modelpilot.controller.reconcile import Reconciler, TransientError
from modelpilot.optimizer import profiles
from modelpilot.render import plan as plans
from modelpilot.render.children import MANAGED_BY, Defaults

MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}

# A model that did not load is tried again no sooner than this, whatever retryAfterSeconds
# says (0 would drop and re-add the record, with its Event and reconcile, on every pass).
LOAD_RETRY_MIN_S = 300


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
    # Watching named namespaces (the chart's Roles, no cluster scope), kopf would first try
    # to list every namespace, fail with 403 six times and only then use the named ones.
    settings.scanning.disabled = os.environ.get("MODELPILOT_NAMESPACED") == "true"
    kube = Kube(new_api_client(os.environ.get("KUBECONFIG")))
    env = os.environ
    defaults = Defaults(
        image_repository=env.get("MODELPILOT_IMAGE_REPOSITORY", Defaults.image_repository),
        image_tag=env.get("MODELPILOT_IMAGE_TAG", Defaults.image_tag),
        triton_image=env.get("MODELPILOT_TRITON_IMAGE", Defaults.triton_image),
        operator_namespace=env.get("MODELPILOT_OPERATOR_NAMESPACE", ""),
        operator_labels=_labels(env.get("MODELPILOT_OPERATOR_LABELS", "")),
    )
    prometheus = PrometheusConfig.from_env(env)
    memo.prometheus = prometheus
    memo.actuator = Actuator(kube, defaults, admin_key=_admin_key(env))
    profile_path = env.get("MODELPILOT_PROFILES")
    measured = profiles.load(profile_path) if profile_path else profiles.Profiles({})
    memo.reconciler = Reconciler(
        kube, memo.actuator, check_spec=_prometheus_check(prometheus), profiles=measured
    )
    memo.locks = {}
    memo.queued = set()
    memo.ready_pods = set()
    memo.live_pool = ThreadPoolExecutor(4, thread_name_prefix="pod-sync")
    memo.locks_guard = threading.Lock()
    # Handlers are short, blocking API calls: more threads than kopf's default (CPUs + 4).
    settings.execution.max_workers = int(env.get("MODELPILOT_WORKERS", "16"))
    # Live settings go to pod IPs: off where the operator cannot reach pods (kwok nodes).
    memo.live = env.get("MODELPILOT_LIVE_UPDATES", "true") == "true"
    memo.optimizer = OptimizerLoop(
        kube=kube,
        reconciler=memo.reconciler,
        profiles=measured,
        snapshot_source=lambda url, ns, name, now: _telemetry(prometheus, url).snapshot(
            ns, name, now
        ),
        prometheus_url=prometheus.resolve,
    )


def _admin_key(env: Mapping[str, str]) -> bytes | None:
    """The key the ModelDeployments' admin tokens derive from (the chart mounts a Secret)."""
    if path := env.get("MODELPILOT_ADMIN_KEY_FILE"):
        with open(path, "rb") as f:
            return f.read().strip()
    raw = env.get("MODELPILOT_ADMIN_KEY")
    return raw.encode() if raw else None


def _labels(raw: str) -> dict[str, str]:
    """``a=b,c=d`` -> {"a": "b", "c": "d"}."""
    return dict(p.split("=", 1) for p in raw.split(",") if "=" in p)


def _prometheus_check(
    prometheus: PrometheusConfig,
) -> Any:
    def check(spec: ModelDeploymentSpec) -> tuple[str, str] | None:
        try:
            prometheus.resolve(spec.prometheus.url)
        except NotAllowed as exc:
            return "PrometheusNotAllowed", str(exc)
        return None

    return check


@functools.lru_cache(maxsize=64)
def _telemetry(prometheus: PrometheusConfig, url: str) -> Telemetry:
    """One Prometheus client (and its HTTP connection pool) per URL, not one per tick."""
    return prometheus.telemetry(url)


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
    lock = _lock(memo, namespace, name)
    with metrics.RECONCILE_WAITING.track_inprogress():
        lock.acquire()
    try:
        if coalesce:
            with memo.locks_guard:
                memo.queued.discard(key)
        start, outcome = time.monotonic(), "error"
        try:
            memo.reconciler.reconcile(namespace, name, attempt=retry)
            outcome = "ok"
        except TransientError as exc:
            outcome = "retry"
            # Exponential backoff, capped: a broken object never becomes a hot loop.
            raise kopf.TemporaryError(str(exc), delay=min(300, 5 * 2**retry)) from exc
        finally:
            metrics.RECONCILE_SECONDS.labels(outcome).observe(time.monotonic() - start)
    finally:
        lock.release()


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
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED, when=_ours)
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
    """One optimizer decision, then the live sync; returns the seconds until the next.
    Only the decision holds the object's lock: reading Prometheus and syncing pods can be
    slow, and a reconcile (a new object, a child's status) must not wait for them."""
    with metrics.TICK_SECONDS.time():
        observed = memo.optimizer.observe(namespace, name)  # Prometheus, outside the lock
        with _lock(memo, namespace, name):
            decision = memo.optimizer.act(namespace, name, observed)
    if decision is not None:
        kind = "held" if decision.hold else "changed" if decision.changed else "unchanged"
        metrics.DECISIONS.labels(kind).inc()
    if decision is not None and decision.changed:
        logger.info(f"optimizer: {decision.summary}: {'; '.join(decision.reasons)}")
    _sync_live(memo, namespace, name)
    return int(memo.optimizer.intervals.get((namespace, name), 30))


def _sync_live(memo: kopf.Memo, namespace: str, name: str) -> None:
    """Bring every ready model pod to the plan's live settings; record per stage how many
    run it. Coalesced per object: a sync asked for while one runs is folded into one more."""
    if not memo.live:
        return
    key = ("live", namespace, name)
    with memo.locks_guard:
        if key in memo.queued:
            return
        memo.queued.add(key)
    with _lock(memo, "live/" + namespace, name):
        with memo.locks_guard:
            memo.queued.discard(key)
        md = memo.reconciler.kube.get_model_deployment(namespace, name)
        if md is None or md["metadata"].get("deletionTimestamp"):
            return
        try:
            spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
        except ValueError:
            return
        status = md.get("status") or {}
        plan = plans.resume(spec, status.get("stages") or {}, memo.reconciler.quality(spec))
        synced = memo.actuator.sync_live(md, spec, plan)
        stages, found = {}, []
        for stage, result in synced.items():
            records, new = plans.record_unavailable(
                spec.model_stage(stage),
                (status.get("stages") or {}).get(stage),
                result.unavailable,
                time.time(),
                max(spec.optimizer.verification.retry_after_seconds, LOAD_RETRY_MIN_S),
            )
            stages[stage] = {
                "podsOnPlan": result.on_plan,
                "liveMessage": result.message,
                "unavailable": records,
            }
            found += [(stage, r) for r in new]
        if merge_patch(status, {"stages": stages}) != status:
            memo.reconciler.kube.patch_status(namespace, name, {"stages": stages})
        for stage, r in found:
            memo.reconciler.kube.event(
                md,
                "Warning",
                "ModelUnavailable",
                f"{stage}/{r['variant']}: model {r['model']} does not load: {r['reason']}; "
                f"not used until {rfc3339(r['until'])} or until its model changes",
            )
    if found:  # the plan moves off it now, not at the next change
        with _lock(memo, namespace, name):
            memo.reconciler.reconcile(namespace, name)


def _model_pod(labels: kopf.Labels, **_: Any) -> bool:
    return labels.get("app.kubernetes.io/component") in MODEL_STAGES


@kopf.on.event("v1", "pods", labels=MANAGED, when=_model_pod)
def pod_changed(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """A model pod became Ready: check it runs the plan's live settings now, not at the
    next tick (it normally does already: it read them from its mounted config). The sync
    runs in a pool of its own, so slow pods never hold kopf's handler threads."""
    uid = body.get("metadata", {}).get("uid")
    owner = (body.get("metadata", {}).get("labels") or {}).get("app.kubernetes.io/instance")
    if namespace is None or owner is None or event.get("type") == "DELETED":
        memo.ready_pods.discard(uid)
        return
    conditions = body.get("status", {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    if not ready:
        memo.ready_pods.discard(uid)
    elif uid not in memo.ready_pods:  # the transition to Ready, not every later event
        memo.ready_pods.add(uid)
        memo.live_pool.submit(_sync_live, memo, namespace, owner)
