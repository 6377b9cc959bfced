"""JSON over HTTP, as every service speaks it: errors, request parsing, calls downstream.

Errors always answer ``{"error": {"code": ..., "message": ...}}`` with a 4xx for bad input;
a 5xx means *we* failed (or a dependency did, then with ``Retry-After``).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from modelpilot_services.toolkit.upstream import Upstream

MAX_BODY_BYTES = int(os.environ.get("MODELPILOT_MAX_BODY_BYTES", str(1 << 20)))
Model = TypeVar("Model", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JSON_HEADERS = {"Content-Type": "application/json"}


class ApiError(Exception):
    """An error the client can act on; ``status`` is the HTTP code."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response through orjson: an embedding's 384 floats serialize in ~12 us against
    ~180 us with the standard library, on the hot path of every embed and query."""
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def error_response(
    status: int, code: str, message: str, retry_after: int | None = None
) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {"error": {"code": code, "message": message}}
    return json_response(body, status=status, headers=headers)


async def parse(request: web.Request, model: type[Model]) -> Model:
    """The request body validated against ``model``; 4xx with the reason otherwise."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
    raw = await request.read()  # bounded by client_max_size: 413 beyond it
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_encoding", f"body is not UTF-8: {e.reason}") from None
    try:
        # pydantic-core parses and validates in one pass, without building Python dicts
        # first: the request path's cheapest way from bytes to a checked model.
        return model.model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, "invalid_json", f"body is not JSON: {first['msg']}") from None
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, "invalid_request", f"{where}: {first['msg']}") from None


async def call_downstream(
    upstream: Upstream, method: str, path: str, body: Any = None, retry_after: int = 1
) -> Any:
    """A JSON call to another service. Its overload, 5xx or absence becomes our 503 with
    ``Retry-After``; its 4xx (our request was bad for it) passes on with its reason."""
    where = f"{upstream.url}{path}"
    try:
        if body is None:
            r = await upstream.request(method, path)
        else:
            payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
            r = await upstream.request(method, path, payload, JSON_HEADERS)
        data = orjson.loads(r.body)
    except (OSError, TimeoutError, ValueError) as e:
        raise ApiError(
            503, "downstream_unavailable", f"{where}: {e!r}", retry_after=retry_after
        ) from None
    if r.status == 429 or r.status >= 500:
        raise ApiError(
            503, "downstream_unavailable", f"{where}: {r.status}", retry_after=retry_after
        )
    if r.status >= 400:
        message = data.get("error", {}).get("message", str(r.status))
        raise ApiError(r.status, "rejected_downstream", message)
    return data
