"""StatusService over gRPC: validates requests, reads the store, streams the feed.

Limits (the README's "Limits" table; WatchLimits): at most
--max-watchers-per-job WatchJob streams of one job at once; at most
--max-snapshots WatchJobs calls holding their listing of every job (their
starting state) at once; and every watch lets go of what it holds when its
client stops reading (stepstream_common.streaming.handed_over).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

from stepstream.common.v1 import states_pb2
from stepstream.states import CHILD_STATES, TERMINAL_JOB_STATES
from stepstream.status.v1 import status_service_pb2 as pb

from status_svc.config import StatusConfig
from status_svc.ingest.progress import AppliedPositions
from status_svc.storage.base import ChangeFilter, StatusStore, StoredChange
from stepstream_common import wire
from stepstream_common.errors import NotFoundError, quoted
from stepstream_common.feed import Feed, Page, ReadPage, Subscription
from stepstream_common.paging import page_size
from stepstream_common.rpc import Context, Violations
from stepstream_common.streaming import SNAPSHOTS, WATCHERS_PER_JOB, Limit, Slots, handed_over, serve_feed
from stepstream_common.timeutil import duration, timestamp

Request = (
    pb.GetJobRequest | pb.ListJobsRequest | pb.ListChildrenRequest | pb.WatchJobRequest | pb.WatchJobsRequest
)
Response = pb.WatchJobResponse | pb.WatchJobsResponse

MAX_UPDATES_PER_MESSAGE = 500
# How long past a call's deadline a wait may last if gRPC has not cancelled it by then.
_DEADLINE_SLACK = 5.0

_JOB_STATES = frozenset(states_pb2.JobState.values()) - {states_pb2.JOB_STATE_UNSPECIFIED}


def _finished(job: pb.JobStatus) -> bool:
    return job.state in TERMINAL_JOB_STATES


def _not_a_state(state: int) -> str:
    return f"not a valid state: {state}"


def _ends_job(change: StoredChange) -> bool:
    return change.header is not None and change.state_after in TERMINAL_JOB_STATES


@functools.lru_cache(maxsize=16384)
def update_entry(change: StoredChange, with_steps: bool) -> bytes:
    """One JobUpdate as an entry of JobUpdateBatch.updates, assembled from the
    parts committed with the change: once per change, however many watchers
    send it."""
    return wire.job_update(change.revision, change.job_id, change.header, change.steps if with_steps else None)


@dataclass(frozen=True)
class WatchLimits:
    """What watches may hold at once: StatusConfig's settings of the same names, whose defaults these are."""

    max_watchers_per_job: int = StatusConfig.max_watchers_per_job
    max_snapshots: int = StatusConfig.max_snapshots
    stream_stall_timeout: float = StatusConfig.stream_stall_timeout

    @classmethod
    def of(cls, config: StatusConfig) -> WatchLimits:
        return cls(config.max_watchers_per_job, config.max_snapshots, config.stream_stall_timeout)


def _listing(jobs: Sequence[pb.JobStatus], revision: int) -> Iterator[pb.WatchJobsResponse]:
    """WatchJobs' starting state: every job as of `revision`, a chunk per message, then the marker."""
    for start in range(0, max(len(jobs), 1), MAX_UPDATES_PER_MESSAGE):
        chunk = jobs[start:start + MAX_UPDATES_PER_MESSAGE]
        updates = [pb.JobUpdate(revision=revision, job_id=job.id, job=job) for job in chunk]
        yield pb.WatchJobsResponse(updates=pb.JobUpdateBatch(updates=updates))
    yield pb.WatchJobsResponse(initial_state_complete=pb.InitialStateComplete(revision=revision))


