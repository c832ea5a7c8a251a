"""Follows one orchestrator's event stream for as long as the service runs.

- Resumes StreamStepEvents after the last seq handed to the writer (the
  committed cursor after a restart), with the log id it belongs to. What was
  handed to the writer is applied in order before anything later, so resuming
  there neither skips nor repeats (the writer also ignores seqs it has).
- Checks contiguity: within a stream every event must have the log id the
  cursor belongs to and seq == previous seq + 1, starting at cursor + 1. At a
  gap (or a foreign log id) it logs an error naming it, hands the writer only
  the contiguous events before it, and reconnects from its cursor: nothing
  after a gap is ever applied.
- Reconnects by itself after any error, with capped, jittered exponential
  backoff; a stream silent for `stale_after` (no events, no heartbeat) is
  treated as broken. (The loop is stepstream.resumable's, shared with the
  client's watch; this module adds what is particular to an event log.)
- On OUT_OF_RANGE (cursor too old, or from another log) it resyncs from
  StreamSnapshot and carries on after the snapshot's seq; it never skips.
- When the orchestrator cannot be followed for `stale_after`, it reports the
  source stale (since the last message heard); the first message handled
  after that reports it fresh again. It never invents a job or step state.
- An unexpected exception while following (a bug, not a gRPC error) is logged
  with its traceback and treated like a broken stream: the follower restarts
  from its cursor after a backoff that is not reset by that attempt, and the
  source turns stale (detail: the error) if it persists: an attempt that
  breaks (a gap, a bug) does not count as hearing from it. Chosen over stopping
  the service so one orchestrator's poison cannot stop the following of the
  others nor the serving of reads; it is never left unfollowed silently.
- With a token (--orchestrator-token-file) every call presents it. A call
  refused (UNAUTHENTICATED, or PERMISSION_DENIED for a token without role
  follower) is retried like any error, since the orchestrator may accept the
  token after its tokens file is fixed (SIGHUP); meanwhile the source turns
  stale with the refusal, the role it needs included, as its detail.
- run() itself ends only if the staleness watchdog fails; the service treats
  that (any follower task ending) as fatal and exits (see status_svc.app).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Never

import grpc
from stepstream.backoff import DEFAULT_BACKOFF, Backoff
from stepstream.channel import ClientTLS, bearer_metadata, open_channel
from stepstream.common.v1 import records_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.resumable import ResumableStream, Silence, StreamEnded, Verdict, next_message

from status_svc.ingest.writer import Events, IngestWriter, SnapshotApplied, SourceHealth

log = logging.getLogger(__name__)


_SNAPSHOT_ORDER = {"child": 0, "step": 1, "job": 2, None: 3}


class _Broken(Exception):
    """The stream broke the protocol (a gap, a foreign log id): reconnect from the cursor."""


def _short(text: str, limit: int = 64) -> str:
    """A peer's string as quoted in a log line or a stale detail: bounded, whatever it sent."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _contiguous(events: Sequence[records_pb2.StepEvent], cursor: int) -> int:
    """How many of `events`, from the first, continue `cursor` one seq at a time."""
    expected = cursor + 1
    for count, event in enumerate(events):
        if event.seq != expected + count:
            return count
    return len(events)


