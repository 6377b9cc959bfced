"""Live settings of running pods: read back what each ready pod runs, correct what differs.

The fields in :data:`modelpilot.contract.LIVE_FIELDS` change without a restart: Triton's
dynamic batching and instance count (its model-control API reloads a model with an
overriding config; in-flight requests finish on the old instances), the services' shadow
candidate and the gateway's small share and cache threshold (their admin API).
A pod that starts reads the same settings from its mounted ``service.json``; this module
corrects the pods that run something else, level-triggered: it compares each ready pod's
actual settings with the plan and writes only where they differ. Pods are handled
concurrently with short timeouts and retries with backoff, and one pod's failure never
stops the others.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from modelpilot import contract

TIMEOUT_S = 3.0  # reading a pod's settings
# Writing them: Triton's load call returns when the model is reloaded, and a shadow
# candidate is loaded before the service answers; either can take many seconds on a busy
# node. Never retried after a read timeout: the next pass reads back and decides again.
WRITE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LiveSettings:
    """What every ready pod of a model stage should run now."""

    models: tuple[str, ...]
    max_batch_size: int
    max_queue_delay_us: int
    shadow: contract.Shadow | None
    knobs: tuple[tuple[str, float], ...] = ()  # the gateway's (admin config name, value)
    instances: int = 1

    @property
    def batching(self) -> tuple[int, int, int]:
        return (self.max_batch_size, self.max_queue_delay_us, self.instances)

    @classmethod
    def of(cls, config: contract.ServiceConfig) -> LiveSettings | None:
        """The live part of a stage's service.json; None for a stage without Triton."""
        if not config.models or config.maxBatchSize is None:
            return None
        # The shadow candidate runs the plan's batching too: its latency is compared with the
        # serving variant's, so both are measured under the same settings.
        models = [*config.models]
        if config.shadow is not None and config.shadow.model not in models:
            models.append(config.shadow.model)
        knobs = {"smallShare": config.smallShare, "cacheThreshold": config.cacheThreshold}
        return cls(
            tuple(models),
            config.maxBatchSize,
            config.maxQueueDelayMicroseconds or 0,
            config.shadow,
            tuple((k, v) for k, v in knobs.items() if v is not None),
            config.instances or 1,
        )


def session(
    retries: int = 3, backoff_s: float = 0.2, read_retries: int | None = None
) -> requests.Session:
    """HTTP with retries and exponential backoff on connection errors and 5xx, for every
    method: each call here sets an absolute value, so repeating one is safe."""
    retry = Retry(
        total=retries,
        read=read_retries,
        backoff_factor=backoff_s,
        status_forcelist=(502, 503, 504),
        allowed_methods=None,
        raise_on_status=False,
    )
    s = requests.Session()
    s.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=4))
    return s


