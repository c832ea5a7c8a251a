"""StatusService over gRPC: validates requests, reads the store, streams the feed."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from stepstream.common.v1 import states_pb2
from stepstream.states import CHILD_STATES, TERMINAL_JOB_STATES
from stepstream.status.v1 import status_service_pb2 as pb

from status_svc.ingest.progress import AppliedPositions
from status_svc.storage.base import ChangeFilter, StatusStore, StoredChange
from stepstream_common import wire
from stepstream_common.errors import NotFoundError, quoted
from stepstream_common.feed import Feed, Page, ReadPage, Subscription, replay_then_live
from stepstream_common.paging import page_size
from stepstream_common.rpc import require
from stepstream_common.timeutil import duration, timestamp

Context = grpc.aio.ServicerContext[Any, Any]
Request = (
    pb.GetJobRequest | pb.ListJobsRequest | pb.ListChildrenRequest | pb.WatchJobRequest | pb.WatchJobsRequest
)
Response = pb.WatchJobResponse | pb.WatchJobsResponse

MAX_UPDATES_PER_MESSAGE = 500
MAX_BYTES_PER_MESSAGE = 1 << 20

_JOB_STATES = frozenset(states_pb2.JobState.values()) - {states_pb2.JOB_STATE_UNSPECIFIED}


def _finished(job: pb.JobStatus) -> bool:
    return job.state in TERMINAL_JOB_STATES


def _check_states(field: str, states: Sequence[int], allowed: frozenset[int]) -> list[tuple[str, str]]:
    return [(f"{field}[{i}]", f"not a valid state: {state}") for i, state in enumerate(states) if state not in allowed]


@functools.lru_cache(maxsize=16384)
def update_entry(change: StoredChange, with_steps: bool) -> bytes:
    """One JobUpdate as an entry of JobUpdateBatch.updates, assembled from the
    parts committed with the change: once per change, however many watchers
    send it."""
    data = wire.varint_field(1, change.revision) + wire.length_delimited(2, change.job_id.encode())
    if change.header is not None:
        data += wire.length_delimited(3, change.header)
    if with_steps and change.steps is not None:
        data += change.steps
    return wire.length_delimited(1, data)


def update_batches(entries: list[bytes]) -> list[bytes]:
    """Watch responses (field 1, JobUpdateBatch) carrying these entries, bounded in size."""
    return [
        wire.length_delimited(1, b"".join(chunk))
        for chunk in wire.chunks(entries, MAX_UPDATES_PER_MESSAGE, MAX_BYTES_PER_MESSAGE)
    ]


class StatusServicer:
    def __init__(
        self,
        store: StatusStore,
        feed: Feed[StoredChange],
        heartbeat_interval: float,
        applied: AppliedPositions,
        max_wait_applied: float,
    ) -> None:
        self._store = store
        self._feed = feed
        self._heartbeat_interval = heartbeat_interval
        self._applied = applied
        self._max_wait_applied = max_wait_applied
        self._ingest_stopped: tuple[float, str] | None = None

    def ingest_stopped(self, detail: str) -> None:
        """Nothing will update what is stored any more: from now on, reads show
        every unfinished job stale, with why (the service is about to exit)."""
        self._ingest_stopped = (time.time(), detail)

    def _fresh(self, job: pb.JobStatus) -> pb.JobStatus:
        if self._ingest_stopped is not None and job.state not in TERMINAL_JOB_STATES:
            since, detail = self._ingest_stopped
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
        require([("not_older_than.seq", "must not be negative")] if position.seq < 0 else [])
        remaining = context.time_remaining()
        timeout = self._max_wait_applied if remaining is None else min(remaining, self._max_wait_applied)
        await self._applied.wait(position.log_id, position.seq, timeout)

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        require([("job_id", "is required")] if not request.job_id else [])
        await self._not_older_than(request, context)
        snapshot = await self._store.get_job(request.job_id)
        if snapshot is None:
            raise NotFoundError(f"no job {quoted(request.job_id)}")
        return pb.GetJobResponse(job=self._fresh(snapshot.job), steps=snapshot.steps, revision=snapshot.revision)

    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        require(_check_states("filter.states", request.filter.states, _JOB_STATES))
        await self._not_older_than(request, context)
        jobs, token, revision = await self._store.list_jobs(
            list(request.filter.states), request.filter.name, page_size(request.page_size), request.page_token
        )
        return pb.ListJobsResponse(jobs=[self._fresh(job) for job in jobs], next_page_token=token, revision=revision)

    async def ListChildren(self, request: pb.ListChildrenRequest, context: Context) -> pb.ListChildrenResponse:
        require(
            [("job_id", "is required")] * (not request.job_id)
            + [("step_name", "is required")] * (not request.step_name)
            + _check_states("states", request.states, CHILD_STATES)
        )
        await self._not_older_than(request, context)
        found = await self._store.list_children(
            request.job_id, request.step_name, list(request.states), page_size(request.page_size),
            request.page_token,
        )
        if found is None:
            raise NotFoundError(f"no step {quoted(request.step_name)} in job {quoted(request.job_id)}")
        children, token, revision = found
        return pb.ListChildrenResponse(children=children, next_page_token=token, revision=revision)

    async def WatchJob(self, request: pb.WatchJobRequest, context: Context) -> AsyncIterator[bytes | Response]:
        require(
            [("job_id", "is required")] * (not request.job_id)
            + [("after_revision", "must not be negative")] * (request.after_revision < 0)
        )
        await self._not_older_than(request, context)
        subscription = self._feed.subscribe(request.job_id)
        try:
            if request.HasField("after_revision"):
                found = await self._store.get_job(request.job_id)
                if found is None:
                    raise NotFoundError(f"no job {quoted(request.job_id)}")
                await self._store.check_retained(request.after_revision)
                after = request.after_revision
                if request.until_finished and _finished(found.job) and found.job.revision <= after:
                    return
            else:
                snapshot = await self._store.get_job(request.job_id)
                if snapshot is None:
                    raise NotFoundError(f"no job {quoted(request.job_id)}")
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

            async for message in self._changes(subscription, after, read, None, with_steps=True,
                                               heartbeat=pb.WatchJobResponse, until_finished=request.until_finished):
                yield message
        finally:
            self._feed.unsubscribe(subscription)

    async def WatchJobs(self, request: pb.WatchJobsRequest, context: Context) -> AsyncIterator[bytes | Response]:
        require(
            _check_states("filter.states", request.filter.states, _JOB_STATES)
            + [("after_revision", "must not be negative")] * (request.after_revision < 0)
        )
        await self._not_older_than(request, context)
        matching = ChangeFilter(frozenset(request.filter.states), request.filter.name)
        subscription = self._feed.subscribe()
        try:
            if request.HasField("after_revision"):
                await self._store.check_retained(request.after_revision)
                after = request.after_revision
            else:
                jobs, after = await self._store.all_jobs(list(request.filter.states), request.filter.name)
                for start in range(0, max(len(jobs), 1), MAX_UPDATES_PER_MESSAGE):
                    chunk = jobs[start:start + MAX_UPDATES_PER_MESSAGE]
                    updates = [pb.JobUpdate(revision=after, job_id=job.id, job=job) for job in chunk]
                    yield pb.WatchJobsResponse(updates=pb.JobUpdateBatch(updates=updates))
                yield pb.WatchJobsResponse(initial_state_complete=pb.InitialStateComplete(revision=after))

            async def read(cursor: int, limit: int) -> Page[StoredChange]:
                return await self._store.read_changes(cursor, limit, matching=matching)

            async for message in self._changes(subscription, after, read, matching, with_steps=False,
                                               heartbeat=pb.WatchJobsResponse):
                yield message
        finally:
            self._feed.unsubscribe(subscription)

    async def _changes(
        self,
        subscription: Subscription[StoredChange],
        after: int,
        read: ReadPage[StoredChange],
        matching: ChangeFilter | None,
        *,
        with_steps: bool,
        heartbeat: type[pb.WatchJobResponse] | type[pb.WatchJobsResponse],
        until_finished: bool = False,
    ) -> AsyncIterator[bytes | Response]:
        """Changes after `after`; with until_finished, up to the one that ends the job."""
        async for items in replay_then_live(self._feed, subscription, after=after, read_page=read,
                                  idle_timeout=self._heartbeat_interval, page_size=MAX_UPDATES_PER_MESSAGE):
            if not items:
                yield heartbeat(heartbeat=pb.WatchHeartbeat(
                    revision=self._feed.latest, time=timestamp(time.time()),
                    interval=duration(self._heartbeat_interval),
                ))
                continue
            selected = items if matching is None else [item for item in items if matching.matches(item)]
            for message in update_batches([update_entry(change, with_steps) for change in selected]):
                yield message
            if until_finished and any(
                change.header is not None and change.state_after in TERMINAL_JOB_STATES for change in selected
            ):
                return
