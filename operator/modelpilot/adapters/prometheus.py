"""Prometheus adapter: the only module that speaks PromQL.

Reads the services' metrics (the ``METRIC_*`` names of :mod:`modelpilot.contract`, which
the services export by the same constants) for one
pipeline, selected by the ``namespace`` and ``app_kubernetes_io_instance`` target labels
(:data:`INSTANCE_LABEL`), and returns a frozen :class:`~modelpilot.optimizer.snapshot.Snapshot`.
Empty results, NaN and +-Inf are ``None`` ("unknown"), never 0. Each query groups
``by (stage)`` so one request serves every stage.

Both scrape paths give those labels: annotation-based scraping (``prometheus.io/scrape`` with
the usual ``labelmap`` of ``__meta_kubernetes_pod_label_(.+)``, as the prometheus-community
chart's ``kubernetes-pods`` job and ``hack/prometheus.sh`` do) and the chart's PodMonitor. The
stage pods carry ``app.kubernetes.io/instance=<ModelDeployment name>``.

Shadow statistics cover ``shadow_window`` (10 minutes by default): a verification needs its
samples within that window. The rate history for seasonal forecasts is three range queries
(the last hour; the same hour a day and a week ago, a little longer).

Which Prometheus is read is operator configuration (:class:`PrometheusConfig`, from the
``MODELPILOT_PROMETHEUS_*`` environment the chart sets): a ModelDeployment's
``spec.prometheus.url`` may only name one of the endpoints it allows, TLS is verified (against
a CA bundle when one is configured) and credentials come from mounted files.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from prometheus_api_client import PrometheusConnect
from requests.auth import AuthBase, HTTPBasicAuth

from modelpilot import contract as C  # the metric names
from modelpilot.optimizer.snapshot import (
    BURST_WINDOW_S,
    HISTORY_AHEAD_S,
    HISTORY_LOOKBACK_S,
    HISTORY_STEP_S,
    RATE_WINDOW_S,
    SEASONS_S,
    SHORT_RATE_WINDOW_S,
    Agreement,
    Band,
    RateHistory,
    SeasonWindow,
    ShadowStats,
    Snapshot,
    StageTelemetry,
)

#: The target label naming the ModelDeployment: the pod label ``app.kubernetes.io/instance``
#: as Prometheus's ``labelmap`` (and the chart's PodMonitor) writes it.
INSTANCE_LABEL = "app_kubernetes_io_instance"

#: A range query: (PromQL, start, end, step in seconds) -> rows with "metric" and "values".
RangeQuery = Callable[[str, float, float, int], list[Any]]

#: Prometheus when neither the environment nor a spec names one.
DEFAULT_URL = "http://prometheus-server.monitoring.svc"

# The operator's environment (set by the chart's deployment.yaml).
ENV_URL = "MODELPILOT_PROMETHEUS_URL"
ENV_ALLOWED_URLS = "MODELPILOT_PROMETHEUS_ALLOWED_URLS"
ENV_CA_FILE = "MODELPILOT_PROMETHEUS_CA_FILE"
ENV_TOKEN_FILE = "MODELPILOT_PROMETHEUS_TOKEN_FILE"
ENV_USERNAME_FILE = "MODELPILOT_PROMETHEUS_USERNAME_FILE"
ENV_PASSWORD_FILE = "MODELPILOT_PROMETHEUS_PASSWORD_FILE"
ENV_INSECURE_SKIP_VERIFY = "MODELPILOT_PROMETHEUS_INSECURE_SKIP_VERIFY"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def selector(namespace: str, name: str) -> str:
    """The PromQL label matchers selecting one ModelDeployment's series."""
    return f"namespace={_quote(namespace)},{INSTANCE_LABEL}={_quote(name)}"


def target_labels(namespace: str, name: str) -> dict[str, str]:
    """The target labels a scrape of one ModelDeployment's pods gives (for file-based
    targets of processes outside the cluster: the same labels the queries select)."""
    return {"namespace": namespace, INSTANCE_LABEL: name}


