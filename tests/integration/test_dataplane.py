"""The data plane on real Triton (the nvidia-pytriton wheel's tritonserver) with the real
all-MiniLM-L6-v2 weights: answers, live batching, durability, back-pressure, bad input."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from modelpilot import contract
from modelpilot.adapters.live import LiveSettings, Pod, check_loads, sync_pods
from modelpilot_services.devtools.stack import Stack, http_ok
from modelpilot_services.models import calibration, tritonserve
from modelpilot_services.stages.routing import position
from tests.dataplane.client import call, ok
from tests.helpers import free_port, start_service, wait_for

pytestmark = pytest.mark.integration


def ingest_corpus(stack: Stack, docs: list[str], prefix: str) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(len(docs))]
    for start in range(0, len(docs), 16):
        batch = [
            {"id": i, "text": d, "metadata": {"corpus": prefix}}
            for i, d in zip(ids[start : start + 16], docs[start : start + 16], strict=True)
        ]
        body = ok("POST", f"{stack.url('ingestion')}/v1/documents", {"documents": batch})
        assert body["acknowledged"] == [d["id"] for d in batch]
    return ids


def test_known_answer_queries_find_their_document_in_the_top_3(data_plane: Stack) -> None:
    docs = calibration.corpus(limit=100)
    ids = ingest_corpus(data_plane, docs, "ka")
    hits = 0
    for doc_id, query in zip(ids, calibration.queries(docs), strict=True):
        answer = ok(
            "POST",
            f"{data_plane.url('inference')}/v1/query",
            {"query": query, "top_k": 3, "filter": {"corpus": "ka"}},
        )
        assert (
            answer["variant"]
            == {"small": "reranker_small", "large": "reranker_large"}[answer["route"]]
        )
        assert len(answer["results"]) == 3
        hits += doc_id in [r["document_id"] for r in answer["results"]]
    assert hits / len(ids) >= 0.9, f"top-3 hit rate {hits / len(ids):.2f}"

    # The same question again is served from the semantic cache, with the same answer.
    again = ok(
        "POST",
        f"{data_plane.url('inference')}/v1/query",
        {"query": calibration.queries(docs)[0], "top_k": 3, "filter": {"corpus": "ka"}},
    )
    assert again["cached"] is True


def _routed(stack: Stack, url: str, queries: list[str]) -> list[tuple[str, str]]:
    """(route, re-ranker model) of each query through the gateway at ``url`` (each query
    new to it, so none is a semantic-cache hit)."""
    out = []
    for q in queries:
        answer = ok("POST", f"{url}/v1/query", {"query": q, "top_k": 3, "filter": {"corpus": "rt"}})
        assert answer["cached"] is False
        out.append((answer["route"], answer["variant"]))
    return out


def test_the_small_share_decides_every_route_and_changes_live(data_plane: Stack) -> None:
    """At share 0 every query goes to the large re-ranker, at 1 every one to the small; in
    between, each query by the hash of its text (the same route every time); a change
    applies to the next query."""
    docs = calibration.corpus(limit=40)
    ingest_corpus(data_plane, docs, "rt")
    queries = calibration.queries(docs)
    gateway, admin = data_plane.url("inference"), data_plane.admin_url("inference")
    before = ok("GET", admin + contract.ADMIN_CONFIG_PATH)["smallShare"]
    try:
        ok("PATCH", admin + contract.ADMIN_CONFIG_PATH, {"smallShare": 0.0})
        assert set(_routed(data_plane, gateway, queries[:8])) == {("large", "reranker_large")}
        ok("PATCH", admin + contract.ADMIN_CONFIG_PATH, {"smallShare": 1.0})
        assert set(_routed(data_plane, gateway, queries[8:16])) == {("small", "reranker_small")}
        # Between the extremes each query goes by its hash: a share at the median splits them.
        mid = sorted(position(q) for q in queries[16:32])[8]
        ok("PATCH", admin + contract.ADMIN_CONFIG_PATH, {"smallShare": mid})
        routes = dict(
            zip(queries[16:32], _routed(data_plane, gateway, queries[16:32]), strict=True)
        )
        assert {q for q, (r, _) in routes.items() if r == "small"} == {
            q for q in queries[16:32] if position(q) < mid
        }
        assert sum(r == "small" for r, _ in routes.values()) == 8
    finally:
        ok("PATCH", admin + contract.ADMIN_CONFIG_PATH, {"smallShare": before})


def test_with_routing_off_every_query_goes_to_the_planned_variant(
    data_plane: Stack, tmp_path: Path
) -> None:
    """routing.mode Off: both routes are the planned variant's model, even a forced route."""
    docs = calibration.corpus(limit=20)
    ingest_corpus(data_plane, docs, "rt")
    config = tmp_path / "service.json"
    planned = {
        "stage": "inference",
        "variant": "reranker-large",
        "model": "reranker_large",
        "variants": {"reranker-large": "reranker_large", "reranker-small": "reranker_small"},
        "routing": {
            "mode": "Off",
            "smallVariant": "reranker-small",
            "largeVariant": "reranker-large",
        },
    }
    config.write_text(json.dumps(planned))
    env = {"MODELPILOT_SERVICE_CONFIG": str(config), contract.ENV_ADMIN_PORT: str(free_port())}
    with _spare_service(data_plane, "inference", env, ready_timeout=120) as url:
        queries = [f"{q} (off)" for q in calibration.queries(docs)[:6]]
        assert {m for _, m in _routed(data_plane, url, queries)} == {"reranker_large"}
        forced = ok("POST", f"{url}/v1/query", {"query": "forced small", "route": "small"})
        assert forced["variant"] == "reranker_large"


