"""Pure parts of the data plane: chunking, the semantic cache, the durable ANN store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydantic import TypeAdapter, ValidationError
from tritonclient.http import InferResult
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from modelpilot import contract
from modelpilot_services.stages.agreement import MIN_RING, NeighbourRecall, top_overlap
from modelpilot_services.stages.cache import SemanticCache
from modelpilot_services.stages.ingestion import chunk
from modelpilot_services.stages.shadow import NotReady, Shadow
from modelpilot_services.stages.store import Store
from modelpilot_services.toolkit.http import ApiError
from modelpilot_services.toolkit.metrics import Arrivals
from modelpilot_services.toolkit.schemas import Filter
from modelpilot_services.toolkit.triton import decode_response, encode_request
from tests.helpers import ROOT

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("words", "size", "overlap", "expected"),
    [
        (0, 5, 1, []),
        (3, 5, 1, [[0, 1, 2]]),
        (5, 5, 1, [[0, 1, 2, 3, 4]]),
        (8, 5, 1, [[0, 1, 2, 3, 4], [4, 5, 6, 7]]),
        (9, 4, 2, [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8]]),
        (4, 2, 0, [[0, 1], [2, 3]]),
    ],
)
def test_chunk_windows(words: int, size: int, overlap: int, expected: list[list[int]]) -> None:
    text = "  ".join(f"w{i}" for i in range(words))
    assert chunk(text, size, overlap) == [" ".join(f"w{i}" for i in c) for c in expected]


def unit(*values: float) -> np.ndarray:
    v = np.array(values, np.float32)
    return v / np.linalg.norm(v)


def test_cache_hits_above_threshold_for_the_same_key_only() -> None:
    now = [0.0]
    cache = SemanticCache(0.95, max_entries=10, ttl_s=60, dims=2, clock=lambda: now[0])
    cache.put("k5", unit(0, 1), "other")
    cache.put("k3", unit(1, 0), "answer")
    assert cache.get("k5", unit(0, 1)) == "other" and cache.get("k3", unit(0, 1)) is None
    assert cache.get("k3", unit(1, 0.1)) == "answer"  # cosine 0.995
    assert cache.get("k3", unit(1, 0.5)) is None  # cosine 0.894
    assert cache.get("k5", unit(1, 0)) is None  # another top_k/filter
    now[0] = 61
    assert cache.get("k3", unit(1, 0)) is None and len(cache) == 0  # expired
    cache.put("k3", unit(1, 0.05), "fresh")  # expired rows never answer, live ones do
    cache.put("k3", unit(1, 0.2), "second")  # cosine 0.981: a hit, but not the best
    assert cache.get("k3", unit(1, 0)) == "fresh"
    assert cache.get("k3", unit(1, 0.3)) == "second"


def test_cache_is_bounded_and_overwrites_the_oldest() -> None:
    cache = SemanticCache(0.99, max_entries=2, ttl_s=60, dims=2)
    for i, v in enumerate([unit(1, 0), unit(0, 1), unit(1, 1)]):
        cache.put("k", v, i)
    assert len(cache) == 2
    assert cache.get("k", unit(1, 0)) is None
    assert cache.get("k", unit(0, 1)) == 1 and cache.get("k", unit(1, 1)) == 2
    disabled = SemanticCache(0.5, max_entries=0, ttl_s=60, dims=2)
    disabled.put("k", unit(1, 0), 1)
    assert disabled.get("k", unit(1, 0)) is None


def test_triton_request_encoding_matches_tritonclients() -> None:
    query, passages = "q", ["héllo wörld", "", "x" * 300]
    body, length = encode_request({"QUERY": [query] * 3, "PASSAGE": passages}, "SCORE", 5)
    header = json.loads(body[:length])
    assert header["outputs"] == [{"name": "SCORE", "parameters": {"binary_data": True}}]
    assert header["parameters"] == {"timeout": 5}
    expected = b""
    for spec, values in zip(header["inputs"], ([query] * 3, passages), strict=True):
        blob = serialize_byte_tensor(np.array([[v.encode()] for v in values], dtype=object))
        assert spec["shape"] == [3, 1] and spec["datatype"] == "BYTES"
        assert spec["parameters"]["binary_data_size"] == len(blob.item())
        expected += blob.item()
    assert body[length:] == expected


def test_triton_response_decoding_matches_tritonclients() -> None:
    first, wanted = np.ones(4, np.float32), np.arange(6, dtype=np.float32).reshape(2, 3)
    outputs = [
        {
            "name": name,
            "datatype": "FP32",
            "shape": list(a.shape),
            "parameters": {"binary_data_size": a.nbytes},
        }
        for name, a in (("OTHER", first), ("EMB", wanted))
    ]
    header = json.dumps({"model_name": "m", "outputs": outputs}).encode()
    body = header + first.tobytes() + wanted.tobytes()
    ours = decode_response(body, len(header), "EMB")
    np.testing.assert_array_equal(ours, wanted)
    np.testing.assert_array_equal(
        ours, InferResult.from_response_body(body, False, len(header)).as_numpy("EMB")
    )
    with pytest.raises(InferenceServerException, match="no output"):
        decode_response(body, len(header), "MISSING")
    with pytest.raises(InferenceServerException, match="without binary output"):
        decode_response(b'{"error": "x"}', None, "EMB")


def vectors(n: int, dims: int = 8, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dims)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_store_search_filter_replace_delete(tmp_path: Path) -> None:
    store = Store(tmp_path, dims=8)
    v = vectors(6)
    store.put("a", [("a0", {"lang": "en"}), ("a1", {"lang": "de"})], v[:2])
    store.put("b", [("b0", {"lang": "en"})], v[2:3])
    assert [h.chunk for h in store.search(v[0], 1)] == ["a0"]
    assert store.search(v[0], 1)[0].score == pytest.approx(1.0, abs=1e-5)
    assert {h.chunk for h in store.search(v[0], 5, {"lang": "de"})} == {"a1"}
    assert {h.chunk for h in store.search(v[0], 5, {"lang": ["de", "en"]})} == {"a0", "a1", "b0"}
    store.put("a", [("a-new", {})], v[3:4])  # idempotent by id: replaces
    assert len(store) == 2 and [c.text for c in store.document("a") or []] == ["a-new"]
    assert store.delete("b") and not store.delete("b")
    assert [h.chunk for h in store.search(v[2], 5)] == ["a-new"]
    with pytest.raises(ValueError, match="vectors must be"):
        store.put("c", [("c0", {})], vectors(1, dims=4))


def test_store_recovers_from_wal_snapshot_and_a_torn_tail(tmp_path: Path) -> None:
    v = vectors(5)
    store = Store(tmp_path, dims=8, snapshot_every=2)
    store.put("a", [("a0", {})], v[:1])
    store.put("b", [("b0", {})], v[1:2])
    assert store.maybe_snapshot() and (tmp_path / "CURRENT").read_text() == "2"
    store.put("c", [("c0", {})], v[2:3])
    store.delete("a")
    store.close()  # a crash after these acks: they live only in the WAL
    wal = tmp_path / "wal-2.jsonl"
    with open(wal, "ab") as f:
        f.write(b'{"op":"put","id":"torn","chu')  # a write that never finished (never acked)

    again = Store(tmp_path, dims=8)
    assert set(again.documents) == {"b", "c"}
    assert [h.chunk for h in again.search(v[2], 1)] == ["c0"]
    again.put("d", [("d0", {})], v[3:4])  # appends after the cut tail cleanly
    again.close()
    third = Store(tmp_path, dims=8)
    assert set(third.documents) == {"b", "c", "d"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", "snap-2", "wal-2.jsonl"]
    with pytest.raises(ValueError, match="dimensions"):
        Store(tmp_path, dims=16)


def test_the_triton_model_imports_the_venvs_packages_before_the_systems(tmp_path: Path) -> None:
    """The python-backend stub runs the system interpreter, whose dist-packages (a Debian
    python3-protobuf, say) sit ahead of anything appended later: model.py must put the venv's
    packages first. Here a shadowing numpy stands in for the system's."""
    shadow = tmp_path / "system"
    (shadow / "numpy").mkdir(parents=True)
    (shadow / "numpy/__init__.py").write_text("raise ImportError('the system numpy won')\n")
    (tmp_path / "triton_python_backend_utils.py").write_text("")  # the stub provides it
    model = ROOT / "services/modelpilot_services/models/triton_model.py"
    code = f"import runpy; runpy.run_path({str(model)!r})"
    paths = sysconfig.get_paths()
    env = {
        **os.environ,
        # The system interpreter, the shadowing directory ahead of everything, as the stub has
        # dist-packages ahead of the venv.
        "PYTHONPATH": os.pathsep.join([str(shadow), str(tmp_path)]),
        "MODELPILOT_SITE_PACKAGES": os.pathsep.join({paths["purelib"], paths["platlib"]}),
    }
    run = subprocess.run(
        [sys._base_executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "the system numpy won" not in run.stderr
    assert run.returncode == 0, run.stderr[-2000:]


# ------------------------------------------- shadow agreement, by the stages' quality metric
def _texts(n: int, start: int = 0) -> list[str]:
    return [f"text {i}" for i in range(start, start + n)]


def test_neighbour_recall_waits_for_a_warm_ring_then_scores_one_for_the_same_model() -> None:
    rng = np.random.default_rng(0)
    ring = NeighbourRecall(dims=16, size=50, warm=20)
    first = rng.normal(size=(19, 16))
    assert ring.measure(_texts(19), first, first) == []  # 19 < warm: nothing to compare yet
    more = rng.normal(size=(5, 16))
    # the 20th text makes the ring warm; the four after it are scored
    got = ring.measure(_texts(5, 19), more, more * 3.0)  # the same directions, other norms
    assert got == [1.0] * 4


def test_neighbour_recall_tells_a_distorted_model_from_a_faithful_one() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(300, 32))
    faithful = base + rng.normal(scale=0.05, size=base.shape)  # small per-vector noise
    scrambled = rng.normal(size=base.shape)  # unrelated vectors
    good, bad = NeighbourRecall(32), NeighbourRecall(32)
    good_scores = good.measure(_texts(300), base, faithful)
    bad_scores = bad.measure(_texts(300), base, scrambled)
    assert len(good_scores) == len(bad_scores) == 300 - MIN_RING
    assert np.mean(good_scores) > 0.8 > 0.2 > np.mean(bad_scores)


def test_a_repeated_text_is_scored_without_itself_and_not_stored_twice() -> None:
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(30, 8))
    ring = NeighbourRecall(dims=8, size=40, k=5, warm=10)
    ring.measure(_texts(30), vectors, vectors)
    again = ring.measure(["text 3"], vectors[3:4], vectors[3:4])
    assert again == [1.0] and ring.filled == 30


