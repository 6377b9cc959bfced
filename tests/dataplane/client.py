"""A tiny JSON-over-HTTP client for the data-plane tests (requests, no retries)."""

from __future__ import annotations

from typing import Any

import requests


def call(method: str, url: str, body: Any = None, **kwargs: Any) -> requests.Response:
    return requests.request(method, url, json=body, timeout=60, **kwargs)


def ok(method: str, url: str, body: Any = None) -> Any:
    r = call(method, url, body)
    assert r.status_code == 200, f"{method} {url} -> {r.status_code} {r.text[:300]}"
    return r.json()
