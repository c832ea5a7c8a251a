"""Replay, then live, as gRPC responses: the one loop behind every streaming method.

The orchestrator's StreamStepEvents and the status service's WatchJob and
WatchJobs send a feed (stepstream_common.feed) the same way: the entry bytes of
each item, encoded when it was committed, chunked so that no response grows
past a bound, wrapped in the method's envelope (stepstream_common.wire); and a
heartbeat whenever nothing happened for a heartbeat interval, so clients and
proxies can tell a quiet stream from a dead one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

from google.protobuf.message import Message

from stepstream_common import wire
from stepstream_common.feed import Feed, Positioned, ReadPage, Subscription, replay_then_live

# The bytes of entries one response carries (unless one alone is more): well
# below the 4 MB gRPC clients accept by default (grpcurl, most other languages).
MAX_BYTES_PER_MESSAGE = 1 << 20

T = TypeVar("T", bound=Positioned)
H = TypeVar("H", bound=Message)

Envelope = Callable[[list[bytes]], bytes]


def enveloped(entries: list[bytes], envelope: Envelope, max_items: int) -> Iterator[bytes]:
    """Responses carrying `entries` in order: at most `max_items` in each and (unless
    one entry alone is larger) at most MAX_BYTES_PER_MESSAGE of them."""
    for chunk in wire.chunks(entries, max_items, MAX_BYTES_PER_MESSAGE):
        yield envelope(chunk)


async def serve_feed(
    feed: Feed[T],
    subscription: Subscription[T],
    *,
    after: int,
    read_page: ReadPage[T],
    entry: Callable[[T], bytes],
    envelope: Envelope,
    heartbeat: Callable[[], H],
    heartbeat_interval: float,
    max_items: int,
    select: Callable[[T], bool] | None = None,
    until: Callable[[T], bool] | None = None,
) -> AsyncIterator[bytes | H]:
    """The responses of a stream of every item after `after` (see replay_then_live,
    whose rules and errors apply), forever, or up to the batch holding an item
    for which `until` holds. Items for which `select` does not hold are skipped:
    a subscription to everything feeding a filtered stream. The caller owns the
    subscription (it must be taken before `after` was read) and releases it.
    """
    async for items in replay_then_live(feed, subscription, after=after, read_page=read_page,
                                        idle_timeout=heartbeat_interval, page_size=max_items):
        if not items:
            yield heartbeat()
            continue
        selected = items if select is None else [item for item in items if select(item)]
        for response in enveloped([entry(item) for item in selected], envelope, max_items):
            yield response
        if until is not None and any(until(item) for item in selected):
            return
