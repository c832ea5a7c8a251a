"""OrchestratorService over gRPC: validates requests, calls the engine, maps errors."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator

from stepstream.common.v1 import states_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as pb

from orchestrator_svc.engine.engine import Engine
from orchestrator_svc.storage.base import EventStore, StoredEvent
from stepstream_common import wire
from stepstream_common.errors import CURSOR_UNKNOWN, CursorOutOfRangeError, quoted
from stepstream_common.feed import Feed
from stepstream_common.paging import page_size
from stepstream_common.rpc import Context, Violations
from stepstream_common.streaming import enveloped, serve_feed
from stepstream_common.timeutil import duration, timestamp

MAX_EVENTS_PER_MESSAGE = 500

_JOB_STATES = frozenset(states_pb2.JobState.values()) - {states_pb2.JOB_STATE_UNSPECIFIED}


def _check_job_id(job_id: str) -> None:
    Violations().require("job_id", bool(job_id), "is required").check()


def _event_data(event: StoredEvent) -> bytes:
    return event.data


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
        self._events = functools.partial(wire.step_events, log_id)
        self._heartbeat_interval = heartbeat_interval

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Context) -> pb.SubmitJobResponse:
        Violations().require("request_id", len(request.request_id) <= 200, "must be at most 200 characters").check()
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
        Violations().require_all_in(
            "states", request.states, _JOB_STATES, lambda state: f"unknown job state {state}"
        ).check()
        jobs, token = await self._engine.list(
            list(request.states), request.name, page_size(request.page_size), request.page_token
        )
        return pb.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def StreamStepEvents(
        self, request: pb.StreamStepEventsRequest, context: Context
    ) -> AsyncIterator[bytes | pb.StreamStepEventsResponse]:
        Violations().require("after_seq", request.after_seq >= 0, "must not be negative").check()
        with self._feed.subscribed() as subscription:
            latest = self._feed.latest
            if request.log_id and request.log_id != self._log_id:
                raise self._unknown_cursor(
                    f"the cursor belongs to log {quoted(request.log_id)}, this is log {self._log_id}"
                )
            if request.after_seq > latest:
                raise self._unknown_cursor(f"after_seq {request.after_seq} is ahead of this log (latest {latest})")
            async for response in serve_feed(
                self._feed, subscription, after=request.after_seq, read_page=self._store.read_events,
                entry=_event_data, envelope=self._events, heartbeat=self._heartbeat,
                heartbeat_interval=self._heartbeat_interval, max_items=MAX_EVENTS_PER_MESSAGE,
            ):
                yield response

    async def StreamSnapshot(
        self, request: pb.StreamSnapshotRequest, context: Context
    ) -> AsyncIterator[bytes]:
        async with self._store.snapshot() as snapshot:
            records = functools.partial(wire.snapshot_records, self._log_id, snapshot.seq)
            sent = False
            async for page in snapshot.pages:
                for response in enveloped(page, records, MAX_EVENTS_PER_MESSAGE):
                    yield response
                    sent = True
            if not sent:
                yield records([])

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
            CURSOR_UNKNOWN, message + ": resync with StreamSnapshot",
            oldest=0, latest=self._feed.latest, log_id=self._log_id,
        )
