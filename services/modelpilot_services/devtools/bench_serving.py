"""``make bench-serving``: what each service adds over calling Triton directly, and the
variants' throughput through Triton, measured side by side in one run (a benchmark, not a test).

Per service, the same work is timed both ways, interleaved so drift hits both equally, and
through the same HTTP client library (geventhttpclient, which tritonclient.http uses), so
the difference is the service's own work and its one extra hop, not the clients' (requests
alone costs about 1.3 ms more per call than geventhttpclient here):
- embedding: ``POST /v1/embed`` (1 text) vs tritonclient ``infer`` of the same text;
- ingestion: ``POST /v1/documents`` (1 chunk) vs tritonclient embed + retrieval ``PUT``;
- inference: ``POST /v1/query`` (cache off) vs tritonclient embed + retrieval search +
  tritonclient re-rank of the same candidates;
- one bare hop, ``GET /healthz`` on the embedding service: what any service adds at least.

Ingestion and the gateway call the embedding service, so their figures hold its share too.
Their own share is timed against a third path: the client makes the same calls through the
services they call (embedding service, retrieval, Triton for the re-rank).

Each path is also timed less its requests' time inside Triton (read from Triton's
statistics around the call), which isolates what the service adds from the model's own
run-to-run variance.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import requests
import tritonclient.http as httpclient
from geventhttpclient import HTTPClient
from numpy.typing import NDArray
from tqdm import tqdm

from modelpilot_services.devtools.stack import DEFAULT_PORTS, Stack
from modelpilot_services.models import calibration, minilm


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bytes(name: str, values: list[str]) -> httpclient.InferInput:
    t = httpclient.InferInput(name, [len(values), 1], "BYTES")
    t.set_data_from_numpy(np.array([[v.encode()] for v in values], dtype=object))
    return t


def _ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def _in_triton_ms(session: requests.Session, triton_url: str) -> float:
    """Milliseconds Triton has spent on successful requests so far, over every model: the
    difference across a call is that call's time inside Triton (queue + compute)."""
    stats = session.get(f"{triton_url}/v2/models/stats", timeout=10).json()["model_stats"]
    return float(sum(m["inference_stats"]["success"]["ns"] for m in stats)) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200, help="timed requests per path")
    parser.add_argument("--seconds", type=float, default=8.0, help="per variant throughput run")
    parser.add_argument("--profile", type=Path, default=Path("profiles/cpu.json"))
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="modelpilot-bench-"))
    stack = Stack(root, ports={k: _free_port() for k in DEFAULT_PORTS})
    print(f"starting Triton and the services under {root} ...")
    stack.up()
    try:
        return _run(stack, args)
    finally:
        stack.down()