def test_the_ring_forgets_its_oldest_texts() -> None:
    rng = np.random.default_rng(3)
    ring = NeighbourRecall(dims=4, size=10, k=3, warm=5)
    ring.measure(_texts(25), rng.normal(size=(25, 4)), rng.normal(size=(25, 4)))
    assert ring.filled == 10 and set(ring.slot) == set(_texts(10, 15))


@pytest.mark.parametrize(
    ("served", "candidate", "expected"),
    [
        ([0.9, 0.8, 0.7, 0.1, 0.0], [0.1, 0.2, 0.3, 0.8, 0.9], 1 / 3),  # only index 2 shared
        ([0.9, 0.8, 0.7, 0.1, 0.0], [0.7, 0.9, 0.8, 0.0, 0.1], 1.0),  # same top 3, other order
        ([0.9, 0.8, 0.7, 0.1, 0.0], [0.0, 0.0, 0.0, 0.9, 0.8], 1 / 3),  # ties break stably
        ([0.5, 0.4], [0.4, 0.5], 1.0),  # fewer candidates than 3
    ],
)
def test_top_overlap(served: list[float], candidate: list[float], expected: float) -> None:
    assert top_overlap(np.array(served), np.array(candidate)) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("outcome", "samples", "timed", "errors"),
    [
        ([0.8, 0.9], 2.0, 1.0, 0.0),  # a comparison: its values, its time
        (NotReady("seeding"), 0.0, 0.0, 0.0),  # not yet: skipped, not timed, not an error
        (RuntimeError("candidate down"), 0.0, 0.0, 1.0),  # the candidate's failure
    ],
)
def test_a_mirrored_comparison_counts_as_a_sample_a_skip_or_an_error(
    outcome: Any, samples: float, timed: float, errors: float
) -> None:
    registry = CollectorRegistry()

    async def noop(model: str) -> None:
        return None

    shadow = Shadow("embedding", registry, ["cand"], noop)

    async def compare(model: str) -> list[float]:
        if isinstance(outcome, Exception):
            raise outcome
        return list(outcome)

    asyncio.run(shadow._run("cand", compare))
    labels = {"stage": "embedding", "model": "cand"}
    value = registry.get_sample_value
    assert (value("modelpilot_shadow_agreement_count", labels) or 0.0) == samples
    assert (value("modelpilot_shadow_duration_seconds_count", labels) or 0.0) == timed
    assert (value("modelpilot_shadow_errors_total", labels) or 0.0) == errors


