"""OrchestratorService over gRPC: validates requests, calls the engine, maps errors."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from stepstream.common.v1 import states_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as pb

from orchestrator_svc.engine.engine import Engine
from orchestrator_svc.storage.base import EventStore, StoredEvent
from stepstream_common import wire
from stepstream_common.errors import CursorOutOfRangeError, quoted
from stepstream_common.feed import Feed, replay_then_live
from stepstream_common.paging import page_size
from stepstream_common.rpc import require
from stepstream_common.timeutil import duration, timestamp

Context = grpc.aio.ServicerContext[Any, Any]

MAX_EVENTS_PER_MESSAGE = 500
MAX_BYTES_PER_MESSAGE = 1 << 20


def _check_job_id(job_id: str) -> None:
    require([("job_id", "is required")] if not job_id else [])


class OrchestratorServicer:
    def __init__(
        self,
        engine: Engine,
        store: EventStore,
        feed: Feed[StoredEvent],
        log_id: str,
        heartbeat_interval: float,
    ) -> None:
        self._engine = engine
        self._store = store
        self._feed = feed
        self._log_id = log_id
        self._log_id_field = wire.length_delimited(1, log_id.encode())
        self._heartbeat_interval = heartbeat_interval

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Context) -> pb.SubmitJobResponse:
        require([("request_id", "must be at most 200 characters")] if len(request.request_id) > 200 else [])
        job, seq = await self._engine.submit(request.definition, request.request_id)
        return pb.SubmitJobResponse(job=job, seq=seq, log_id=self._log_id)

    async def CancelJob(self, request: pb.CancelJobRequest, context: Context) -> pb.CancelJobResponse:
        _check_job_id(request.job_id)
        return pb.CancelJobResponse(job=await self._engine.cancel(request.job_id))

    async def GetJob(
        self, request: pb.GetJobRequest, context: Context
    ) -> pb.GetJobResponse:
        _check_job_id(request.job_id)
        view = await self._engine.get(request.job_id)
        return pb.GetJobResponse(
            job=view.job,
            steps=[pb.StepProgress(step=step, children=view.child_counts.get(step.name)) for step in view.steps],
            definition=view.definition,
            seq=view.seq,
        )

    async def ListJobs(
        self, request: pb.ListJobsRequest, context: Context
    ) -> pb.ListJobsResponse:
        known = set(states_pb2.JobState.values()) - {states_pb2.JOB_STATE_UNSPECIFIED}
        require([
            (f"states[{i}]", f"unknown job state {state}") for i, state in enumerate(request.states)
            if state not in known
        ])
        jobs, token = await self._engine.list(
            list(request.states), request.name, page_size(request.page_size), request.page_token
        )
        return pb.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def StreamStepEvents(
        self, request: pb.StreamStepEventsRequest, context: Context
    ) -> AsyncIterator[bytes | pb.StreamStepEventsResponse]:
        require([("after_seq", "must not be negative")] if request.after_seq < 0 else [])
        subscription = self._feed.subscribe()
        try:
            latest = self._feed.latest
            if request.log_id and request.log_id != self._log_id:
                raise self._unknown_cursor(
                    f"the cursor belongs to log {quoted(request.log_id)}, this is log {self._log_id}"
                )
            if request.after_seq > latest:
                raise self._unknown_cursor(f"after_seq {request.after_seq} is ahead of this log (latest {latest})")
            async for items in replay_then_live(
                self._feed, subscription, after=request.after_seq, read_page=self._store.read_events,
                idle_timeout=self._heartbeat_interval, page_size=MAX_EVENTS_PER_MESSAGE,
            ):
                if not items:
                    yield self._heartbeat()
                    continue
                for chunk in wire.chunks([item.data for item in items], MAX_EVENTS_PER_MESSAGE,
                                         MAX_BYTES_PER_MESSAGE):
                    yield self._log_id_field + wire.length_delimited(2, wire.repeated(1, chunk))
        finally:
            self._feed.unsubscribe(subscription)

    async def StreamSnapshot(
        self, request: pb.StreamSnapshotRequest, context: Context
    ) -> AsyncIterator[bytes]:
        async with self._store.snapshot() as snapshot:
            header = self._log_id_field + wire.varint_field(2, snapshot.seq)
            sent = False
            async for page in snapshot.pages:
                for chunk in wire.chunks(page, MAX_EVENTS_PER_MESSAGE, MAX_BYTES_PER_MESSAGE):
                    yield header + wire.repeated(3, chunk)
                    sent = True
            if not sent:
                yield header

    def _heartbeat(self) -> pb.StreamStepEventsResponse:
        return pb.StreamStepEventsResponse(
            log_id=self._log_id,
            heartbeat=pb.EventStreamHeartbeat(
                latest_seq=self._feed.latest,
                time=timestamp(time.time()),
                interval=duration(self._heartbeat_interval),
            ),
        )

    def _unknown_cursor(self, message: str) -> CursorOutOfRangeError:
        return CursorOutOfRangeError(
            "CURSOR_UNKNOWN", message + ": resync with StreamSnapshot",
            oldest=0, latest=self._feed.latest, log_id=self._log_id,
        )
