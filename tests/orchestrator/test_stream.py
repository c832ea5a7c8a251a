"""StreamStepEvents and StreamSnapshot: replay then live with no gap and no
duplicate, slow and stalled readers, heartbeats, cursors that cannot be served,
snapshots joined to the stream by one seq, and graceful shutdown."""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream_client.errors import OutOfRangeError, from_rpc_error

from orchestrator_svc.app import Orchestrator, start
from tests.conftest import orchestrator_config
from tests.helpers import DEADLINE, channel, eventually, job_definition, wait_job_state

if TYPE_CHECKING:
    from stepstream.orchestrator.v1.orchestrator_service_pb2_grpc import OrchestratorServiceAsyncStub as Stub
else:
    Stub = orch_grpc.OrchestratorServiceStub

Event = records_pb2.StepEvent
TERMINAL_JOB: set[int] = {s.JOB_STATE_COMPLETED, s.JOB_STATE_FAILED, s.JOB_STATE_CANCELLED}


@pytest.fixture
async def custom_orchestrator(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Orchestrator]]]:
    """Start orchestrators with configuration overrides; all are stopped at the end."""
    started: list[Orchestrator] = []

    async def make(**overrides: Any) -> Orchestrator:
        running = await start(orchestrator_config(tmp_path / f"orchestrator-{len(started)}", **overrides))
        started.append(running)
        return running

    yield make
    for running in started:
        await running.stop()


def fanout_job(count: int, name: str = "fan-job", seconds: float = 0.001, concurrency: int = 5) -> Any:
    return job_definition(
        [
            {"name": "before", "type": "sleep", "seconds": 0},
            {"name": "fan", "type": "fanout", "count": count, "concurrency": concurrency,
             "child": {"type": "sleep", "seconds": seconds}},
            {"name": "after", "type": "sleep", "seconds": 0},
        ],
        name=name,
    )


async def submit(stub: Stub, definition: Any) -> orch_pb.SubmitJobResponse:
    return await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))


async def latest_seq(stub: Stub, job_id: str) -> int:
    return (await stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))).seq


def assert_contiguous(events: list[Event], after_seq: int, last: int) -> None:
    seqs = [e.seq for e in events]
    assert seqs == list(range(after_seq + 1, last + 1)), (
        f"expected seqs {after_seq + 1}..{last}, got {len(seqs)} seqs, first {seqs[:3]}, last {seqs[-3:]}, "
        f"gaps/dups at {[b for a, b in itertools.pairwise(seqs) if b != a + 1][:5]}"
    )


class StreamReader:
    """Reads one StreamStepEvents call at its own pace until it has seq `target`."""

    def __init__(self, stub: Stub, after_seq: int, pace: float = 0.0, log_id: str = "") -> None:
        self.after_seq = after_seq
        self.pace = pace
        self.events: list[Event] = []
        self.heartbeats: list[orch_pb.EventStreamHeartbeat] = []
        self.log_ids: set[str] = set()
        self.call = stub.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=after_seq, log_id=log_id))

    async def read_until(self, target: asyncio.Future[int]) -> list[Event]:
        try:
            async with asyncio.timeout(DEADLINE):
                while True:
                    message = await self.call.read()
                    assert message is not grpc.aio.EOF, "stream ended early"
                    assert isinstance(message, orch_pb.StreamStepEventsResponse)
                    self.log_ids.add(message.log_id)
                    if message.HasField("heartbeat"):
                        self.heartbeats.append(message.heartbeat)
                    batch = list(message.batch.events)
                    if batch and self.events:
                        assert batch[0].seq == self.events[-1].seq + 1, "batch not contiguous with the previous one"
                    self.events.extend(batch)
                    if target.done() and self.events and self.events[-1].seq >= target.result():
                        return self.events
                    if target.done() and not self.events and self.after_seq >= target.result():
                        return self.events
                    if self.pace:
                        await asyncio.sleep(self.pace * random.random())
        finally:
            self.call.cancel()


