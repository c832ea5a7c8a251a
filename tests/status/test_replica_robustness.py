"""What a white-box review of the PostgreSQL store and the replicas found, each
shown on the real thing: replicas in-process (status_svc.app.start_replica) on a
fresh PostgreSQL database each (the `postgres` fixture), following a real
orchestrator in-process, called over gRPC on loopback.

- Any string may hold U+0000 (a job's name, a fan-out item: the orchestrator
  accepts them, SQLite stores them), but PostgreSQL's text cannot: one such
  event must not stop ingest on every replica, and a request naming one must
  not end INTERNAL.
- A statement binds at most 32767 parameters on PostgreSQL: a filter naming a
  state many times, or a writer loading every unfinished job of a source at
  once, must not meet that limit.
- A read whose caller is gone (its deadline passed) must not go on holding a
  pooled connection on the server (here: waiting on a lock) until
  --store-timeout, starving every later read.
- A service that fails to start after its store opened (its port taken) must
  close the store, on PostgreSQL and on SQLite, and start no ingest.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import aiosqlite
import grpc
import pytest
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from orchestrator_svc.app import Orchestrator
from status_svc.app import ReplicaService, start, start_replica
from status_svc.domain.projector import StoredChild, StoredHeader, StoredStep
from status_svc.replication.lease import LEASE_NAME, LEASE_TABLE, IngestLease, LeaseLost, create_lease_table
from status_svc.storage.base import StatusStore, StoredChange, WriteBatch
from status_svc.storage.open import store_from_config
from status_svc.storage.postgres import APPLICATION_NAME, PG_SCHEMA, PostgresStatusStore
from status_svc.storage.sqlite import SqliteStatusStore
from tests.client.services import nobody
from tests.conftest import status_config
from tests.helpers import (
    DEADLINE,
    channel,
    ends_job,
    eventually,
    job_definition,
    status_job_finished,
    wait_status_job,
    watch_until,
)
from tests.helpers.postgres import PostgresDatabase

FAST = {"poll_interval": 0.1, "lease_ttl": 5.0}  # as tests/status/test_replicas.py's
ESCAPE = "\uffff"  # what the store writes NUL with (status_svc.storage.postgres.ESCAPE)
# Strings PostgreSQL's text cannot hold as they are, and ones that look like what they are stored as.
AWKWARD = ["nul\x00inside", "\x00", "\x00\x00", ESCAPE, ESCAPE + "0", f"{ESCAPE}{ESCAPE}\x00{ESCAPE}0", "plain"]
MANY_STATES = 40_000  # one filter naming a state this many times: more parameters than a statement may bind


@contextlib.asynccontextmanager
async def replica(tmp_path: Path, orchestrator: str, dsn: str, **settings: object) -> AsyncIterator[ReplicaService]:
    config = status_config(tmp_path / "replica", orchestrator, store=dsn, **{**FAST, **settings})
    store = store_from_config(config)
    assert isinstance(store, PostgresStatusStore)
    running = await start_replica(config, store)
    try:
        yield running
    finally:
        await running.stop()


async def submit(orchestrator: Orchestrator, name: str, items: list[str]) -> str:
    fanout = {"name": "fan", "type": "fanout", "items": items, "child": {"type": "sleep", "seconds": 0}}
    async with channel(orchestrator.address) as ch:
        response = await orch_grpc.OrchestratorServiceStub(ch).SubmitJob(
            orch_pb.SubmitJobRequest(definition=job_definition([fanout], name=name)))
    return response.job.id


def test_the_escape_is_one_to_one() -> None:
    from status_svc.storage.postgres import ESCAPE as STORE_ESCAPE
    from status_svc.storage.postgres import from_text, to_text

    assert STORE_ESCAPE == ESCAPE
    stored = [to_text(text) for text in AWKWARD]
    assert all("\x00" not in text for text in stored)
    assert len(set(stored)) == len(AWKWARD)
    assert [from_text(text) for text in stored] == AWKWARD


async def test_a_nul_in_an_event_or_a_request_is_ordinary_text_on_a_replica(
    tmp_path: Path, orchestrator: Orchestrator, postgres: PostgresDatabase
) -> None:
    async with replica(tmp_path, orchestrator.address, postgres.dsn) as running, channel(running.address) as ch:
        stub = status_grpc.StatusServiceStub(ch)
        # Before: the commit of this job's first event failed on every term (invalid byte sequence for
        # encoding "UTF8": 0x00), each replica stepped down and competed again, and nothing was ingested.
        job_id = await submit(orchestrator, "nul\x00name", AWKWARD)
        job = await wait_status_job(stub, job_id, status_job_finished, "the job with NUL in it to finish")
        assert job.job.name == "nul\x00name" and job.job.state == s.JOB_STATE_COMPLETED
        children = await stub.ListChildren(status_pb.ListChildrenRequest(job_id=job_id, step_name="fan"))
        assert [child.item for child in children.children] == AWKWARD
        assert running.ingest.terms == 1, "ingest stepped down on the way"
        later = await submit(orchestrator, "after", ["a"])
        await wait_status_job(stub, later, status_job_finished, "a job after it")

        listed = await stub.ListJobs(status_pb.ListJobsRequest(filter=status_pb.JobFilter(name="nul\x00name")))
        assert [each.id for each in listed.jobs] == [job_id]
        for name in ("nul", "nul" + ESCAPE + "0name", "\x00"):
            listed = await stub.ListJobs(status_pb.ListJobsRequest(filter=status_pb.JobFilter(name=name)))
            assert not listed.jobs, f"{name!r} names no job"
        watch = stub.WatchJobs(status_pb.WatchJobsRequest(filter=status_pb.JobFilter(name="nul\x00name"),
                                                          after_revision=0))
        updates, _ = await watch_until(watch, ends_job)  # from the change log, with NUL in the filter
        watch.cancel()
        assert {update.job_id for update in updates} == {job_id}

        # A request naming a string with NUL: before, INTERNAL (the statement failed).
        calls: list[Awaitable[object]] = [
            stub.GetJob(status_pb.GetJobRequest(job_id="a\x00b")),
            stub.ListChildren(status_pb.ListChildrenRequest(job_id=job_id, step_name="f\x00an")),
            stub.ListChildren(status_pb.ListChildrenRequest(job_id=job_id + "\x00", step_name="fan")),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND, raised.value.details()
        watch_one = stub.WatchJob(status_pb.WatchJobRequest(job_id="\x00"))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await watch_one.read()
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND, raised.value.details()


async def test_a_filter_naming_a_state_any_number_of_times_names_it_once(
    tmp_path: Path, orchestrator: Orchestrator, postgres: PostgresDatabase
) -> None:
    async with replica(tmp_path, orchestrator.address, postgres.dsn) as running, channel(running.address) as ch:
        stub = status_grpc.StatusServiceStub(ch)
        job_id = await submit(orchestrator, "states", ["a", "b"])
        await wait_status_job(stub, job_id, status_job_finished, "the job to finish")
        # Before: INTERNAL (asyncpg: the number of query arguments cannot exceed 32767).
        listed = await stub.ListJobs(status_pb.ListJobsRequest(
            filter=status_pb.JobFilter(states=[s.JOB_STATE_COMPLETED] * MANY_STATES)))
        assert [job.id for job in listed.jobs] == [job_id]
        children = await stub.ListChildren(status_pb.ListChildrenRequest(
            job_id=job_id, step_name="fan", states=[s.STEP_STATE_COMPLETED] * MANY_STATES))
        assert [child.item for child in children.children] == ["a", "b"]


def stored_job(job_id: str) -> tuple[StoredHeader, StoredStep, list[StoredChild]]:
    header = StoredHeader(status_pb.JobStatus(id=job_id, name="loaded", state=s.JOB_STATE_RUNNING, revision=1),
                          "orchestrator", 1, None)
    step = StoredStep(job_id, status_pb.StepStats(name="fan", state=s.STEP_STATE_WAITING, revision=1), 2)
    children = [StoredChild(records_pb2.Child(job_id=job_id, step_name="fan", index=index, item=str(index),
                                              state=s.STEP_STATE_RUNNING), 3 + index, 1) for index in range(2)]
    return header, step, children


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
async def test_a_writer_loads_more_jobs_at_once_than_one_statement_can_name(
    backend: str, tmp_path: Path, postgres: PostgresDatabase
) -> None:
    """What the writer asks when a source goes stale or resyncs: every unfinished job of it, at once."""
    store: StatusStore = (PostgresStatusStore(postgres.dsn) if backend == "postgres"
                          else SqliteStatusStore(tmp_path / "status.sqlite3"))
    await store.open()
    try:
        wanted = [f"job-{index:05d}" for index in range(MANY_STATES)]
        present = [wanted[0], wanted[len(wanted) // 2], wanted[-1]]
        jobs = [stored_job(job_id) for job_id in present]
        await store.commit(WriteBatch(headers=[job[0] for job in jobs], steps=[job[1] for job in jobs],
                                      children=[child for job in jobs for child in job[2]]))
        # Before (PostgreSQL): InterfaceError, the number of query arguments cannot exceed 32767: a
        # holder's term failed on it, and so did every later one.
        loaded = await store.load_jobs(wanted)
        assert sorted(loaded) == present
        for job_id in present:
            assert [step.stats.name for step in loaded[job_id].steps] == ["fan"]
            assert sorted(child.index for child in loaded[job_id].children) == [0, 1]
    finally:
        await store.close()


async def lock_waiters(postgres: PostgresDatabase) -> int:
    """The replica's statements on the server waiting for a lock."""
    connection = await postgres.connect()
    try:
        return int(await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2 "
            "AND wait_event_type = 'Lock'", postgres.name, APPLICATION_NAME))
    finally:
        await connection.close()


