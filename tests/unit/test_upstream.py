"""The services' downstream HTTP client against real servers on loopback: an aiohttp app (the
services' own server) and raw asyncio servers that misbehave the way peers do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop
from aiohttp import web

from modelpilot_services.toolkit.upstream import Upstream, UpstreamError

pytestmark = pytest.mark.unit


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[Any]], Any]:
    """Each test on the standard loop and on uvloop, the one the services run."""

    def run(coro: Awaitable[Any]) -> Any:
        loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            return runner.run(asyncio.wait_for(coro, 30))

    return run


@asynccontextmanager
async def app_server(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


Runner = Callable[[Awaitable[Any]], Any]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await handler(r, w)
        finally:
            w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bool:
    """Read one request with a Content-Length body; False at end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:  # the client closed the connection
        return False
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)
    return True


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def echo_app(peers: list[int]) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        body = await request.read()
        return web.Response(body=body, headers={"X-Method": request.method, "X-Path": request.path})

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"one,", b"two,", b"three"):
            await response.write(part)
        await response.write_eof()
        return response

    async def close(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        return web.Response(text="bye", headers={"Connection": "close"})

    app = web.Application(client_max_size=4 << 20)
    app.router.add_route("*", "/base/echo", echo)
    app.router.add_get("/base/chunked", chunked)
    app.router.add_get("/base/close", close)
    return app


def test_keeps_one_connection_alive_across_requests(run: Runner) -> None:
    peers: list[int] = []

    async def main() -> None:
        async with app_server(echo_app(peers)) as url:
            up = Upstream(f"{url}/base")
            body = bytes(range(256)) * 4096  # 1 MiB, every byte value
            for method in ("POST", "PUT", "DELETE", "GET", "POST"):
                r = await up.request(method, "/echo", body if method != "GET" else b"")
                assert r.status == 200
                assert r.headers["x-method"] == method and r.headers["x-path"] == "/base/echo"
                assert r.body == (body if method != "GET" else b"")
            await up.close()

    run(main())
    assert len(peers) == 5 and len(set(peers)) == 1


def test_reads_chunked_responses_and_honours_connection_close(run: Runner) -> None:
    peers: list[int] = []

    async def main() -> None:
        async with app_server(echo_app(peers)) as url:
            up = Upstream(f"{url}/base")
            assert (await up.request("GET", "/chunked")).body == b"one,two,three"
            assert (await up.request("GET", "/close")).body == b"bye"
            assert (await up.request("GET", "/close")).body == b"bye"
            missing = await up.request("GET", "/nowhere")
            assert missing.status == 404
            await up.close()

    run(main())
    assert len(set(peers)) == 2  # each Connection: close answer ended its connection


def test_a_reused_connection_the_peer_closed_is_retried_once_on_a_fresh_one(run: Runner) -> None:
    connections: list[int] = []

    async def one_answer_per_connection(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # Answers keep-alive, then closes on the next request unanswered: an idle timeout
        # racing the client's next send.
        connections.append(1)
        if await read_request(r):
            w.write(OK)
            await w.drain()
        await read_request(r)

    async def main() -> None:
        async with raw_server(one_answer_per_connection) as url:
            up = Upstream(url)
            for _ in range(3):
                assert (await up.request("POST", "/infer", b"x")).body == b"ok"
            await up.close()

    run(main())
    assert len(connections) == 3


def test_a_fresh_connection_closed_unanswered_fails_without_retry(run: Runner) -> None:
    connections: list[int] = []

    async def hang_up(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connections.append(1)
        await read_request(r)

    async def main() -> None:
        async with raw_server(hang_up) as url:
            with pytest.raises(UpstreamError, match="connection closed"):
                await Upstream(url).request("POST", "/infer", b"x")

    run(main())
    assert len(connections) == 1


def test_garbage_is_an_upstream_error(run: Runner) -> None:
    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await w.drain()

    async def main() -> None:
        async with raw_server(garbage) as url:
            with pytest.raises(UpstreamError, match=r"not an HTTP/1\.1 response"):
                await Upstream(url).request("GET", "/")

    run(main())


def test_the_deadline_covers_the_call_and_drops_its_connection(run: Runner) -> None:
    peers: list[int] = []

    async def main() -> None:
        release = asyncio.Event()

        async def slow(request: web.Request) -> web.Response:
            peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
            if request.query.get("wait"):
                await release.wait()
            return web.Response(text="late" if request.query.get("wait") else "now")

        app = web.Application()
        app.router.add_get("/", slow)
        async with app_server(app) as url:
            up = Upstream(url, timeout_s=10)
            with pytest.raises(TimeoutError):
                await up.request("GET", "/?wait=1", timeout_s=0.2)
            release.set()
            assert (await up.request("GET", "/")).body == b"now"  # not the late answer
            await up.close()

    run(main())
    assert len(set(peers)) == 2


def test_at_most_limit_requests_in_flight(run: Runner) -> None:
    in_flight, peak = 0, 0

    async def main() -> None:
        nonlocal in_flight, peak
        gate = asyncio.Event()

        async def handler(request: web.Request) -> web.Response:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await gate.wait()
            in_flight -= 1
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/", handler)
        async with app_server(app) as url:
            up = Upstream(url, limit=2)
            calls = [asyncio.create_task(up.request("GET", "/")) for _ in range(8)]
            while peak < 2:  # wait for the first two to arrive
                await asyncio.sleep(0.01)
            gate.set()
            assert [r.status for r in await asyncio.gather(*calls)] == [200] * 8
            await up.close()

    run(main())
    assert peak == 2


@pytest.mark.parametrize("url", ["https://triton:8000", "ftp://x", "http://"])
def test_only_plain_http_urls(url: str) -> None:
    with pytest.raises(ValueError, match="expected http://host:port"):
        Upstream(url)
