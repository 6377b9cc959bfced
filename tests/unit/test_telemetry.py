"""The Prometheus adapter: parsing (missing data is None, never 0, KEDA-style table), the
series it selects, and which Prometheus it may read and how (allowed endpoints, TLS, auth)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from requests.adapters import HTTPAdapter

from modelpilot.adapters.prometheus import (
    DEFAULT_URL,
    INSTANCE_LABEL,
    NotAllowed,
    PrometheusConfig,
    Telemetry,
    selector,
    target_labels,
)
from modelpilot.optimizer.snapshot import (
    HISTORY_AHEAD_S,
    HISTORY_LOOKBACK_S,
    HISTORY_STEP_S,
    SEASONS_S,
)

pytestmark = pytest.mark.unit

METRIC = re.compile(r"\bmodelpilot_\w+")
MATCHERS = re.compile(r'(\w+)(=~|!~|!=|=)"((?:[^"\\]|\\.)*)"')


def matchers(promql: str, metric_end: int) -> dict[str, str]:
    """The equality matchers of the ``{...}`` right after a metric name (none: {})."""
    if not promql.startswith("{", metric_end):
        return {}
    block = promql[metric_end + 1 : promql.index("}", metric_end)]
    return {k: v for k, op, v in MATCHERS.findall(block) if op == "="}


def fake(answers: dict[str, list[dict[str, Any]]], namespace: str = "ns", name: str = "p") -> Any:
    """A query function answering by the first key contained in the PromQL text. Like
    Prometheus with only this ModelDeployment's series, it fails any query in which a metric
    is not selected by the labels every scrape path gives: namespace and
    app_kubernetes_io_instance."""
    seen: list[str] = []
    wanted = {"namespace": namespace, INSTANCE_LABEL: name}

    def query(promql: str) -> list[dict[str, Any]]:
        seen.append(promql)
        metrics = list(METRIC.finditer(promql))
        assert metrics, promql
        for m in metrics:
            got = matchers(promql, m.end())
            assert {k: got.get(k) for k in wanted} == wanted, f"{m.group()} in {promql}"
        for key, rows in answers.items():
            if key in promql:
                return rows
        return []

    query.seen = seen  # type: ignore[attr-defined]
    return query


def row(value: str, stage: str | None = "embedding") -> dict[str, Any]:
    return {"metric": {"stage": stage} if stage else {}, "value": [1700000000, value]}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([], None),  # empty result
        ([row("NaN")], None),
        ([row("+Inf")], None),
        ([row("-Inf")], None),
        ([row("0")], 0.0),  # a real zero stays zero
        ([row("12.5")], 12.5),
        ([row("3", "embedding"), row("4", "inference")], 3.0),  # several series, by stage
    ],
)
def test_rate_parsing(rows: list[dict[str, Any]], expected: float | None) -> None:
    answers = {"rate(modelpilot_requests_total{": rows, "timestamp(": [row("1700000000", None)]}
    snap = Telemetry("http://unused", query=fake(answers)).snapshot("ns", "p", 1700000001.0)
    tele = snap.stages.get("embedding")
    assert (tele.rate_rps if tele else None) == expected


def test_latency_is_converted_to_milliseconds_and_staleness_is_reported() -> None:
    answers = {
        "histogram_quantile(0.95, sum by (stage, le)": [row("0.25")],
        "modelpilot_query_duration_seconds": [row("0.4", None)],
        "timestamp(": [row("1000", None)],
        "rate(modelpilot_requests_total{": [row("10")],
    }
    query = fake(answers, "ns", "pipe")
    snap = Telemetry("http://unused", query=query).snapshot("ns", "pipe", 1100.0)
    assert snap.stages["embedding"].p95_ms == 250.0
    assert snap.e2e_p95_ms == 400.0
    assert snap.stale(1100.0, 60) == "newest sample is 100s old (limit 60s)"
    assert snap.stale(1030.0, 60) is None
    assert len(query.seen) > 15  # every query passed the selector check


def test_no_samples_at_all_is_stale() -> None:
    snap = Telemetry("http://unused", query=fake({})).snapshot("ns", "p", 5.0)
    assert snap.stages == {} and snap.stale(5.0, 60) == "no samples in Prometheus"


@pytest.mark.parametrize(
    "promql",
    [
        'rate(modelpilot_requests_total{namespace="ns",pipeline="p"}[1m])',  # the old selector
        'rate(modelpilot_requests_total{namespace="ns"}[1m])',
        'rate(modelpilot_requests_total{namespace="ns",app_kubernetes_io_instance="q"}[1m])',
        "rate(modelpilot_requests_total[1m])",
    ],
)
def test_the_fake_refuses_queries_without_the_selector(promql: str) -> None:
    with pytest.raises(AssertionError):
        fake({})(promql)


def test_selector_and_target_labels_name_the_same_series() -> None:
    sel = selector("team-a", "rag")
    assert sel == 'namespace="team-a",app_kubernetes_io_instance="rag"'
    assert dict(MATCHERS.findall(sel)[i][::2] for i in range(2)) == target_labels("team-a", "rag")
    assert selector("a", 'x"y') == 'namespace="a",app_kubernetes_io_instance="x\\"y"'


# -- Which Prometheus: the operator's configuration, not the spec's --------------------------

CONFIG = PrometheusConfig(
    url="http://prometheus-server.monitoring.svc",
    allowed_urls=("https://Thanos.example:9091/", "https://prom.example/prefix"),
)


@pytest.mark.parametrize(
    ("spec_url", "expected"),
    [
        (None, "http://prometheus-server.monitoring.svc"),
        ("", "http://prometheus-server.monitoring.svc"),
        ("http://prometheus-server.monitoring.svc", "http://prometheus-server.monitoring.svc"),
        ("http://prometheus-server.monitoring.svc/", "http://prometheus-server.monitoring.svc"),
        ("https://thanos.example:9091", "https://thanos.example:9091"),
        ("HTTPS://THANOS.example:9091//", "https://thanos.example:9091"),
        ("https://prom.example/prefix/", "https://prom.example/prefix"),
        # refused: anything not exactly an allowed endpoint
        ("http://169.254.169.254/latest/meta-data", None),
        ("http://kubernetes.default.svc", None),
        ("http://thanos.example:9091", None),  # another scheme
        ("https://thanos.example:9092", None),  # another port
        ("https://thanos.example", None),  # the default port is not :9091
        ("https://prom.example", None),  # without the allowed path
        ("https://prom.example/prefix/../admin", None),
        ("https://prom.example/prefix?x=1", None),
        ("https://evil@prom.example/prefix", None),
        ("http://prometheus-server.monitoring.svc.evil.example", None),
    ],
)
def test_resolve(spec_url: str | None, expected: str | None) -> None:
    if expected is not None:
        assert CONFIG.resolve(spec_url) == expected
        return
    with pytest.raises(NotAllowed) as refused:
        CONFIG.resolve(spec_url)
    assert str(refused.value) == (
        f"spec.prometheus.url {spec_url} is not among the endpoints this operator allows "
        "(prometheus.url and prometheus.allowedUrls in the chart's values): "
        "http://prometheus-server.monitoring.svc, https://thanos.example:9091, "
        "https://prom.example/prefix"
    )


def test_refusal_does_not_show_credentials_of_allowed_endpoints() -> None:
    config = PrometheusConfig(url="https://user:s3cret@prom.example")
    assert config.resolve(None) == "https://user:s3cret@prom.example"
    with pytest.raises(NotAllowed, match=r": https://prom\.example$") as refused:
        config.resolve("https://other.example")
    assert "s3cret" not in str(refused.value)


def test_from_env_defaults_verify_tls() -> None:
    config = PrometheusConfig.from_env({})
    assert config.url == DEFAULT_URL and config.allowed_urls == ()
    assert config.verify is True and config.session().auth is None


def test_from_env_reads_the_charts_variables() -> None:
    config = PrometheusConfig.from_env(
        {
            "MODELPILOT_PROMETHEUS_URL": "https://prom.example/",
            "MODELPILOT_PROMETHEUS_ALLOWED_URLS": "https://a.example, https://b.example/x/\n",
            "MODELPILOT_PROMETHEUS_CA_FILE": "/etc/ca/ca.crt",
            "MODELPILOT_PROMETHEUS_TOKEN_FILE": "/etc/auth/token",
            "MODELPILOT_PROMETHEUS_INSECURE_SKIP_VERIFY": "false",
        }
    )
    assert config.url == "https://prom.example"
    assert config.allowed == ("https://prom.example", "https://a.example", "https://b.example/x")
    assert config.verify == "/etc/ca/ca.crt" and config.token_file == "/etc/auth/token"
    insecure = PrometheusConfig.from_env(
        {
            "MODELPILOT_PROMETHEUS_CA_FILE": "/ca",
            "MODELPILOT_PROMETHEUS_INSECURE_SKIP_VERIFY": "true",
        }
    )
    assert insecure.verify is False


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"MODELPILOT_PROMETHEUS_URL": "prometheus:9090"}, "MODELPILOT_PROMETHEUS_URL"),
        ({"MODELPILOT_PROMETHEUS_ALLOWED_URLS": "https://ok, file:///etc/passwd"}, "ALLOWED"),
        ({"MODELPILOT_PROMETHEUS_INSECURE_SKIP_VERIFY": "maybe"}, "expected true or false"),
        ({"MODELPILOT_PROMETHEUS_USERNAME_FILE": "/u"}, "needs both"),
        (
            {
                "MODELPILOT_PROMETHEUS_TOKEN_FILE": "/t",
                "MODELPILOT_PROMETHEUS_USERNAME_FILE": "/u",
                "MODELPILOT_PROMETHEUS_PASSWORD_FILE": "/p",
            },
            "exclusive",
        ),
    ],
)
def test_from_env_rejects_malformed_settings(env: dict[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        PrometheusConfig.from_env(env)


# -- How: what actually goes over the wire (requests' transport replaced) --------------------


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> list[tuple[requests.PreparedRequest, Any]]:
    """Every request PrometheusConnect sends, with the transport arguments requests passes
    (verify, timeout); each answers an empty vector."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    sent: list[tuple[requests.PreparedRequest, Any]] = []

    def send(self: HTTPAdapter, request: requests.PreparedRequest, **kwargs: Any) -> Any:
        sent.append((request, kwargs))
        response = requests.Response()
        response.status_code = 200
        response._content = json.dumps(
            {"status": "success", "data": {"resultType": "vector", "result": []}}
        ).encode()
        response.request, response.url = request, str(request.url)
        return response

    monkeypatch.setattr(HTTPAdapter, "send", send)
    return sent