def _run(stack: Stack, args: argparse.Namespace) -> int:
    http = requests.Session()
    triton = httpclient.InferenceServerClient(f"127.0.0.1:{stack.ports['triton']}")

    def out(name: str) -> Any:
        return httpclient.InferRequestedOutput(name, binary_data=True)

    docs = calibration.corpus(limit=400)
    queries = calibration.queries(docs)
    n = min(args.requests, len(docs) // 2)

    def embed_direct(texts: list[str]) -> NDArray[Any]:
        r = triton.infer("minilm_fp32", [_bytes("TEXT", texts)], outputs=[out("EMBEDDING")])
        return np.asarray(r.as_numpy("EMBEDDING"))

    clients = {
        name: HTTPClient("127.0.0.1", stack.ports[name], concurrency=1, network_timeout=60)
        for name in ("embedding", "ingestion", "retrieval", "inference")
    }

    def call(method: str, service: str, path: str, body: object) -> dict[str, Any]:
        r = clients[service].request(
            method, path, body=orjson.dumps(body), headers={"Content-Type": "application/json"}
        )
        data = r.read()
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {service}{path}: {r.status_code} {data[:200]!r}")
        answer: dict[str, Any] = orjson.loads(data)
        return answer

    def post(service: str, path: str, body: object) -> dict[str, Any]:
        return call("POST", service, path, body)

    http.patch(f"{stack.url('inference')}/v1/admin/config", json={"cacheThreshold": 1.0})
    for i in range(20):  # warm every path
        embed_direct([docs[i]])
        post("embedding", "/v1/embed", {"texts": [docs[i]]})
    # Per service: [through it, direct to Triton, through the services it calls].
    times: dict[str, list[list[float]]] = {
        k: [[], [], []] for k in ("embedding", "ingestion", "inference")
    }
    # The same calls less their time inside Triton: a re-rank's 300 ms varies by tens of ms
    # from call to call on a shared CPU, which buries a few ms of service work in noise.
    outside: dict[str, list[list[float]]] = {k: [[], [], []] for k in times}

    def timed(name: str, path: int, fn: Callable[[], object]) -> None:
        before = _in_triton_ms(http, stack.triton_url)
        wall = _ms(fn)
        times[name][path].append(wall)
        outside[name][path].append(wall - (_in_triton_ms(http, stack.triton_url) - before))

    # One bare hop into a service in the same run (GET /healthz: no middleware, no model):
    # the floor of what any service in this HTTP stack adds.
    hop: list[float] = []

    def healthz() -> None:
        r = clients["embedding"].request("GET", "/healthz")
        r.read()
        if r.status_code != 200:
            raise RuntimeError(f"GET embedding/healthz: {r.status_code}")

    for i in tqdm(range(n), desc="service vs direct", unit="pair"):
        text, doc = docs[i], {"id": f"bench-{i}", "text": docs[i]}
        hop.append(_ms(healthz))
        timed("embedding", 0, lambda: post("embedding", "/v1/embed", {"texts": [text]}))  # noqa: B023
        timed("embedding", 1, lambda: embed_direct([text]))  # noqa: B023

        def ingest_direct(i: int = i, text: str = text) -> None:
            vector = embed_direct([text])[0].tolist()
            body = {"chunks": [{"text": text}], "embeddings": [vector]}
            call("PUT", "retrieval", f"/v1/documents/direct-{i}", body)

        def ingest_via(i: int = i, text: str = text) -> None:
            vector = post("embedding", "/v1/embed", {"texts": [text]})["embeddings"][0]
            body = {"chunks": [{"text": text}], "embeddings": [vector]}
            call("PUT", "retrieval", f"/v1/documents/via-{i}", body)

        timed("ingestion", 0, lambda: post("ingestion", "/v1/documents", {"documents": [doc]}))  # noqa: B023
        timed("ingestion", 1, ingest_direct)
        timed("ingestion", 2, ingest_via)

        q = queries[n + i]

        def query_direct(q: str = q, via: bool = False) -> None:
            if via:
                vector = post("embedding", "/v1/embed", {"texts": [q]})["embeddings"][0]
            else:
                vector = embed_direct([q])[0].tolist()
            found = post("retrieval", "/v1/search", {"embedding": vector, "top_k": 10})["results"]
            passages = [c["chunk"] for c in found]
            inputs = [_bytes("QUERY", [q] * len(passages)), _bytes("PASSAGE", passages)]
            triton.infer("reranker_small", inputs, outputs=[out("SCORE")])

        timed("inference", 1, query_direct)
        timed("inference", 2, lambda: query_direct(via=True))
        query = {"query": q, "top_k": 3, "route": "small"}
        timed("inference", 0, lambda: post("inference", "/v1/query", query))  # noqa: B023

    print(f"\nadded latency per service, {n} interleaved pairs (ms)")
    print(
        f"{'service':<11}{'service p50':>12}{'direct p50':>12}{'added p50':>11}{'added p95':>11}"
        f"{'outside Triton: service':>25}{'direct':>8}{'added p50':>11}{'own p50':>9}"
    )
    summary: dict[str, object] = {}

    def paired(a: list[float], b: list[float]) -> float:
        return statistics.median(x - y for x, y in zip(a, b, strict=True))

    for name, (svc, direct, _) in times.items():
        added = [a - b for a, b in zip(svc, direct, strict=True)]
        s50, d50 = statistics.median(svc), statistics.median(direct)
        a95 = float(np.percentile(added, 95))
        o_svc, o_direct, o_via = outside[name]
        o50 = paired(o_svc, o_direct)
        own = paired(o_svc, o_via) if o_via else o50  # embedding calls Triton itself
        os50, od50 = statistics.median(o_svc), statistics.median(o_direct)
        print(
            f"{name:<11}{s50:>12.2f}{d50:>12.2f}{s50 - d50:>11.2f}{a95:>11.2f}"
            f"{os50:>25.2f}{od50:>8.2f}{o50:>11.2f}{own:>9.2f}"
        )
        summary[name] = {
            "service_p50_ms": s50,
            "direct_p50_ms": d50,
            "added_p50_ms": s50 - d50,
            "added_outside_triton_p50_ms": o50,
            "own_outside_triton_p50_ms": own,
        }
    print("own: over the same calls made through the services it calls, outside Triton")
    search = [
        _ms(lambda: post("retrieval", "/v1/search", {"embedding": [0.05] * 384, "top_k": 10}))
        for _ in range(n)
    ]
    print(
        f"{'retrieval':<11}{statistics.median(search):>12.2f}  (search, top 10 of {2 * n} chunks)"
    )
    print(f"{'one hop':<11}{statistics.median(hop):>12.2f}  (GET /healthz: the HTTP stack's floor)")
    summary["hop_p50_ms"] = statistics.median(hop)

    # Variant throughput through Triton: 4 clients x 8 texts per request.
    prof = json.loads(args.profile.read_text())["models"] if args.profile.exists() else {}
    print(f"\nvariants through Triton, 4 clients x 8 texts/request, {args.seconds:.0f} s each")
    print(f"{'model':<16}{'texts/s':>9}{'req p50 ms':>12}{'quality':>9}  (quality: {args.profile})")
    variants: dict[str, object] = {}
    for model in minilm.VARIANTS:
        requests.post(f"{stack.triton_url}/v2/repository/models/{model}/load", timeout=300)
        batch = docs[:8]
        lat: list[float] = []
        until = time.monotonic() + args.seconds

        def client(
            model: str = model,
            batch: list[str] = batch,
            lat: list[float] = lat,
            until: float = until,
        ) -> int:
            c = httpclient.InferenceServerClient(f"127.0.0.1:{stack.ports['triton']}")
            done = 0
            while time.monotonic() < until:
                lat.append(_ms(lambda: c.infer(model, [_bytes("TEXT", batch)])))
                done += len(batch)
            return done

        started = time.monotonic()
        with cf.ThreadPoolExecutor(4) as pool:
            total = sum(pool.map(lambda _: client(), range(4)))
        # Over the time until the last request finished: a slow variant completes only a few
        # requests in the window, and dividing by the window alone would under-count it.
        rate = total / (time.monotonic() - started)
        quality = prof.get(model, {}).get("quality", float("nan"))
        print(f"{model:<16}{rate:>9.1f}{statistics.median(lat):>12.1f}{quality:>9.3f}")
        variants[model] = {
            "texts_per_s": rate,
            "p50_ms": statistics.median(lat),
            "quality": quality,
        }
    print(json.dumps({"added_latency": summary, "variants": variants}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