async def test_replay_then_live_without_gap_or_duplicate(orchestrator: Orchestrator, tmp_path: Path) -> None:
    async with channel(orchestrator.address) as ch:
        stub = Stub(ch)
        target: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        readers: list[StreamReader] = [StreamReader(stub, 0), StreamReader(stub, 0, pace=0.01)]
        tasks = [asyncio.create_task(r.read_until(target)) for r in readers]
        jobs = [await submit(stub, fanout_job(150, name=f"job-{i}", seconds=0.005)) for i in range(4)]
        polls = 0

        # Join at various points while the jobs run; and keep readers of the
        # storage busy with GetJob at the same time.
        while True:
            views = [await stub.GetJob(orch_pb.GetJobRequest(job_id=j.job.id)) for j in jobs]
            polls += 1
            now = max(v.seq for v in views)
            for after in (now, now // 2, random.randrange(0, now + 1)):
                reader = StreamReader(stub, after, pace=random.choice([0.0, 0.0, 0.005]))
                readers.append(reader)
                tasks.append(asyncio.create_task(reader.read_until(target)))
            if all(v.job.state in TERMINAL_JOB for v in views) or len(readers) > 40:
                break
            await asyncio.sleep(0.03)
        for job in jobs:
            await wait_job_state(stub, job.job.id, TERMINAL_JOB)
        last = max([await latest_seq(stub, j.job.id) for j in jobs])
        target.set_result(last)
        results = await asyncio.gather(*tasks)

    assert polls > 1, "the jobs finished before any stream joined mid-run; make them longer"
    by_seq = {e.seq: e for e in results[0]}
    assert_contiguous(results[0], 0, last)
    for reader, events in zip(readers, results, strict=True):
        assert_contiguous(events, reader.after_seq, last)
        assert all(by_seq[e.seq] == e for e in events), "two streams disagree about an event"
        assert len(reader.log_ids) == 1
    assert len({log_id for r in readers for log_id in r.log_ids}) == 1
    finals = [e.job for e in results[0] if e.HasField("job") and e.job.state in TERMINAL_JOB]
    assert sorted(j.id for j in finals) == sorted(j.job.id for j in jobs)
    assert all(j.state == s.JOB_STATE_COMPLETED for j in finals)
    # Every child ran exactly once.
    child_runs = [e for e in results[0] if e.HasField("child") and e.child.state == s.STEP_STATE_RUNNING]
    assert len(child_runs) == 4 * 150


async def test_a_stalled_reader_does_not_block_jobs_and_loses_nothing(
    custom_orchestrator: Callable[..., Awaitable[Orchestrator]],
) -> None:
    orchestrator = await custom_orchestrator(subscriber_queue=50)
    # A small flow-control window: the server's writes block as soon as this
    # client stops reading, so the server-side subscriber really stalls.
    small_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(orchestrator.address, options=small_window) as slow_channel, \
            channel(orchestrator.address) as ch:
        stub, slow = Stub(ch), Stub(slow_channel)
        stalled = slow.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=0))
        first = await stalled.read()  # the stream is open (an idle heartbeat): now stop reading
        assert isinstance(first, orch_pb.StreamStepEventsResponse) and first.HasField("heartbeat")

        jobs = [await submit(stub, fanout_job(1000, name=f"job-{i}", seconds=0, concurrency=20)) for i in range(2)]
        for job in jobs:
            await wait_job_state(stub, job.job.id, {s.JOB_STATE_COMPLETED})
        last = max([await latest_seq(stub, j.job.id) for j in jobs])
        assert last > 6000
        # The stalled subscriber's queue overflowed instead of growing or
        # holding the writer: it is bounded and will go back to the log.
        assert orchestrator.feed.overflow_count >= 1
        subscriptions = list(orchestrator.feed._everything)
        assert subscriptions and all(sub.pending_count <= 50 for sub in subscriptions)
        assert orchestrator.feed.subscriber_count == 1  # slowed down, not cut off

        # Resume reading: every seq exactly once, in order.
        events: list[Event] = []
        async with asyncio.timeout(DEADLINE):
            while not events or events[-1].seq < last:
                message = await stalled.read()
                assert isinstance(message, orch_pb.StreamStepEventsResponse)
                events.extend(message.batch.events)
        stalled.cancel()
    assert_contiguous(events, 0, last)


