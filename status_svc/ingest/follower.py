"""Follows one orchestrator's event stream for as long as the service runs.

- Resumes StreamStepEvents after the last seq handed to the writer (the
  committed cursor after a restart), with the log id it belongs to.
- Reconnects by itself after any error, with capped, jittered exponential
  backoff; a stream silent for `stale_after` (no events, no heartbeat) is
  treated as broken.
- On OUT_OF_RANGE (cursor too old, or from another log) it resyncs from
  StreamSnapshot and carries on after the snapshot's seq; it never skips.
- When the orchestrator cannot be followed for `stale_after`, it reports the
  source stale (since the last message heard); the first message after that
  reports it fresh again. It never invents a job or step state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc
from stepstream.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.v1 import records_pb2

from status_svc.ingest.writer import Events, IngestWriter, SnapshotApplied, SourceHealth
from stepstream_common.backoff import DEFAULT_BACKOFF, Backoff
from stepstream_common.rpc import channel_options

log = logging.getLogger(__name__)


_SNAPSHOT_ORDER = {"child": 0, "step": 1, "job": 2, None: 3}


class _Silent(Exception):
    pass


class OrchestratorFollower:
    def __init__(
        self,
        address: str,
        writer: IngestWriter,
        *,
        stale_after: float,
        backoff: Backoff = DEFAULT_BACKOFF,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.address = address
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
        self._last_error = known.detail
        self.resyncs = 0
        self.reconnects = 0

    async def run(self) -> None:
        watchdog = asyncio.create_task(self._watch_staleness(), name=f"staleness-{self.address}")
        failures = 0
        try:
            async with grpc.aio.insecure_channel(self.address, options=channel_options()) as channel:
                stub = orch_grpc.OrchestratorServiceStub(channel)
                while True:
                    heard_before = self._last_heard
                    try:
                        await self._follow(stub)
                        self._last_error = "the orchestrator ended the stream"
                    except grpc.aio.AioRpcError as error:
                        if error.code() == grpc.StatusCode.OUT_OF_RANGE:
                            log.warning("%s: %s; resyncing from a snapshot", self.address, error.details())
                            await self._resync(stub)
                            failures = 0
                            continue
                        self._last_error = f"{error.code().name}: {error.details()}"
                    except _Silent:
                        self._last_error = f"no message for {self._stale_after:g}s"
                    if self._last_heard != heard_before:
                        failures = 0  # it was a working stream: a new run of failures
                    delay = self._backoff.delay(failures)
                    failures += 1
                    self.reconnects += 1
                    log.info("%s: %s; reconnecting in %.2fs", self.address, self._last_error, delay)
                    await asyncio.sleep(delay)
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog

    async def _follow(self, stub: orch_grpc.OrchestratorServiceAsyncStub) -> None:
        call = stub.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=self._cursor, log_id=self._log_id))
        try:
            while True:
                try:
                    async with asyncio.timeout(self._stale_after):
                        message = await call.read()
                except TimeoutError:
                    raise _Silent from None
                if message is grpc.aio.EOF:
                    return
                assert isinstance(message, orch_pb.StreamStepEventsResponse)
                await self._heard()
                if message.HasField("batch") and message.batch.events:
                    events = list(message.batch.events)
                    await self._writer.submit(Events(self.address, message.log_id, events))
                    self._cursor, self._log_id = events[-1].seq, message.log_id
        finally:
            call.cancel()

    async def _resync(self, stub: orch_grpc.OrchestratorServiceAsyncStub) -> None:
        call = stub.StreamSnapshot(orch_pb.StreamSnapshotRequest())
        records: list[records_pb2.StepEvent] = []
        seq, log_id = 0, ""
        try:
            async for message in call:
                await self._heard()
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
        self.resyncs += 1

    async def _heard(self) -> None:
        self._last_heard = self._clock()
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
