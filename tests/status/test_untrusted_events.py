"""Data the status service did not expect (invariant 9): events from a newer
orchestrator carrying enum values this service does not know, and orchestrators
that claim or invent jobs that are not theirs.

The peers that send such events are real gRPC servers on loopback: a
FakeOrchestrator serves StreamStepEvents/StreamSnapshot from a log the test
writes, beside a real orchestrator where the point is two sources. The status
service is the real one, in-process (so its log records reach caplog), on a
real SQLite file; restarts reopen the same data directory. The writer-level
test drives the real IngestWriter and SqliteStatusStore directly, with Events
items shaped as the follower makes them (a stream batch, a snapshot item).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc
from stepstream_client.models import ChildCounts, StepCounts
from stepstream_client.sdk import Client

from orchestrator_svc.app import Orchestrator
from status_svc.app import DATABASE_FILE, StatusService
from status_svc.app import start as start_status
from status_svc.domain.projector import restore
from status_svc.ingest.writer import Events, IngestWriter
from status_svc.storage.base import StoredChange
from status_svc.storage.sqlite import SCHEMA, SqliteStatusStore
from stepstream_common.feed import Feed
from stepstream_common.timeutil import timestamp
from tests.conftest import status_config
from tests.helpers import (
    channel,
    entity_key,
    eventually,
    gate_step,
    job_definition,
    open_sqlite_readonly,
    status_job_finished,
    wait_job_state,
    wait_status_job,
)
from tests.status.test_paths import TERMINAL_JOB, assert_status_equals_orchestrator

if TYPE_CHECKING:
    OrchStub = orch_grpc.OrchestratorServiceAsyncStub
    StatusStub = status_grpc.StatusServiceAsyncStub

# Values no version of states.proto has (yet): what a newer orchestrator might send.
STEP_99, REASON_77, JOB_42 = 99, 77, 42
WRITER_LOG = "status_svc.ingest.writer"
Record = records_pb2.Job | records_pb2.Step | records_pb2.Child


# --- a fake orchestrator: a real gRPC server serving a log the test writes ------------------------------------


class FakeOrchestrator(orch_grpc.OrchestratorServiceServicer):
    """The two methods a status service follows, over a log appended to by the
    test: StreamStepEvents replays after the cursor, then sends each append as
    one message (one Events item for the writer) and heartbeats when idle;
    StreamSnapshot sends each entity's last record. Every other method is
    UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.log_id = secrets.token_hex(8)
        self.events: list[records_pb2.StepEvent] = []
        self.address = ""
        self._appended = asyncio.Condition()

    async def append(self, *records: Record) -> list[records_pb2.StepEvent]:
        """Give each record the next seq; all of them go out in one stream message."""
        added = [_event(len(self.events) + 1 + offset, record) for offset, record in enumerate(records)]
        async with self._appended:
            self.events.extend(added)
            self._appended.notify_all()
        return added

    async def StreamStepEvents(
        self, request: orch_pb.StreamStepEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[orch_pb.StreamStepEventsResponse]:
        if (request.log_id and request.log_id != self.log_id) or request.after_seq > len(self.events):
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "unknown cursor: resync with StreamSnapshot")
        sent = request.after_seq
        while True:
            if sent < len(self.events):
                batch = self.events[sent:]
                sent += len(batch)
                yield orch_pb.StreamStepEventsResponse(log_id=self.log_id,
                                                       batch=orch_pb.StepEventBatch(events=batch))
                continue
            yield orch_pb.StreamStepEventsResponse(log_id=self.log_id,
                                                   heartbeat=orch_pb.EventStreamHeartbeat(latest_seq=sent))
            async with self._appended:
                if len(self.events) == sent:
                    with suppress(TimeoutError):
                        await asyncio.wait_for(self._appended.wait(), 0.2)

    async def StreamSnapshot(
        self, request: orch_pb.StreamSnapshotRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[orch_pb.StreamSnapshotResponse]:
        last = {(*entity_key(event), _job_of(event)): event for event in self.events}
        yield orch_pb.StreamSnapshotResponse(log_id=self.log_id, seq=len(self.events), records=list(last.values()))


    async def SubmitJob(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _not_here(context)

    async def CancelJob(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _not_here(context)

    async def GetJob(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _not_here(context)

    async def ListJobs(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _not_here(context)

    async def StreamOutput(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[orch_pb.StreamOutputResponse]:
        await _not_here(context)
        yield orch_pb.StreamOutputResponse()  # not reached: _not_here aborts the call

    async def ListOutput(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _not_here(context)


async def _not_here(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "a fake orchestrator only serves its event log")


def _job_of(event: records_pb2.StepEvent) -> str:
    kind = event.WhichOneof("record")
    return event.job.id if kind == "job" else (event.step.job_id if kind == "step" else event.child.job_id)


def _event(seq: int, record: Record) -> records_pb2.StepEvent:
    event = records_pb2.StepEvent(seq=seq)
    kind = {records_pb2.Job: "job", records_pb2.Step: "step", records_pb2.Child: "child"}[type(record)]
    getattr(event, kind).CopyFrom(record)
    return event


@asynccontextmanager
async def fake_orchestrator() -> AsyncIterator[FakeOrchestrator]:
    fake = FakeOrchestrator()
    server = grpc.aio.server()
    orch_grpc.add_OrchestratorServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake.address = f"127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await server.stop(0)


def new_job_id() -> str:
    """Shaped like the orchestrator's: 64 random bits in hex."""
    return secrets.token_hex(8)


def at(seconds: float) -> Timestamp:
    return timestamp(1_800_000_000.0 + seconds)


def job(job_id: str, state: int, reason: int = 0, name: str = "crafted") -> records_pb2.Job:
    return records_pb2.Job(id=job_id, name=name, state=state, reason=reason, created_at=at(0))  # type: ignore[arg-type]


def step(job_id: str, name: str, index: int, state: int, reason: int = 0, **fields: Any) -> records_pb2.Step:
    return records_pb2.Step(job_id=job_id, name=name, index=index, type="fanout" if name == "fan" else "command",
                            state=state, reason=reason, max_attempts=1, **fields)  # type: ignore[arg-type]


def child(job_id: str, index: int, state: int, reason: int = 0, **fields: Any) -> records_pb2.Child:
    return records_pb2.Child(job_id=job_id, step_name="fan", index=index, item=f"item-{index}",
                             state=state, reason=reason, **fields)  # type: ignore[arg-type]


async def committed_cursor(data_dir: Path, source: str, seq: int) -> None:
    """Wait until the status service has committed its cursor for `source` up to `seq`
    (the cursor commits with the state it produced: everything before it is applied)."""

    async def probe() -> bool | None:
        db = open_sqlite_readonly(data_dir / DATABASE_FILE)
        try:
            rows = db.execute("SELECT cursor FROM sources WHERE address = ?", (source,)).fetchall()
        except sqlite3.OperationalError:
            return None
        finally:
            db.close()
        return True if rows and rows[0][0] >= seq else None

    await eventually(probe, f"the cursor of {source} to reach {seq}")


async def get_job(stub: StatusStub, job_id: str) -> status_pb.GetJobResponse:
    response: status_pb.GetJobResponse = await stub.GetJob(status_pb.GetJobRequest(job_id=job_id))
    return response


async def list_children(stub: StatusStub, job_id: str) -> list[status_pb.ChildStatus]:
    response = await stub.ListChildren(status_pb.ListChildrenRequest(job_id=job_id, step_name="fan"))
    return list(response.children)


async def watch_initial_state(stub: StatusStub, job_id: str) -> tuple[status_pb.JobUpdate, int]:
    """WatchJob's initial state and the revision of its "initial state complete" marker."""
    call = stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id))
    try:
        first, marker = await call.read(), await call.read()
    finally:
        call.cancel()
    assert isinstance(first, status_pb.WatchJobResponse) and isinstance(marker, status_pb.WatchJobResponse)
    assert first.HasField("updates") and len(first.updates.updates) == 1
    assert marker.HasField("initial_state_complete")
    return first.updates.updates[0], marker.initial_state_complete.revision


# --- unknown enum values --------------------------------------------------------------------------------------


def assert_unknown_values_shown(got: status_pb.GetJobResponse, children: Sequence[status_pb.ChildStatus]) -> None:
    """The raw values of the records, and the entities in them counted as unknown."""
    assert (got.job.state, got.job.reason) == (JOB_42, REASON_77)
    assert got.job.steps == status_pb.StepCounts(total=2, running=1, unknown=1)
    fan, plain = got.steps
    assert (fan.name, fan.state, fan.reason) == ("fan", STEP_99, REASON_77)
    assert fan.children == records_pb2.ChildCounts(total=2, running=1, unknown=1)
    assert (plain.name, plain.state) == ("plain", s.STEP_STATE_RUNNING)
    assert [(c.index, c.state, c.reason) for c in children] == [
        (0, STEP_99, REASON_77), (1, s.STEP_STATE_RUNNING, s.REASON_UNSPECIFIED)]


async def test_unknown_enum_values_are_stored_shown_raw_and_counted_unknown_across_a_restart(
    tmp_path: Path
) -> None:
    """A job, a step and a child in states this service does not know (job 42,
    step and child 99, reason 77) are ingested without a crash and shown over
    the wire (GetJob, ListChildren, WatchJob, the SDK) with their raw values and
    `unknown` counts; a restart on the same data directory gives the same
    answers; later known events move them to COMPLETED with the counts moving
    from `unknown` (the fold reloaded from the database); and an unknown state
    never replaces a terminal one, whatever its seq."""
    data_dir = tmp_path / "status"
    job_id = new_job_id()
    async with fake_orchestrator() as fake:
        await fake.append(
            job(job_id, s.JOB_STATE_RUNNING),
            step(job_id, "fan", 0, STEP_99, REASON_77, started_at=at(1)),
            step(job_id, "plain", 1, s.STEP_STATE_RUNNING, started_at=at(1)),
            child(job_id, 0, STEP_99, REASON_77),
            child(job_id, 1, s.STEP_STATE_RUNNING),
            job(job_id, JOB_42, REASON_77),
        )
        config = status_config(data_dir, fake.address)
        status = await start_status(config)
        try:
            async with channel(status.address) as ch:
                stub = status_grpc.StatusServiceStub(ch)
                got = await wait_status_job(stub, job_id, lambda r: r.job.state == JOB_42, "job state 42")
                children = await list_children(stub, job_id)
                assert_unknown_values_shown(got, children)
                update, marker = await watch_initial_state(stub, job_id)
                assert (update.job, list(update.steps), marker) == (got.job, list(got.steps), got.revision)
            async with Client(fake.address, status.address) as client:
                view = await client.get(job_id)
            assert view.step_counts == StepCounts(total=2, running=1, unknown=1)
            assert view.step("fan").children == ChildCounts(total=2, running=1, unknown=1)
            assert not status.writer_task.done(), "ingest must not stop on an unknown value"
        finally:
            await status.stop()

        # Restart on the same data directory: same answers, ingest keeps running.
        status = await start_status(config)
        try:
            async with channel(status.address) as ch:
                stub = status_grpc.StatusServiceStub(ch)
                again = await get_job(stub, job_id)
                assert again == got
                assert await list_children(stub, job_id) == children
                assert await watch_initial_state(stub, job_id) == (update, marker)

                # Later events of known states: folded into the fold reloaded from the database.
                await fake.append(
                    child(job_id, 0, s.STEP_STATE_COMPLETED),
                    child(job_id, 1, s.STEP_STATE_COMPLETED),
                    step(job_id, "fan", 0, s.STEP_STATE_COMPLETED, started_at=at(1), finished_at=at(3)),
                    step(job_id, "plain", 1, s.STEP_STATE_COMPLETED, started_at=at(1), finished_at=at(2)),
                    job(job_id, s.JOB_STATE_COMPLETED),
                )
                done = await wait_status_job(stub, job_id, status_job_finished, "the job to complete")
                assert (done.job.state, done.job.reason) == (s.JOB_STATE_COMPLETED, s.REASON_UNSPECIFIED)
                assert done.job.steps == status_pb.StepCounts(total=2, completed=2)
                assert [(st.name, st.state, st.reason, st.children) for st in done.steps] == [
                    ("fan", s.STEP_STATE_COMPLETED, s.REASON_UNSPECIFIED,
                     records_pb2.ChildCounts(total=2, completed=2)),
                    ("plain", s.STEP_STATE_COMPLETED, s.REASON_UNSPECIFIED, records_pb2.ChildCounts()),
                ]
                assert [c.state for c in await list_children(stub, job_id)] == [s.STEP_STATE_COMPLETED] * 2

                # Unknown states are not terminal: newer unknown events change nothing that ended.
                late = await fake.append(
                    child(job_id, 0, STEP_99), step(job_id, "fan", 0, STEP_99), job(job_id, JOB_42),
                )
                await committed_cursor(data_dir, fake.address, late[-1].seq)
                assert await get_job(stub, job_id) == done
            assert not status.writer_task.done()
        finally:
            await status.stop()


# The tables of a database file made before the `unknown` columns (the first release's).
OLD_TABLES = """
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY, source TEXT NOT NULL, name TEXT NOT NULL, state INTEGER NOT NULL,
    reason INTEGER NOT NULL, message TEXT NOT NULL, created_at REAL, started_at REAL, finished_at REAL,
    cancel_requested_at REAL, steps_total INTEGER NOT NULL, steps_pending INTEGER NOT NULL,
    steps_running INTEGER NOT NULL, steps_waiting INTEGER NOT NULL, steps_completed INTEGER NOT NULL,
    steps_failed INTEGER NOT NULL, steps_cancelled INTEGER NOT NULL, steps_skipped INTEGER NOT NULL,
    seq INTEGER NOT NULL, revision INTEGER NOT NULL, lost_since REAL, lost_detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE step_stats (
    job_id TEXT NOT NULL, name TEXT NOT NULL, idx INTEGER NOT NULL, type TEXT NOT NULL,
    state INTEGER NOT NULL, reason INTEGER NOT NULL, message TEXT NOT NULL, attempt INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL, started_at REAL, finished_at REAL, duration REAL,
    children_total INTEGER NOT NULL, children_pending INTEGER NOT NULL, children_running INTEGER NOT NULL,
    children_completed INTEGER NOT NULL, children_failed INTEGER NOT NULL, children_cancelled INTEGER NOT NULL,
    seq INTEGER NOT NULL, revision INTEGER NOT NULL,
    PRIMARY KEY (job_id, name)
) WITHOUT ROWID;
"""


async def test_a_database_file_from_before_the_unknown_counts_is_migrated_in_place(tmp_path: Path) -> None:
    """An existing file lacking steps_unknown/children_unknown opens (twice), gains
    both columns with 0 for the rows it had, serves those rows, and takes the new
    counts: the in-place migration at open."""
    path = tmp_path / "status.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_TABLES + SCHEMA)
        db.execute("INSERT INTO jobs VALUES ('j1', 'orch', 'old', 2, 0, '', 1.0, 2.0, NULL, NULL, "
                   "1, 0, 1, 0, 0, 0, 0, 0, 3, 2, NULL, '')")
        db.execute("INSERT INTO step_stats VALUES ('j1', 'fan', 0, 'fanout', 2, 0, '', 1, 1, 2.0, NULL, NULL, "
                   "1, 0, 1, 0, 0, 0, 2, 2)")
        db.execute("INSERT INTO changes VALUES (2, 'j1', 'old', 2, 2, NULL, NULL, 0)")
    db.close()

    for _ in range(2):  # a second open finds nothing to add
        store = SqliteStatusStore(path)
        try:
            assert (await store.open()).revision == 2
            snapshot = await store.get_job("j1")
            assert snapshot is not None
            assert snapshot.job.steps == status_pb.StepCounts(total=1, running=1)
            assert [(st.name, st.children) for st in snapshot.steps] == [
                ("fan", records_pb2.ChildCounts(total=1, running=1))]
            held = restore((await store.load_jobs(["j1"]))["j1"])
            assert held.source == "orch" and held.fold.job is not None and held.fold.job.state == s.JOB_STATE_RUNNING
        finally:
            await store.close()
    with sqlite3.connect(path) as db:
        for table, column in (("jobs", "steps_unknown"), ("step_stats", "children_unknown")):
            assert column in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            assert db.execute(f"SELECT {column} FROM {table}").fetchall() == [(0,)]
    db.close()

    # The migrated file takes a step in an unknown state like a new one.
    async with writer_on(path) as (writer, _):
        await writer.submit(Events("orch", "log", [_event(4, step("j1", "fan", 0, STEP_99))]))
    async with writer_on(path) as (_, store):
        snapshot = await store.get_job("j1")
        assert snapshot is not None
        assert snapshot.job.steps == status_pb.StepCounts(total=1, unknown=1)
        assert [st.state for st in snapshot.steps] == [STEP_99]


# --- jobs kept apart by source --------------------------------------------------------------------------------


def rejections(caplog: pytest.LogCaptureFixture, job_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == WRITER_LOG and r.levelno == logging.WARNING and job_id in r.getMessage()]


@asynccontextmanager
async def writer_on(path: Path) -> AsyncIterator[tuple[IngestWriter, SqliteStatusStore]]:
    """The real writer on a real store; on exit it applies everything submitted, then closes."""
    store = SqliteStatusStore(path)
    opened = await store.open()
    feed: Feed[StoredChange] = Feed(max_pending=1000)
    writer = IngestWriter(store, feed, latest_revision=opened.revision, sources=opened.sources)
    running = asyncio.create_task(writer.run())
    try:
        yield writer, store
        await writer.stop()
        await running
    finally:
        if not running.done():
            running.cancel()
        await store.close()


async def test_the_writer_creates_jobs_only_from_their_own_records_and_keeps_each_to_its_source(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the real IngestWriter and SqliteStatusStore: a snapshot item whose
    job records come after its steps and children creates its jobs; in a stream
    item, a step before its job's record in the same item is accepted, a step of
    a job nobody created is rejected; another source can change none of a job,
    whether the job is in memory or read back from the database after a restart.
    Each rejection is logged once per (source, job) and transaction, and the
    cursor moves past rejected events."""
    caplog.set_level(logging.WARNING, logger=WRITER_LOG)
    path = tmp_path / "status.sqlite3"
    j1, j2, j3 = new_job_id(), new_job_id(), new_job_id()
    async with writer_on(path) as (writer, store):
        # A resync item, innermost first as the follower orders it.
        await writer.submit(Events("orch-a", "log-a", [
            _event(3, child(j1, 0, s.STEP_STATE_COMPLETED)), _event(4, step(j1, "fan", 0, s.STEP_STATE_COMPLETED)),
            _event(5, job(j1, s.JOB_STATE_COMPLETED)),
        ], from_stream=False))
        await writer.submit(Events("orch-a", "log-a", [
            _event(6, step(j2, "plain", 0, s.STEP_STATE_RUNNING)),  # j2: never created
            _event(7, step(j3, "plain", 0, s.STEP_STATE_RUNNING)),  # j3: its record follows in this item
            _event(8, job(j3, s.JOB_STATE_RUNNING)),
            _event(9, step(j2, "plain", 0, s.STEP_STATE_COMPLETED)),
        ]))
        await writer.submit(Events("orch-b", "log-b", [
            _event(1, job(j3, s.JOB_STATE_CANCELLED, name="hijack")),  # j3 is orch-a's, in memory
            _event(2, step(j3, "plain", 0, s.STEP_STATE_CANCELLED)),
            _event(3, step(j1, "fan", 0, s.STEP_STATE_FAILED)),  # j1 is orch-a's
        ]))
    assert (writer.source("orch-a").cursor, writer.source("orch-b").cursor) == (9, 3)
    assert writer.events_rejected == 5

    # A restart: every job now comes back from the database.
    async with writer_on(path) as (writer, store):
        assert (writer.source("orch-a").cursor, writer.source("orch-b").cursor) == (9, 3)
        await writer.submit(Events("orch-b", "log-b", [
            _event(4, job(j1, s.JOB_STATE_RUNNING)), _event(5, child(j1, 1, s.STEP_STATE_RUNNING)),
        ]))
        await writer.submit(Events("orch-a", "log-a", [_event(10, step(j3, "plain", 0, s.STEP_STATE_COMPLETED))]))
    assert writer.source("orch-b").cursor == 5
    assert writer.events_rejected == 2

    async with writer_on(path) as (_, store):
        first = await store.get_job(j1)
        assert first is not None and first.job.freshness.source == "orch-a"
        assert (first.job.state, first.job.steps) == (s.JOB_STATE_COMPLETED, status_pb.StepCounts(total=1, completed=1))
        assert [(st.state, st.children) for st in first.steps] == [
            (s.STEP_STATE_COMPLETED, records_pb2.ChildCounts(total=1, completed=1))]
        children = await store.list_children(j1, "fan", [], 10, "")
        assert children is not None and [c.index for c in children.children] == [0]
        assert await store.get_job(j2) is None
        third = await store.get_job(j3)
        assert third is not None and third.job.freshness.source == "orch-a"
        assert (third.job.name, third.job.state) == ("crafted", s.JOB_STATE_RUNNING)
        assert [st.state for st in third.steps] == [s.STEP_STATE_COMPLETED]

    [never] = rejections(caplog, j2)
    assert "rejected 2 event(s) from orch-a" in never and "never created" in never
    [claim] = rejections(caplog, j3)
    assert "rejected 2 event(s) from orch-b" in claim and "belongs to orch-a" in claim
    assert len(rejections(caplog, j1)) == 2  # one per transaction: before and after the restart
    assert all("from orch-b" in m and "belongs to orch-a" in m for m in rejections(caplog, j1))


async def test_a_second_orchestrator_can_neither_overwrite_nor_invent_jobs(
    tmp_path: Path, orchestrator: Orchestrator, orchestrator_stub: OrchStub, caplog: pytest.LogCaptureFixture
) -> None:
    """One status service follows a real orchestrator and a fake one. The fake
    copies the ids of the real one's jobs (one finished, one running) and sends
    records for them, and sends step and child events for a job it never
    created: none of it changes anything (the real jobs stay equal to the real
    orchestrator's view, field by field, and end as it says), the invented job
    does not exist, each is logged once naming both sources, and the fake's own
    job, sent after, is ingested."""
    caplog.set_level(logging.WARNING, logger=WRITER_LOG)
    gate = tmp_path / "gate"
    async with fake_orchestrator() as fake:
        status = await start_status(status_config(
            tmp_path / "status", orchestrator.address, orchestrators=[orchestrator.address, fake.address]))
        try:
            async with channel(status.address) as ch:
                stub = status_grpc.StatusServiceStub(ch)
                await theirs_untouched(orchestrator, orchestrator_stub, stub, status, fake, gate, caplog)
        finally:
            await status.stop()


async def theirs_untouched(
    orchestrator: Orchestrator, orch: OrchStub, stub: StatusStub, status: StatusService, fake: FakeOrchestrator,
    gate: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    real = orchestrator.address
    done_id = (await orch.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(
        [{"name": "quick", "type": "sleep", "seconds": 0}], name="real-done")))).job.id
    running_id = (await orch.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(
        [gate_step("held", gate)], name="real-running")))).job.id
    finished_view = await wait_job_state(orch, done_id, TERMINAL_JOB)  # type: ignore[arg-type]
    finished = await wait_status_job(stub, done_id, status_job_finished, "the finished job in status")
    assert_status_equals_orchestrator(finished_view, finished, real)
    running = await wait_status_job(
        stub, running_id,
        lambda r: r.job.state == s.JOB_STATE_RUNNING and [st.state for st in r.steps] == [s.STEP_STATE_RUNNING],
        "the held step running in status")

    invented, own = new_job_id(), new_job_id()
    sent = await fake.append(
        job(done_id, s.JOB_STATE_FAILED, s.REASON_STEP_FAILED, name="hijacked"),
        step(done_id, "quick", 0, s.STEP_STATE_FAILED, s.REASON_WORK_FAILED),
        step(done_id, "extra", 1, s.STEP_STATE_RUNNING),
        job(running_id, s.JOB_STATE_CANCELLED, s.REASON_CANCELLED_BY_REQUEST, name="hijacked"),
        step(running_id, "held", 0, s.STEP_STATE_CANCELLED, s.REASON_CANCELLED_BY_REQUEST),
        child(running_id, 0, s.STEP_STATE_FAILED),
        step(invented, "plain", 0, s.STEP_STATE_RUNNING),
        child(invented, 0, s.STEP_STATE_RUNNING),
        job(own, s.JOB_STATE_RUNNING, name="fake-own"),
        step(own, "plain", 0, s.STEP_STATE_RUNNING),
    )
    await committed_cursor(status.config.data_dir, fake.address, sent[-1].seq)
    mine = await get_job(stub, own)
    assert (mine.job.name, mine.job.freshness.source, [st.name for st in mine.steps]) == (
        "fake-own", fake.address, ["plain"])

    # Nothing of theirs changed: the very same header and steps, at the very same revisions
    # (the answer's own revision, the service's latest, moved on with the fake's own job).
    for job_id, before in ((done_id, finished), (running_id, running)):
        after = await get_job(stub, job_id)
        assert (after.job, list(after.steps)) == (before.job, list(before.steps))
    assert_status_equals_orchestrator(finished_view, await get_job(stub, done_id), real)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await get_job(stub, invented)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    # The running job still follows its own orchestrator to the end.
    gate.touch()
    view = await wait_job_state(orch, running_id, TERMINAL_JOB)  # type: ignore[arg-type]
    ended = await wait_status_job(stub, running_id, status_job_finished, "the held job to end in status")
    assert_status_equals_orchestrator(view, ended, real)
    assert ended.job.state == s.JOB_STATE_COMPLETED

    for job_id, count in ((done_id, 3), (running_id, 3)):
        [line] = rejections(caplog, job_id)
        assert f"rejected {count} event(s) from {fake.address}" in line and f"belongs to {real}" in line
    [line] = rejections(caplog, invented)
    assert f"rejected 2 event(s) from {fake.address}" in line and "never created" in line
    assert not rejections(caplog, own)
    assert not status.writer_task.done()


async def test_an_event_without_a_job_id_or_with_an_oversize_key_is_rejected_and_ingest_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job id or step name of 257 characters (keys of the store's indexes: PostgreSQL would fail
    every commit holding one), or no job id at all: rejected, logged once per source and
    transaction, the cursor moved past them; the same source's well-formed events around them apply,
    and 256 characters is taken."""
    caplog.set_level(logging.WARNING, logger=WRITER_LOG)
    j1, longest = new_job_id(), "x" * 256
    async with writer_on(tmp_path / "status.sqlite3") as (writer, store):
        await writer.submit(Events("orch-a", "log-a", [
            _event(1, job(j1, s.JOB_STATE_RUNNING)),
            _event(2, job("j" * 257, s.JOB_STATE_RUNNING)),
            _event(3, step(j1, "s" * 257, 0, s.STEP_STATE_RUNNING)),
            _event(4, records_pb2.Child(job_id=j1, step_name="s" * 257, index=0, state=s.STEP_STATE_RUNNING)),
            _event(5, job("", s.JOB_STATE_RUNNING)),
            _event(6, step(j1, longest, 0, s.STEP_STATE_RUNNING)),
            _event(7, job(longest, s.JOB_STATE_RUNNING)),
        ]))
    assert writer.source("orch-a").cursor == 7
    assert writer.events_rejected == 4
    async with writer_on(tmp_path / "status.sqlite3") as (_, store):
        first = await store.get_job(j1)
        assert first is not None and [st.name for st in first.steps] == [longest]
        assert await store.get_job(longest) is not None
    [line] = [r.getMessage() for r in caplog.records if r.name == WRITER_LOG and "from orch-a" in r.getMessage()]
    assert "rejected 4 event(s) from orch-a: no job id, or a job id or step name over 256 characters" in line
