"""Following one job: a snapshot, then every change, resumed by revision across
any disconnect.

The rules (DESIGN.md invariants 4-6, from the client's side):

- The first WatchJob has no after_revision: the server sends the job's state,
  then InitialStateComplete. Every later JobUpdate is applied only if its
  revision is newer than the one held (header replaced when present, steps
  replaced by name), so a replayed or duplicated update can never move the
  view backwards.
- After a disconnect (UNAVAILABLE, the stream ended by a server shutdown, or
  silence for `stale_after_heartbeats` heartbeat intervals) the watch resumes
  with after_revision = the revision held, after a capped, jittered backoff.
  OUT_OF_RANGE means the server no longer retains that far back: take a new
  snapshot, never continue silently from "now".
- NOT_FOUND may only mean that the status service has not ingested a job the
  orchestrator just accepted: it is retried for a bounded time unless the
  orchestrator itself says the job does not exist.
- The watch ends after yielding a view whose job state is terminal. Closing
  it early (aclose, `async with`, or dropping it) cancels the RPC: breaking out
  of `async for` over a grpc.aio call does not (notes/grpc-python.md §1.3).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType

import grpc
from stepstream.backoff import Backoff
from stepstream.status.v1 import status_service_pb2 as pb
from stepstream.status.v1 import status_service_pb2_grpc as pb_grpc

from stepstream_client.errors import from_rpc_error
from stepstream_client.models import JobView, job_view, step_view

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


class JobWatch:
    """An async iterator of JobViews for one job; see the module docstring.

    Use as `async with client.watch(job_id) as views: async for view in views`
    (or call aclose()) so the RPC is cancelled as soon as you stop reading.
    Merely dropping it also cancels the RPC, soon after: nothing the running
    generator holds points back here, so it is finalized at once (no cycle
    left for the garbage collector).
    """

    def __init__(self, follower: Follower) -> None:
        self._follower = follower
        self._views = follower.run()

    @property
    def heartbeat_interval(self) -> float | None:
        """The server's heartbeat interval, once a heartbeat has told it (None before):
        silence for stale_after_heartbeats of these makes the view not live."""
        return self._follower.heartbeat_interval

    def __aiter__(self) -> JobWatch:
        return self

    async def __anext__(self) -> JobView:
        return await self._views.__anext__()

    async def aclose(self) -> None:
        await self._views.aclose()

    async def __aenter__(self) -> JobWatch:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()


class Follower:
    """The state of one watch and the loop that keeps it current (JobWatch is its handle)."""

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
        self._live = False
        self._last_heard: datetime | None = None
        # Learned from the server's heartbeats; until then only keepalive detects a dead peer.
        self.heartbeat_interval: float | None = None

    def _current(self) -> JobView:
        assert self._view is not None
        return dataclasses.replace(self._view, live=self._live, last_heard=self._last_heard)

    def _silence_limit(self) -> float | None:
        if self.heartbeat_interval is None:
            return None
        return self.heartbeat_interval * self._stale_after_heartbeats

    async def run(self) -> AsyncGenerator[JobView, None]:
        if self._view is not None and self._view.terminal:
            return
        snapshot = self._view is None
        failures = 0
        while True:
            request = pb.WatchJobRequest(job_id=self._job_id, not_older_than=self._not_older_than)
            if not snapshot:
                assert self._view is not None
                request.after_revision = self._view.revision
            call = self._stub.WatchJob(request)
            try:
                async with contextlib.aclosing(self._stream(call, snapshot)) as views:
                    async for view in views:
                        snapshot = False
                        failures = 0
                        yield view
                        if view.terminal:
                            return
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.OUT_OF_RANGE:
                    snapshot = True
                    continue
                if not await self._should_retry(error):
                    raise from_rpc_error(error, target=self._target) from None
            finally:
                call.cancel()
            if self._live:
                self._live = False
                yield self._current()
            await asyncio.sleep(self._backoff.delay(failures))
            failures += 1

    async def _should_retry(self, error: grpc.aio.AioRpcError) -> bool:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return await self._grace.keep_waiting(self._job_id)
        # Before the job was ever shown, failing fast says more than retrying in silence.
        return self._view is not None and error.code() in RESUMABLE

    async def _stream(
        self, call: grpc.aio.UnaryStreamCall[pb.WatchJobRequest, pb.WatchJobResponse], snapshot: bool
    ) -> AsyncGenerator[JobView, None]:
        """Views from one call, until it ends or goes silent (both mean: reconnect)."""
        initial = snapshot
        while True:
            try:
                message = await asyncio.wait_for(call.read(), self._silence_limit())
            except TimeoutError:
                return
            if not isinstance(message, pb.WatchJobResponse):
                return  # EOF: the server ended the stream (e.g. it is shutting down)
            self._grace.reset()
            was_live, self._live = self._live, True
            self._last_heard = datetime.now(UTC)
            kind = message.WhichOneof("event")
            changed = False
            if kind == "updates":
                for update in message.updates.updates:
                    changed |= self._apply(update, initial, replace=snapshot)
                    snapshot = False
            elif kind == "initial_state_complete":
                initial = False
            elif kind == "heartbeat" and message.heartbeat.HasField("interval"):
                self.heartbeat_interval = message.heartbeat.interval.ToNanoseconds() / 1e9 or None
            if self._view is not None and (changed or not was_live):
                yield self._current()

    def _apply(self, update: pb.JobUpdate, initial: bool, *, replace: bool) -> bool:
        """Apply `update` if it is newer than what is held (any part of the initial state is)."""
        view = self._view
        if replace or view is None:
            if not update.HasField("job"):
                return False
            self._view = job_view(update.job, list(update.steps), update.revision)
        elif initial or update.revision > view.revision:
            self._view = apply_update(view, update)
        else:
            return False
        if self._on_apply is not None:
            self._on_apply(Applied(update.revision, initial))
        return True
