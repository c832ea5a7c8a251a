"""A server stream resumed from what was seen, across any disconnect: the one
loop behind every long-lived stream (the status service following an
orchestrator, a client watching a job).

The rules:

- Each attempt opens a new call with `open_call()`, which builds its request
  from the reader's cursor: what `handle` has taken so far. The stream keeps
  no position of its own. Messages go to `handle` one at a time, in order,
  from the current call only; the attempt ends at the first one `handle`
  raises on, so nothing after it in that call is handed over.
- An attempt ends on any error (from `open_call`, the call, `handle` or
  `resync`), when the server ends the stream (StreamEnded), or when no message
  arrives within `silence()` seconds (Silence; None: no limit). `silence()` is
  asked before every read, so a limit learned from the stream applies at once.
  The call is cancelled however the attempt ends.
- `classify(error)`, awaited once per ended attempt, decides: RETRY reopens
  after a backoff, RESYNC awaits `resync()` at once and then reopens, FAIL
  re-raises the error. A resync that fails is classified in turn and done
  again before anything is reopened.
- The backoff is given the number of attempts in a row without progress.
  Progress is an attempt that handled a message and ended with no error from
  `handle`, or a resync that completed. An attempt that breaks on a message
  (a gap, a bug) never resets the count, so a stream that breaks on every
  attempt keeps backing off.
- Before each backoff sleep the reader gets a Reconnecting item, in order with
  what `handle` returned (None is not passed on), so it can show that it is
  no longer live.
- Only FAIL ends the iteration. Closing it (aclose, contextlib.aclosing) or
  cancelling its task cancels the call.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import grpc

from stepstream.backoff import Backoff

T = TypeVar("T")
V = TypeVar("V")


class Verdict(enum.Enum):
    """What an ended attempt calls for."""

    RETRY = "retry"
    RESYNC = "resync"
    FAIL = "fail"


class Silence(Exception):
    """No message within the silence limit: the peer, or the path to it, is presumed dead."""


class StreamEnded(Exception):
    """The server ended the stream without an error (e.g. it is shutting down)."""


@dataclass(frozen=True)
class Reconnecting:
    """An attempt ended with `error`; the next one opens after `delay` seconds."""

    error: Exception
    delay: float


async def next_message(call: grpc.aio.UnaryStreamCall[Any, T], silence: float | None) -> T | None:
    """The next message of `call`, None at its end; Silence if none arrives within `silence` seconds."""
    try:
        async with asyncio.timeout(silence):
            message = await call.read()
    except TimeoutError:
        raise Silence(f"no message for {silence:g}s") from None
    return None if message is grpc.aio.EOF else cast("T", message)


class ResumableStream(Generic[T, V]):
    """Iterate it for what `handle` returns and a Reconnecting before each backoff; see the module docstring."""

    def __init__(
        self,
        open_call: Callable[[], grpc.aio.UnaryStreamCall[Any, T]],
        handle: Callable[[T], Awaitable[V | None]],
        *,
        silence: Callable[[], float | None],
        classify: Callable[[Exception], Awaitable[Verdict]],
        resync: Callable[[], Awaitable[None]],
        backoff: Backoff,
    ) -> None:
        self._open_call = open_call
        self._handle = handle
        self._classify = classify
        self._resync = resync
        self._backoff = backoff
        self._silence = silence

    async def __aiter__(self) -> AsyncGenerator[V | Reconnecting, None]:
        failures = 0
        must_resync = False
        while True:
            progressed = False
            try:
                if must_resync:
                    await self._resync()
                    must_resync, failures = False, 0
                call = self._open_call()
                try:
                    while (message := await next_message(call, self._silence())) is not None:
                        progressed = False
                        output = await self._handle(message)
                        progressed = True
                        if output is not None:
                            yield output
                    raise StreamEnded("the server ended the stream")
                finally:
                    call.cancel()
            except Exception as error:
                ended, verdict = error, await self._classify(error)
                if verdict is Verdict.FAIL:
                    raise
            # An attempt only ever ends in an error, so `ended` and `verdict` are its.
            if verdict is Verdict.RESYNC:
                must_resync = True
                continue
            if progressed:
                failures = 0
            delay = self._backoff.delay(failures)
            failures += 1
            yield Reconnecting(ended, delay)
            await asyncio.sleep(delay)
