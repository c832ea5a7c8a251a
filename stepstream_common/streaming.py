"""Replay, then live, as gRPC responses: the one loop behind every streaming method.

The orchestrator's StreamStepEvents and the status service's WatchJob and
WatchJobs send a feed (stepstream_common.feed) the same way: the entry bytes of
each item, encoded when it was committed, chunked so that no response grows
past a bound, wrapped in the method's envelope (stepstream_common.wire); and a
heartbeat whenever nothing happened for a heartbeat interval, so clients and
proxies can tell a quiet stream from a dead one.

Limits (the README's "Limits" table): no client, hostile or clumsy, can take
what the others need.

- StreamAdmission, a server interceptor, counts every server-streaming call
  (ours, health's Watch, reflection's) while it runs: at most --max-streams in
  the service, --max-streams-per-connection on one client connection (its peer
  address and port) and, with --tokens-file, --max-streams-per-token with one
  token (stepstream_common.auth.caller_name). One over is RESOURCE_EXHAUSTED
  before the call starts; calls already running, and everyone else's, go on.
- Slots bounds what one kind of stream holds (the orchestrator's snapshots,
  each a database read transaction on a thread of its own; the status
  service's WatchJobs listings, each in memory; the watchers of one job).
- A client that stops reading: gRPC's flow control holds the write of its
  stream (the feed's queue for it is bounded, see stepstream_common.feed), so
  what the stream holds would be held for as long as the connection lives.
  handed_over runs the stream's body in a task of its own that hands one
  message at a time to gRPC's writer; when a message waits
  --stream-stall-timeout seconds for the writer to take it, the body is closed
  at once, letting go of its subscription, read transaction, listing and
  slots, and the call ends RESOURCE_EXHAUSTED (reason STREAM_STALLED) as soon
  as its client reads again, after the messages already on their way. A client
  resumes from the last message it received. The call itself (one message
  in flight) counts against the client's own stream limits until its
  connection closes, so stalling streams on purpose only uses up one's own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from stepstream_common import wire
from stepstream_common.auth import caller_name
from stepstream_common.config import ServiceConfig
from stepstream_common.errors import ResourceExhaustedError
from stepstream_common.feed import Feed, Positioned, ReadPage, Subscription, replay_then_live
from stepstream_common.rpc import Context, abort, wrapped_handler

# The bytes of entries one response carries (unless one alone is more): well
# below the 4 MB gRPC clients accept by default (grpcurl, most other languages).
MAX_BYTES_PER_MESSAGE = 1 << 20

T = TypeVar("T", bound=Positioned)
H = TypeVar("H", bound=Message)
R = TypeVar("R")

# The google.rpc.ErrorInfo reasons of the RESOURCE_EXHAUSTED these limits answer.
STREAMS = "STREAMS"
STREAMS_PER_CONNECTION = "STREAMS_PER_CONNECTION"
STREAMS_PER_TOKEN = "STREAMS_PER_TOKEN"
SNAPSHOTS = "SNAPSHOTS"
WATCHERS_PER_JOB = "WATCHERS_PER_JOB"
STREAM_STALLED = "STREAM_STALLED"

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


# --- Limits ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """A bound on how many of something may be held at once, as the caller is told of it."""

    reason: str  # google.rpc.ErrorInfo reason
    setting: str  # the flag that sets it
    value: int
    what: str  # what is counted, plural ("streams open")


class Slots:
    """At most `limit.value` held at once per key (a connection, a token, a job,
    or "" for the whole service); one more is ResourceExhaustedError."""

    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}

    def count(self, key: str = "") -> int:
        return self._held.get(key, 0)

    @contextlib.contextmanager
    def held(self, key: str = "", subject: str = "this service") -> Iterator[None]:
        """One slot of `key` for the length of the block; `subject` names the key to the caller."""
        limit = self.limit
        if self.count(key) >= limit.value:
            raise ResourceExhaustedError(
                f"{subject}: {limit.what} at the limit of {limit.value} ({limit.setting}); retry when one ends",
                reason=limit.reason, subject=subject, setting=limit.setting, limit=limit.value,
            )
        self._held[key] = self.count(key) + 1
        try:
            yield
        finally:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]


@dataclass(frozen=True)
class StreamLimits:
    """The stream limits every service has (ServiceConfig's settings of the same names)."""

    max_streams: int
    max_streams_per_connection: int
    max_streams_per_token: int

    @classmethod
    def of(cls, config: ServiceConfig) -> StreamLimits:
        return cls(config.max_streams, config.max_streams_per_connection, config.max_streams_per_token)


class StreamAdmission(grpc.aio.ServerInterceptor):
    """Admits every server-streaming call within StreamLimits, for as long as it
    runs (see the module docstring). Placed after the auth interceptor, so that
    a call is counted against its token and a call denied is not counted."""

    def __init__(self, limits: StreamLimits) -> None:
        self._everywhere = Slots(Limit(STREAMS, "--max-streams", limits.max_streams, "streams open"))
        self._per_connection = Slots(Limit(STREAMS_PER_CONNECTION, "--max-streams-per-connection",
                                           limits.max_streams_per_connection, "streams open"))
        self._per_token = Slots(Limit(STREAMS_PER_TOKEN, "--max-streams-per-token",
                                      limits.max_streams_per_token, "streams open"))

    @contextlib.contextmanager
    def admitted(self, context: Context) -> Iterator[None]:
        """A slot of every limit for the length of the block, or ResourceExhaustedError
        naming the first one full (the most particular first: the caller's own)."""
        peer = context.peer()
        token = caller_name()
        with contextlib.ExitStack() as slots:
            slots.enter_context(self._per_connection.held(peer, f"connection {peer}"))
            if token:
                slots.enter_context(self._per_token.held(token, f"token {token!r}"))
            slots.enter_context(self._everywhere.held())
            yield

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler

        async def slot(context: Context) -> contextlib.ExitStack:
            slots = contextlib.ExitStack()
            try:
                slots.enter_context(self.admitted(context))
            except ResourceExhaustedError as refused:
                await abort(context, refused)  # outside the servicer: no error boundary maps it
            return slots

        return wrapped_handler(handler, slot)


def _stalled(seconds: float) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"the client took no message for {seconds:g}s (--stream-stall-timeout), so the stream let go of what it "
        "held and ended; resume after the last message received",
        reason=STREAM_STALLED, subject="this call", setting="--stream-stall-timeout", limit=seconds,
    )