def _samples(url: str, metric: str) -> dict[tuple[str, str], float]:
    """(sample name, its band or le label) -> value, from a service's /metrics."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, s.labels.get("band") or s.labels.get("le") or ""): s.value
        for family in text_string_to_metric_families(text)
        if family.name == metric
        for s in family.samples
    }


def test_the_gateway_measures_small_large_agreement_on_sampled_queries(
    data_plane: Stack,
) -> None:
    """With sampleRatio 1 every routed query is re-ranked by the other model too, off the
    response path, and the two rankings' top-3 overlap recorded: what the optimizer tunes
    the small share from. A cached answer is not routed, so it is not sampled."""
    docs = calibration.corpus(limit=30)
    ingest_corpus(data_plane, docs, "rt")
    queries = [f"{q} (agreement)" for q in calibration.queries(docs)[:12]]
    env = {contract.ENV_ADMIN_PORT: str(free_port()), "MODELPILOT_SAMPLE_RATIO": "1"}
    with _spare_service(data_plane, "inference", env, ready_timeout=120) as url:
        assert {r for r, _ in _routed(data_plane, url, queries)} == {"small", "large"}
        count = f"{contract.METRIC_ROUTING_AGREEMENT}_count"

        def measured() -> dict[tuple[str, str], float] | None:
            got = _samples(url, contract.METRIC_ROUTING_AGREEMENT)
            return got if got.get((count, ""), 0) >= len(queries) else None

        got = wait_for(measured, 120, what="an agreement sample per query")
        assert got[(count, "")] == len(queries)
        mean = got[(f"{contract.METRIC_ROUTING_AGREEMENT}_sum", "")] / len(queries)
        assert 0.3 <= mean <= 1.0  # README: small and large agree 0.87 on real queries
        body = {"query": queries[0], "top_k": 3, "filter": {"corpus": "rt"}}
        assert ok("POST", f"{url}/v1/query", body)["cached"] is True
        again = _samples(url, contract.METRIC_ROUTING_AGREEMENT)
        assert again[(count, "")] == len(queries)


def test_the_cache_checks_its_hits_and_near_misses_by_similarity_band(data_plane: Stack) -> None:
    """A repeat is a hit, recomputed off the response path and compared (the same answer:
    agreement 1 in the top band); a different query with an entry near it is a near miss,
    its fresh answer compared with the entry's at no extra call."""
    docs = calibration.corpus(limit=30)
    ingest_corpus(data_plane, docs, "rt")
    first, other = calibration.queries(docs)[3], calibration.queries(docs)[9]
    env = {
        contract.ENV_ADMIN_PORT: str(free_port()),
        "MODELPILOT_SAMPLE_RATIO": "1",
        "MODELPILOT_CACHE_THRESHOLD": "0.97",
    }
    # one route for both (a near miss is compared only on the route its entry took)
    body = {"top_k": 3, "filter": {"corpus": "rt"}, "route": "small"}
    with _spare_service(data_plane, "inference", env, ready_timeout=120) as url:
        assert ok("POST", f"{url}/v1/query", {**body, "query": first})["cached"] is False
        assert ok("POST", f"{url}/v1/query", {**body, "query": first})["cached"] is True
        assert ok("POST", f"{url}/v1/query", {**body, "query": other})["cached"] is False
        metric = contract.METRIC_CACHE_AGREEMENT

        def checked() -> dict[tuple[str, str], float] | None:
            got = _samples(url, metric)
            return (
                got if sum(v for (n, _), v in got.items() if n == f"{metric}_count") >= 2 else None
            )

        got = wait_for(checked, 120, what="the hit's check and the near miss's")
        assert got[(f"{metric}_count", "1")] == 1 and got[(f"{metric}_sum", "1")] == 1.0
        near = [b for (n, b), v in got.items() if n == f"{metric}_count" and b != "1" and v]
        assert len(near) == 1 and float(near[0]) < 0.97  # the miss, in its own band
        lookups = _samples(url, contract.METRIC_CACHE_SIMILARITY)
        assert lookups[(f"{contract.METRIC_CACHE_SIMILARITY}_count", "")] == 2