class StatusServicer:
    def __init__(
        self,
        store: StatusStore,
        feed: Feed[StoredChange],
        heartbeat_interval: float,
        applied: AppliedPositions,
        max_wait_applied: float,
        *,
        limits: WatchLimits | None = None,
    ) -> None:
        self._store = store
        self._feed = feed
        self._heartbeat_interval = heartbeat_interval
        self._applied = applied
        self._max_wait_applied = max_wait_applied
        # (since, why) while reads must show unfinished jobs stale.
        self._stale: tuple[float, str] | None = None
        limits = limits or WatchLimits()
        self._stall_timeout = limits.stream_stall_timeout
        self.watchers = Slots(Limit(WATCHERS_PER_JOB, "--max-watchers-per-job", limits.max_watchers_per_job,
                                    "watchers"))
        self.snapshots = Slots(Limit(SNAPSHOTS, "--max-snapshots", limits.max_snapshots,
                                     "WatchJobs listings being sent"))

    def ingest_stopped(self, detail: str) -> None:
        """Nothing will update what is stored any more: from now on, reads show
        every unfinished job stale, with why (the service is about to exit)."""
        self.mark_stale(detail)

    def mark_stale(self, detail: str | None) -> None:
        """Reads show every unfinished job stale with `detail` (since the first such
        call) until this is called with None: a replica whose database is in
        trouble (status_svc.replication.health)."""
        if detail is None:
            self._stale = None
        else:
            self._stale = (self._stale[0] if self._stale is not None else time.time(), detail)

    def _fresh(self, job: pb.JobStatus) -> pb.JobStatus:
        if self._stale is not None and job.state not in TERMINAL_JOB_STATES:
            since, detail = self._stale
            if not job.freshness.stale:
                job.freshness.stale = True
                job.freshness.stale_since.FromNanoseconds(round(since * 1e9))
            job.freshness.detail = detail
        return job

    async def _not_older_than(self, request: Request, context: Context) -> None:
        """Wait until the orchestrator position the client names is applied (read your writes),
        within the call's deadline and --max-wait-applied."""
        if not request.HasField("not_older_than"):
            return
        position = request.not_older_than
        Violations().require("not_older_than.seq", position.seq >= 0, "must not be negative").check()
        remaining = context.time_remaining()
        if remaining is not None and remaining < self._max_wait_applied:
            # The call's deadline comes first and ends it DEADLINE_EXCEEDED (gRPC cancels this wait):
            # an UNAVAILABLE of our own a moment before it would race the client's clock.
            await self._applied.wait(position.log_id, position.seq, remaining + _DEADLINE_SLACK)
        else:
            await self._applied.wait(position.log_id, position.seq, self._max_wait_applied)

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        Violations().require("job_id", bool(request.job_id), "is required").check()
        await self._not_older_than(request, context)
        snapshot = await self._store.get_job(request.job_id)
        if snapshot is None:
            raise NotFoundError(f"no job {quoted(request.job_id)}")
        return pb.GetJobResponse(job=self._fresh(snapshot.job), steps=snapshot.steps, revision=snapshot.revision)

    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        Violations().require_all_in("filter.states", request.filter.states, _JOB_STATES, _not_a_state).check()
        await self._not_older_than(request, context)
        page = await self._store.list_jobs(
            list(request.filter.states), request.filter.name, page_size(request.page_size), request.page_token
        )
        return pb.ListJobsResponse(jobs=[self._fresh(job) for job in page.jobs], next_page_token=page.next_page_token,
                                   revision=page.revision)

    async def ListChildren(self, request: pb.ListChildrenRequest, context: Context) -> pb.ListChildrenResponse:
        (Violations()
            .require("job_id", bool(request.job_id), "is required")
            .require("step_name", bool(request.step_name), "is required")
            .require_all_in("states", request.states, CHILD_STATES, _not_a_state)
            .check())
        await self._not_older_than(request, context)
        found = await self._store.list_children(
            request.job_id, request.step_name, list(request.states), page_size(request.page_size),
            request.page_token,
        )
        if found is None:
            raise NotFoundError(f"no step {quoted(request.step_name)} in job {quoted(request.job_id)}")
        return pb.ListChildrenResponse(children=found.children, next_page_token=found.next_page_token,
                                       revision=found.revision)

    async def WatchJob(self, request: pb.WatchJobRequest, context: Context) -> AsyncIterator[bytes | Response]:
        (Violations()
            .require("job_id", bool(request.job_id), "is required")
            .require("after_revision", request.after_revision >= 0, "must not be negative")
            .check())
        async with contextlib.aclosing(handed_over(self._watch_job(request, context), self._stall_timeout)) as watch:
            async for response in watch:
                yield response

    async def _watch_job(
        self, request: pb.WatchJobRequest, context: Context
    ) -> AsyncGenerator[bytes | Response, None]:
        await self._not_older_than(request, context)
        with (self.watchers.held(request.job_id, f"job {quoted(request.job_id)}"),
              self._feed.subscribed(request.job_id) as subscription):
            snapshot = await self._store.get_job(request.job_id)
            if snapshot is None:
                raise NotFoundError(f"no job {quoted(request.job_id)}")
            if request.HasField("after_revision"):
                await self._store.check_retained(request.after_revision)
                after = request.after_revision
                if request.until_finished and _finished(snapshot.job) and snapshot.job.revision <= after:
                    return
            else:
                initial = pb.JobUpdate(
                    revision=snapshot.revision, job_id=request.job_id, job=snapshot.job, steps=snapshot.steps
                )
                yield pb.WatchJobResponse(updates=pb.JobUpdateBatch(updates=[initial]))
                yield pb.WatchJobResponse(initial_state_complete=pb.InitialStateComplete(revision=snapshot.revision))
                if request.until_finished and _finished(snapshot.job):
                    return
                after = snapshot.revision

            async def read(cursor: int, limit: int) -> Page[StoredChange]:
                return await self._store.read_changes(cursor, limit, job_id=request.job_id)

            async for message in self._changes(subscription, after, read, pb.WatchJobResponse, with_steps=True,
                                               until=_ends_job if request.until_finished else None):
                yield message

    async def WatchJobs(self, request: pb.WatchJobsRequest, context: Context) -> AsyncIterator[bytes | Response]:
        (Violations()
            .require_all_in("filter.states", request.filter.states, _JOB_STATES, _not_a_state)
            .require("after_revision", request.after_revision >= 0, "must not be negative")
            .check())
        async with contextlib.aclosing(handed_over(self._watch_jobs(request, context), self._stall_timeout)) as watch:
            async for response in watch:
                yield response

    async def _watch_jobs(
        self, request: pb.WatchJobsRequest, context: Context
    ) -> AsyncGenerator[bytes | Response, None]:
        await self._not_older_than(request, context)
        matching = ChangeFilter(frozenset(request.filter.states), request.filter.name)
        with self._feed.subscribed() as subscription:
            if request.HasField("after_revision"):
                await self._store.check_retained(request.after_revision)
                after = request.after_revision
            else:
                with self.snapshots.held():  # the listing is held (in memory) only while it is sent
                    listed = await self._store.all_jobs(list(request.filter.states), request.filter.name)
                    after = listed.revision
                    for response in _listing(listed.jobs, after):
                        yield response
                    del listed

            async def read(cursor: int, limit: int) -> Page[StoredChange]:
                return await self._store.read_changes(cursor, limit, matching=matching)

            async for message in self._changes(subscription, after, read, pb.WatchJobsResponse, with_steps=False,
                                               select=matching.matches):
                yield message

    def _changes(
        self,
        subscription: Subscription[StoredChange],
        after: int,
        read: ReadPage[StoredChange],
        response: wire.WatchResponse,
        *,
        with_steps: bool,
        select: Callable[[StoredChange], bool] | None = None,
        until: Callable[[StoredChange], bool] | None = None,
    ) -> AsyncIterator[bytes | Response]:
        """WatchJob's and WatchJobs' responses after `after`: the same stream, but
        for the message type and whether updates carry the changed steps."""

        def heartbeat() -> Response:
            return response(heartbeat=pb.WatchHeartbeat(
                revision=self._feed.latest, time=timestamp(time.time()), interval=duration(self._heartbeat_interval),
            ))

        return serve_feed(
            self._feed, subscription, after=after, read_page=read,
            entry=functools.partial(update_entry, with_steps=with_steps),
            envelope=functools.partial(wire.watch_updates, response), heartbeat=heartbeat,
            heartbeat_interval=self._heartbeat_interval, max_items=MAX_UPDATES_PER_MESSAGE, select=select, until=until,
        )