async def test_a_reader_stalled_beyond_retention_is_cut_off_never_skipped(
    custom_orchestrator: Callable[..., Awaitable[Orchestrator]],
) -> None:
    orchestrator = await custom_orchestrator(subscriber_queue=50, retain_events=100, prune_interval=0.05)
    small_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(orchestrator.address, options=small_window) as slow_channel, \
            channel(orchestrator.address) as ch:
        stub, slow = Stub(ch), Stub(slow_channel)
        stalled = slow.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=0))
        assert isinstance(await stalled.read(), orch_pb.StreamStepEventsResponse)
        job = await submit(stub, fanout_job(1000, seconds=0, concurrency=20))
        await wait_job_state(stub, job.job.id, {s.JOB_STATE_COMPLETED})
        last = await latest_seq(stub, job.job.id)

        await eventually(functools.partial(pruned, stub), "the log to be pruned")
        events: list[Event] = []

        async def read_to_the_end() -> None:
            async with asyncio.timeout(DEADLINE):
                while True:
                    message = await stalled.read()
                    assert isinstance(message, orch_pb.StreamStepEventsResponse), "ended without an error"
                    events.extend(message.batch.events)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_to_the_end()
    error = from_rpc_error(caught.value)
    assert isinstance(error, OutOfRangeError)
    assert error.reason == "CURSOR_TOO_OLD"
    # What did arrive is contiguous from the start and stops where the log no
    # longer has the next event: the reader is told, never silently skipped ahead.
    received = events[-1].seq if events else 0
    assert_contiguous(events, 0, received)
    assert int(error.metadata["oldest"]) > received + 1
    assert received < last


async def test_heartbeats_when_idle(orchestrator_stub: Stub, orchestrator: Orchestrator) -> None:
    call = orchestrator_stub.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=0))
    messages: list[orch_pb.StreamStepEventsResponse] = []
    try:
        async with asyncio.timeout(DEADLINE):
            for _ in range(2):
                message = await call.read()
                assert isinstance(message, orch_pb.StreamStepEventsResponse)
                messages.append(message)
            assert all(m.HasField("heartbeat") and m.heartbeat.latest_seq == 0 for m in messages)
            submitted = await orchestrator_stub.SubmitJob(
                orch_pb.SubmitJobRequest(definition=job_definition([{"name": "a", "type": "sleep", "seconds": 0}]))
            )
            events: list[Event] = []
            while True:
                message = await call.read()
                assert isinstance(message, orch_pb.StreamStepEventsResponse)
                messages.append(message)
                events.extend(message.batch.events)
                if message.HasField("heartbeat"):
                    break
    finally:
        call.cancel()
    assert submitted.seq == 1
    heartbeat = messages[-1].heartbeat
    assert [e.seq for e in events] == list(range(1, heartbeat.latest_seq + 1))
    assert events[-1].job.state == s.JOB_STATE_COMPLETED
    assert heartbeat.interval.ToMilliseconds() == 200
    assert heartbeat.HasField("time")
    assert {m.log_id for m in messages} == {messages[0].log_id} and messages[0].log_id
    # Heartbeats on a caught-up resume too, with the newest seq.
    first = await first_message(orchestrator_stub, heartbeat.latest_seq, messages[0].log_id)
    assert first.HasField("heartbeat") and first.heartbeat.latest_seq == heartbeat.latest_seq


