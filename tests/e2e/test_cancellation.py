"""Any request may vanish at any await (DESIGN invariant 8), tried at every await.

`cancel_at(work, n)` drives a coroutine the way an asyncio Task does, and at its
n-th suspension cancels what it waits on and throws CancelledError into it:
exactly what grpc.aio does to a handler whose client left or whose deadline
passed. Each path below is run with n = 1, 2, ... until it completes without
being cancelled, so every await point of every read and write path of both
services' storage and servicers is the last one once. After each cancellation:
no database unit still running, no lock held, no shared connection inside a
transaction, no subscription left in a feed, and the same request, asked again,
answers exactly what it answered before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from orchestrator_svc.api.servicer import OrchestratorServicer
from orchestrator_svc.app import Orchestrator
from orchestrator_svc.storage.base import NewJob
from orchestrator_svc.storage.sqlite import SqliteEventStore
from status_svc.api.servicer import StatusServicer
from status_svc.app import StatusService
from status_svc.storage.base import ChangeFilter, WriteBatch
from status_svc.storage.sqlite import SqliteStatusStore
from stepstream_common.errors import ServiceError
from stepstream_common.sqlite import SqliteFile
from tests.helpers import DEADLINE, job_definition, status_job_finished, wait_job_state, wait_status_job

MAX_AWAITS = 400


@dataclass
class Outcome:
    completed: bool
    result: Any = None


async def cancel_at(work: Coroutine[Any, Any, Any], n: int) -> Outcome:
    """Run `work` to its end, or cancel it at its n-th suspension as Task.cancel() would."""
    to_throw: BaseException | None = None
    suspensions = 0
    while True:
        try:
            waiting_on = work.send(None) if to_throw is None else work.throw(to_throw)
        except StopIteration as done:
            return Outcome(True, done.value)
        except asyncio.CancelledError:
            return Outcome(False)
        to_throw = None
        suspensions += 1
        if suspensions == n:
            if isinstance(waiting_on, asyncio.Future):
                waiting_on.cancel()
            to_throw = asyncio.CancelledError()
        elif isinstance(waiting_on, asyncio.Future):
            waiting_on._asyncio_future_blocking = False
            await asyncio.wait([waiting_on])
        else:
            await asyncio.sleep(0)


class _Context:
    """The part of grpc.aio.ServicerContext the servicers use (errors are raised, not aborted:
    turning them into statuses is rpc._boundary's job, outside the servicer)."""

    def time_remaining(self) -> None:
        return None


async def _settled(*files: SqliteFile) -> None:
    """Wait until the units that cancelled callers left behind have finished."""
    end = time.monotonic() + DEADLINE
    while not all(f.idle() for f in files):
        assert time.monotonic() < end, "a database unit never finished"
        await asyncio.sleep(0.001)


Work = Callable[[], Coroutine[Any, Any, Any]]


async def every_await(
    work: Work, *files: SqliteFile, clean: Callable[[], None] = lambda: None,
    same: Callable[[Any, Any], bool] = lambda a, b: bool(a == b),
) -> int:
    """Cancel `work` at each of its awaits in turn; returns how many there were.

    A refused call's answer is its error (a refused cancel is an answer too).
    """

    async def answer() -> Any:
        try:
            return await work()
        except ServiceError as refused:
            return type(refused), str(refused)

    expected = await answer()
    await _settled(*files)
    for n in range(1, MAX_AWAITS):
        outcome = await cancel_at(answer(), n)
        await _settled(*files)
        for f in files:
            assert f.idle(), f"cancelled at await {n}: {f.path.name} left busy"
        clean()
        again = await answer()
        assert same(again, expected), f"after a cancellation at await {n}: {again!r} != {expected!r}"
        if outcome.completed:
            assert n > 1, "the path never awaited anything: nothing was tried"
            return n - 1
    raise AssertionError(f"still not done after {MAX_AWAITS} awaits")


async def _consume(stream: AsyncIterator[Any], messages: int) -> list[bytes]:
    """The first `messages` responses of a servicer stream, encoded."""
    received: list[bytes] = []
    try:
        async for message in stream:
            received.append(message if isinstance(message, bytes) else message.SerializeToString())
            if len(received) == messages:
                break
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    return received


def _without_heartbeats(responses: list[bytes], response_type: Any) -> list[Any]:
    parsed = [response_type.FromString(data) for data in responses]
    return [message for message in parsed if not message.HasField("heartbeat")]


# --- the orchestrator -------------------------------------------------------------------------------------------


def _event(seq: int, job_id: str) -> tuple[records_pb2.StepEvent, bytes]:
    event = records_pb2.StepEvent(seq=seq, job=records_pb2.Job(id=job_id, name="j", state=s.JOB_STATE_PENDING))
    return event, event.SerializeToString()


async def test_event_store_write_and_read_paths_survive_cancellation_at_every_await(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.sqlite3")
    await store.open()
    try:
        seq = 0

        async def append() -> tuple[int, ...]:
            nonlocal seq
            seq += 1
            event = _event(seq, f"job-{seq}")
            await store.append([event], [NewJob(f"job-{seq}", f"request-{seq}", b"")])
            return ()

        # A cancelled append still commits whole (its unit finishes): the log stays contiguous.
        awaits = await every_await(append, store)
        page = await store.read_events(0, 10_000)
        assert [event.position for event in page.items] == list(range(1, seq + 1))
        assert page.horizon == seq
        assert awaits >= 1

        for work in (
            lambda: store.read_events(0, 100),
            lambda: store.get_job("job-1"),
            lambda: store.job_for_request("request-2"),
            lambda: store.list_jobs([], "", 2, ""),
            lambda: store.unfinished_jobs(),
            lambda: store.oldest_seq(),
        ):
            await every_await(work, store)

        async def whole_snapshot() -> list[bytes]:
            async with store.snapshot() as snapshot:
                return [record async for page in snapshot.pages for record in page]

        await every_await(whole_snapshot, store)
        await every_await(lambda: store.prune(10_000, 3600.0), store)
        page = await store.read_events(0, 10_000)
        assert [event.position for event in page.items] == list(range(1, seq + 1))
    finally:
        await store.close()


async def test_orchestrator_handlers_survive_cancellation_at_every_await(
    orchestrator: Orchestrator, orchestrator_stub: orch_grpc.OrchestratorServiceAsyncStub
) -> None:
    definition = job_definition([
        {"name": "fan", "type": "fanout", "count": 3, "child": {"type": "sleep", "seconds": 0}},
        {"name": "after", "type": "sleep", "seconds": 0},
    ])
    first = await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition, request_id="first"))
    await wait_job_state(orchestrator_stub, first.job.id, {s.JOB_STATE_COMPLETED})
    servicer = OrchestratorServicer(
        orchestrator.engine, orchestrator.store, orchestrator.feed, orchestrator.store.log_id, 0.05,
        output=orchestrator.output,
    )
    context: Any = _Context()
    store = orchestrator.store

    def no_subscribers() -> None:
        assert orchestrator.feed.subscriber_count == 0

    for unary in (
        lambda: servicer.GetJob(orch_pb.GetJobRequest(job_id=first.job.id), context),
        lambda: servicer.ListJobs(orch_pb.ListJobsRequest(page_size=1), context),
        lambda: servicer.SubmitJob(orch_pb.SubmitJobRequest(definition=definition, request_id="first"), context),
        lambda: servicer.CancelJob(orch_pb.CancelJobRequest(job_id=first.job.id), context),
    ):
        await every_await(unary, store)

    latest = orchestrator.feed.latest
    events = orch_pb.StreamStepEventsResponse

    async def stream_from_start() -> list[Any]:
        stream = servicer.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=0), context)
        received = _without_heartbeats(await _consume(stream, 3), events)
        return [event.seq for message in received for event in message.batch.events]

    async def whole_snapshot() -> list[bytes]:
        return await _consume(servicer.StreamSnapshot(orch_pb.StreamSnapshotRequest(), context), 1_000)

    await every_await(stream_from_start, store, clean=no_subscribers,
                      same=lambda a, b: a == b == list(range(1, latest + 1)))
    await every_await(whole_snapshot, store, clean=no_subscribers)

    # Submits cancelled at every await: each request_id ends with at most one job,
    # and the same submit asked again answers with that job.
    submitted: list[str] = []

    async def submit_new() -> str:
        request_id = f"cancelled-{len(submitted)}"
        submitted.append(request_id)
        response = await servicer.SubmitJob(
            orch_pb.SubmitJobRequest(definition=definition, request_id=request_id), context
        )
        return str(response.job.name)

    await every_await(submit_new, store, same=lambda a, b: a == b)
    for request_id in submitted:
        again = await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition,
                                                                          request_id=request_id))
        await wait_job_state(orchestrator_stub, again.job.id, {s.JOB_STATE_COMPLETED})
    await _settled(store)
    assert store.idle()