class OrchestratorFollower:
    def __init__(
        self,
        address: str,
        writer: IngestWriter,
        *,
        stale_after: float,
        backoff: Backoff = DEFAULT_BACKOFF,
        clock: Callable[[], float] = time.time,
        tls: ClientTLS | None = None,
        token: str = "",
    ) -> None:
        self.address = address
        self._tls = tls
        # The token (role follower) this service presents on each call (see stepstream_common.auth).
        self._metadata = bearer_metadata(token)
        self._writer = writer
        self._stale_after = stale_after
        self._backoff = backoff
        self._clock = clock
        known = writer.source(address)
        # Where to resume: everything up to here has been handed to the writer.
        self._cursor = known.cursor
        self._log_id = known.log_id
        self._stale_reported = known.stale_since is not None
        self._last_heard = known.stale_since if known.stale_since is not None else clock()
        # When the last message was received that was also handled without error.
        self._last_handled = self._last_heard
        self._last_error = known.detail
        self.resyncs = 0
        # The newest seq the orchestrator said it has (a heartbeat's latest_seq, a batch's
        # last event, a snapshot's seq): what ingest lag is measured against.
        self.latest_seq_heard = known.cursor
        # When seqs not committed yet were first heard of: (seq, clock time) per message that
        # raised latest_seq_heard, oldest first; trimmed as they commit (what lag_seconds reads).
        self._heard_at: deque[tuple[int, float]] = deque()
        self.reconnects = 0
        self.gaps = 0
        self.crashes = 0

    async def run(self) -> None:
        """Follow until cancelled; raises only if the staleness watchdog fails."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch_staleness(), name=f"staleness-{self.address}")
            group.create_task(self._follow_forever(), name=f"stream-{self.address}")

    async def _follow_forever(self) -> None:
        async with open_channel(self.address, tls=self._tls) as channel:
            stub = orch_grpc.OrchestratorServiceStub(channel)
            # _handle returns nothing, so the stream yields only its Reconnecting items.
            stream: ResumableStream[orch_pb.StreamStepEventsResponse, Never] = ResumableStream(
                lambda: stub.StreamStepEvents(
                    orch_pb.StreamStepEventsRequest(after_seq=self._cursor, log_id=self._log_id),
                    metadata=self._metadata),
                self._handle,
                silence=lambda: self._stale_after,
                classify=self._classify,
                resync=lambda: self._resync(stub),
                backoff=self._backoff,
            )
            async for reconnecting in stream:
                self._note_failure(reconnecting.error)
                self.reconnects += 1
                log.info("%s: %s; reconnecting in %.2fs", self.address, self._last_error, reconnecting.delay)

    async def _classify(self, error: Exception) -> Verdict:
        """Resync from a snapshot on OUT_OF_RANGE; retry anything else (see the module docstring)."""
        if isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.OUT_OF_RANGE:
            log.warning("%s: %s; resyncing from a snapshot", self.address, error.details())
            return Verdict.RESYNC
        return Verdict.RETRY

    def _note_failure(self, error: Exception) -> None:
        """Keep why following failed, for the stale detail. An attempt that broke (a gap,
        a bug) does not count as hearing from the orchestrator."""
        if isinstance(error, grpc.aio.AioRpcError):
            self._last_error = f"{error.code().name}: {error.details()}"
        elif isinstance(error, Silence):
            self._last_error = str(error)
        elif isinstance(error, StreamEnded):
            self._last_error = "the orchestrator ended the stream"
        elif isinstance(error, _Broken):
            self.gaps += 1
            self._last_heard = self._last_handled
            self._last_error = str(error)
            log.error("%s: %s; reconnecting from seq %d", self.address, error, self._cursor)
        else:
            self.crashes += 1
            self._last_heard = self._last_handled
            self._last_error = f"internal error: {type(error).__name__}: {error}"
            log.error("%s: internal error while following; restarting from seq %d", self.address, self._cursor,
                      exc_info=error)

    async def _handle(self, message: orch_pb.StreamStepEventsResponse) -> None:
        """One message of the event stream; _Broken (a gap) ends the attempt."""
        self._heard()
        if message.HasField("heartbeat"):
            self._heard_of(message.heartbeat.latest_seq)
        if message.HasField("batch") and message.batch.events:
            self._heard_of(max(self.latest_seq_heard, message.batch.events[-1].seq))
            await self._take(message.log_id, list(message.batch.events))
        else:
            await self._handled()

    async def _take(self, log_id: str, events: list[records_pb2.StepEvent]) -> None:
        """Hand the writer the events that continue the cursor; _Broken at the first that does not.

        A whole batch is handled (the source fresh again) before its events are
        submitted, so what it changes is shown fresh.
        """
        if self._log_id and log_id != self._log_id:
            raise _Broken(f"events of log {_short(log_id)} on a stream of log {_short(self._log_id)}")
        good = _contiguous(events, self._cursor)
        if good == len(events):
            await self._handled()
        if good:
            await self._writer.submit(Events(self.address, log_id, events[:good]))
            self._cursor, self._log_id = events[good - 1].seq, log_id
        if good < len(events):
            raise _Broken(f"gap in the event stream of log {_short(log_id)}: expected seq {self._cursor + 1}, "
                          f"got {events[good].seq}")

    async def _resync(self, stub: orch_grpc.OrchestratorServiceAsyncStub) -> None:
        call = stub.StreamSnapshot(orch_pb.StreamSnapshotRequest(), metadata=self._metadata)
        records: list[records_pb2.StepEvent] = []
        seq, log_id = 0, ""
        try:
            while (message := await next_message(call, self._stale_after)) is not None:
                self._heard()
                await self._handled()
                seq, log_id = message.seq, message.log_id
                records.extend(message.records)
        finally:
            call.cancel()
        seen = {record.job.id for record in records if record.HasField("job")}
        # The snapshot comes jobs first; applied that way, a job would be shown
        # ended before its steps and children moved. Apply it whole (one item:
        # one transaction) and innermost first, as the event stream orders them.
        records.sort(key=lambda record: (_SNAPSHOT_ORDER[record.WhichOneof("record")], record.seq))
        if records:
            await self._writer.submit(Events(self.address, log_id, records, from_stream=False))
        await self._writer.submit(SnapshotApplied(self.address, log_id, seq, frozenset(seen)))
        self._cursor, self._log_id = seq, log_id
        self._heard_of(seq)
        self.resyncs += 1

    def _heard_of(self, seq: int) -> None:
        """The orchestrator has events up to `seq`; keeps when newer ones were first heard of."""
        heard = self._heard_at
        if seq < self.latest_seq_heard:  # another log: what was heard of the old one is moot
            heard.clear()
        elif seq > self.latest_seq_heard:
            committed = self._writer.applied.committed_seq(self.address)
            while heard and heard[0][0] <= committed:
                heard.popleft()
            heard.append((seq, self._clock()))
        self.latest_seq_heard = seq

    def lag_seconds(self) -> float:
        """How long the oldest event heard of (in a batch or a heartbeat's latest_seq) but not
        committed yet has waited since; 0 when everything heard of is committed. Safe to call
        from another thread (the metrics server's)."""
        committed = self._writer.applied.committed_seq(self.address)
        for seq, since in list(self._heard_at):
            if seq > committed:
                return max(0.0, self._clock() - since)
        return 0.0

    def _heard(self) -> None:
        """A message arrived (while it is handled, however long the writer makes that take)."""
        self._last_heard = self._clock()

    async def _handled(self) -> None:
        """The messages heard so far are good: only now is the source fresh again, so a
        stream that breaks on every attempt (a gap, a bug) keeps it stale."""
        self._last_handled = self._last_heard
        if self._stale_reported:
            self._stale_reported = False
            await self._writer.submit(SourceHealth(self.address, None))

    async def _watch_staleness(self) -> None:
        while True:
            await asyncio.sleep(self._stale_after / 4)
            if not self._stale_reported and self._clock() - self._last_heard > self._stale_after:
                self._stale_reported = True
                detail = f"cannot follow {self.address}: {self._last_error or 'no message'}"
                log.warning("%s is stale since %s", self.address, time.ctime(self._last_heard))
                await self._writer.submit(SourceHealth(self.address, self._last_heard, detail))