@pytest.mark.parametrize(
    ("loads", "restored"),
    [
        ([None], "cand"),  # Triton serves: loaded, then mirrored
        ([OSError("refused"), OSError("refused"), None], "cand"),  # the sidecar starts late
        ([ApiError(422, "model_unavailable", "no such model")], None),  # dropped, not fatal
    ],
)
def test_a_restored_shadow_candidate_is_loaded_before_it_is_mirrored(
    loads: list[Exception | None], restored: str | None
) -> None:
    """service.json's candidate loads in the background: the pod is unready meanwhile, an
    unreachable Triton is waited for, and a candidate Triton rejects is dropped."""
    calls: list[str] = []

    async def ensure_loaded(model: str) -> None:
        calls.append(model)
        if (outcome := loads[len(calls) - 1]) is not None:
            raise outcome

    async def scenario() -> tuple[str | None, str | None, str | None, str | None]:
        shadow = Shadow("embedding", CollectorRegistry(), ["cand"], ensure_loaded)
        shadow.configure(contract.Shadow(model="cand", sampleRatio=0.5))
        shadow.restore()
        while_loading = (shadow.model, shadow.pending())
        assert shadow._restoring is not None
        await asyncio.wait_for(shadow._restoring, 30)
        return *while_loading, shadow.pending(), shadow.model

    model_while, pending_while, pending_after, model_after = asyncio.run(scenario())
    assert model_while is None and pending_while is not None  # nothing mirrored yet, unready
    assert pending_after is None and len(calls) == len(loads)
    assert model_after == restored