async def first_message(stub: Stub, after_seq: int, log_id: str = "") -> orch_pb.StreamStepEventsResponse:
    """The first message of a new stream (AioRpcError if the stream fails)."""
    call = stub.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=after_seq, log_id=log_id))
    try:
        async with asyncio.timeout(DEADLINE):
            message = await call.read()  # raises AioRpcError when the stream failed
        assert isinstance(message, orch_pb.StreamStepEventsResponse), f"stream ended: {await call.code()}"
        return message
    finally:
        call.cancel()


async def pruned(stub: Stub) -> OutOfRangeError | None:
    """The OutOfRangeError a stream from the start fails with once the log was pruned; None before."""
    try:
        await first_message(stub, 0)
    except grpc.aio.AioRpcError as failed:
        error = from_rpc_error(failed)
        return error if isinstance(error, OutOfRangeError) else None
    return None


async def out_of_range(stub: Stub, after_seq: int, log_id: str = "") -> OutOfRangeError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await first_message(stub, after_seq, log_id)
    error = from_rpc_error(caught.value)
    assert isinstance(error, OutOfRangeError), caught.value
    return error


async def test_cursor_too_old(custom_orchestrator: Callable[..., Awaitable[Orchestrator]]) -> None:
    orchestrator = await custom_orchestrator(retain_events=5, prune_interval=0.05)
    async with channel(orchestrator.address) as ch:
        stub = Stub(ch)
        submitted = await submit(stub, fanout_job(5))
        await wait_job_state(stub, submitted.job.id, {s.JOB_STATE_COMPLETED})
        last = await latest_seq(stub, submitted.job.id)
        assert last > 20

        error = await eventually(functools.partial(pruned, stub), "the log to be pruned")
        assert error.reason == "CURSOR_TOO_OLD"
        assert error.metadata == {"oldest": str(last - 4), "latest": str(last), "log_id": error.metadata["log_id"]}
        assert error.metadata["log_id"]
        assert "resync with StreamSnapshot" in error.message

        too_old = await out_of_range(stub, last - 6)
        assert too_old.reason == "CURSOR_TOO_OLD" and too_old.metadata["oldest"] == str(last - 4)
        # The oldest retained cursor still works, contiguously.
        message = await first_message(stub, last - 5)
        assert [e.seq for e in message.batch.events] == list(range(last - 4, last + 1))


async def test_cursor_unknown(orchestrator_stub: Stub) -> None:
    submitted = await submit(orchestrator_stub, job_definition([{"name": "a", "type": "sleep", "seconds": 0}]))
    await wait_job_state(orchestrator_stub, submitted.job.id, {s.JOB_STATE_COMPLETED})
    last = await latest_seq(orchestrator_stub, submitted.job.id)

    ahead = await out_of_range(orchestrator_stub, last + 1)
    assert ahead.reason == "CURSOR_UNKNOWN"
    assert ahead.metadata["latest"] == str(last) and ahead.metadata["oldest"] == "0"
    log_id = ahead.metadata["log_id"]
    assert log_id

    other_log = await out_of_range(orchestrator_stub, 1, log_id="0" * 32)
    assert other_log.reason == "CURSOR_UNKNOWN"
    assert other_log.metadata["log_id"] == log_id
    assert "0" * 32 in other_log.message

    message = await first_message(orchestrator_stub, 1, log_id)
    assert message.batch.events[0].seq == 2

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await first_message(orchestrator_stub, -1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in from_rpc_error(caught.value).violations] == ["after_seq"]


def entity(event: Event) -> tuple[Any, ...]:
    kind = event.WhichOneof("record")
    if kind == "job":
        return ("job", event.job.id)
    if kind == "step":
        return ("step", event.step.job_id, event.step.name)
    return ("child", event.child.job_id, event.child.step_name, event.child.index)


