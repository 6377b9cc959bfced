"""Keep-alive HTTP/1.1 connections to one upstream (the pod's Triton, or another service):
the client every service calls downstream with on the request path.

Why not aiohttp's client: per call to Triton it spent 0.5-0.7 ms of CPU here against 0.2 ms
for this (an asyncio protocol around httptools' parser, the one uvicorn uses; 1000 calls each,
2-core machine), and a service may add 1 ms in all. It does only what our calls need:
``Content-Length`` request bodies, any response framing httptools parses (``Content-Length``,
chunked), a bounded keep-alive pool and one deadline per call covering the wait for a slot.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.parse
from collections.abc import Mapping
from typing import NamedTuple, cast

import httptools


class UpstreamError(ConnectionError):
    """The upstream closed the connection or answered something that is not HTTP/1.1."""


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes


class _Closed(UpstreamError):
    def __init__(self, received: bool, cause: Exception | None):
        super().__init__(f"connection closed{f': {cause}' if cause else ''}")
        self.received = received  # any byte of the response had arrived


class _Connection(asyncio.Protocol):
    """One TCP connection; at most one request in flight on it (no pipelining)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self.reusable = True
        self.received = False
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small requests must not wait for an ACK (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(_Closed(self.received, exc))

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for: the stream is out of step
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"not an HTTP/1.1 response: {e}"))
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            status = self.parser.get_status_code()
            waiter.set_result(Response(status, self.headers, b"".join(self.body)))

    def _fail(self, error: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def send(self, head: bytes, body: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.received, self.headers, self.body = False, {}, []
        self.transport.writelines((head, body))
        return self.waiter

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


class Upstream:
    """Up to ``limit`` concurrent requests to ``url`` (``http://host:port[/prefix]`` or
    ``host:port``), each within ``timeout_s`` unless the call says otherwise."""

    def __init__(self, url: str, limit: int = 100, timeout_s: float = 30.0):
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"{url!r}: expected http://host:port (in-cluster calls are plain)")
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.prefix = parsed.path.rstrip("/")
        self.url = f"http://{parsed.netloc}{self.prefix}"
        self.timeout_s = timeout_s
        self._host_header = f"Host: {parsed.netloc}\r\n"
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Response:
        """Send one request and read the whole response. Raises ``TimeoutError`` past the
        deadline and ``OSError`` (``UpstreamError`` among them) when the upstream fails."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) if headers else ""
        head = (
            f"{method} {self.prefix}{path} HTTP/1.1\r\n{self._host_header}"
            f"Content-Length: {len(body)}\r\n{extra}\r\n"
        ).encode("latin-1")
        async with asyncio.timeout(self.timeout_s if timeout_s is None else timeout_s):
            async with self._slots:
                conn, reused = await self._connection()
                try:
                    try:
                        response = await conn.send(head, body)
                    except _Closed as e:
                        # The peer closed a kept-alive connection as we sent on it: every call
                        # our services make is idempotent (inference, search, PUT, DELETE), so
                        # it goes again, once, on a fresh connection.
                        if not reused or e.received:
                            raise
                        conn.close()
                        conn = await self._connect()
                        response = await conn.send(head, body)
                except BaseException:  # includes the deadline: a late answer must not be read
                    conn.close()
                    raise
                if conn.reusable and not conn.closed:
                    self._idle.append(conn)
                else:
                    conn.close()
                return response

    async def _connection(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: idle ones age out server-side
            if not conn.closed:
                return conn, True
        return await self._connect(), False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        return conn

    async def close(self) -> None:
        """Close the idle connections (requests in flight close theirs when they end)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