def test_a_pushed_shadow_supersedes_a_restore_under_way() -> None:
    async def scenario() -> tuple[str | None, bool]:
        loaded = asyncio.Event()

        async def ensure_loaded(model: str) -> None:
            if model == "old":
                await loaded.wait()  # Triton not answering yet

        shadow = Shadow("embedding", CollectorRegistry(), ["old", "new"], ensure_loaded)
        shadow.configure(contract.Shadow(model="old", sampleRatio=0.5))
        shadow.restore()
        restoring = shadow._restoring
        await asyncio.sleep(0)  # the restore is under way, waiting for Triton
        shadow.cancel_restore()  # what a PUT or DELETE does first
        shadow.model, shadow.ratio = "new", 0.2
        loaded.set()  # had the restore gone on, it would now set "old"
        assert restoring is not None
        await asyncio.wait([restoring], timeout=30)
        return shadow.model, restoring.cancelled()

    assert asyncio.run(scenario()) == ("new", True)


def test_a_serving_model_outside_the_images_catalog_starts_the_service() -> None:
    """A user's model, or one missing from Triton: the service runs (not ready until Triton
    serves it) instead of exiting into a crash loop; only shadow candidates are checked."""
    from modelpilot_services.stages.embedding import Embedding

    service = Embedding("127.0.0.1:1", "their_model", ("minilm_fp32",))
    assert service.model == "their_model" and service.shadow.allowed == ("minilm_fp32",)


def test_a_repeats_similarity_over_one_in_float32_counts_in_the_top_band() -> None:
    from modelpilot_services.stages.cache import CacheCheck

    registry = CollectorRegistry()
    check = CacheCheck("inference", registry, sample_ratio=1.0)
    check.looked_up(1.0000001)
    check.record(1.0000001, 1.0)
    name = "modelpilot_cache_similarity_bucket"
    assert registry.get_sample_value(name, {"stage": "inference", "le": "1.0"}) == 1
    agreement = "modelpilot_cache_agreement_count"
    assert registry.get_sample_value(agreement, {"stage": "inference", "band": "1"}) == 1


def test_arrivals_are_counted_per_whole_second_with_quiet_seconds_as_zero() -> None:
    now = [10.0]
    arrivals = Arrivals("embedding", clock=lambda: now[0])

    def totals() -> tuple[float, ...]:
        values = {f.name: f.samples[0].value for f in arrivals.collect()}
        return (
            values[contract.METRIC_ARRIVAL_SECONDS],
            values[contract.METRIC_ARRIVALS],
            values[contract.METRIC_ARRIVALS_SQUARED],
        )

    for t in (10.1, 10.5, 10.9, 12.2):
        now[0] = t
        arrivals.arrive()
    now[0] = 12.9
    assert totals() == (2, 3, 9)  # seconds 10 (3 arrivals) and 11 (none); 12 is under way
    now[0] = 13.0
    assert totals() == (3, 4, 10)  # second 12 closed with its one arrival
    registry = CollectorRegistry()
    registry.register(arrivals)
    assert (
        registry.get_sample_value(
            contract.METRIC_ARRIVALS_SQUARED + "_total", {contract.STAGE_LABEL: "embedding"}
        )
        == 10
    )


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, [1, 2**64]])
def test_metadata_and_filters_hold_64_bit_integers_only(value: object) -> None:
    """A larger integer is valid JSON but cannot be passed on (orjson refuses it): it is
    a 4xx at the edge, not a 500 from the hop that tries."""
    adapter = TypeAdapter(Filter)
    assert adapter.validate_python({"n": 2**63 - 1, "m": -(2**63)}) == {
        "n": 2**63 - 1,
        "m": -(2**63),
    }
    with pytest.raises(ValidationError, match="64 bits"):
        adapter.validate_python({"n": value})
