"""OrchestratorService over gRPC: validates requests, calls the engine, maps errors.

Limits (the README's "Limits" table; ApiLimits): a definition is checked
against DefinitionLimits before anything of it is converted; SubmitJob
requests being worked on hold at most --max-submit-bytes between them, so
that many large submissions at once cannot multiply the memory one takes;
at most --max-snapshots StreamSnapshot calls hold a read transaction at once;
StreamOutput's bounds are orchestrator_svc.api.output's; and every stream
lets go of what it holds when its client stops reading
(stepstream_common.streaming.handed_over).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, fields

from stepstream.common.v1 import states_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as pb

from orchestrator_svc.api.output import OutputApi
from orchestrator_svc.config import OrchestratorConfig
from orchestrator_svc.domain.spec import DefinitionLimits, WorkerCatalog, check_limits
from orchestrator_svc.engine.engine import Engine
from orchestrator_svc.output import OutputStore
from orchestrator_svc.storage.base import EventStore, StoredEvent
from orchestrator_svc.workers.registry import WorkerRegistry
from stepstream_common import wire
from stepstream_common.auth import caller_name
from stepstream_common.errors import CURSOR_UNKNOWN, CursorOutOfRangeError, ResourceExhaustedError, quoted
from stepstream_common.feed import Feed
from stepstream_common.paging import page_size
from stepstream_common.rpc import Context, Violations
from stepstream_common.streaming import SNAPSHOTS, Limit, Slots, enveloped, handed_over, serve_feed
from stepstream_common.timeutil import duration, timestamp

MAX_EVENTS_PER_MESSAGE = 500
# The google.rpc.ErrorInfo reason of a SubmitJob refused by --max-submit-bytes.
SUBMIT_BYTES = "SUBMIT_BYTES"

Response = bytes | pb.StreamStepEventsResponse

_JOB_STATES = frozenset(states_pb2.JobState.values()) - {states_pb2.JOB_STATE_UNSPECIFIED}


def _check_job_id(job_id: str) -> None:
    Violations().require("job_id", bool(job_id), "is required").check()


def _event_data(event: StoredEvent) -> bytes:
    return event.data


@dataclass(frozen=True)
class ApiLimits:
    """What the API takes at once: OrchestratorConfig's settings of the same
    names, whose defaults these are."""

    definition: DefinitionLimits = field(default_factory=DefinitionLimits)
    max_submit_bytes: int = OrchestratorConfig.max_submit_bytes
    max_snapshots: int = OrchestratorConfig.max_snapshots
    stream_stall_timeout: float = OrchestratorConfig.stream_stall_timeout

    @classmethod
    def of(cls, config: OrchestratorConfig) -> ApiLimits:
        definition = DefinitionLimits(**{each.name: getattr(config, each.name) for each in fields(DefinitionLimits)})
        return cls(definition, config.max_submit_bytes, config.max_snapshots, config.stream_stall_timeout)


class ByteBudget:
    """The bytes of the requests being worked on, at most `limit` between them:
    the bound on the memory they take, whatever how many arrive at once. A
    request larger than the whole budget is taken when nothing else is, so
    any request the server accepts can be served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def take(self, size: int) -> None:
        """Count `size` bytes in (give them back with give_back), or ResourceExhaustedError."""
        if self.in_use and self.in_use + size > self.limit:
            raise ResourceExhaustedError(
                f"submissions of {self.in_use} bytes are being checked already and this one is {size} bytes "
                f"(--max-submit-bytes {self.limit}); retry shortly",
                reason=SUBMIT_BYTES, subject="SubmitJob requests in flight", setting="--max-submit-bytes",
                limit=self.limit,
            )
        self.in_use += size

    def give_back(self, size: int) -> None:
        self.in_use -= size