def test_requests_carry_the_ca_bundle_the_token_and_a_timeout(
    wire: list[tuple[requests.PreparedRequest, Any]], tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("tok-1\n")
    config = PrometheusConfig(
        url="https://prom.example/",
        ca_file=str(tmp_path / "ca.crt"),
        token_file=str(tmp_path / "token"),
        timeout_s=3.0,
    )
    telemetry = config.telemetry(None)
    telemetry.snapshot("ns", "rag", 1.0)
    assert len(wire) > 15
    for request, kwargs in wire:
        parts = urlsplit(str(request.url))
        assert (parts.scheme, parts.netloc) == ("https", "prom.example")
        assert parts.path in ("/api/v1/query", "/api/v1/query_range")  # rate history: range
        assert selector("ns", "rag") in parse_qs(parts.query)["query"][0]
        assert request.headers["Authorization"] == "Bearer tok-1"
        assert kwargs["verify"] == str(tmp_path / "ca.crt")
        assert kwargs["timeout"] == 3.0

    assert {urlsplit(str(r.url)).path for r, _ in wire} == {"/api/v1/query", "/api/v1/query_range"}
    (tmp_path / "token").write_text("tok-2")  # a rotated Secret: read on every request
    wire.clear()
    telemetry.snapshot("ns", "rag", 2.0)
    assert {r.headers["Authorization"] for r, _ in wire} == {"Bearer tok-2"}


def test_basic_auth_and_insecure_skip_verify(
    wire: list[tuple[requests.PreparedRequest, Any]], tmp_path: Path
) -> None:
    (tmp_path / "username").write_text("reader\n")
    (tmp_path / "password").write_text("pa:ss\n")
    config = PrometheusConfig(
        url="https://prom.example",
        username_file=str(tmp_path / "username"),
        password_file=str(tmp_path / "password"),
        insecure_skip_verify=True,
    )
    config.telemetry("https://prom.example/").snapshot("ns", "rag", 1.0)
    expected = "Basic " + base64.b64encode(b"reader:pa:ss").decode()
    assert wire and {r.headers["Authorization"] for r, _ in wire} == {expected}
    assert {kw["verify"] for _, kw in wire} == {False}


def test_default_verifies_tls_with_no_credentials_and_refuses_other_endpoints(
    wire: list[tuple[requests.PreparedRequest, Any]],
) -> None:
    Telemetry("https://prom.example").snapshot("ns", "rag", 1.0)
    PrometheusConfig(url="https://prom.example").telemetry(None).snapshot("ns", "rag", 1.0)
    assert wire and {kw["verify"] for _, kw in wire} == {True}
    assert not any("Authorization" in r.headers for r, _ in wire)
    wire.clear()
    with pytest.raises(NotAllowed):
        PrometheusConfig(url="https://prom.example").telemetry("http://10.0.0.1:9090")
    assert wire == []


def test_the_stages_dispersion_is_recovered_from_each_pods_thinned_moments() -> None:
    """A stage whose per-second arrivals are 0 or 40, half the time each (mean 20, variance
    400: index 20), spread at random over 2 pods: each pod's counts have mean 10 and variance
    400 / 4 + 20 / 4 = 105 (index 10.5). Over 300 s each pod exports 3000 arrivals and
    sum of squares 300 x (105 + 100); the telemetry reads the stage's 20 back."""
    answers = {
        " ^ 2 / ": [row("60000")],  # sum over pods of arrivals^2 / seconds: 2 x 3000^2 / 300
        "count by (stage)": [row("2")],
        "modelpilot_arrivals_squared_total{": [row("123000")],
        "modelpilot_arrivals_total{": [row("6000")],
        "rate(modelpilot_requests_total{": [row("20")],
        "timestamp(": [row("1000", None)],
    }
    telemetry = Telemetry("http://unused", query=fake(answers))
    assert telemetry.dispersion(selector("ns", "p")) == {"embedding": pytest.approx(20.0)}
    snap = telemetry.snapshot("ns", "p", 1000.0)
    assert snap.stages["embedding"].arrival_dispersion == pytest.approx(20.0)
    # Without the counters (an older data plane): unmeasured, never a made-up 1.
    bare = Telemetry("http://unused", query=fake({"rate(modelpilot_requests_total{": [row("5")]}))
    assert bare.snapshot("ns", "p", 1000.0).stages["embedding"].arrival_dispersion is None


def test_tritons_mean_compute_time_per_batch_is_read_in_milliseconds() -> None:
    answers = {
        "rate(modelpilot_compute_duration_seconds_sum{": [row("0.012")],
        "rate(modelpilot_batch_size_sum{": [row("8")],
        "rate(modelpilot_requests_total{": [row("20")],
        "timestamp(": [row("1000", None)],
    }
    snap = Telemetry("http://unused", query=fake(answers)).snapshot("ns", "p", 1000.0)
    assert snap.stages["embedding"].exec_ms == pytest.approx(12.0)
    assert snap.stages["embedding"].batch_size == 8.0


def test_the_rate_history_is_read_on_a_step_grid_for_each_season() -> None:
    calls: list[tuple[str, float, float, int]] = []

    def query_range(promql: str, start: float, end: float, step: int) -> list[Any]:
        calls.append((promql, start, end, step))
        values = [[start + step * k, str(float(k))] for k in range(int((end - start) / step) + 1)]
        del values[3]  # a gap: no sample at that step
        return [{"metric": {"stage": "inference"}, "values": values}]

    telemetry = Telemetry("http://unused", query=fake({}), query_range=query_range)
    got = telemetry.rate_history(selector("ns", "p"), 1_000_030.0)["inference"]
    n = HISTORY_LOOKBACK_S // HISTORY_STEP_S + 1
    assert got.step_s == HISTORY_STEP_S and len(got.recent) == n
    assert got.recent[:5] == (0.0, 1.0, 2.0, None, 4.0)
    assert [s.period_s for s in got.seasons] == list(SEASONS_S)
    assert all(len(s.past) == n + HISTORY_AHEAD_S // HISTORY_STEP_S for s in got.seasons)
    start = calls[0][1]
    assert start % HISTORY_STEP_S == 0 and start <= 1_000_030.0 - HISTORY_LOOKBACK_S
    assert [c[1] for c in calls[1:]] == [start - p for p in SEASONS_S]
    assert all(
        "rate(modelpilot_requests_total{" in c[0] and selector("ns", "p") in c[0] for c in calls
    )