async def test_a_read_whose_caller_left_stops_on_the_server_and_gives_its_connection_back(
    tmp_path: Path, orchestrator: Orchestrator, postgres: PostgresDatabase
) -> None:
    pool_size = 2
    async with replica(tmp_path, orchestrator.address, postgres.dsn, store_pool_size=pool_size,
                       store_timeout=3600.0) as running, channel(running.address) as ch:
        stub = status_grpc.StatusServiceStub(ch)
        locker = await postgres.connect()
        try:
            async with locker.transaction():
                # Every read of `jobs` now waits (as behind a migration, a VACUUM FULL, a stuck session).
                await locker.execute(f"LOCK TABLE {PG_SCHEMA}.jobs IN ACCESS EXCLUSIVE MODE")
                for _ in range(pool_size):
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await stub.GetJob(status_pb.GetJobRequest(job_id="anything"), timeout=0.5)
                    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                # Before: both went on waiting on the server, each holding one of the pool's two
                # connections, for --store-timeout (an hour here).
                await eventually(lambda: _when_zero(lock_waiters(postgres)), "the abandoned reads to stop")
                # The pool is whole: a read of other tables answers while `jobs` is still locked.
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.ListChildren(status_pb.ListChildrenRequest(job_id="anything", step_name="s"),
                                            timeout=DEADLINE)
                assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await locker.close()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetJob(status_pb.GetJobRequest(job_id="anything"), timeout=DEADLINE)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert running.health.serving


