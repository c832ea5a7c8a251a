"""Hand-assembled protobuf wire bytes for the hot streaming paths.

Events and watch updates are serialized once, when they are committed; a stream
then sends the same bytes to every subscriber and every replay, wrapping them
in their envelope by concatenation instead of re-parsing and re-serializing.
This is exactly the standard encoding of a length-delimited field, so any
protobuf client reads the result as the declared message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from google.protobuf.message import Message


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One length-delimited field (a string, bytes or embedded message)."""
    return varint(field_number << 3 | 2) + varint(len(payload)) + payload


def varint_field(field_number: int, value: int) -> bytes:
    """One varint field (int64, int32, bool, enum); zero is the default and omitted."""
    return varint(field_number << 3) + varint(value) if value else b""


def repeated(field_number: int, payloads: Iterable[bytes]) -> bytes:
    """A repeated message field: each element is its own length-delimited entry."""
    tag = varint(field_number << 3 | 2)
    return b"".join(tag + varint(len(p)) + p for p in payloads)


def chunks(payloads: list[bytes], max_items: int, max_bytes: int) -> list[list[bytes]]:
    """Split into runs of at most max_items and (unless one item is larger) max_bytes."""
    out: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for payload in payloads:
        if current and (len(current) >= max_items or size + len(payload) > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append(payload)
        size += len(payload)
    if current:
        out.append(current)
    return out


M = TypeVar("M", bound=Message)


def clone(message: M) -> M:
    """An independent copy (messages held by a running job keep changing)."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy
