"""Watching one job (or every job a filter matches): a snapshot, then every
change, resumed by revision across any disconnect.

The rules (DESIGN.md invariants 4-6, from the client's side):

- The first WatchJob has no after_revision: the server sends the job's state,
  then InitialStateComplete. Every later JobUpdate is applied only if its
  revision is newer than the one held (header replaced when present, steps
  replaced by name), so a replayed or duplicated update can never move the
  view backwards.
- After a disconnect (UNAVAILABLE, the stream ended by a server shutdown, or
  silence for `stale_after_heartbeats` heartbeat intervals) the watch resumes
  with after_revision = the revision held, after a capped, jittered backoff
  (the loop is stepstream.resumable's, shared with the status service). The
  last view is yielded again with live=False when the stream breaks.
  OUT_OF_RANGE means the server no longer retains that far back: take a new
  snapshot, never continue silently from "now".
- NOT_FOUND may only mean that the status service has not ingested a job the
  orchestrator just accepted: it is retried for a bounded time unless the
  orchestrator itself says the job does not exist.
- The watch ends after yielding a view whose job state is terminal (a jobs
  watch never ends by itself). Closing
  it early (aclose, `async with`, or dropping it) cancels the RPC: breaking out
  of `async for` over a grpc.aio call does not (notes/grpc-python.md §1.3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import grpc
from stepstream.backoff import Backoff
from stepstream.resumable import Reconnecting, ResumableStream, Silence, StreamEnded, Verdict
from stepstream.status.v1 import status_service_pb2 as pb
from stepstream.status.v1 import status_service_pb2_grpc as pb_grpc

from stepstream_client.errors import from_rpc_error
from stepstream_client.models import JobSummary, JobsView, JobView, job_summary, job_view, step_view

# Codes after which a watch that has shown the job reconnects from its revision.
RESUMABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED,
})


@dataclass(frozen=True)
class Applied:
    """One JobUpdate the watch applied: `snapshot` marks a full state (the first
    one, or a re-snapshot after OUT_OF_RANGE), after which revisions may jump."""

    revision: int
    snapshot: bool


class IngestGrace:
    """How long NOT_FOUND from the status service is taken for ingestion lag.

    `may_exist(job_id)` asks the orchestrator: False means the job really does
    not exist, so there is nothing to wait for.
    """

    def __init__(self, seconds: float, may_exist: Callable[[str], Awaitable[bool]]) -> None:
        self._seconds = seconds
        self._may_exist = may_exist
        self._since: float | None = None

    async def keep_waiting(self, job_id: str) -> bool:
        now = time.monotonic()
        if self._since is None:
            self._since = now
        return now - self._since < self._seconds and await self._may_exist(job_id)

    def reset(self) -> None:
        self._since = None


def apply_update(view: JobView, update: pb.JobUpdate) -> JobView:
    """`view` with one JobUpdate applied: the header replaced when present, steps replaced by name."""
    header = job_view(update.job, [], update.revision) if update.HasField("job") else view
    steps = {step.name: step for step in view.steps}
    steps.update((stats.name, step_view(stats)) for stats in update.steps)
    ordered = tuple(sorted(steps.values(), key=lambda step: (step.index, step.name)))
    return dataclasses.replace(header, steps=ordered, revision=update.revision)


V = TypeVar("V", covariant=True)


class Loop(Protocol[V]):
    heartbeat_interval: float | None

    def run(self) -> AsyncGenerator[V, None]: ...


class Watch(Generic[V]):
    """An async iterator of views (see the module docstring).

    Use as `async with client.watch(job_id) as views: async for view in views`
    (or call aclose()) so the RPC is cancelled as soon as you stop reading.
    Merely dropping it also cancels the RPC, soon after: nothing the running
    generator holds points back here, so it is finalized at once (no cycle
    left for the garbage collector).
    """

    def __init__(self, watch_loop: Loop[V]) -> None:
        self._watch_loop = watch_loop
        self._views = watch_loop.run()

    @property
    def heartbeat_interval(self) -> float | None:
        """The server's heartbeat interval, once a heartbeat has told it (None before):
        silence for stale_after_heartbeats of these makes the view not live."""
        return self._watch_loop.heartbeat_interval

    def __aiter__(self) -> Watch[V]:
        return self

    async def __anext__(self) -> V:
        return await self._views.__anext__()

    async def aclose(self) -> None:
        await self._views.aclose()

    async def __aenter__(self) -> Watch[V]:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()


# What Client.watch and Client.watch_jobs return.
JobWatch = Watch[JobView]
JobsWatch = Watch[JobsView]

Message = TypeVar("Message")
View = TypeVar("View")


class ViewLoop(ABC, Generic[Message, View]):
    """A view kept current by stepstream.resumable's loop: yielded at every change,
    and once more (not live) when the stream breaks; ended once `_finished` says so."""

    _target: str
    _backoff: Backoff
    _stale_after_heartbeats: float
    _live: bool
    # Learned from the server's heartbeats; until then only keepalive detects a dead peer.
    heartbeat_interval: float | None

    async def run(self) -> AsyncGenerator[View, None]:
        if self._finished():
            return
        stream = ResumableStream(
            self._open_call, self._take, silence=self._silence_limit, classify=self._classify,
            resync=self._start_over, backoff=self._backoff,
        )
        try:
            async with contextlib.aclosing(aiter(stream)) as items:
                async for item in items:
                    if not isinstance(item, Reconnecting):
                        yield item
                        if self._finished():
                            return
                    elif self._live:
                        self._live = False
                        yield self._current()
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, target=self._target) from None

    def _silence_limit(self) -> float | None:
        return None if self.heartbeat_interval is None else self.heartbeat_interval * self._stale_after_heartbeats

    def _finished(self) -> bool:
        """Whether nothing can change the view held any more (the watch ends once it is shown)."""
        return False

    @abstractmethod
    def _current(self) -> View: ...

    @abstractmethod
    def _open_call(self) -> grpc.aio.UnaryStreamCall[Any, Message]: ...

    @abstractmethod
    async def _take(self, message: Message) -> View | None:
        """Apply one message; the view to show if it changed or the watch is live again."""

    async def _classify(self, error: Exception) -> Verdict:
        """A broken or silent stream is retried, OUT_OF_RANGE starts over, other RPC errors as the view says."""
        if isinstance(error, Silence | StreamEnded):
            return Verdict.RETRY
        if not isinstance(error, grpc.aio.AioRpcError):
            return Verdict.FAIL
        if error.code() == grpc.StatusCode.OUT_OF_RANGE:
            return Verdict.RESYNC
        return await self._classify_rpc_error(error)

    @abstractmethod
    async def _classify_rpc_error(self, error: grpc.aio.AioRpcError) -> Verdict: ...

    @abstractmethod
    async def _start_over(self) -> None:
        """OUT_OF_RANGE: what follows the view is gone from the server; start from a new snapshot."""


class WatchLoop(ViewLoop[pb.WatchJobResponse, JobView]):
    """The view of one watched job and the resumable stream that keeps it current
    (JobWatch is its handle)."""

    def __init__(
        self,
        stub: pb_grpc.StatusServiceAsyncStub,
        target: str,
        job_id: str,
        *,
        since: JobView | None,
        stale_after_heartbeats: float,
        grace: IngestGrace,
        backoff: Backoff,
        on_apply: Callable[[Applied], None] | None = None,
        not_older_than: pb.LogPosition | None = None,
    ) -> None:
        self._stub = stub
        self._not_older_than = not_older_than
        self._target = target
        self._job_id = job_id
        self._stale_after_heartbeats = stale_after_heartbeats
        self._grace = grace
        self._backoff = backoff
        self._on_apply = on_apply
        self._view = since
        # Ask for a snapshot, whose first update replaces the view (at the start, or after OUT_OF_RANGE).
        self._snapshot = since is None
        # The current call is still sending the initial state (it was asked for a snapshot).
        self._initial = False
        # A view handed in (`since`) is being shown as live: if the first call fails, its holder must hear otherwise.
        self._live = since is not None
        self._last_heard: datetime | None = since.last_heard if since is not None else None
        self.heartbeat_interval: float | None = None

    def _current(self) -> JobView:
        assert self._view is not None
        return dataclasses.replace(self._view, live=self._live, last_heard=self._last_heard)

    def _finished(self) -> bool:
        return self._view is not None and self._view.terminal

    def _open_call(self) -> grpc.aio.UnaryStreamCall[pb.WatchJobRequest, pb.WatchJobResponse]:
        """WatchJob after the revision held, or for a snapshot."""
        request = pb.WatchJobRequest(job_id=self._job_id, not_older_than=self._not_older_than)
        after = None if self._snapshot else self._view
        if after is not None:
            request.after_revision = after.revision
        self._initial = after is None
        return self._stub.WatchJob(request)

    async def _start_over(self) -> None:
        """OUT_OF_RANGE: the server no longer has what follows the view, so take a new snapshot."""
        self._snapshot = True

    async def _classify_rpc_error(self, error: grpc.aio.AioRpcError) -> Verdict:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return Verdict.RETRY if await self._grace.keep_waiting(self._job_id) else Verdict.FAIL
        # Before the job was ever shown, failing fast says more than retrying in silence.
        return Verdict.RETRY if self._view is not None and error.code() in RESUMABLE else Verdict.FAIL

    async def _take(self, message: pb.WatchJobResponse) -> JobView | None:
        """Apply one message; the view to show if it changed or the watch is live again."""
        self._grace.reset()
        was_live, self._live = self._live, True
        self._last_heard = datetime.now(UTC)
        kind = message.WhichOneof("event")
        changed = False
        if kind == "updates":
            for update in message.updates.updates:
                changed |= self._apply(update)
        elif kind == "initial_state_complete":
            self._initial = False
        elif kind == "heartbeat" and message.heartbeat.HasField("interval"):
            self.heartbeat_interval = message.heartbeat.interval.ToNanoseconds() / 1e9 or None
        return self._current() if self._view is not None and (changed or not was_live) else None

    def _apply(self, update: pb.JobUpdate) -> bool:
        """Apply `update` if it is newer than what is held (any part of the initial state is)."""
        view = self._view
        replace, self._snapshot = self._snapshot, False
        if replace or view is None:
            if not update.HasField("job"):
                return False
            self._view = job_view(update.job, list(update.steps), update.revision)
        elif self._initial or update.revision > view.revision:
            self._view = apply_update(view, update)
        else:
            return False
        if self._on_apply is not None:
            self._on_apply(Applied(update.revision, self._initial))
        return True


class JobsWatchLoop(ViewLoop[pb.WatchJobsResponse, JobsView]):
    """Every job a WatchJobs filter matches, kept current by the resumable stream
    (JobsWatch is its handle). The listing a snapshot sends is shown once complete
    (at its InitialStateComplete), so a half-received one never hides jobs; a job
    whose change takes it out of the filter's states leaves the view."""

    def __init__(
        self, stub: pb_grpc.StatusServiceAsyncStub, target: str, job_filter: pb.JobFilter, *,
        stale_after_heartbeats: float, backoff: Backoff,
    ) -> None:
        self._stub = stub
        self._target = target
        self._filter = job_filter
        self._states = frozenset(job_filter.states)
        self._stale_after_heartbeats = stale_after_heartbeats
        self._backoff = backoff
        self._jobs: dict[str, JobSummary] = {}
        # The listing being received after a snapshot was asked for (None: following changes).
        self._listing: dict[str, JobSummary] | None = None
        self._revision = 0
        self._shown = False
        self._live = False
        self._last_heard: datetime | None = None
        self.heartbeat_interval: float | None = None

    def _current(self) -> JobsView:
        ordered = sorted(self._jobs.values(), key=lambda job: (job.created_at or datetime.min.replace(tzinfo=UTC),
                                                               job.id), reverse=True)
        return JobsView(tuple(ordered), self._revision, live=self._live, last_heard=self._last_heard)

    def _open_call(self) -> grpc.aio.UnaryStreamCall[pb.WatchJobsRequest, pb.WatchJobsResponse]:
        request = pb.WatchJobsRequest(filter=self._filter)
        if not self._shown or self._listing is not None:
            self._listing = {}
        else:
            request.after_revision = self._revision
        return self._stub.WatchJobs(request)

    async def _start_over(self) -> None:
        """OUT_OF_RANGE: take a new listing."""
        self._listing = {}

    async def _classify_rpc_error(self, error: grpc.aio.AioRpcError) -> Verdict:
        return Verdict.RETRY if self._shown and error.code() in RESUMABLE else Verdict.FAIL

    async def _take(self, message: pb.WatchJobsResponse) -> JobsView | None:
        was_live, self._live = self._live, True
        self._last_heard = datetime.now(UTC)
        kind = message.WhichOneof("event")
        changed = False
        if kind == "updates":
            for update in message.updates.updates:
                if self._listing is not None:
                    if update.HasField("job"):
                        self._listing[update.job_id] = job_summary(update.job)
                else:
                    changed |= self._apply(update)
        elif kind == "initial_state_complete" and self._listing is not None:
            self._jobs, self._listing = self._listing, None
            self._revision = message.initial_state_complete.revision
            self._shown = changed = True
        elif kind == "heartbeat" and message.heartbeat.HasField("interval"):
            self.heartbeat_interval = message.heartbeat.interval.ToNanoseconds() / 1e9 or None
        return self._current() if self._shown and (changed or not was_live) else None

    def _apply(self, update: pb.JobUpdate) -> bool:
        """Apply `update` to its job if newer than what is held of it."""
        self._revision = max(self._revision, update.revision)
        held = self._jobs.get(update.job_id)
        if not update.HasField("job") or (held is not None and held.revision >= update.revision):
            return False
        if self._states and update.job.state not in self._states:
            return self._jobs.pop(update.job_id, None) is not None
        self._jobs[update.job_id] = job_summary(update.job)
        return True