class Pod:
    """One pod's live settings: its Triton and its service's admin API."""

    def __init__(
        self,
        triton_url: str,
        admin_url: str,
        token: str | None,
        http: requests.Session | None = None,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.triton, self.admin = triton_url.rstrip("/"), admin_url.rstrip("/")
        self.http = http or session()
        self.writes = session(read_retries=0)
        self.timeout_s = timeout_s
        self.triton_headers = {contract.TRITON_ADMIN_HEADER: token} if token else {}
        self.admin_headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _call(self, method: str, url: str, headers: dict[str, str], body: Any = None) -> Any:
        if method == "GET":
            r = self.http.request(method, url, headers=headers, timeout=self.timeout_s)
        else:
            r = self.writes.request(
                method, url, json=body, headers=headers, timeout=WRITE_TIMEOUT_S
            )
        r.raise_for_status()
        return r.json() if r.content else {}

    def batching(self, model: str) -> tuple[int, int, int]:
        """(max_batch_size, max_queue_delay_us, instances) the model runs with now."""
        config = self._call("GET", f"{self.triton}/v2/models/{model}/config", {})
        delay = (config.get("dynamic_batching") or {}).get("max_queue_delay_microseconds", 0)
        instances = sum(int(g.get("count") or 1) for g in config.get("instance_group") or [])
        return int(config.get("max_batch_size") or 0), int(delay or 0), instances

    def set_batching(
        self, model: str, max_batch_size: int, max_queue_delay_us: int, instances: int = 1
    ) -> None:
        """Reload ``model`` with this batching and instance count (Triton's model-control
        API, restricted). Triton finishes in-flight requests on the old instances."""
        config = {
            "max_batch_size": max_batch_size,
            "dynamic_batching": {"max_queue_delay_microseconds": max_queue_delay_us},
            "instance_group": [{"kind": "KIND_CPU", "count": instances}],
        }
        body = {"parameters": {"config": json.dumps(config)}}
        url = f"{self.triton}/v2/repository/models/{model}/load"
        self._call("POST", url, self.triton_headers, body)

    def shadow(self) -> contract.Shadow | None:
        state = self._call("GET", self.admin + contract.ADMIN_SHADOW_PATH, self.admin_headers)
        return None if not state.get("model") else contract.Shadow.model_validate(state)

    def set_shadow(self, shadow: contract.Shadow | None) -> None:
        url = self.admin + contract.ADMIN_SHADOW_PATH
        if shadow is None:
            self._call("DELETE", url, self.admin_headers)
        else:
            self._call("PUT", url, self.admin_headers, shadow.model_dump())

    def unavailable(self, models: Sequence[str]) -> dict[str, str]:
        """The ``models`` Triton does not serve and will not without a change, each with
        Triton's own message: not in the repository, or failed to load (a model still
        loading, or not asked to load yet, is not a finding)."""
        out: dict[str, str] = {}
        index: dict[str, Any] | None = None
        for model in models:
            r = self.http.get(f"{self.triton}/v2/models/{model}/ready", timeout=self.timeout_s)
            if r.status_code == 200:
                continue
            if index is None:  # a read, though a POST (and restricted: the token)
                url = f"{self.triton}/v2/repository/index"
                r = self.http.post(
                    url, json={}, headers=self.triton_headers, timeout=self.timeout_s
                )
                r.raise_for_status()
                index = {row.get("name"): row for row in r.json()}
            row = index.get(model)
            if row is None:  # not in the repository: Triton says why
                r = self.http.get(f"{self.triton}/v2/models/{model}", timeout=self.timeout_s)
                out[model] = _error(r) or f"HTTP {r.status_code} for model {model}"
            elif row.get("state") == "UNAVAILABLE" and row.get("reason"):
                out[model] = str(row["reason"])[:500]
        return out

    def knobs(self) -> dict[str, Any]:
        """The gateway's live knobs (admin config)."""
        return dict(self._call("GET", self.admin + contract.ADMIN_CONFIG_PATH, self.admin_headers))

    def set_knobs(self, values: dict[str, float]) -> None:
        self._call("PATCH", self.admin + contract.ADMIN_CONFIG_PATH, self.admin_headers, values)

    def sync(self, want: LiveSettings) -> list[str]:
        """Make this pod run ``want``; returns what it corrected (empty: it already did)."""
        corrected = []
        # The shadow first: setting one loads its candidate, whose batching is then checked.
        if self.shadow() != want.shadow:
            self.set_shadow(want.shadow)
            corrected.append("shadow")
        for model in want.models:
            if self.batching(model) != want.batching:
                self.set_batching(model, *want.batching)
                corrected.append(f"batching of {model}")
        if want.knobs:
            have = self.knobs()
            off = {k: v for k, v in want.knobs if have.get(k) != v}
            if off:
                self.set_knobs(off)
                corrected.extend(sorted(off))
        return corrected


@dataclass(frozen=True)
class PodSync:
    pod: str
    corrected: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class StageSync:
    """One stage's pass: how many ready pods run the plan now, and what it took."""

    pods: tuple[PodSync, ...]
    rolling: int = 0  # ready pods of an older template, which the rollout replaces
    unavailable: Mapping[str, str] = field(default_factory=dict)  # model -> why (load check)

    @property
    def message(self) -> str | None:
        """Why ready pods are off the plan, or None: stable while the causes are."""
        parts = [f"{p.pod}: {p.error}" for p in self.failed]
        if self.rolling:
            parts.append(f"{self.rolling} pod(s) of an older template, rolling out")
        return "; ".join(parts)[:1024] or None

    @property
    def on_plan(self) -> int:
        return sum(1 for p in self.pods if p.error is None)

    @property
    def corrected(self) -> tuple[PodSync, ...]:
        return tuple(p for p in self.pods if p.corrected and p.error is None)

    @property
    def failed(self) -> tuple[PodSync, ...]:
        return tuple(p for p in self.pods if p.error is not None)


def _error(r: requests.Response) -> str | None:
    """The message of Triton's ``{"error": ...}`` body, if it has one."""
    try:
        detail = r.json().get("error")
    except ValueError:
        return None
    detail = detail.get("message") if isinstance(detail, dict) else detail
    return str(detail)[:500] if detail else None


def describe(exc: BaseException) -> str:
    """A stable one-line cause (no object addresses or timings), so that status and Events
    change only when the cause does."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        r = exc.response
        detail = _error(r)
        return f"HTTP {r.status_code} from {r.request.method} {r.url}" + (
            f": {detail[:200]}" if detail else ""
        )
    if isinstance(exc, requests.RequestException) and exc.request is not None:
        return f"{type(exc).__name__} on {exc.request.method} {exc.request.url}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def pod_at(ip: str, token: str | None, timeout_s: float = TIMEOUT_S) -> Pod:
    """The pod at ``ip``, on the contract's Triton and admin ports."""
    return Pod(
        f"http://{ip}:{contract.TRITON_PORTS['http']}",
        f"http://{ip}:{contract.ADMIN_PORT}",
        token,
        timeout_s=timeout_s,
    )


def sync_pods(
    pods: Sequence[tuple[str, Pod]], want: LiveSettings, pool: ThreadPoolExecutor, rolling: int = 0
) -> StageSync:
    """Sync every ``(name, pod)`` concurrently; a failure is that pod's result only."""

    def one(name: str, pod: Pod) -> PodSync:
        try:
            return PodSync(name, tuple(pod.sync(want)))
        except Exception as exc:  # one pod's failure is its own result, never the stage's
            return PodSync(name, error=describe(exc))
        finally:
            pod.http.close()
            pod.writes.close()

    return StageSync(tuple(pool.map(lambda p: one(*p), pods)), rolling)


def check_loads(
    pods: Sequence[tuple[str, Pod]], models: Sequence[str], pool: ThreadPoolExecutor
) -> dict[str, str]:
    """Load checks on every ``(name, pod)`` of the current template, ready or not: the
    ``models`` some pod's Triton does not serve and will not, with Triton's message and the
    pod. A pod that does not answer (still starting) is no finding."""

    def one(name: str, pod: Pod) -> dict[str, str]:
        try:
            return {m: f"{why} (pod {name})" for m, why in pod.unavailable(models).items()}
        except Exception:  # unreachable or starting: the readiness probe reports that
            return {}
        finally:
            pod.http.close()
            pod.writes.close()

    found: dict[str, str] = {}
    for result in pool.map(lambda p: one(*p), pods):
        for model, why in result.items():
            found.setdefault(model, why)
    return found