async def test_snapshot_then_resume(orchestrator: Orchestrator) -> None:
    async with channel(orchestrator.address) as ch:
        stub = Stub(ch)
        target: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        full = StreamReader(stub, 0)
        full_task = asyncio.create_task(full.read_until(target))
        jobs = [await submit(stub, fanout_job(100, name=f"job-{i}", seconds=0.01)) for i in range(3)]

        async def some_progress() -> bool | None:
            view = await stub.GetJob(orch_pb.GetJobRequest(job_id=jobs[0].job.id))
            return True if view.steps[1].children.completed >= 10 else None

        await eventually(some_progress, "children to run")
        messages = [m async for m in stub.StreamSnapshot(orch_pb.StreamSnapshotRequest())]
        snapshot_seq = messages[0].seq
        resumed = StreamReader(stub, snapshot_seq, log_id=messages[0].log_id)
        resumed_task = asyncio.create_task(resumed.read_until(target))
        for job in jobs:
            await wait_job_state(stub, job.job.id, TERMINAL_JOB)
        last = max([await latest_seq(stub, j.job.id) for j in jobs])
        target.set_result(last)
        everything, after_snapshot = await asyncio.gather(full_task, resumed_task)

    assert {(m.seq, m.log_id) for m in messages} == {(snapshot_seq, full.log_ids.copy().pop())}
    assert 0 < snapshot_seq < last, "the snapshot should be taken mid-run"
    records = [r for m in messages for r in m.records]
    assert_contiguous(everything, 0, last)
    assert_contiguous(after_snapshot, snapshot_seq, last)

    # The snapshot is exactly the latest record of every entity as of its seq.
    expected: dict[tuple[Any, ...], Event] = {}
    for event in everything:
        if event.seq <= snapshot_seq:
            expected[entity(event)] = event
    got = {entity(r): r for r in records}
    assert len(got) == len(records), "an entity appears twice in the snapshot"
    assert got == expected
    assert any(r.HasField("job") and r.job.state == s.JOB_STATE_RUNNING for r in records)

    # Snapshot + stream after it == the whole stream.
    state = dict(got)
    for event in after_snapshot:
        state[entity(event)] = event
    final: dict[tuple[Any, ...], Event] = {}
    for event in everything:
        final[entity(event)] = event
    assert state == final


async def test_snapshot_of_an_empty_log(orchestrator_stub: Stub) -> None:
    messages = [m async for m in orchestrator_stub.StreamSnapshot(orch_pb.StreamSnapshotRequest())]
    assert len(messages) == 1
    assert messages[0].seq == 0 and messages[0].log_id and list(messages[0].records) == []


async def test_graceful_shutdown_ends_an_open_stream_cleanly(
    custom_orchestrator: Callable[..., Awaitable[Orchestrator]],
) -> None:
    orchestrator = await custom_orchestrator()
    async with channel(orchestrator.address) as ch:
        stub = Stub(ch)
        long_step = {"name": "long", "type": "command", "command": ["sleep", "60"]}
        submitted = await submit(stub, job_definition([long_step]))
        await wait_job_state(stub, submitted.job.id, {s.JOB_STATE_RUNNING})
        call = stub.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=0))
        first = await call.read()
        assert isinstance(first, orch_pb.StreamStepEventsResponse)
        events = list(first.batch.events)

        stopping = asyncio.create_task(orchestrator.stop())
        async with asyncio.timeout(DEADLINE):
            while (message := await call.read()) is not grpc.aio.EOF:
                assert isinstance(message, orch_pb.StreamStepEventsResponse)
                events.extend(message.batch.events)
        await stopping
        assert await call.code() == grpc.StatusCode.OK
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    # The in-flight job was ended (and that was streamed) before the stream ended.
    assert events[-1].HasField("job")
    assert events[-1].job.state == s.JOB_STATE_FAILED
    assert events[-1].job.reason == s.REASON_ORCHESTRATOR_RESTARTED
    assert events[-1].job.message == "the orchestrator shut down while this was in flight"