# --- the status service ------------------------------------------------------------------------------------------


async def test_status_handlers_and_store_survive_cancellation_at_every_await(
    orchestrator_stub: orch_grpc.OrchestratorServiceAsyncStub,
    status: StatusService,
    status_stub: status_grpc.StatusServiceAsyncStub,
) -> None:
    definition = job_definition([
        {"name": "fan", "type": "fanout", "count": 5, "child": {"type": "sleep", "seconds": 0}},
        {"name": "after", "type": "sleep", "seconds": 0},
    ])
    job_id = (await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))).job.id
    await wait_status_job(status_stub, job_id, status_job_finished, "the job to end")
    servicer = StatusServicer(status.store, status.feed, 0.05, status.writer.applied, 5.0)
    context: Any = _Context()
    store = status.store
    assert isinstance(store, SqliteStatusStore)  # the default store: its SqliteFile tells when it is idle

    def no_subscribers() -> None:
        assert status.feed.subscriber_count == 0

    for unary in (
        lambda: servicer.GetJob(status_pb.GetJobRequest(job_id=job_id), context),
        lambda: servicer.ListJobs(status_pb.ListJobsRequest(page_size=1), context),
        lambda: servicer.ListChildren(status_pb.ListChildrenRequest(job_id=job_id, step_name="fan",
                                                                    page_size=2), context),
    ):
        await every_await(unary, store)

    source = status.writer.source(status.followers[0].address)
    for work in (
        lambda: store.get_job(job_id),
        lambda: store.list_jobs([], "", 1, ""),
        lambda: store.all_jobs([s.JOB_STATE_COMPLETED], ""),
        lambda: store.list_children(job_id, "fan", [], 2, ""),
        lambda: store.read_changes(0, 100, job_id=job_id),
        lambda: store.read_changes(0, 100, matching=ChangeFilter()),
        lambda: store.check_retained(0),
        lambda: store.unfinished_jobs(source.address),
        lambda: store.load_jobs([job_id]),
        lambda: store.prune(1_000_000),
        lambda: store.commit(WriteBatch(sources=[source])),
    ):
        await every_await(work, store, same=lambda a, b: repr(a) == repr(b))

    async def watch_job() -> list[Any]:
        stream = servicer.WatchJob(status_pb.WatchJobRequest(job_id=job_id), context)
        return _without_heartbeats(await _consume(stream, 3), status_pb.WatchJobResponse)

    async def resume_job() -> list[Any]:
        stream = servicer.WatchJob(status_pb.WatchJobRequest(job_id=job_id, after_revision=0), context)
        return _without_heartbeats(await _consume(stream, 3), status_pb.WatchJobResponse)

    async def watch_jobs() -> list[Any]:
        stream = servicer.WatchJobs(status_pb.WatchJobsRequest(), context)
        return _without_heartbeats(await _consume(stream, 3), status_pb.WatchJobsResponse)

    for stream_work in (watch_job, resume_job, watch_jobs):
        await every_await(stream_work, store, clean=no_subscribers)

    # And over the wire, after all that: the service still follows and answers.
    second = (await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))).job.id
    final = await wait_status_job(status_stub, second, status_job_finished, "a job submitted afterwards to end")
    assert final.job.state == s.JOB_STATE_COMPLETED