async def _when_zero(count: Awaitable[int]) -> bool | None:
    return True if await count == 0 else None


async def test_a_holder_that_lost_the_lease_prunes_nothing(postgres: PostgresDatabase) -> None:
    """The writer prunes on its own clock: a holder that wakes from a stall after a takeover may
    prune before its renewal fails. Like its commits, the prune is fenced."""
    store = PostgresStatusStore(postgres.dsn)
    await store.open()
    connection = await store.connect()
    try:
        await create_lease_table(connection)
    finally:
        await connection.close()
    lease = IngestLease(store.connect, holder="the deposed", ttl=60.0)
    try:
        epoch = await lease.try_acquire()
        assert epoch is not None
        store.fence = lease.fence_for(epoch)
        await store.commit(WriteBatch(changes=[change(revision) for revision in range(1, 11)]))
        thief = await store.connect()
        try:
            await thief.execute(f"UPDATE {LEASE_TABLE} SET holder = 'the test', epoch = epoch + 1 WHERE name = $1",
                                LEASE_NAME)
        finally:
            await thief.close()
        with pytest.raises(LeaseLost):
            await store.prune(1)
        page = await store.read_changes(0, 100)  # before: revisions 1-9 pruned by a replica not holding the lease
        assert [each.revision for each in page.items] == list(range(1, 11))
    finally:
        await lease.close()
        await store.close()


def change(revision: int) -> StoredChange:
    header = status_pb.JobStatus(id="job", name="job", state=s.JOB_STATE_RUNNING, revision=revision)
    return StoredChange(revision, "job", "job", s.JOB_STATE_PENDING, s.JOB_STATE_RUNNING,
                        header.SerializeToString(), None, 0)


async def test_a_replica_that_cannot_bind_its_port_leaves_no_session_open(
    tmp_path: Path, postgres: PostgresDatabase
) -> None:
    """start_replica() failing after its store opened (the port is taken) closes the store: an
    embedding process that goes on holds no pooled session on the database."""
    config = status_config(tmp_path, nobody(), store=postgres.dsn, listen=nobody())
    with pytest.raises(RuntimeError, match="Failed to bind"):
        await start_replica(config, store_from_config(config))  # type: ignore[arg-type]
    connection = await postgres.connect()
    try:
        async def no_session() -> bool | None:
            sessions = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
                postgres.name, APPLICATION_NAME)
            return True if sessions == 0 else None
        await eventually(no_session, "the replica's sessions to end")
    finally:
        await connection.close()


async def test_a_sqlite_service_that_cannot_bind_its_port_closes_its_store_and_starts_no_ingest(
    tmp_path: Path,
) -> None:
    """The same for the single-process service: no ingest task left running, no database thread."""
    def database_threads() -> int:
        return sum(isinstance(thread, aiosqlite.Connection) for thread in threading.enumerate())

    before = database_threads()
    config = status_config(tmp_path, nobody(), listen=nobody())
    with pytest.raises(RuntimeError, match="Failed to bind"):
        await start(config)
    assert not [task for task in asyncio.all_tasks() if task.get_name().startswith(("ingest-", "follow-"))]
    await eventually(lambda: asyncio.sleep(0, True if database_threads() == before else None),
                     "the store's database thread to end")