def _thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _stub_pid(triton_pid: int, model: str) -> int:
    """The Python-backend stub process that runs ``model`` for this Triton."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            parent = (entry / "status").read_text().split("PPid:")[1].split()[0]
            if (
                int(parent) == triton_pid
                and b"triton_python_backend_stub" in argv[0]
                and f"/{model}/1/".encode() in argv[1]
            ):
                return int(entry.name)
    raise AssertionError(f"Triton {triton_pid} has no Python-backend stub for {model}")


def test_no_helper_thread_spins_beside_the_work(data_plane: Stack) -> None:
    """The gateway and the re-ranker's model process do their numpy work on one thread: a
    second OpenBLAS thread only spins in sched_yield after each product big enough to share
    (58-90 ms of CPU a query in the gateway, 60-96 in the re-ranker, on Triton's cores)."""
    docs = calibration.corpus(limit=30)
    ingest_corpus(data_plane, docs, "spin")
    query = f"{data_plane.url('inference')}/v1/query"
    # 40 cache entries: OpenBLAS shares a matrix-vector product past 9216 elements (24 rows
    # of 384). A filter matching nothing skips the re-ranker, so these are cheap.
    for i in range(40):
        ok("POST", query, {"query": f"warm {i}", "filter": {"corpus": "none"}})
    triton, gateway = data_plane.pid("triton"), data_plane.pid("inference")
    assert triton is not None and gateway is not None
    pids = {"gateway": gateway, "reranker_small": _stub_pid(triton, "reranker_small")}
    before = {name: _thread_cpu_s(pid) for name, pid in pids.items()}
    queries = calibration.queries(docs)[:10]
    for q in queries:  # distinct texts: every one misses the cache and runs the re-ranker
        body = {"query": q, "top_k": 3, "route": "small", "filter": {"corpus": "spin"}}
        assert ok("POST", query, body)["cached"] is False
    for name, pid in pids.items():
        after = _thread_cpu_s(pid)
        helpers = sum(t - before[name].get(tid, 0.0) for tid, t in after.items() if tid != pid)
        per_query_ms = helpers * 1000 / len(queries)
        assert per_query_ms < 10, f"{name}: helper threads took {per_query_ms:.1f} ms CPU/query"


def _batch_sizes(stack: Stack, model: str) -> dict[int, int]:
    stats = requests.get(f"{stack.triton_url}/v2/models/{model}/stats", timeout=10).json()
    out: dict[int, int] = {}
    for version in stats["model_stats"]:
        for row in version["batch_stats"]:
            out[row["batch_size"]] = out.get(row["batch_size"], 0) + row["compute_infer"]["count"]
    return out


def _set_batching(
    stack: Stack, model: str, max_batch: int, delay_us: int, instances: int = 1
) -> None:
    pod = Pod(stack.triton_url, stack.admin_url("embedding"), None)  # the operator's adapter
    pod.set_batching(model, max_batch, delay_us, instances)
    assert pod.batching(model) == (max_batch, delay_us, instances)
    config = requests.get(f"{stack.triton_url}/v2/models/{model}/config", timeout=10).json()
    assert config["max_batch_size"] == max_batch
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == delay_us
    assert [g["count"] for g in config["instance_group"]] == [instances]


def test_batching_and_instances_change_live_with_no_failed_request(data_plane: Stack) -> None:
    model = "minilm_fp32"
    url = f"{data_plane.url('embedding')}/v1/embed"
    triton_pid = data_plane.pid("triton")
    stop = threading.Event()
    statuses: list[int] = []

    def client(n: int) -> None:
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(url, json={"texts": [f"sentence {n} {time.monotonic()}"]}, timeout=60)
                statuses.append(r.status_code)

    try:
        _set_batching(data_plane, model, 1, 0)
        with cf.ThreadPoolExecutor(8) as pool:
            for n in range(8):
                pool.submit(client, n)
            wait_for(lambda: len(statuses) >= 40, timeout=120, what="load on batch size 1")
            small = _batch_sizes(data_plane, model)
            assert small and max(small) == 1, small
            # Live: a larger batch, a queue delay and a second model instance, while 8
            # clients keep sending.
            _set_batching(data_plane, model, 8, 20_000, instances=2)
            seen = len(statuses)
            wait_for(lambda: len(statuses) >= seen + 80, timeout=120, what="load after change")
            # ... and back to one instance, still under load.
            _set_batching(data_plane, model, 8, 20_000, instances=1)
            seen = len(statuses)
            wait_for(lambda: len(statuses) >= seen + 40, timeout=120, what="load after 2 -> 1")
            stop.set()
        large = _batch_sizes(data_plane, model)
        assert max(large) > 1, f"no batching after the change: {large}"
        assert max(large) <= 8, large
        failed = [s for s in statuses if s != 200]
        assert not failed, f"{len(failed)} of {len(statuses)} requests failed: {set(failed)}"
        assert data_plane.pid("triton") == triton_pid, "Triton restarted"
    finally:
        stop.set()
        _set_batching(data_plane, model, 64, 2000)


def test_a_request_larger_than_a_retuned_max_batch_size_is_split_not_failed(
    data_plane: Stack,
) -> None:
    """The optimizer may lower max_batch_size below what a client sends in one request (an
    ingestion batch, a query's candidates); Triton rejects such a request, so the service
    splits it."""
    model, url = "minilm_fp32", f"{data_plane.url('embedding')}/v1/embed"
    texts = [f"split me into parts, sentence number {i}" for i in range(7)]
    whole = ok("POST", url, {"texts": texts})["embeddings"]  # cached max_batch_size: 64
    before = _batch_sizes(data_plane, model)
    try:
        _set_batching(data_plane, model, 2, 0)
        parts = ok("POST", url, {"texts": texts})["embeddings"]
        assert len(parts) == 7
        for a, b in zip(whole, parts, strict=True):
            assert sum(x * y for x, y in zip(a, b, strict=True)) > 0.999
        after = _batch_sizes(data_plane, model)
        new = {size: n - before.get(size, 0) for size, n in after.items()}
        assert max(size for size, n in new.items() if n) <= 2, new
    finally:
        _set_batching(data_plane, model, 64, 2000)


def test_the_admin_api_is_on_its_own_port_and_needs_the_token(data_plane: Stack) -> None:
    """In a pod the stage's Service exposes only its API port; the admin port needs the
    token. Neither the shadow nor the gateway's knobs are reachable without both."""
    admin_port = free_port()
    env = {contract.ENV_ADMIN_PORT: str(admin_port), contract.ENV_ADMIN_TOKEN: "s3cret"}
    with _spare_service(data_plane, "inference", env, ready_timeout=120) as url:
        admin = f"http://127.0.0.1:{admin_port}"
        for path in (contract.ADMIN_SHADOW_PATH, contract.ADMIN_CONFIG_PATH):
            assert call("GET", url + path).status_code == 404  # not on the API port
            refused = call("GET", admin + path)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "unauthorized"
            wrong = requests.get(admin + path, headers={"Authorization": "Bearer nope"}, timeout=10)
            assert wrong.status_code == 401
            right = requests.get(
                admin + path, headers={"Authorization": "Bearer s3cret"}, timeout=10
            )
            assert right.status_code == 200, right.text
        pod = Pod(data_plane.triton_url, admin, "s3cret")  # the operator's adapter
        shadow = contract.Shadow(model="reranker_large", sampleRatio=0.25)
        pod.set_shadow(shadow)
        assert pod.shadow() == shadow
        pod.set_shadow(None)
        assert pod.shadow() is None


def test_retrieval_keeps_every_acknowledged_document_across_crash_and_restart(
    data_plane: Stack,
) -> None:
    docs = [f"Durability check number {i}: the quick brown fox {i} jumps." for i in range(30)]
    ids = ingest_corpus(data_plane, docs, "dur")
    ok("DELETE", f"{data_plane.url('ingestion')}/v1/documents/dur-0")

    def present() -> set[str]:
        return {i for i in ids if call("GET", f"{data_plane.url('retrieval')}/v1/documents/{i}").ok}

    assert present() == set(ids[1:])
    data_plane.stop("retrieval", signal.SIGKILL)  # a crash: only the WAL survives
    data_plane.start("retrieval")
    assert present() == set(ids[1:])
    data_plane.stop("retrieval", signal.SIGTERM)  # a clean stop writes a snapshot
    data_plane.start("retrieval")
    stats = ok("GET", f"{data_plane.url('retrieval')}/v1/stats")
    assert stats["snapshot"] == stats["seq"] > 0
    assert present() == set(ids[1:])
    hit = ok(
        "POST",
        f"{data_plane.url('inference')}/v1/query",
        {"query": "quick brown fox 7 jumps", "top_k": 1, "filter": {"corpus": "dur"}},
    )
    assert hit["results"][0]["document_id"].startswith("dur-")


@contextlib.contextmanager
def _spare_service(
    stack: Stack, name: str, env: dict[str, str], ready_timeout: float
) -> Iterator[str]:
    """A second ``name`` process beside the stack's, on a free port with ``env`` on top of
    the stack's settings; yields its URL once ready, stopped on exit."""
    port = free_port()
    proc = start_service(name, stack.service_env(name) | {"PORT": str(port)} | env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{url}/readyz"), timeout=ready_timeout, what=name)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ingestion_pushes_back_when_its_queue_is_full(data_plane: Stack) -> None:
    limits = {"MODELPILOT_MAX_CONCURRENT": "1", "MODELPILOT_MAX_QUEUE": "1"}
    with _spare_service(data_plane, "ingestion", limits, ready_timeout=60) as url:
        text = " ".join(f"word{i}" for i in range(3000))  # many chunks: a slow request

        def post(n: int) -> requests.Response:
            body = {"documents": [{"id": f"bp-{n}", "text": text}]}
            return call("POST", f"{url}/v1/documents", body)

        with cf.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, range(8)))
        codes = [r.status_code for r in responses]
        assert 429 in codes and 200 in codes, codes
        assert set(codes) <= {200, 429}, codes
        assert all(r.headers.get("Retry-After") for r in responses if r.status_code == 429)


