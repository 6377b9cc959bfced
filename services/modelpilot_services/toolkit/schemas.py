"""Request shapes the services share: document ids, metadata and metadata filters."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import AfterValidator, Field, StringConstraints

from modelpilot_services.toolkit.http import ApiError

DOC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$"
DocumentId = Annotated[str, StringConstraints(pattern=DOC_ID_PATTERN)]
Key = Annotated[str, StringConstraints(min_length=1, max_length=64)]


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _int64(value: object) -> object:
    # JSON allows any integer; the services pass metadata on as JSON through orjson, which
    # (like the index and most stores) holds 64-bit integers only.
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ValueError("integers must fit in 64 bits")
    return value


Scalar = Annotated[
    Annotated[str, StringConstraints(max_length=1024)] | bool | int | float,
    AfterValidator(_int64),
]
Metadata = Annotated[dict[Key, Scalar], Field(max_length=32)]
Filter = Annotated[
    dict[Key, Scalar | Annotated[list[Scalar], Field(min_length=1, max_length=64)]],
    Field(max_length=16),
]
Vector = Annotated[
    list[Annotated[float, AfterValidator(_finite)]], Field(min_length=1, max_length=4096)
]


def document_id(raw: str) -> str:
    """A path parameter checked like a body field: 400 for an id we would never store."""
    if not re.fullmatch(DOC_ID_PATTERN, raw):
        raise ApiError(400, "invalid_document_id", f"document id must match {DOC_ID_PATTERN}")
    return raw
