"""Opaque page tokens: the sort key of the last item returned."""

from __future__ import annotations

import base64
import json
from typing import Any

from stepstream_common.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int, field: str = "page_size") -> int:
    if requested < 0:
        raise InvalidArgument(f"{field} must not be negative",
                              [FieldViolation(field, f"must not be negative, got {requested}")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


def decode_token(token: str, length: int, field: str = "page_token") -> list[Any] | None:
    """The key in `token` (None for an empty token); InvalidArgument if it is not ours."""
    if not token:
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeDecodeError):
        key = None
    if not isinstance(key, list) or len(key) != length:
        raise InvalidArgument("invalid page token", [FieldViolation(field, "not a token from a previous page")])
    return key