VECTOR = [0.05] * 384
BAD_INPUTS: list[tuple[str, str, str, Any, int]] = [
    # (service, method, path, body: dict -> JSON, bytes -> raw, expected status)
    ("ingestion", "POST", "/v1/documents", b"{not json", 400),
    (
        "ingestion",
        "POST",
        "/v1/documents",
        b'{"documents": [{"id": "x", "text": "\xff\xfe"}]}',
        400,
    ),
    ("ingestion", "POST", "/v1/documents", b"x" * (2 << 20), 413),
    ("ingestion", "POST", "/v1/documents", {"documents": "nope"}, 422),
    ("ingestion", "POST", "/v1/documents", {"documents": []}, 422),
    (
        "ingestion",
        "POST",
        "/v1/documents",
        {"documents": [{"id": f"d{i}", "text": "t"} for i in range(65)]},
        422,
    ),
    ("ingestion", "POST", "/v1/documents", {"documents": [{"text": "no id"}]}, 422),
    ("ingestion", "POST", "/v1/documents", {"documents": [{"id": "has space", "text": "t"}]}, 422),
    ("ingestion", "POST", "/v1/documents", {"documents": [{"id": "ünïcödé", "text": "t"}]}, 422),
    ("ingestion", "POST", "/v1/documents", {"documents": [{"id": "x" * 300, "text": "t"}]}, 422),
    ("ingestion", "POST", "/v1/documents", {"documents": [{"id": "e", "text": ""}]}, 422),
    ("ingestion", "POST", "/v1/documents", {"documents": [{"id": "w", "text": "   \n\t "}]}, 422),
    ("ingestion", "POST", "/v1/documents", {"documents": [{"id": "n", "text": 42}]}, 422),
    (
        "ingestion",
        "POST",
        "/v1/documents",
        {"documents": [{"id": "m", "text": "t", "metadata": {"a": {"b": 1}}}]},
        422,
    ),
    (
        "ingestion",
        "POST",
        "/v1/documents",
        {"documents": [{"id": "u", "text": "t", "extra": 1}]},
        422,
    ),
    (
        "ingestion",
        "POST",
        "/v1/documents",
        {"documents": [{"id": "d", "text": "a"}, {"id": "d", "text": "b"}]},
        422,
    ),
    ("ingestion", "DELETE", "/v1/documents/bad%20id", None, 400),
    ("ingestion", "DELETE", "/v1/documents/never-ingested", None, 404),
    ("ingestion", "GET", "/v1/documents", None, 405),
    ("ingestion", "POST", "/v1/nowhere", {}, 404),
    ("inference", "POST", "/v1/query", {"query": ""}, 422),
    ("inference", "POST", "/v1/query", {"query": "q", "top_k": 1_000_000}, 422),
    ("inference", "POST", "/v1/query", {"query": "q", "top_k": 0}, 422),
    ("inference", "POST", "/v1/query", {"query": "q", "top_k": "5"}, 422),
    ("inference", "POST", "/v1/query", {"query": "q", "route": "medium"}, 422),
    ("inference", "POST", "/v1/query", {"query": "q", "filter": {"k": {"nested": 1}}}, 422),
    ("inference", "POST", "/v1/query", {"query": ["a", "list"]}, 422),
    ("inference", "POST", "/v1/query", {"query": "q" * 5000}, 422),
    ("inference_admin", "PATCH", "/v1/admin/config", {"smallShare": 2}, 422),
    ("inference_admin", "PATCH", "/v1/admin/config", {"smallModel": "reranker_large"}, 422),
    ("embedding", "POST", "/v1/embed", {"texts": []}, 422),
    ("embedding", "POST", "/v1/embed", {"texts": ["ok", ""]}, 422),
    ("embedding", "POST", "/v1/embed", {"texts": ["t"] * 257}, 422),
    ("embedding", "POST", "/v1/embed", {"texts": [None]}, 422),
    ("embedding_admin", "PUT", "/v1/admin/shadow", {"model": "gpt-17-ultra"}, 400),
    ("embedding_admin", "PUT", "/v1/admin/shadow", {"model": "minilm_int8", "sampleRatio": 2}, 422),
    ("retrieval", "POST", "/v1/search", {"embedding": [0.1, 0.2, 0.3]}, 422),
    ("retrieval", "POST", "/v1/search", b'{"embedding": [NaN]}', 422),
    ("retrieval", "POST", "/v1/search", {"embedding": VECTOR, "top_k": 10**9}, 422),
    (
        "retrieval",
        "PUT",
        "/v1/documents/z",
        {"chunks": [{"text": "a"}], "embeddings": [VECTOR, VECTOR]},
        422,
    ),
    (
        "retrieval",
        "PUT",
        "/v1/documents/z",
        {"chunks": [{"text": "a"}], "embeddings": [[0.0] * 384]},
        422,
    ),
    ("retrieval", "GET", "/v1/documents/no-such-doc", None, 404),
]