class OrchestratorServicer:
    def __init__(
        self,
        engine: Engine,
        store: EventStore,
        feed: Feed[StoredEvent],
        log_id: str,
        heartbeat_interval: float,
        *,
        output: OutputStore,
        workers: WorkerCatalog | None = None,
        limits: ApiLimits | None = None,
    ) -> None:
        """`output` is what steps printed; `workers` is what the engine runs
        (default: the registered workers); `limits` default to the settings' defaults."""
        self._engine = engine
        self._store = store
        self._feed = feed
        self._log_id = log_id
        self._events = functools.partial(wire.step_events, log_id)
        self._heartbeat_interval = heartbeat_interval
        self._workers = workers or WorkerRegistry.from_entry_points()
        self._limits = limits or ApiLimits()
        self._stall_timeout = self._limits.stream_stall_timeout
        self.submissions = ByteBudget(self._limits.max_submit_bytes)
        self.snapshots = Slots(Limit(SNAPSHOTS, "--max-snapshots", self._limits.max_snapshots, "snapshots being sent"))
        self.output = OutputApi(engine, store, output, heartbeat_interval)

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Context) -> pb.SubmitJobResponse:
        """The limits are checked at once, before anything waits holding the request
        (checking is synchronous: nothing else runs meanwhile). The submission then
        holds its request's bytes of the budget until it ends (see _submission)."""
        Violations().require("request_id", len(request.request_id) <= 200, "must be at most 200 characters").check()
        check_limits(request.definition, self._workers, self._limits.definition)
        return await self._submission(request)

    def _submission(self, request: pb.SubmitJobRequest) -> asyncio.Future[pb.SubmitJobResponse]:
        """The submission as a task of its own, holding the request's bytes of the
        budget until it ends: the engine goes on with a submission whose caller
        left, so a client cancelling at once cannot have more recorded at a time.
        Its caller awaits it through a shield. (Neither is kept in a local of a
        frame its error's traceback holds: that would be a cycle, keeping the
        request until a garbage collection.)"""
        size = request.ByteSize()
        self.submissions.take(size)
        task = asyncio.ensure_future(self._submit(request))

        def ended(done: asyncio.Future[pb.SubmitJobResponse]) -> None:
            self.submissions.give_back(size)
            if not done.cancelled():
                done.exception()  # retrieved: a caller that left must not turn it into a log line

        task.add_done_callback(ended)
        return asyncio.shield(task)

    async def _submit(self, request: pb.SubmitJobRequest) -> pb.SubmitJobResponse:
        job, seq = await self._engine.submit(request.definition, request.request_id, submitted_by=caller_name())
        return pb.SubmitJobResponse(job=job, seq=seq, log_id=self._log_id)

    async def CancelJob(self, request: pb.CancelJobRequest, context: Context) -> pb.CancelJobResponse:
        _check_job_id(request.job_id)
        return pb.CancelJobResponse(job=await self._engine.cancel(request.job_id, cancelled_by=caller_name()))

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
    ) -> AsyncIterator[Response]:
        Violations().require("after_seq", request.after_seq >= 0, "must not be negative").check()
        async with contextlib.aclosing(handed_over(self._step_events(request), self._stall_timeout)) as responses:
            async for response in responses:
                yield response

    async def _step_events(self, request: pb.StreamStepEventsRequest) -> AsyncGenerator[Response, None]:
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
        async with contextlib.aclosing(handed_over(self._snapshot(), self._stall_timeout)) as responses:
            async for response in responses:
                yield response

    async def _snapshot(self) -> AsyncGenerator[bytes, None]:
        """The snapshot's records, read in one transaction on a connection (and
        thread) of its own: one of --max-snapshots while it lasts."""
        with self.snapshots.held():
            async with self._store.snapshot() as snapshot:
                records = functools.partial(wire.snapshot_records, self._log_id, snapshot.seq)
                sent = False
                pages = snapshot.pages
                try:
                    async for page in pages:
                        for response in enveloped(page, records, MAX_EVENTS_PER_MESSAGE):
                            yield response
                            sent = True
                finally:
                    if isinstance(pages, AsyncGenerator):
                        await pages.aclose()  # its cursor, before the snapshot closes the connection under it
                if not sent:
                    yield records([])

    async def StreamOutput(
        self, request: pb.StreamOutputRequest, context: Context
    ) -> AsyncIterator[pb.StreamOutputResponse]:
        async with contextlib.aclosing(handed_over(self.output.stream(request), self._stall_timeout)) as responses:
            async for response in responses:
                yield response

    async def ListOutput(self, request: pb.ListOutputRequest, context: Context) -> pb.ListOutputResponse:
        return await self.output.list(request)

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