@dataclass(frozen=True)
class _Ended:
    error: BaseException | None


async def handed_over(source: AsyncGenerator[R, None], stall_timeout: float) -> AsyncGenerator[R, None]:
    """`source`'s items, produced by a task of their own and handed over one at a
    time: the caller (gRPC's writer) takes the next only once it has written the
    one before, and the task keeps one ready.

    If an item waits `stall_timeout` seconds to be taken (its client reads
    nothing and flow control holds the write), `source` is closed at once,
    releasing what it holds, and the caller gets ResourceExhaustedError
    (STREAM_STALLED) once it takes the items already handed over. An error of
    `source` reaches the caller as raised, after the items before it. Closing
    the caller's iteration (use contextlib.aclosing) closes `source`.
    """
    handoff: asyncio.Queue[tuple[R] | _Ended] = asyncio.Queue(maxsize=1)

    async def taken_in_time(item: R) -> bool:
        try:
            async with asyncio.timeout(stall_timeout):
                await handoff.put((item,))
        except TimeoutError:
            return False
        return True

    async def produce() -> None:
        ending = _Ended(None)
        try:
            async with contextlib.aclosing(source) as items:
                async for item in items:
                    if not await taken_in_time(item):
                        ending = _Ended(_stalled(stall_timeout))
                        break
        except Exception as error:
            ending = _Ended(error)
        # `source` is closed by now: waiting for the caller to take the end holds nothing.
        await handoff.put(ending)

    producer = asyncio.create_task(produce(), name="stream-producer")
    try:
        while True:
            entry = await handoff.get()
            if isinstance(entry, _Ended):
                if entry.error is not None:
                    raise entry.error
                return
            yield entry[0]
    finally:
        await _ended(producer)


async def _ended(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait until it has ended, even if the caller is cancelled
    meanwhile (that is raised afterwards): what the task holds (a subscription, a
    read transaction) is let go of before the caller goes on."""
    task.cancel()
    interrupted = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError
