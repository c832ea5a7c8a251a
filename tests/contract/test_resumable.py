"""stepstream.resumable against a real gRPC server on loopback whose one streaming
method misbehaves on purpose, call by call: each resumed request carries the
cursor of what was taken, nothing is handed over twice or skipped, OUT_OF_RANGE
resyncs, silence and an ended stream reconnect, terminal errors surface, and
the backoff counts attempts without progress (asserted on the count it is
given, never on time)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.wrappers_pb2 import Int64Value
from stepstream.backoff import Backoff
from stepstream.resumable import Reconnecting, ResumableStream, Silence, StreamEnded, Verdict

from tests.helpers import DEADLINE, eventually

SERVICE = "test.Scripted"
RECONNECT = "reconnect"


@dataclass(frozen=True)
class Send:
    """Send the next `count` seqs after the request's cursor."""

    count: int


@dataclass(frozen=True)
class Abort:
    code: grpc.StatusCode


@dataclass(frozen=True)
class Hang:
    """Send nothing more until the client cancels the call."""


Step = Send | Abort | Hang


class ScriptedServer:
    """Answers its Nth call with scripts[N] (a call past the last script fails with
    FAILED_PRECONDITION); a script that runs out ends the stream. The request is the
    cursor, each message one seq."""

    def __init__(self, *scripts: list[Step]) -> None:
        self.scripts = scripts
        self.requests: list[int] = []
        self.open_calls = 0

    async def stream(self, request: Int64Value, context: grpc.aio.ServicerContext[Int64Value, Int64Value]
                     ) -> AsyncIterator[Int64Value]:
        number = len(self.requests)
        self.requests.append(request.value)
        script = self.scripts[number] if number < len(self.scripts) else [Abort(grpc.StatusCode.FAILED_PRECONDITION)]
        seq = request.value
        self.open_calls += 1
        try:
            for step in script:
                if isinstance(step, Send):
                    for _ in range(step.count):
                        seq += 1
                        yield Int64Value(value=seq)
                elif isinstance(step, Abort):
                    await context.abort(step.code, f"scripted {step.code.name}")
                else:
                    await asyncio.Event().wait()
        finally:
            self.open_calls -= 1