def test_bad_input_gets_a_clear_4xx_and_the_services_stay_healthy(data_plane: Stack) -> None:
    assert len(BAD_INPUTS) >= 20
    failures = []
    for service, method, path, body, expected in BAD_INPUTS:
        url = data_plane.url(service) + path
        if isinstance(body, bytes):
            r = requests.request(
                method, url, data=body, headers={"Content-Type": "application/json"}, timeout=60
            )
        else:
            r = call(method, url, body)
        error = r.json().get("error", {}) if r.content else {}
        if r.status_code != expected or not error.get("message"):
            failures.append(
                f"{method} {service}{path} {str(body)[:60]}: {r.status_code} {r.text[:120]}"
            )
    assert not failures, "\n".join(failures)
    for service in ("ingestion", "embedding", "retrieval", "inference"):
        assert ok("GET", f"{data_plane.url(service)}/healthz")["status"] == "ok"
        metrics = requests.get(f"{data_plane.url(service)}/metrics", timeout=10).text
        server_errors = [
            line for line in metrics.splitlines()
            if line.startswith("modelpilot_requests_total") and 'code="5' in line
        ]  # fmt: skip
        assert not server_errors, server_errors
    ok("POST", f"{data_plane.url('inference')}/v1/query", {"query": "still serving?", "top_k": 1})


def test_metrics_follow_prometheus_conventions_beside_tritons(data_plane: Stack) -> None:
    docs = [
        {"id": f"metrics-{i}", "text": f"Metric document {i} about counters and gauges."}
        for i in range(12)
    ]
    ok("POST", f"{data_plane.url('ingestion')}/v1/documents", {"documents": docs})
    ok("POST", f"{data_plane.url('inference')}/v1/query", {"query": "metrics please", "top_k": 2})
    inference = requests.get(f"{data_plane.url('inference')}/metrics", timeout=10).text
    for name in (
        "modelpilot_requests_total",
        "modelpilot_request_duration_seconds_bucket",
        "modelpilot_in_flight_requests",
        "modelpilot_query_duration_seconds_bucket",
        "modelpilot_cache_requests_total",
        "modelpilot_routed_requests_total",
        "modelpilot_batch_size_bucket",
        "modelpilot_queue_duration_seconds_sum",
    ):
        assert name in inference, name
    embedding = requests.get(f"{data_plane.url('embedding')}/metrics", timeout=10).text
    assert 'modelpilot_batch_size_count{model="minilm_fp32",stage="embedding"}' in embedding
    # Triton's compute time per batch, which calibrates the profile's batch times.
    compute = {
        s.name: s.value
        for f in text_string_to_metric_families(embedding)
        if f.name == contract.METRIC_COMPUTE_DURATION
        for s in f.samples
        if s.labels.get("model") == "minilm_fp32"
    }
    count = compute[contract.METRIC_COMPUTE_DURATION + "_count"]
    assert count >= 1 and compute[contract.METRIC_COMPUTE_DURATION + "_sum"] > 0, compute
    # Items per Triton request, which the optimizer sizes batches in: a query re-ranks at
    # most of its candidates (at least 10 when the index has them) in one request.
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(inference):
        for sample in family.samples:
            if sample.name in (
                "modelpilot_model_inferences_total",
                "modelpilot_model_requests_total",
            ):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    assert totals["modelpilot_model_requests_total"] >= 1
    items = totals["modelpilot_model_inferences_total"] / totals["modelpilot_model_requests_total"]
    assert items > 2, totals
    triton = requests.get(
        f"http://127.0.0.1:{data_plane.ports['triton_metrics']}/metrics", timeout=10
    )
    assert 'nv_inference_request_success{model="minilm_fp32"' in triton.text
    # Structured logs: one JSON object per line.
    for line in data_plane.log("inference").read_text().splitlines():
        assert isinstance(json.loads(line), dict), line
    assert os.path.exists(data_plane.log("triton"))


