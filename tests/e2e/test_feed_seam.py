"""The seam between stored and live items is checked: a storage read that ends
before the live queue begins ends the stream (UNAVAILABLE) instead of jumping."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from stepstream_common.feed import Feed, Page, StreamGap, replay_then_live


class Item(NamedTuple):
    position: int


async def _first_batches(feed: Feed[Item], stored_until: int, count: int) -> list[list[int]]:
    subscription = feed.subscribe()
    feed.publish([Item(position) for position in range(4, 7)], 6)

    async def read_page(cursor: int, limit: int) -> Page[Item]:
        # A store that has only committed up to `stored_until` (stale, or broken).
        items = [Item(position) for position in range(cursor + 1, stored_until + 1)][:limit]
        return Page(items, stored_until)

    batches: list[list[int]] = []
    async for batch in replay_then_live(feed, subscription, after=0, read_page=read_page, idle_timeout=0.01):
        batches.append([item.position for item in batch])
        if len(batches) == count:
            break
    return batches


async def test_a_store_that_reaches_the_live_queue_streams_without_a_gap() -> None:
    feed: Feed[Item] = Feed(max_pending=100)
    feed.latest = 3
    assert await _first_batches(feed, stored_until=6, count=1) == [[1, 2, 3, 4, 5, 6]]


async def test_a_store_behind_the_live_queue_ends_the_stream_rather_than_skip() -> None:
    feed: Feed[Item] = Feed(max_pending=100)
    feed.latest = 3
    with pytest.raises(StreamGap):
        # Stored 1..2 then live 4..6 would silently skip 3.
        await _first_batches(feed, stored_until=2, count=3)