def normalize_url(url: str) -> str:
    """A URL as compared and used: scheme and host lower-cased, no trailing slash."""
    parts = urlsplit(url.strip())
    userinfo, at, host = parts.netloc.rpartition("@")
    netloc = userinfo + at + host.lower()
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme.lower(), netloc, path, parts.query, parts.fragment))


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class NotAllowed(Exception):
    """A spec names a Prometheus the operator's installation does not allow; ``str()`` is a
    message for a status condition."""


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "false", "0", "no"):
        return False
    if raw in ("true", "1", "yes"):
        return True
    raise ValueError(f"{name}={environ[name]!r}: expected true or false")


def _http_url(name: str, url: str) -> str:
    if urlsplit(url).scheme.lower() not in ("http", "https") or not urlsplit(url).netloc:
        raise ValueError(f"{name}: {url!r} is not an http(s) URL")
    return normalize_url(url)


class _FileAuth(AuthBase):
    """Bearer token or basic auth read from mounted Secret files on every request, so a
    rotated Secret is picked up without a restart."""

    def __init__(
        self,
        token_file: str | None = None,
        username_file: str | None = None,
        password_file: str | None = None,
    ) -> None:
        self.token_file = token_file
        self.username_file = username_file
        self.password_file = password_file

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if self.token_file:
            r.headers["Authorization"] = "Bearer " + Path(self.token_file).read_text().strip()
            return r
        assert self.username_file and self.password_file
        basic = HTTPBasicAuth(
            Path(self.username_file).read_text().strip(),
            Path(self.password_file).read_text().strip(),
        )
        signed: requests.PreparedRequest = basic(r)
        return signed


@dataclass(frozen=True)
class PrometheusConfig:
    """Which Prometheus the operator reads, and how: the installation's choice, not a spec's.

    ``url`` is the default endpoint, ``allowed_urls`` the others a spec may name. ``verify``
    is ``False`` only with ``insecure_skip_verify``; otherwise TLS is verified against
    ``ca_file`` when set, else the system's CAs. Credentials are file paths (mounted
    Secrets): a bearer token, or a username and password for basic auth.
    """

    url: str = DEFAULT_URL
    allowed_urls: tuple[str, ...] = ()
    ca_file: str | None = None
    token_file: str | None = None
    username_file: str | None = None
    password_file: str | None = None
    insecure_skip_verify: bool = False
    timeout_s: float = 5.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> PrometheusConfig:
        """Reads the ``MODELPILOT_PROMETHEUS_*`` variables; raises ``ValueError`` on a
        malformed one (an operator that cannot know its Prometheus should not start)."""
        url = _http_url(ENV_URL, environ.get(ENV_URL) or DEFAULT_URL)
        raw = environ.get(ENV_ALLOWED_URLS, "").replace(",", " ").split()
        allowed = tuple(dict.fromkeys(_http_url(ENV_ALLOWED_URLS, u) for u in raw))
        username = environ.get(ENV_USERNAME_FILE) or None
        password = environ.get(ENV_PASSWORD_FILE) or None
        if bool(username) != bool(password):
            raise ValueError(f"basic auth needs both {ENV_USERNAME_FILE} and {ENV_PASSWORD_FILE}")
        token = environ.get(ENV_TOKEN_FILE) or None
        if token and username:
            raise ValueError(f"{ENV_TOKEN_FILE} and basic auth are exclusive")
        return cls(
            url=url,
            allowed_urls=allowed,
            ca_file=environ.get(ENV_CA_FILE) or None,
            token_file=token,
            username_file=username,
            password_file=password,
            insecure_skip_verify=_flag(environ, ENV_INSECURE_SKIP_VERIFY),
        )

    @property
    def allowed(self) -> tuple[str, ...]:
        """Every endpoint a spec may name, normalised, the default first."""
        return tuple(dict.fromkeys(normalize_url(u) for u in (self.url, *self.allowed_urls)))

    def resolve(self, spec_url: str | None) -> str:
        """The (normalised) URL to read for a spec's ``spec.prometheus.url``: the default
        when it is unset, itself when allowed; raises :class:`NotAllowed` otherwise."""
        if spec_url is None or not spec_url.strip():
            return normalize_url(self.url)
        wanted = normalize_url(spec_url)
        if wanted in self.allowed:
            return wanted
        raise NotAllowed(
            f"spec.prometheus.url {spec_url} is not among the endpoints this operator allows "
            "(prometheus.url and prometheus.allowedUrls in the chart's values): "
            + ", ".join(_without_userinfo(u) for u in self.allowed)
        )

    @property
    def verify(self) -> bool | str:
        """What ``requests`` verifies TLS with: the CA bundle's path, True, or False."""
        if self.insecure_skip_verify:
            return False
        return self.ca_file or True

    def session(self) -> requests.Session:
        """A ``requests`` session with this configuration's TLS and credentials."""
        session = requests.Session()
        session.verify = self.verify
        if self.token_file or self.username_file:
            session.auth = _FileAuth(self.token_file, self.username_file, self.password_file)
        return session

    def telemetry(self, spec_url: str | None, **kwargs: Any) -> Telemetry:
        """A :class:`Telemetry` for ``resolve(spec_url)`` (so :class:`NotAllowed` too) with
        this configuration's TLS, credentials and timeout; ``kwargs`` go to Telemetry."""
        kwargs.setdefault("timeout_s", self.timeout_s)
        return Telemetry(self.resolve(spec_url), session=self.session(), **kwargs)


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class Telemetry:
    """Builds snapshots for one pipeline from a Prometheus server."""

    def __init__(
        self,
        url: str,
        window: str = f"{RATE_WINDOW_S}s",
        short_window: str = f"{SHORT_RATE_WINDOW_S}s",
        shadow_window: str = "10m",
        timeout_s: float = 5.0,
        query: Callable[[str], list[dict[str, Any]]] | None = None,
        session: requests.Session | None = None,
        query_range: RangeQuery | None = None,
    ) -> None:
        """``query`` (instant) and ``query_range`` replace Prometheus (tests; with ``query``
        alone no rate history is read); ``session`` carries TLS and credentials
        (:meth:`PrometheusConfig.session`); without one, TLS is verified against the
        system's CAs."""
        self.window = window
        self.short_window = short_window
        self.shadow_window = shadow_window
        if query is None:
            session = session if session is not None else requests.Session()
            session.request = _with_timeout(session.request, timeout_s)  # type: ignore[method-assign]
            prom = PrometheusConnect(url=normalize_url(url), session=session)
            if hasattr(prom, "ssl_verification"):  # prometheus-api-client < 0.6 passes this
                prom.ssl_verification = session.verify
            query = prom.custom_query

            def query_range(promql: str, start: float, end: float, step: int) -> list[Any]:
                utc = datetime.UTC
                rows = prom.custom_query_range(
                    promql,
                    datetime.datetime.fromtimestamp(start, utc),
                    datetime.datetime.fromtimestamp(end, utc),
                    f"{step}s",
                )
                return list(rows)

        self._query = query
        self._query_range = query_range

    def _by_stage(self, promql: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for row in self._query(promql):
            stage = row.get("metric", {}).get("stage")
            if stage:
                out[stage] = _finite(row["value"][1])
        return out

    def _scalar(self, promql: str) -> float | None:
        rows = self._query(promql)
        return _finite(rows[0]["value"][1]) if rows else None

    def _by_candidate(self, promql: str) -> dict[tuple[str, str], float | None]:
        out: dict[tuple[str, str], float | None] = {}
        for row in self._query(promql):
            labels = row.get("metric", {})
            if labels.get("stage") and labels.get("model"):
                out[(labels["stage"], labels["model"])] = _finite(row["value"][1])
        return out

    def rate_history(self, sel: str, now: float) -> dict[str, RateHistory]:
        """Per stage, the request rate at ``HISTORY_STEP_S`` steps over the last
        ``HISTORY_LOOKBACK_S``, and over the same span one season earlier for each of
        ``SEASONS_S`` (``HISTORY_AHEAD_S`` longer): one range query each."""
        if self._query_range is None:
            return {}
        step = HISTORY_STEP_S
        promql = f"sum by (stage) (rate({C.METRIC_REQUESTS}_total{{{sel}}}[{step}s]))"
        n = HISTORY_LOOKBACK_S // step + 1
        start = math.floor((now - HISTORY_LOOKBACK_S) / step) * step
        recent = self._grid(promql, start, n, step)
        longer = n + HISTORY_AHEAD_S // step
        past = {p: self._grid(promql, start - p, longer, step) for p in SEASONS_S}
        return {
            stage: RateHistory(
                step,
                rates,
                tuple(SeasonWindow(p, got.get(stage, (None,) * longer)) for p, got in past.items()),
            )
            for stage, rates in recent.items()
        }

    def _grid(
        self, promql: str, start: float, count: int, step: int
    ) -> dict[str, tuple[float | None, ...]]:
        """A range query's values per stage on the grid start + k * step, None where absent."""
        assert self._query_range is not None
        out: dict[str, tuple[float | None, ...]] = {}
        for row in self._query_range(promql, start, start + (count - 1) * step, step):
            stage = row.get("metric", {}).get("stage")
            if not stage:
                continue
            values: list[float | None] = [None] * count
            for ts, value in row.get("values", []):
                i = round((float(ts) - start) / step)
                if 0 <= i < count:
                    values[i] = _finite(value)
            out[stage] = tuple(values)
        return out

    def dispersion(self, sel: str) -> dict[str, float]:
        """Per stage, the index of dispersion (variance / mean) of its per-second arrival
        counts over ``BURST_WINDOW_S``, from each pod's moments (``Arrivals`` in the
        services). A pod sees its share of the stage's requests; a Service that spreads them
        at random (kube-proxy picks a backend at random) thins a stage's index ``D`` to
        ``1 + (D - 1) / n`` on each of ``n`` pods, which is undone here."""
        w = f"{BURST_WINDOW_S}s"

        def inc(metric: str) -> str:
            return f"increase({metric}_total{{{sel}}}[{w}])"

        arrivals = self._by_stage(f"sum by (stage) ({inc(C.METRIC_ARRIVALS)})")
        squared = self._by_stage(f"sum by (stage) ({inc(C.METRIC_ARRIVALS_SQUARED)})")
        # sum over pods of (arrivals^2 / seconds): each pod's squared mean, times its seconds
        mean_sq = self._by_stage(
            f"sum by (stage) ({inc(C.METRIC_ARRIVALS)} ^ 2 / {inc(C.METRIC_ARRIVAL_SECONDS)})"
        )
        pods = self._by_stage(f"count by (stage) ({inc(C.METRIC_ARRIVAL_SECONDS)} > 0)")
        out = {}
        for stage, n in pods.items():
            a, q, m = arrivals.get(stage), squared.get(stage), mean_sq.get(stage)
            if not n or not a or q is None or m is None:
                continue
            per_pod = (q - m) / a
            out[stage] = max(0.0, 1.0 + n * (per_pod - 1.0))
        return out

    def shadow(self, sel: str) -> dict[tuple[str, str], ShadowStats]:
        """Per (stage, candidate model): samples, mean agreement, p95 and errors; ``sel``
        are label matchers, e.g. :func:`selector`."""
        w, by = self.shadow_window, "stage, model"
        count = self._by_candidate(
            f"sum by ({by}) (increase({C.METRIC_SHADOW_AGREEMENT}_count{{{sel}}}[{w}]))"
        )
        total = self._by_candidate(
            f"sum by ({by}) (increase({C.METRIC_SHADOW_AGREEMENT}_sum{{{sel}}}[{w}]))"
        )
        p95 = self._by_candidate(
            f"histogram_quantile(0.95, sum by ({by}, le) "
            f"(increase({C.METRIC_SHADOW_DURATION}_bucket{{{sel}}}[{w}])))"
        )
        errors = self._by_candidate(
            f"sum by ({by}) (increase({C.METRIC_SHADOW_ERRORS}_total{{{sel}}}[{w}]))"
        )
        out = {}
        for key in set(count) | set(errors):
            n = count.get(key) or 0.0
            s = total.get(key)
            latency = p95.get(key)
            out[key] = ShadowStats(
                samples=round(n),
                agreement=s / n if n > 0 and s is not None else None,
                p95_ms=None if latency is None else latency * 1000.0,
                errors=round(errors.get(key) or 0.0),
            )
        return out

    def bands(self, sel: str, histogram: str, summary: str) -> tuple[Band, ...]:
        """The cache's bands over the check window: the histogram's count per bucket and the
        summary's mean agreement per ``band`` label (the same edges)."""
        w = self.shadow_window
        cumulative = {
            row["metric"]["le"]: _finite(row["value"][1]) or 0.0
            for row in self._query(f"sum by (le) (increase({histogram}_bucket{{{sel}}}[{w}]))")
            if "le" in row.get("metric", {})
        }

        def by_band(part: str) -> dict[str, float]:
            rows = self._query(f"sum by (band) (increase({summary}_{part}{{{sel}}}[{w}]))")
            return {
                r["metric"]["band"]: _finite(r["value"][1]) or 0.0
                for r in rows
                if "band" in r.get("metric", {})
            }

        total, count = by_band("sum"), by_band("count")
        edges = sorted((float(le), n) for le, n in cumulative.items() if le != "+Inf")
        out, below = [], 0.0
        for edge, n in edges:
            label = f"{edge:g}"
            samples = count.get(label, 0.0)
            out.append(
                Band(
                    edge,
                    max(0.0, n - below),
                    round(samples),
                    total.get(label, 0.0) / samples if samples > 0 else None,
                )
            )
            below = n
        return tuple(out) if below > 0 else ()

    def agreement(self, sel: str, summary: str) -> Agreement | None:
        """A summary's samples and mean over the check window; None without samples."""
        w = self.shadow_window
        n = self._scalar(f"sum(increase({summary}_count{{{sel}}}[{w}]))")
        total = self._scalar(f"sum(increase({summary}_sum{{{sel}}}[{w}]))")
        if not n:
            return None
        return Agreement(round(n), None if total is None else total / n)

    def snapshot(self, namespace: str, name: str, now: float) -> Snapshot:
        """Query Prometheus once per metric family for the ModelDeployment ``name`` in
        ``namespace`` (:func:`selector`); missing data stays ``None``."""
        sel = selector(namespace, name)
        w = self.window

        def quantile(metric: str, q: float, by: str = "stage") -> str:
            return (
                f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}[{w}])))"
            )

        def mean(metric: str) -> str:
            return (
                f"sum by (stage) (rate({metric}_sum{{{sel}}}[{w}])) / "
                f"sum by (stage) (rate({metric}_count{{{sel}}}[{w}]))"
            )

        rate = self._by_stage(f"sum by (stage) (rate({C.METRIC_REQUESTS}_total{{{sel}}}[{w}]))")
        short = self._by_stage(
            f"sum by (stage) (rate({C.METRIC_REQUESTS}_total{{{sel}}}[{self.short_window}]))"
        )
        errors = self._by_stage(
            f'sum by (stage) (rate({C.METRIC_REQUESTS}_total{{{sel},code=~"5.."}}[{w}])) / '
            f"sum by (stage) (rate({C.METRIC_REQUESTS}_total{{{sel}}}[{w}]))"
        )
        p50 = self._by_stage(quantile(C.METRIC_REQUEST_DURATION, 0.5))
        p95 = self._by_stage(quantile(C.METRIC_REQUEST_DURATION, 0.95))
        p99 = self._by_stage(quantile(C.METRIC_REQUEST_DURATION, 0.99))
        queue = self._by_stage(mean(C.METRIC_QUEUE_DURATION))
        batch = self._by_stage(mean(C.METRIC_BATCH_SIZE))
        compute = self._by_stage(mean(C.METRIC_COMPUTE_DURATION))
        items = self._by_stage(
            f"sum by (stage) (rate({C.METRIC_MODEL_INFERENCES}_total{{{sel}}}[{w}])) / "
            f"sum by (stage) (rate({C.METRIC_MODEL_REQUESTS}_total{{{sel}}}[{w}]))"
        )
        in_flight = self._by_stage(f"sum by (stage) ({C.METRIC_IN_FLIGHT}{{{sel}}})")
        hits = self._by_stage(
            f'sum by (stage) (rate({C.METRIC_CACHE_REQUESTS}_total{{{sel},result="hit"}}[{w}]))'
            f" / sum by (stage) (rate({C.METRIC_CACHE_REQUESTS}_total{{{sel}}}[{w}]))"
        )
        small = self._by_stage(
            f'sum by (stage) (rate({C.METRIC_ROUTED_REQUESTS}_total{{{sel},route="small"}}[{w}]))'
            f" / sum by (stage) (rate({C.METRIC_ROUTED_REQUESTS}_total{{{sel}}}[{w}]))"
        )
        e2e = self._scalar(
            f"histogram_quantile(0.95, sum by (le) "
            f"(rate({C.METRIC_QUERY_DURATION}_bucket{{{sel}}}[{w}])))"
        )
        newest = self._scalar(f"max(timestamp({C.METRIC_REQUESTS}_total{{{sel}}}))")
        dispersion = self.dispersion(sel)
        history = self.rate_history(sel, now)

        def ms(v: float | None) -> float | None:
            return None if v is None else v * 1000.0

        stages: dict[str, StageTelemetry] = {}
        for stage in set(rate) | set(p95) | set(in_flight):
            stages[stage] = StageTelemetry(
                rate_rps=rate.get(stage),
                rate_short_rps=short.get(stage),
                arrival_dispersion=dispersion.get(stage),
                rate_history=history.get(stage),
                p50_ms=ms(p50.get(stage)),
                p95_ms=ms(p95.get(stage)),
                p99_ms=ms(p99.get(stage)),
                queue_ms=ms(queue.get(stage)),
                batch_size=batch.get(stage),
                exec_ms=ms(compute.get(stage)),
                items_per_request=items.get(stage),
                error_ratio=errors.get(stage),
                in_flight=in_flight.get(stage),
                cache_hit_ratio=hits.get(stage),
                small_share=small.get(stage),
            )
        return Snapshot(
            time=now,
            newest_sample=newest,
            stages=stages,
            e2e_p95_ms=ms(e2e),
            shadow=self.shadow(sel),
            routing=self.agreement(sel, C.METRIC_ROUTING_AGREEMENT),
            cache=self.bands(sel, C.METRIC_CACHE_SIMILARITY, C.METRIC_CACHE_AGREEMENT),
        )


def _with_timeout(request: Callable[..., Any], timeout_s: float) -> Callable[..., Any]:
    """requests has no session-wide timeout: a hung Prometheus must not hang the operator."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("timeout") is None:  # prometheus-api-client passes timeout=None
            kwargs["timeout"] = timeout_s
        return request(*args, **kwargs)

    return call