@contextlib.contextmanager
def _sidecar_triton(
    tmp_path: Path, *args: str, http: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """What the Triton sidecar runs in a pod (the image's entrypoint), on free local ports
    (HTTP on ``http`` if given), the repository under ``tmp_path/models``; yields its URL
    once minilm_static serves."""
    http, grpc, metrics = http or free_port(), free_port(), free_port()
    env = {**os.environ, "MODELPILOT_TRITON_WORKDIR": str(tmp_path / "work")}
    argv = [
        f"--model-repository={tmp_path / 'models'}", "--model-control-mode=explicit",
        "--load-model=minilm_static", *args, f"--http-port={http}", f"--grpc-port={grpc}",
        f"--metrics-port={metrics}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelpilot_services.models.tritonserve", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{http}"
        wait_for(lambda: http_ok(f"{base}/v2/models/minilm_static/ready"), 180, what="Triton")
        yield base, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_the_triton_entrypoint_writes_the_repository_and_serves(tmp_path: Path) -> None:
    """What the Triton sidecar runs in a pod: an empty /models becomes a repository and the
    named model serves, with tritonserver's own arguments passed through."""
    with _sidecar_triton(tmp_path) as (base, _):
        assert (tmp_path / "models/minilm_int8/config.pbtxt").exists()
        body = {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES",
                            "data": ["a pod's first request"]}]}  # fmt: skip
        out = ok("POST", f"{base}/v2/models/minilm_static/infer", body)["outputs"][0]
        assert out["shape"] == [1, 384]


def test_load_checks_read_tritons_reason_for_a_missing_or_broken_model(tmp_path: Path) -> None:
    """What the Triton sidecar runs in a pod, asked for a model its repository lacks and one
    whose config Triton rejects: it stays up serving the rest (no crash loop), and the
    operator's load check reports each with Triton's own message."""
    broken = tmp_path / "models/broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "broken"\nbackend: "no_such_backend"\n')
    missing = ("--load-model=missing_model", "--load-model=broken", "--exit-on-error=false")
    with _sidecar_triton(tmp_path, *missing) as (base, proc):
        pod = Pod(base, f"http://127.0.0.1:{free_port()}", None)
        found = pod.unavailable(["minilm_static", "missing_model", "broken"])
        assert set(found) == {"missing_model", "broken"}, found
        assert "missing_model" in found["missing_model"] and "not found" in found["missing_model"]
        assert "no_such_backend" in found["broken"], found["broken"]
        with cf.ThreadPoolExecutor(2) as pool:
            checked = check_loads([("p-0", pod)], ["minilm_static", "missing_model"], pool)
        assert list(checked) == ["missing_model"] and checked["missing_model"].endswith("(pod p-0)")
        assert proc.poll() is None  # still serving


