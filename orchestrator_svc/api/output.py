"""StreamOutput and ListOutput: what steps printed, served by the orchestrator that captured it.

Output is served here rather than by the status service: the orchestrator
holds it (orchestrator_svc.output), and relaying it through the event stream
would put megabytes of output in the way of the status events the status
service must apply in order (a follower reads one stream). On a stream of its
own, a step printing without pause costs status watchers nothing.

Limits (the README's "Limits" table): a stream reads at most MAX_LINES_PER_MESSAGE
lines at a time (and at most the store's read size, 1 MiB of line data, unless
one line alone is more) and sends them in messages of at most
stepstream_common.streaming's MAX_BYTES_PER_MESSAGE; it holds one such read
and the message handed to gRPC (stepstream_common.streaming.handed_over), and
lets go of both when its client stops reading for --stream-stall-timeout.
`tail` is at most MAX_TAIL lines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass

from stepstream.orchestrator.v1 import orchestrator_service_pb2 as pb

from orchestrator_svc.engine.engine import Engine
from orchestrator_svc.output import (
    AttemptOutput,
    OutputGone,
    OutputKey,
    OutputLine,
    OutputNotFound,
    OutputStore,
    OutputStream,
)
from orchestrator_svc.storage.base import EventStore, StoredJob
from stepstream_common.errors import CursorOutOfRangeError, NotFoundError, quoted
from stepstream_common.paging import page_size, scope
from stepstream_common.rpc import Violations
from stepstream_common.streaming import MAX_BYTES_PER_MESSAGE
from stepstream_common.timeutil import duration, timestamp

MAX_LINES_PER_MESSAGE = 500
MAX_TAIL = 100_000

# The google.rpc.ErrorInfo reasons of StreamOutput's OUT_OF_RANGE.
OUTPUT_GONE = "OUTPUT_GONE"  # from_line is older than the first retained line
LINE_AHEAD = "LINE_AHEAD"  # from_line is past the attempt's last line

_STREAMS = frozenset(pb.OutputStream.values()) - {pb.OUTPUT_STREAM_UNSPECIFIED}
_ALWAYS_SENT = frozenset({OutputStream.NOTICE})


@dataclass(frozen=True)
class _Plan:
    """What one StreamOutput sends: `key`'s lines from `start`, of `streams`
    (empty: all), up to `stop` (None: until the attempt ends)."""

    key: OutputKey
    start: int
    stop: int | None
    streams: frozenset[int]


def _check_target(request: pb.StreamOutputRequest | pb.ListOutputRequest, step_required: bool) -> Violations:
    violations = Violations().require("job_id", bool(request.job_id), "is required")
    if step_required:
        violations.require("step", bool(request.step), "is required")
    else:
        violations.require("step", bool(request.step) or not request.HasField("child"), "is required with child")
    return violations.require("child", request.child >= 0, f"must not be negative, got {request.child}")


def _check_stream_request(request: pb.StreamOutputRequest) -> None:
    start = request.WhichOneof("start")
    (
        _check_target(request, step_required=True)
        .require("attempt", request.attempt >= 0, f"must not be negative (0: the latest), got {request.attempt}")
        .require("from_line", start != "from_line" or request.from_line >= 0,
                 f"must not be negative, got {request.from_line}")
        .require("tail", start != "tail" or 0 < request.tail <= MAX_TAIL,
                 f"must be 1 to {MAX_TAIL}, got {request.tail}")
        .require_all_in("streams", request.streams, _STREAMS, lambda stream: f"unknown output stream {stream}")
        .check()
    )


def _where(job_id: str, step: str, child: int | None) -> str:
    return f"job {job_id} step {quoted(step)}" + ("" if child is None else f" child {child}")


def _chunks(lines: list[OutputLine]) -> Iterator[pb.StreamOutputResponse]:
    """`lines` in chunks of at most MAX_BYTES_PER_MESSAGE of line data (unless one line
    alone is more), each line added in place: twice as fast as building each line's
    message apart and copying it in, and the serving rate is bound by this."""
    response = pb.StreamOutputResponse()
    size = 0
    for line in lines:
        if size and size + len(line.data) > MAX_BYTES_PER_MESSAGE:
            yield response
            response, size = pb.StreamOutputResponse(), 0
        added = response.chunk.lines.add(number=line.number, stream=pb.OutputStream.ValueType(line.stream),
                                         data=line.data, continued=line.continued)
        added.time.seconds, added.time.nanos = divmod(round(line.time * 1e9), 1_000_000_000)
        size += len(line.data)
    if response.chunk.lines:
        yield response


class OutputApi:
    """The two output RPCs; the servicer validates nothing of theirs itself."""

    def __init__(self, engine: Engine, events: EventStore, store: OutputStore, heartbeat_interval: float) -> None:
        """`events` issues ListOutput's page tokens."""
        self._engine = engine
        self._events = events
        self._store = store
        self._heartbeat_interval = heartbeat_interval
        # StreamOutput bodies running now, each holding at most one read; one whose
        # client stalled has let go and is not counted.
        self.open_streams = 0

    async def stream(self, request: pb.StreamOutputRequest) -> AsyncGenerator[pb.StreamOutputResponse, None]:
        """StreamOutput's messages: OutputStart, chunks (and heartbeats), OutputEnd."""
        _check_stream_request(request)
        child = request.child if request.HasField("child") else None
        self.open_streams += 1
        try:
            job = await self._known(request.job_id, request.step, child)
            try:
                output = self._attempt(request.job_id, request.step, child, request.attempt)
            except NotFoundError:
                if child is None and request.step in job.child_counts and not request.attempt:
                    raise NotFoundError(f"{_where(request.job_id, request.step, None)} is a fan-out: it prints "
                                        "nothing itself; ask for one of its children's output (child)") from None
                raise
            plan = self._plan(request, output)
            yield pb.StreamOutputResponse(start=pb.OutputStart(
                attempt=output.key.attempt, first_retained_line=output.first_retained, lines=output.lines,
            ))
            async for response in self._lines(plan):
                yield response
        finally:
            self.open_streams -= 1

    async def _known(self, job_id: str, step: str, child: int | None) -> StoredJob:
        """The job; NotFoundError naming the first of job, step, child that does not exist."""
        job = await self._engine.get(job_id)
        steps = {each.name for each in job.steps}
        if step and step not in steps:
            raise NotFoundError(f"job {job_id} has no step {quoted(step)}")
        if child is not None:
            counts = job.child_counts.get(step)
            if counts is None or child >= counts.total:
                raise NotFoundError(f"{_where(job_id, step, None)} has no child {child}")
        return job

    def _attempt(self, job_id: str, step: str, child: int | None, attempt: int) -> AttemptOutput:
        """The attempt asked for (0: the latest); NotFoundError if it has no output."""
        if attempt == 0:
            latest = self._store.latest_attempt(job_id, step, child)
            if latest is None:
                raise NotFoundError(f"{_where(job_id, step, child)} has no output: it has not started")
            return latest
        for output in self._store.attempts(job_id, step, child):
            if output.key == OutputKey(job_id, step, child, attempt):
                return output
        raise NotFoundError(f"{_where(job_id, step, child)} has no attempt {attempt}")

    def _plan(self, request: pb.StreamOutputRequest, output: AttemptOutput) -> _Plan:
        """Where the stream starts and stops; OUT_OF_RANGE for a from_line not served."""
        start = output.first_retained
        kind = request.WhichOneof("start")
        if kind == "tail":
            start = max(start, output.lines - request.tail)
        elif kind == "from_line":
            start = request.from_line
            if start < output.first_retained:
                raise self._gone(output.key, start, output.first_retained, output.lines)
            if start > output.lines:
                raise CursorOutOfRangeError(
                    LINE_AHEAD, f"from_line {start} is past the end of attempt {output.key.attempt} of "
                    f"{_where(output.key.job_id, output.key.step, output.key.child)}, which has {output.lines} lines",
                    oldest=output.first_retained, latest=output.lines,
                )
        stop = None if request.follow else output.lines
        return _Plan(output.key, start, stop, frozenset(request.streams))

    @staticmethod
    def _gone(key: OutputKey, line: int, first_retained: int | None = None, lines: int = 0) -> CursorOutOfRangeError:
        """OUT_OF_RANGE for `line`: older than `first_retained`, or (None) all of the attempt's
        output was removed by retention while it was being read."""
        where = f"attempt {key.attempt} of {_where(key.job_id, key.step, key.child)}"
        if first_retained is None:
            return CursorOutOfRangeError(
                OUTPUT_GONE, f"the output of {where} was removed (output retention) before line {line} was sent",
                oldest=lines, latest=lines,
            )
        return CursorOutOfRangeError(
            OUTPUT_GONE, f"line {line} of {where} is no longer retained; the first retained is {first_retained}",
            oldest=first_retained, latest=lines,
        )

    def _current(self, key: OutputKey, position: int) -> AttemptOutput:
        """What the store knows of `key` now; gone (OUT_OF_RANGE) if retention removed it meanwhile."""
        try:
            return self._attempt(key.job_id, key.step, key.child, key.attempt)
        except NotFoundError:
            raise self._gone(key, position) from None

    async def _lines(self, plan: _Plan) -> AsyncGenerator[pb.StreamOutputResponse, None]:
        """The plan's lines as they come, a heartbeat for each quiet interval, then OutputEnd."""
        loop = asyncio.get_running_loop()
        position = plan.start
        quiet_since = loop.time()
        while True:
            limit = MAX_LINES_PER_MESSAGE if plan.stop is None else min(MAX_LINES_PER_MESSAGE, plan.stop - position)
            lines = await self._read(plan.key, position, limit) if limit > 0 else []
            if lines:
                position = lines[-1].number + 1
                wanted = [line for line in lines
                          if not plan.streams or line.stream in plan.streams or line.stream in _ALWAYS_SENT]
                for chunk in _chunks(wanted):
                    yield chunk
                    quiet_since = loop.time()
                continue
            output = self._current(plan.key, position)
            finished = output.finished and position >= output.lines
            if finished or plan.stop is not None:
                yield pb.StreamOutputResponse(end=pb.OutputEnd(
                    finished=finished, state=output.final_state if finished else 0,  # type: ignore[arg-type]
                    lines=output.lines, dropped_bytes=output.dropped_bytes, retried=finished and output.retried,
                ))
                return
            waited = loop.time() - quiet_since
            if waited >= self._heartbeat_interval:
                yield self._heartbeat(output)
                quiet_since = loop.time()
                waited = 0.0
            try:
                await self._store.wait(plan.key, position - 1, self._heartbeat_interval - waited)
            except OutputNotFound:
                raise self._gone(plan.key, position) from None

    async def _read(self, key: OutputKey, position: int, limit: int) -> list[OutputLine]:
        """Lines from `position`; OUT_OF_RANGE if retention removed them meanwhile."""
        try:
            return await self._store.read(key, position, limit)
        except OutputGone as gone:
            raise self._gone(key, position, lines=gone.first_retained) from None
        except OutputNotFound:
            raise self._gone(key, position) from None

    def _heartbeat(self, output: AttemptOutput) -> pb.StreamOutputResponse:
        return pb.StreamOutputResponse(heartbeat=pb.OutputHeartbeat(
            lines=output.lines, time=timestamp(time.time()), interval=duration(self._heartbeat_interval),
        ))

    async def list(self, request: pb.ListOutputRequest) -> pb.ListOutputResponse:
        """One page of ListOutput: attempts in step, child, attempt order."""
        _check_target(request, step_required=False).check()
        size = page_size(request.page_size)
        child = request.child if request.HasField("child") else None
        job = await self._known(request.job_id, request.step, child)
        query = scope("ListOutput", request.job_id, request.step, -1 if child is None else child)
        tokens = self._events.page_tokens
        after = tokens.decode(request.page_token, query, (int, int, int))
        order = {step.name: step.index for step in job.steps}

        def sort_key(output: AttemptOutput) -> tuple[int, int, int]:
            key = output.key
            return order.get(key.step, len(order)), -1 if key.child is None else key.child, key.attempt

        outputs = sorted(self._store.attempts(request.job_id, request.step or None, child), key=sort_key)
        if after is not None:
            outputs = [output for output in outputs if sort_key(output) > tuple(after)]
        page, more = outputs[:size], len(outputs) > size
        token = tokens.encode(query, list(sort_key(page[-1]))) if more else ""
        return pb.ListOutputResponse(output=[_summary(output) for output in page], next_page_token=token)


def _summary(output: AttemptOutput) -> pb.OutputSummary:
    key = output.key
    return pb.OutputSummary(
        step=key.step, child=key.child, attempt=key.attempt, lines=output.lines, bytes=output.bytes,
        dropped_bytes=output.dropped_bytes, first_retained_line=output.first_retained, finished=output.finished,
        state=output.final_state,  # type: ignore[arg-type]
    )