async def test_a_storm_of_cancelled_callers_never_wedges_the_shared_reader(tmp_path: Path) -> None:
    """The race as a client makes it (the facts note's 200 of 200): tasks that
    start a read and are cancelled after one loop turn, then normal reads."""
    store = SqliteEventStore(tmp_path / "events.sqlite3")
    await store.open()
    try:
        await store.append([_event(1, "job-1")], [NewJob("job-1", "", b"")])
        for _ in range(200):
            task = asyncio.create_task(store.get_job("job-1"))
            await asyncio.sleep(0)
            task.cancel()
        await _settled(store)
        views = await asyncio.gather(*(store.get_job("job-1") for _ in range(20)))
        assert all(view is not None and view.job.id == "job-1" for view in views)
    finally:
        await store.close()


@pytest.mark.parametrize("cancel_after", [0, 1, 2, 3])
async def test_cancelled_snapshot_streams_close_their_connection(tmp_path: Path, cancel_after: int) -> None:
    store = SqliteEventStore(tmp_path / "events.sqlite3")
    await store.open()
    try:
        await store.append([_event(i, f"job-{i}") for i in range(1, 3001)],
                           [NewJob(f"job-{i}", "", b"") for i in range(1, 3001)])

        async def read_some() -> None:
            async with store.snapshot() as snapshot:
                async for _ in snapshot.pages:
                    await asyncio.sleep(0)

        task = asyncio.create_task(read_some())
        for _ in range(cancel_after):
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await _settled(store)
        # The writer can still checkpoint and write: no reader transaction pins the WAL.
        await store.append([_event(3001, "job-3001")], [NewJob("job-3001", "", b"")])
        assert (await store.read_events(3000, 10)).horizon == 3001
    finally:
        await store.close()