@contextlib.asynccontextmanager
async def served(scripted: ScriptedServer) -> AsyncIterator[grpc.aio.Channel]:
    """`scripted` on 127.0.0.1:0, and a channel to it."""
    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(
        scripted.stream, request_deserializer=Int64Value.FromString,
        response_serializer=Int64Value.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Stream": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


@dataclass(frozen=True)
class RecordingBackoff(Backoff):
    """Never waits; keeps the failure count of every delay asked for."""

    asked: list[int] = field(default_factory=list)

    def delay(self, failures: int) -> float:
        self.asked.append(failures)
        return 0.0


class Reader:
    """The reader's side: its cursor is the last seq it took, a resync moves it to
    `resync_to`. UNAVAILABLE, silence, an ended stream and a Broken message are
    retried, OUT_OF_RANGE resyncs, anything else fails."""

    def __init__(
        self, channel: grpc.aio.Channel, *, resync_to: int = 0, breaks_once_on: int | None = None,
        resync_breaks_once: bool = False, silent_after: int | None = None,
    ) -> None:
        self._method: grpc.aio.UnaryStreamMultiCallable[Int64Value, Int64Value] = channel.unary_stream(
            f"/{SERVICE}/Stream", request_serializer=Int64Value.SerializeToString,
            response_deserializer=Int64Value.FromString,
        )
        self.cursor = 0
        self.calls = 0
        self.classified: list[Exception] = []
        self.resyncs = 0
        self.backoff = RecordingBackoff()
        self._resync_to = resync_to
        self._breaks_once_on = breaks_once_on
        self._resync_breaks_once = resync_breaks_once
        self._silent_after = silent_after

    def stream(self) -> ResumableStream[Int64Value, int]:
        return ResumableStream(
            self._open_call, self._handle, silence=self._silence, classify=self._classify,
            resync=self._resync, backoff=self.backoff,
        )

    def _open_call(self) -> grpc.aio.UnaryStreamCall[Int64Value, Int64Value]:
        self.calls += 1
        return self._method(Int64Value(value=self.cursor))

    def _silence(self) -> float | None:
        """A limit only where the first call hangs, so no message sent can ever be late."""
        return 0.01 if self.calls == 1 and self.cursor == self._silent_after else None

    async def _handle(self, message: Int64Value) -> int:
        if message.value == self._breaks_once_on:
            self._breaks_once_on = None
            raise Broken(f"cannot take {message.value}")
        self.cursor = message.value
        return message.value

    async def _classify(self, error: Exception) -> Verdict:
        self.classified.append(error)
        if isinstance(error, Silence | StreamEnded | Broken):
            return Verdict.RETRY
        if isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE:
            return Verdict.RETRY
        if isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.OUT_OF_RANGE:
            return Verdict.RESYNC
        return Verdict.FAIL

    async def _resync(self) -> None:
        self.resyncs += 1
        if self._resync_breaks_once:
            self._resync_breaks_once = False
            raise Broken("the snapshot was cut short")
        self.cursor = self._resync_to


class Broken(Exception):
    pass


async def read_until_failure(stream: ResumableStream[Int64Value, int]) -> tuple[list[int | str], grpc.StatusCode]:
    """Everything the stream gives (RECONNECT for a Reconnecting) until it fails, and the failure's code."""
    items: list[int | str] = []
    try:
        async with asyncio.timeout(DEADLINE):
            async for item in stream:
                items.append(RECONNECT if isinstance(item, Reconnecting) else item)
    except grpc.aio.AioRpcError as error:
        return items, error.code()
    raise AssertionError("a resumable stream never ends by itself")


async def until(condition: Callable[[], bool], what: str) -> None:
    async def probe() -> bool | None:
        return True if condition() else None

    await eventually(probe, what)


def codes(errors: list[Exception]) -> list[grpc.StatusCode | str]:
    return [error.code() if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__ for error in errors]


DENIED = Abort(grpc.StatusCode.PERMISSION_DENIED)  # terminal: how most scripts end the stream
UNAVAILABLE = Abort(grpc.StatusCode.UNAVAILABLE)


async def test_each_attempt_resumes_after_the_last_message_taken() -> None:
    server = ScriptedServer([Send(3), UNAVAILABLE], [Send(2), UNAVAILABLE], [Send(1), DENIED])
    async with served(server) as channel:
        reader = Reader(channel)
        items, code = await read_until_failure(reader.stream())
    assert server.requests == [0, 3, 5]
    assert items == [1, 2, 3, RECONNECT, 4, 5, RECONNECT, 6], "each seq once, in order"
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert codes(reader.classified) == [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE,
                                        grpc.StatusCode.PERMISSION_DENIED]
    assert reader.backoff.asked == [0, 0], "each attempt made progress"
    assert reader.resyncs == 0


async def test_out_of_range_resyncs_at_once_and_resumes_from_there() -> None:
    server = ScriptedServer([Send(2), Abort(grpc.StatusCode.OUT_OF_RANGE)], [Send(2), DENIED])
    async with served(server) as channel:
        reader = Reader(channel, resync_to=10)
        items, code = await read_until_failure(reader.stream())
    assert reader.resyncs == 1
    assert server.requests == [0, 10]
    assert items == [1, 2, 11, 12]
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert reader.backoff.asked == [], "a resync does not back off"


async def test_a_resync_that_fails_is_retried_before_the_stream_reopens() -> None:
    """The resync that completes resets the backoff: the UNAVAILABLE after it backs off from 0."""
    server = ScriptedServer([Abort(grpc.StatusCode.OUT_OF_RANGE)], [UNAVAILABLE], [Send(1), DENIED])
    async with served(server) as channel:
        reader = Reader(channel, resync_to=10, resync_breaks_once=True)
        items, _ = await read_until_failure(reader.stream())
    assert reader.resyncs == 2
    assert server.requests == [0, 10, 10], "nothing reopened before the resync completed"
    assert items == [RECONNECT, RECONNECT, 11]
    assert codes(reader.classified)[:3] == [grpc.StatusCode.OUT_OF_RANGE, "Broken", grpc.StatusCode.UNAVAILABLE]
    assert reader.backoff.asked == [0, 0]


async def test_silence_and_an_ended_stream_reconnect_from_the_cursor_and_cancel_the_call() -> None:
    server = ScriptedServer([Send(2), Hang()], [Send(1)], [DENIED])
    async with served(server) as channel:
        reader = Reader(channel, silent_after=2)
        items, _ = await read_until_failure(reader.stream())
        await until(lambda: server.open_calls == 0, "the server to see the silent call cancelled")
    assert server.requests == [0, 2, 3]
    assert items == [1, 2, RECONNECT, 3, RECONNECT]
    assert codes(reader.classified) == ["Silence", "StreamEnded", grpc.StatusCode.PERMISSION_DENIED]


async def test_the_backoff_counts_attempts_in_a_row_without_progress() -> None:
    server = ScriptedServer([UNAVAILABLE], [UNAVAILABLE], [Send(1), UNAVAILABLE], [UNAVAILABLE], [DENIED])
    async with served(server) as channel:
        reader = Reader(channel)
        items, _ = await read_until_failure(reader.stream())
    assert reader.backoff.asked == [0, 1, 0, 1], "reset by the attempt that took a message"
    assert server.requests == [0, 0, 0, 1, 1]
    assert items == [RECONNECT, RECONNECT, 1, RECONNECT, RECONNECT]


async def test_an_attempt_that_breaks_on_a_message_stops_there_and_does_not_reset_the_backoff() -> None:
    """Seq 2 breaks (as a gap would): 3, sent in the same call, is not handed over then; the
    next call resumes after 1. Taking 1 first does not make that attempt progress."""
    server = ScriptedServer([UNAVAILABLE], [Send(3), UNAVAILABLE], [Send(2), DENIED])
    async with served(server) as channel:
        reader = Reader(channel, breaks_once_on=2)
        items, _ = await read_until_failure(reader.stream())
    assert items == [RECONNECT, 1, RECONNECT, 2, 3]
    assert server.requests == [0, 0, 1]
    assert codes(reader.classified)[:2] == [grpc.StatusCode.UNAVAILABLE, "Broken"]
    assert reader.backoff.asked == [0, 1]


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED])
async def test_a_terminal_error_surfaces_at_once(code: grpc.StatusCode) -> None:
    server = ScriptedServer([Send(1), Abort(code)])
    async with served(server) as channel:
        reader = Reader(channel)
        items, raised = await read_until_failure(reader.stream())
    assert (items, raised) == ([1], code)
    assert server.requests == [0]
    assert reader.backoff.asked == []


async def test_closing_or_cancelling_the_reader_cancels_the_call() -> None:
    server = ScriptedServer([Send(1), Hang()], [Send(1), Hang()])
    async with served(server) as channel:
        async with contextlib.aclosing(aiter(Reader(channel).stream())) as items:
            assert await anext(items) == 1
        await until(lambda: server.open_calls == 0, "the server to see the call cancelled (aclose)")

        taken: list[int | Reconnecting] = []

        async def read_on() -> None:
            async for item in Reader(channel).stream():
                taken.append(item)

        reading = asyncio.create_task(read_on())
        await until(lambda: taken == [1], "the second call's message")
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await until(lambda: server.open_calls == 0, "the server to see the call cancelled (task cancelled)")
