"""Opaque, tamper-evident page tokens: the sort key of the last item returned,
bound to the query that produced it and signed by the store that issued it.

A token is `base64url(json([scope digest, key]) + truncated HMAC)`. The HMAC key
is a secret kept in the store (so tokens survive a restart and work on every
replica of one database); the scope names the endpoint and its filters, so a
token from another endpoint, another filter or another store, or one that was
truncated or edited, is INVALID_ARGUMENT rather than a silently wrong page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from typing import Any

from stepstream_common.errors import FieldViolation, InvalidArgumentError

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_TOKEN_LENGTH = 1024

_SIGNATURE_BYTES = 16


def page_size(requested: int, field: str = "page_size") -> int:
    if requested < 0:
        raise InvalidArgumentError(f"{field} must not be negative",
                              [FieldViolation(field, f"must not be negative, got {requested}")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def new_secret() -> str:
    return secrets.token_hex(32)


def scope(endpoint: str, *filters: Any) -> str:
    """The query a token belongs to: an endpoint and the filters it was called with."""
    return json.dumps([endpoint, *filters], separators=(",", ":"), sort_keys=True, default=list)


class PageTokens:
    """Issues and checks one store's page tokens."""

    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def encode(self, query: str, key: Sequence[Any]) -> str:
        body = json.dumps([_digest(query), list(key)], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(body + self._sign(body)).decode()

    def decode(
        self, token: str, query: str, types: Sequence[type], field: str = "page_token"
    ) -> list[Any] | None:
        """The key in `token` (None for an empty token); InvalidArgumentError unless this
        store issued it for this very query."""
        if not token:
            return None
        key = self._verified(token, query)
        valid = key is not None and len(key) == len(types)
        if key is None or not valid or not all(_is(value, kind) for value, kind in zip(key, types, strict=True)):
            raise InvalidArgumentError(
                "invalid page token",
                [FieldViolation(field, "not a token from the previous page of this same request")],
            )
        return key

    def _verified(self, token: str, query: str) -> list[Any] | None:
        if len(token) > MAX_TOKEN_LENGTH:
            return None
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
        except (ValueError, binascii.Error, UnicodeEncodeError):
            return None
        body, signature = raw[:-_SIGNATURE_BYTES], raw[-_SIGNATURE_BYTES:]
        if len(raw) <= _SIGNATURE_BYTES or not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            digest, key = json.loads(body)
        except (ValueError, TypeError):
            return None
        if digest != _digest(query) or not isinstance(key, list):
            return None
        return key

    def _sign(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_SIGNATURE_BYTES]


def _digest(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16]


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)
