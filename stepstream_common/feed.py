"""Replay-then-live delivery of committed, numbered items to many subscribers.

Both services stream the same way: the orchestrator streams its event log by
`seq`, the status service streams its change log by `revision`. The rules:

- The writer publishes only what it has committed, in position order, and never
  waits for a subscriber: `publish` appends a reference to each subscriber's
  bounded queue and returns.
- A subscriber that falls more than `max_pending` items behind is not cut off
  and does not slow the writer: its queue is dropped and it goes back to
  reading the durable log from its own cursor, page by page, until it has
  caught up, then rejoins the live queue. Nothing is skipped; memory stays
  bounded.
- Resuming after a cursor and starting after a snapshot use that same path.
  The subscription is always registered before storage is read, so an item
  committed in between arrives through the queue and is dropped by position if
  the read already returned it: no gap, no duplicate.
- A subscriber whose client reads nothing (gRPC's flow control holds its
  stream's write, so its loop stops taking from the queue) costs at most
  `max_pending` references to items every subscriber shares; at its first
  overflow the queue is dropped, and from then on it costs nothing until the
  stream runs again and reads storage. Memory per idle stream is bounded
  whatever the writer commits; the stream itself ends RESOURCE_EXHAUSTED once
  its client has taken nothing for --stream-stall-timeout seconds (see
  stepstream_common.streaming), which releases its subscription.
- The seam between storage and the live queue is checked, not assumed: the
  queue holds everything published after `live_from`, so a storage read that
  ends must have seen at least that far (its `horizon`). A read that saw less
  (a stale or broken store) raises StreamGap instead of letting the stream
  jump from old stored items to newer live ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from stepstream_common.errors import UnavailableError

log = logging.getLogger(__name__)


class Positioned(Protocol):
    @property
    def position(self) -> int: ...


T = TypeVar("T", bound=Positioned)


@dataclass(eq=False)
class Subscription(Generic[T]):
    """One subscriber's bounded queue of published batches."""

    key: str | None
    max_pending: int
    # Everything published after this position is in `pending` (unless overflowed).
    live_from: int = 0
    pending: deque[Sequence[T]] = field(default_factory=deque)
    pending_count: int = 0
    overflowed: bool = False
    closed: bool = False
    overflows: int = 0
    # Resolved by the next offer(), notify() or the wait's own timer.
    waiter: asyncio.Future[bool] | None = None

    def offer(self, items: Sequence[T]) -> None:
        if self.overflowed:
            return
        if self.pending_count + len(items) > self.max_pending:
            self.overflowed = True
            self.overflows += 1
            self.pending.clear()
            self.pending_count = 0
        else:
            self.pending.append(items)
            self.pending_count += len(items)
        self.notify()

    def notify(self) -> None:
        """Wake the waiting reader, if any."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def restart_from_storage(self, latest: int) -> None:
        """Forget the queue: the caller is about to read storage from its cursor."""
        self.live_from = latest
        self.overflowed = False
        self.pending.clear()
        self.pending_count = 0

    def take_after(self, cursor: int) -> list[T]:
        items: list[T] = []
        while self.pending:
            items.extend(item for item in self.pending.popleft() if item.position > cursor)
        self.pending_count = 0
        return items

    async def wait(self, seconds: float) -> bool:
        """True when something arrived (or the feed closed), False after `seconds`.

        A bare future and a timer rather than wait_for(): no task per wake, which
        matters with a thousand watchers each woken by every commit.
        """
        if self.pending or self.overflowed or self.closed:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self.waiter = waiter
        timer = loop.call_later(seconds, _time_up, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self.waiter = None


def _time_up(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Feed(Generic[T]):
    """The live side of a durable, position-ordered log."""

    def __init__(self, *, max_pending: int, key_of: Callable[[T], str] | None = None) -> None:
        self._max_pending = max_pending
        self._key_of = key_of
        self._by_key: dict[str, set[Subscription[T]]] = {}
        self._everything: set[Subscription[T]] = set()
        self.latest = 0
        self.closed = False
        self._overflows_gone = 0

    @property
    def subscriber_count(self) -> int:
        return len(self._everything) + sum(len(s) for s in self._by_key.values())

    @property
    def overflow_count(self) -> int:
        """Overflows of every subscriber since the feed began, those gone included (a counter)."""
        return self._overflows_gone + sum(s.overflows for s in list(self._all()))

    @property
    def deepest_queue(self) -> int:
        """The longest queue of any subscriber now, in items (0 once it overflowed: it reads storage)."""
        return max((s.pending_count for s in list(self._all())), default=0)

    def subscribe(self, key: str | None = None) -> Subscription[T]:
        """Start queueing published items: all of them, or those of one key."""
        sub: Subscription[T] = Subscription(key=key, max_pending=self._max_pending, live_from=self.latest)
        if key is None:
            self._everything.add(sub)
        else:
            self._by_key.setdefault(key, set()).add(sub)
        sub.closed = self.closed
        return sub

    @contextlib.contextmanager
    def subscribed(self, key: str | None = None) -> Iterator[Subscription[T]]:
        """subscribe() for the length of a block: released however it ends (an
        error, a cancellation at any await, the stream closed by its caller)."""
        sub = self.subscribe(key)
        try:
            yield sub
        finally:
            self.unsubscribe(sub)

    def unsubscribe(self, sub: Subscription[T]) -> None:
        if sub.overflows:
            self._overflows_gone += sub.overflows
            sub.overflows = 0  # counted once, however often it is unsubscribed
        if sub.key is None:
            self._everything.discard(sub)
            return
        group = self._by_key.get(sub.key)
        if group is not None:
            group.discard(sub)
            if not group:
                del self._by_key[sub.key]

    def publish(self, items: Sequence[T], latest: int) -> None:
        """Hand committed items (in position order) to every subscriber; never blocks."""
        self.latest = max(self.latest, latest)
        if items:
            for sub in self._everything:
                sub.offer(items)
            if self._by_key and self._key_of is not None:
                for key, group in _group(items, self._key_of).items():
                    for sub in self._by_key.get(key, ()):
                        sub.offer(group)
        elif self._everything or self._by_key:
            for sub in self._all():
                sub.notify()

    def skip_to(self, latest: int) -> None:
        """Storage no longer holds the items up to `latest` that were never published:
        every subscriber drops its queue and goes back to storage from its own
        cursor (which says OUT_OF_RANGE to one that is too old) instead of being
        handed what comes after the hole."""
        self.latest = max(self.latest, latest)
        for sub in self._all():
            sub.overflowed = True
            sub.notify()

    def close(self) -> None:
        """End every replay_then_live() loop at its next step (graceful shutdown)."""
        self.closed = True
        for sub in self._all():
            sub.closed = True
            sub.notify()

    def _all(self) -> Iterable[Subscription[T]]:
        yield from self._everything
        for group in self._by_key.values():
            yield from group


def _group(items: Sequence[T], key_of: Callable[[T], str]) -> dict[str, list[T]]:
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(key_of(item), []).append(item)
    return groups


@dataclass(frozen=True)
class Page(Generic[T]):
    """Stored items after a cursor, and the latest position committed when they were read."""

    items: Sequence[T]
    horizon: int


class StreamGap(UnavailableError):
    """Storage ended before the live queue begins: streaming on would skip items.

    The stream ends UNAVAILABLE; its client resumes from its own cursor."""


ReadPage = Callable[[int, int], Awaitable[Page[T]]]


async def replay_then_live(
    feed: Feed[T],
    subscription: Subscription[T],
    *,
    after: int,
    read_page: ReadPage[T],
    idle_timeout: float,
    page_size: int = 500,
) -> AsyncIterator[Sequence[T]]:
    """Yield every item after `after`, in order, forever; an empty batch means
    nothing happened for `idle_timeout` seconds (time for a heartbeat).

    `read_page(cursor, limit)` returns stored items with position > cursor in
    order, and raises CursorOutOfRangeError if the cursor is older than what storage
    retains. The subscription must have been taken before whatever produced
    `after` (a snapshot, a client's cursor) was read. Raises StreamGap if
    storage cannot reach the live queue (see the module docstring).
    """
    cursor = after
    behind = after < feed.latest
    while not feed.closed:
        if behind or subscription.overflowed:
            subscription.restart_from_storage(feed.latest)
            while True:
                page = await read_page(cursor, page_size)
                if page.items:
                    yield page.items
                    cursor = page.items[-1].position
                if len(page.items) < page_size:
                    break
            if page.horizon < subscription.live_from:
                gap = StreamGap(f"storage ends at {page.horizon} but live items start after {subscription.live_from}")
                log.error("ending a stream rather than skipping: %s", gap)
                raise gap
            behind = False
            continue
        items = subscription.take_after(cursor)
        if items:
            yield items
            cursor = items[-1].position
            continue
        if not await subscription.wait(idle_timeout) and not feed.closed:
            yield []