def test_a_pod_started_mid_verification_waits_for_its_triton_then_restores_the_shadow(
    tmp_path: Path,
) -> None:
    """A pod's service may start before its Triton sidecar listens, and a pod that starts
    mid-verification reads the shadow candidate from service.json: the service stays up and
    unready (no crash loop) until Triton serves, then loads the candidate first, so that
    mirrored calls do not fail as the candidate's errors, and only then is ready."""
    triton, port, admin_port = free_port(), free_port(), free_port()
    config = tmp_path / "service.json"
    shadow = {"model": "minilm_int8", "sampleRatio": 1.0}
    config.write_text(
        json.dumps({"stage": "embedding", "model": "minilm_static", "shadow": shadow})
    )
    env = {
        **os.environ,
        contract.ENV_PORT: str(port),
        contract.ENV_ADMIN_PORT: str(admin_port),
        contract.ENV_TRITON_URL: f"127.0.0.1:{triton}",
        contract.ENV_SERVICE_CONFIG: str(config),
    }
    service = start_service("embedding", env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_ok(f"{url}/healthz"), 60, what="the service, before its Triton")
        unready = call("GET", f"{url}/readyz")
        assert unready.status_code == 503 and "minilm_static" in unready.text, unready.text
        with _sidecar_triton(tmp_path, http=triton) as (base, _):
            wait_for(lambda: http_ok(f"{url}/readyz"), 180, what="ready once Triton serves")
            assert service.poll() is None  # the same process: never crashed
            assert ok("GET", f"http://127.0.0.1:{admin_port}/v1/admin/shadow") == shadow
            assert http_ok(f"{base}/v2/models/minilm_int8/ready")
            sent = iter(range(10_000))

            def mirrored() -> bool:
                # One more request per poll: the first mirrored ones wait for the candidate's
                # neighbour ring to be seeded, and past 4 in flight a sample is skipped.
                ok("POST", f"{url}/v1/embed", {"texts": [f"mirrored request {next(sent)}"]})
                text = requests.get(f"{url}/metrics", timeout=10).text
                prefix = 'modelpilot_shadow_agreement_count{model="minilm_int8",stage="embedding"} '
                line = next((x for x in text.splitlines() if x.startswith(prefix)), None)
                return line is not None and float(line.removeprefix(prefix)) >= 5

            wait_for(mirrored, 60, interval=0.5, what="5 mirrored requests measured")
            assert "modelpilot_shadow_errors_total{" not in requests.get(f"{url}/metrics").text
    finally:
        service.terminate()
        service.wait(timeout=30)


def test_live_sync_corrects_only_what_differs_and_one_bad_pod_fails_alone(
    data_plane: Stack,
) -> None:
    """Level-triggered: a pod off the plan is corrected once, then left alone; a pod that
    cannot be reached is that pod's error, never the others'."""
    good = Pod(data_plane.triton_url, data_plane.admin_url("embedding"), None)
    gone = Pod(
        f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}", None, timeout_s=1
    )
    config = contract.ServiceConfig(
        stage="embedding",
        model="minilm_fp32",
        models=["minilm_fp32"],
        maxBatchSize=16,
        maxQueueDelayMicroseconds=500,
        instances=2,
        shadow=contract.Shadow(model="minilm_int8", sampleRatio=0.2),
    )
    want = LiveSettings.of(config)
    assert want is not None and want.models == ("minilm_fp32", "minilm_int8")
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            first = sync_pods([("good", good), ("gone", gone)], want, pool)
            assert [p.pod for p in first.corrected] == ["good"]
            # the shadow candidate, loaded by the shadow's write, runs the plan's batching too
            assert first.corrected[0].corrected == (
                "shadow",
                "batching of minilm_fp32",
                "batching of minilm_int8",
            )
            assert [p.pod for p in first.failed] == ["gone"] and first.on_plan == 1
            again = sync_pods(
                [("good", Pod(data_plane.triton_url, data_plane.admin_url("embedding"), None))],
                want,
                pool,
            )
            assert again.on_plan == 1 and not again.corrected  # nothing differs: no writes
        assert good.batching("minilm_fp32") == good.batching("minilm_int8") == (16, 500, 2)
    finally:
        for model in ("minilm_fp32", "minilm_int8"):
            _set_batching(data_plane, model, *tritonserve.BATCHING[model])
        Pod(data_plane.triton_url, data_plane.admin_url("embedding"), None).set_shadow(None)


def test_live_sync_sets_the_gateways_knobs_without_a_restart(data_plane: Stack) -> None:
    admin = data_plane.admin_url("inference")
    before = ok("GET", admin + contract.ADMIN_CONFIG_PATH)
    models = sorted({before["smallModel"], before["largeModel"]})
    config = contract.ServiceConfig(
        stage="inference",
        model=models[0],
        models=models,
        maxBatchSize=tritonserve.BATCHING[models[0]][0],
        maxQueueDelayMicroseconds=tritonserve.BATCHING[models[0]][1],
        smallShare=0.35,
        cacheThreshold=0.9,
    )
    want = LiveSettings.of(config)
    assert want is not None
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            pod = Pod(data_plane.triton_url, admin, None)
            first = sync_pods([("gateway", pod)], want, pool)
            assert first.corrected[0].corrected == ("cacheThreshold", "smallShare")
            again = sync_pods([("gateway", Pod(data_plane.triton_url, admin, None))], want, pool)
            assert again.on_plan == 1 and not again.corrected
        now = ok("GET", admin + contract.ADMIN_CONFIG_PATH)
        assert (now["smallShare"], now["cacheThreshold"]) == (0.35, 0.9)
    finally:
        knobs = {k: before[k] for k in ("smallShare", "cacheThreshold")}
        ok("PATCH", admin + contract.ADMIN_CONFIG_PATH, knobs)
