"""Reading what steps printed (the orchestrator's StreamOutput), resumed across
any disconnect from the line after the last one seen.

The rules:

- One attempt's lines come from one StreamOutput call at a time. The first
  message (OutputStart) names the attempt and where its lines start; every
  later call asks for that attempt by number (never "the latest" again: a
  retry begun meanwhile would switch attempts) and `from_line` = the last
  line received + 1 (before any line: where the first call started, so a
  `tail` is not recomputed against a longer output). So a reconnect misses
  nothing and repeats nothing.
- A disconnect (UNAVAILABLE, the stream cut without its OutputEnd, a stall
  cut RESOURCE_EXHAUSTED, or silence for `stale_after_heartbeats` of the
  server's heartbeat intervals) reopens after a capped, jittered backoff (the
  loop is stepstream.resumable's, as a watch's), once the attempt was found;
  before that the error is raised, as is any other (NOT_FOUND, OUT_OF_RANGE:
  never a silent skip).
- The stream ends with the OutputEnd: following, once the attempt ended.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable

import grpc
from stepstream.backoff import Backoff
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from stepstream.resumable import ResumableStream, Silence, StreamEnded, Verdict

from stepstream_client.errors import from_rpc_error
from stepstream_client.models import LogLine, log_line
from stepstream_client.watch import RESUMABLE


class AttemptLines:
    """The lines of one attempt (`request.attempt`, 0: the latest), resumed by
    line number; iterate lines(), then read `end` (None if not reached)."""

    def __init__(
        self, stub: Callable[[], pb_grpc.OrchestratorServiceAsyncStub], target: str, request: pb.StreamOutputRequest,
        *, backoff: Backoff, stale_after_heartbeats: float,
    ) -> None:
        self._stub = stub
        self._target = target
        self._request = request
        self._backoff = backoff
        self._stale_after_heartbeats = stale_after_heartbeats
        self._step = request.step
        self._child = request.child if request.HasField("child") else None
        self.attempt = request.attempt
        # The line to resume from, once the first call said where its lines start.
        self._next: int | None = None
        self._heartbeat_interval: float | None = None
        self.end: pb.OutputEnd | None = None

    async def lines(self) -> AsyncGenerator[LogLine, None]:
        stream = ResumableStream(self._open_call, self._take, silence=self._silence, classify=self._classify,
                                 resync=_never, backoff=self._backoff)
        try:
            async with contextlib.aclosing(aiter(stream)) as items:
                async for item in items:
                    if isinstance(item, list):
                        for line in item:
                            yield line
                    if self.end is not None:
                        return
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, target=self._target) from None

    def _open_call(self) -> grpc.aio.UnaryStreamCall[pb.StreamOutputRequest, pb.StreamOutputResponse]:
        request = pb.StreamOutputRequest()
        request.CopyFrom(self._request)
        request.attempt = self.attempt
        if self._next is not None:
            request.from_line = self._next
        return self._stub().StreamOutput(request)

    def _silence(self) -> float | None:
        return None if self._heartbeat_interval is None else self._heartbeat_interval * self._stale_after_heartbeats

    async def _classify(self, error: Exception) -> Verdict:
        if isinstance(error, Silence | StreamEnded):
            return Verdict.RETRY
        if isinstance(error, grpc.aio.AioRpcError) and self._next is not None and error.code() in RESUMABLE:
            return Verdict.RETRY
        return Verdict.FAIL

    async def _take(self, message: pb.StreamOutputResponse) -> list[LogLine] | None:
        """The lines of a chunk; [] for the end (so the reader sees it at once); None for the rest."""
        kind = message.WhichOneof("payload")
        if kind == "start":
            self.attempt = message.start.attempt
            if self._next is None:
                start = message.start
                tail = self._request.tail if self._request.WhichOneof("start") == "tail" else None
                self._next = (max(start.first_retained_line, start.lines - tail) if tail is not None
                              else self._request.from_line if self._request.HasField("from_line")
                              else start.first_retained_line)
        elif kind == "chunk" and message.chunk.lines:
            self._next = message.chunk.lines[-1].number + 1
            return [log_line(self._step, self._child, self.attempt, line) for line in message.chunk.lines]
        elif kind == "heartbeat" and message.heartbeat.HasField("interval"):
            self._heartbeat_interval = message.heartbeat.interval.ToNanoseconds() / 1e9 or None
        elif kind == "end":
            self.end = message.end
            return []
        return None


async def _never() -> None:
    """No resync: OUT_OF_RANGE is the caller's to see (classify never asks for one)."""
