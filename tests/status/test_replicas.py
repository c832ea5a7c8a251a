"""Several status replicas on one PostgreSQL database (status_svc.replication):
one ingests under the lease, all serve; fencing, the change tailer's safety-net
poll, a watcher resuming on another replica, and database trouble.

Replicas run in-process (status_svc.app.start_replica) on a fresh database
each (the `postgres` fixture), following a real orchestrator in-process; the
database is a real PostgreSQL server. Database outages go through a TCP proxy
of the test's own (the shared server is never restarted): cutting it closes
every connection and refuses new ones, as a server restart does.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from orchestrator_svc.app import Orchestrator
from status_svc.app import ReplicaService, start_replica
from status_svc.replication.lease import LEASE_NAME, LEASE_TABLE, IngestLease
from status_svc.storage.base import StoredChange, WriteBatch
from status_svc.storage.open import store_from_config
from status_svc.storage.postgres import PG_SCHEMA, PostgresStatusStore
from status_svc.storage.sql import CHANGE_COLUMNS
from tests.conftest import status_config
from tests.e2e.test_metrics import promql_of_rules, scrape, value
from tests.helpers import (
    REPO,
    channel,
    ends_job,
    eventually,
    free_port,
    read_whole_log,
    status_job_finished,
    wait_status_job,
    watch_until,
)
from tests.helpers.audit import assert_rows_match_the_log, crash_workload, postgres_rows, store_connection
from tests.helpers.postgres import PostgresDatabase

# A change without a notification shows within 0.1 s, a replica that left is replaced within 0.1 s. No
# test here waits for a lease to expire, so the TTL is long enough that a loaded machine's stalls never
# make one expire by accident (the epochs the tests expect would move).
FAST = {"poll_interval": 0.1, "lease_ttl": 5.0}


async def start(tmp_path: Path, name: str, orchestrator: str, dsn: str) -> ReplicaService:
    config = status_config(tmp_path / name, orchestrator, store=dsn, metrics_listen="127.0.0.1:0", **FAST)
    store = store_from_config(config)
    assert isinstance(store, PostgresStatusStore)
    return await start_replica(config, store)


@contextlib.asynccontextmanager
async def replicas(tmp_path: Path, orchestrator: str, dsn: str, count: int) -> AsyncIterator[list[ReplicaService]]:
    """`count` replicas, the first started holding the lease before the next start."""
    started: list[ReplicaService] = []
    try:
        for index in range(count):
            started.append(await start(tmp_path, f"replica{index}", orchestrator, dsn))
            if index == 0:
                await eventually(lambda: _true(started[0].ingest.term is not None), "the first replica to ingest")
        yield started
    finally:
        for replica in started:
            await replica.stop()


async def _true(value: bool) -> bool | None:
    return True if value else None


async def submit(orchestrator: Orchestrator, gate: Path) -> str:
    """The kill -9 tests' busy fan-out (the audit knows it), then a step that runs until `gate` exists."""
    return (await submitted(orchestrator, gate)).job.id


async def submitted(orchestrator: Orchestrator, gate: Path) -> orch_pb.SubmitJobResponse:
    async with channel(orchestrator.address) as ch:
        return await orch_grpc.OrchestratorServiceStub(ch).SubmitJob(
            orch_pb.SubmitJobRequest(definition=crash_workload(gate, 24, 4)))


def step_state(response: Any, name: str) -> int:
    return next((step.state for step in response.steps if step.name == name), s.STEP_STATE_UNSPECIFIED)


async def wait_step(replica: ReplicaService, job_id: str, name: str, state: int) -> Any:
    async with channel(replica.address) as ch:
        return await wait_status_job(status_grpc.StatusServiceStub(ch), job_id,
                                     lambda response: step_state(response, name) == state, f"{name} in {state}")


async def job_revisions(dsn: str, job_id: str) -> list[int]:
    """The change log's revisions of one job, as committed."""
    connection = await store_connection(dsn)
    try:
        return [row[0] for row in await connection.fetch(
            "SELECT revision FROM changes WHERE job_id = $1 ORDER BY revision", job_id)]
    finally:
        await connection.close()


async def latest_revision(dsn: str) -> int:
    connection = await store_connection(dsn)
    try:
        return int(await connection.fetchval("SELECT coalesce(max(revision), 0) FROM changes"))
    finally:
        await connection.close()


async def committed_cursor(dsn: str) -> int:
    """The one followed orchestrator's cursor, as committed."""
    connection = await store_connection(dsn)
    try:
        return int(await connection.fetchval("SELECT cursor FROM sources"))
    finally:
        await connection.close()


async def audit(orchestrator: Orchestrator, dsn: str, job_id: str) -> None:
    """The database, row by row, against the orchestrator's whole log (tests/helpers/audit.py)."""
    async with channel(orchestrator.address) as ch:
        stub = orch_grpc.OrchestratorServiceStub(ch)
        events = await read_whole_log(stub)
        view = await stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))
    assert_rows_match_the_log(await postgres_rows(dsn), orchestrator.address, job_id, events, view)


async def health(replica: ReplicaService) -> int:
    async with channel(replica.address) as ch:
        response = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
    return int(response.status)


async def wait_health(replica: ReplicaService, status: int) -> None:
    await eventually(lambda: _when(health(replica), status), f"health {status}")


async def _when(value: Any, wanted: int) -> bool | None:
    return True if await value == wanted else None


async def test_one_ingests_and_a_watcher_resumes_on_another_replica_missing_nothing(
    tmp_path: Path, orchestrator: Orchestrator, postgres: PostgresDatabase
) -> None:
    gate = tmp_path / "gate"
    async with replicas(tmp_path, orchestrator.address, postgres.dsn, 2) as (a, b):
        assert a.ingest.term is not None and b.ingest.term is None, "exactly one replica ingests"
        assert b.metrics is not None
        assert value(await asyncio.to_thread(scrape, b.metrics.address), "stepstream_ingest_lease_held") == 0
        job = await submitted(orchestrator, gate)
        job_id = job.job.id
        async with channel(b.address) as ch:  # b serves what a ingests, and knows when it is committed
            read = await status_grpc.StatusServiceStub(ch).GetJob(status_pb.GetJobRequest(
                job_id=job_id, not_older_than=status_pb.LogPosition(log_id=job.log_id, seq=job.seq)))
        assert read.job.id == job_id
        await wait_step(b, job_id, "prep", s.STEP_STATE_COMPLETED)
        seen: list[int] = []
        async with channel(a.address) as ch:
            call = status_grpc.StatusServiceStub(ch).WatchJob(status_pb.WatchJobRequest(job_id=job_id,
                                                                                        after_revision=0))
            updates, _ = await watch_until(call, lambda update: update.HasField("job") or bool(update.steps))
            seen += [update.revision for update in updates]
            call.cancel()
        # The holder goes away mid-job; the other replica takes over; the watcher resumes there.
        await a.stop()
        gate.touch()
        async with channel(b.address) as ch:
            call = status_grpc.StatusServiceStub(ch).WatchJob(status_pb.WatchJobRequest(job_id=job_id,
                                                                                        after_revision=seen[-1]))
            updates, _ = await watch_until(call, ends_job)
            seen += [update.revision for update in updates]
        assert b.ingest.term is not None and b.ingest.term.epoch == 2
        assert b.metrics is not None
        samples = await asyncio.to_thread(scrape, b.metrics.address)
        lease = [value(samples, f"stepstream_ingest_lease_{name}") for name in ("held", "epoch")]
        assert lease == [1, 2], "the metrics say who ingests, under which epoch"
        for expression in promql_of_rules(REPO / "deploy/prometheus/alerts-replicas.yml"):
            named = set(re.findall(r"\bstepstream_[a-z_]+", expression))
            assert named and named <= {name for name, _ in samples}, f"{expression!r} names what no replica exports"
        assert seen == await job_revisions(postgres.dsn, job_id), "a revision missed, repeated or out of order"
        await audit(orchestrator, postgres.dsn, job_id)


async def test_a_holder_that_lost_the_lease_never_commits_and_steps_down(
    tmp_path: Path, orchestrator: Orchestrator, postgres: PostgresDatabase
) -> None:
    gate = tmp_path / "gate"
    async with replicas(tmp_path, orchestrator.address, postgres.dsn, 2) as (a, b):
        job_id = await submit(orchestrator, gate)
        await wait_step(a, job_id, "prep", s.STEP_STATE_COMPLETED)
        # Another party locks the lease row (once a commit in flight has ended) ...
        thief = await store_connection(postgres.dsn)
        try:
            transaction = thief.transaction()
            await transaction.start()
            await thief.execute(f"SELECT 1 FROM {LEASE_TABLE} WHERE name = $1 FOR UPDATE", LEASE_NAME)
            before = await latest_revision(postgres.dsn)
            committed = await committed_cursor(postgres.dsn)
            # ... a folds more of the job: its commit waits in its fence (the row is locked) ...
            gate.touch()
            term = a.ingest.term
            assert term is not None
            await eventually(lambda: _true(term.writer.source(orchestrator.address).cursor > committed),
                             "a to fold events it cannot commit")
            # ... while the lease is taken over (as a replica that won it would).
            epoch = await thief.fetchval(
                f"UPDATE {LEASE_TABLE} SET holder = 'the test', epoch = epoch + 1, holder_pid = pg_backend_pid(), "
                "expires_at = clock_timestamp() + interval '1 hour' WHERE name = $1 RETURNING epoch", LEASE_NAME)
            await transaction.commit()
            assert epoch == 2
            await eventually(lambda: _true(a.ingest.term is None), "a to step down")
            assert await latest_revision(postgres.dsn) == before, "a committed after losing the lease"
            assert await committed_cursor(postgres.dsn) == committed < term.writer.source(orchestrator.address).cursor
            held = await wait_step(a, job_id, "prep", s.STEP_STATE_COMPLETED)  # nothing a folded is visible
            assert not status_job_finished(held)
            assert held.revision == before and not held.job.freshness.stale
            assert a.ingest.term is None and b.ingest.term is None and a.health.serving
            # The lease is free again: a replica takes it (a new epoch) and ingests the rest.
            await thief.execute(f"UPDATE {LEASE_TABLE} SET expires_at = '-infinity' WHERE name = $1", LEASE_NAME)
        finally:
            await thief.close()
        for replica in (a, b):
            async with channel(replica.address) as ch:
                await wait_status_job(status_grpc.StatusServiceStub(ch), job_id, status_job_finished, "the end")
        terms = [replica.ingest.term for replica in (a, b) if replica.ingest.term is not None]
        assert [term.epoch for term in terms] == [3]
        await audit(orchestrator, postgres.dsn, job_id)


@contextlib.asynccontextmanager
async def reader(
    tmp_path: Path, orchestrator: str, dsn: str
) -> AsyncIterator[tuple[PostgresStatusStore, ReplicaService]]:
    """A replica that only reads: the test holds the lease (a replica of its own) and
    commits with the store it yields, fenced by that lease."""
    store = PostgresStatusStore(dsn)
    await store.open()
    lease = IngestLease(store.connect, holder="the test", ttl=60.0)
    try:
        first = await start(tmp_path, "replica", orchestrator, dsn)
        await first.stop()  # it made the lease table; now the test takes the lease first
        epoch = await lease.try_acquire()
        assert epoch is not None
        store.fence = lease.fence_for(epoch)
        replica = await start(tmp_path, "replica", orchestrator, dsn)
        try:
            yield store, replica
        finally:
            await replica.stop()
    finally:
        await lease.release()
        await lease.close()
        await store.close()


async def commit_silently(store: PostgresStatusStore, changes: list[StoredChange], prune_to: int = 0) -> None:
    """Changes committed with no notification (and the log pruned up to `prune_to`), in one transaction."""
    connection = await store.connect()
    try:
        async with connection.transaction():
            await connection.executemany(
                f"INSERT INTO changes ({', '.join(CHANGE_COLUMNS)}) "
                f"VALUES ({', '.join(f'${i + 1}' for i in range(len(CHANGE_COLUMNS)))})", changes)
            await connection.execute("DELETE FROM changes WHERE revision <= $1", prune_to)
    finally:
        await connection.close()


async def test_a_change_committed_without_a_notification_reaches_watchers_by_the_poll(
    tmp_path: Path, orchestrator: Orchestrator, postgres: PostgresDatabase
) -> None:
    async with reader(tmp_path, orchestrator.address, postgres.dsn) as (store, replica), channel(replica.address) as ch:
        call = status_grpc.StatusServiceStub(ch).WatchJobs(status_pb.WatchJobsRequest(after_revision=0))
        await eventually(lambda: _true(replica.tailer.polls > 0), "the tailer to listen")
        await store.commit(WriteBatch(changes=[change(1, "notified")]))  # NOTIFY in its transaction
        updates, _ = await watch_until(call, lambda update: update.revision == 1)
        await eventually(lambda: _true(replica.tailer.notifications == 1), "the notification")
        await commit_silently(store, [change(2, "silent")])
        more, _ = await watch_until(call, lambda update: update.revision == 2)
        assert [update.job_id for update in updates + more] == ["notified", "silent"]
        assert replica.tailer.notifications == 1 and replica.tailer.polls > 0
        call.cancel()


async def test_a_watcher_behind_a_log_pruned_before_the_replica_read_it_is_told_out_of_range(
    tmp_path: Path, orchestrator: Orchestrator, postgres: PostgresDatabase
) -> None:
    async with reader(tmp_path, orchestrator.address, postgres.dsn) as (store, replica), channel(replica.address) as ch:
        call = status_grpc.StatusServiceStub(ch).WatchJobs(status_pb.WatchJobsRequest(after_revision=0))
        await eventually(lambda: _true(replica.feed.subscriber_count == 1), "the watch to be live")
        await commit_silently(store, [change(revision, f"job{revision}") for revision in (1, 2, 3)], prune_to=2)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await watch_until(call, lambda update: True)
        assert ended.value.code() == grpc.StatusCode.OUT_OF_RANGE, "revision 3 would follow 0: 1 and 2 skipped"
        await eventually(lambda: _true(replica.feed.latest == 3), "the replica to publish on from what is kept")


def change(revision: int, job_id: str) -> StoredChange:
    header = status_pb.JobStatus(id=job_id, name="ghost", state=s.JOB_STATE_RUNNING, revision=revision)
    return StoredChange(revision, job_id, "ghost", s.JOB_STATE_PENDING, s.JOB_STATE_RUNNING,
                        header.SerializeToString(), None, 0)


class Proxy:
    """A TCP proxy to the PostgreSQL server: cut() closes every connection through it and
    refuses new ones (what a server restart looks like to a client); restore() takes them again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def dsn(self, dsn: str) -> str:
        parts = urlsplit(dsn)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for each in (writer, up_writer):
                self._writers.discard(each)
                each.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


async def test_database_outage_not_serving_then_recovers_and_watchers_miss_nothing(
    tmp_path: Path, orchestrator: Orchestrator, postgres: PostgresDatabase
) -> None:
    parts = urlsplit(postgres.dsn)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    await proxy.restore()
    gate = tmp_path / "gate"
    async with replicas(tmp_path, orchestrator.address, proxy.dsn(postgres.dsn), 1) as (replica,):
        job_id = await submit(orchestrator, gate)
        await wait_step(replica, job_id, "prep", s.STEP_STATE_COMPLETED)
        async with channel(replica.address) as ch:
            stub = status_grpc.StatusServiceStub(ch)
            call = stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id, after_revision=0))
            seen, _ = await watch_until(call, lambda update: step_state(update, "prep") == s.STEP_STATE_COMPLETED)
            await proxy.cut()
            await wait_health(replica, health_pb2.HealthCheckResponse.NOT_SERVING)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetJob(status_pb.GetJobRequest(job_id=job_id))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "status database" in (refused.value.details() or "")
            gate.touch()  # the job runs on while the database is away
            await proxy.restore()
            await wait_health(replica, health_pb2.HealthCheckResponse.SERVING)
            rest, _ = await watch_until(call, ends_job)
            call.cancel()
        revisions = [update.revision for update in seen + rest]
        assert revisions == await job_revisions(postgres.dsn, job_id), "a revision missed, repeated or out of order"
        assert replica.ingest.term is not None, "it ingests again (under the same epoch if nobody took over)"
    await audit(orchestrator, postgres.dsn, job_id)
    await proxy.cut()


async def fail_inserts(connection: Any, table: str) -> None:
    """Every INSERT into `table` fails as on a full disk (SQLSTATE 53100), until DROP TRIGGER disk_full."""
    await connection.execute(
        "CREATE OR REPLACE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; END $$")
    await connection.execute(
        f"CREATE TRIGGER disk_full BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION disk_full()")


async def test_failing_commits_mark_reads_stale_on_every_replica_then_recover(
    tmp_path: Path, orchestrator: Orchestrator, postgres: PostgresDatabase
) -> None:
    gate = tmp_path / "gate"
    async with replicas(tmp_path, orchestrator.address, postgres.dsn, 2) as pair:
        job_id = await submit(orchestrator, gate)
        await wait_step(pair[1], job_id, "prep", s.STEP_STATE_COMPLETED)
        admin = await store_connection(postgres.dsn)
        try:
            await fail_inserts(admin, "changes")
            gate.touch()
            # The holder's commits fail: it steps down, the other takes the lease and fails
            # too: each says NOT_SERVING and shows the unfinished job stale, with why.
            for replica in pair:
                await wait_health(replica, health_pb2.HealthCheckResponse.NOT_SERVING)
                async with channel(replica.address) as ch:
                    response = await status_grpc.StatusServiceStub(ch).GetJob(
                        status_pb.GetJobRequest(job_id=job_id))
                assert response.job.freshness.stale, "old data served as if current"
                assert "No space left on device" in response.job.freshness.detail
            await admin.execute("DROP TRIGGER disk_full ON changes")
        finally:
            await admin.close()
        for replica in pair:
            await wait_health(replica, health_pb2.HealthCheckResponse.SERVING)
            async with channel(replica.address) as ch:
                done = await wait_status_job(status_grpc.StatusServiceStub(ch), job_id, status_job_finished,
                                             "the end")
            assert done.job.state == s.JOB_STATE_COMPLETED and not done.job.freshness.stale
    await audit(orchestrator, postgres.dsn, job_id)


async def test_a_replica_stopped_or_cancelled_at_any_moment_leaves_no_session_and_loses_nothing(
    tmp_path: Path, orchestrator: Orchestrator, postgres: PostgresDatabase
) -> None:
    gate = tmp_path / "gate"
    job_id = await submit(orchestrator, gate)
    for round in range(8):
        replica = await start(tmp_path, f"replica{round}", orchestrator.address, postgres.dsn)
        await asyncio.sleep(round * 0.03)  # starting, competing, mid-term with commits in flight ...
        if round % 2:  # ... and its lease loop and tailer cancelled wherever they are
            replica.ingest_task.cancel()
            replica.tailer_task.cancel()
        await replica.stop()
        await eventually(lambda: _no_sessions(postgres.dsn), "the replica's sessions to end")
    gate.touch()
    async with replicas(tmp_path, orchestrator.address, postgres.dsn, 1) as (last,), channel(last.address) as ch:
        await wait_status_job(status_grpc.StatusServiceStub(ch), job_id, status_job_finished, "the end")
    await audit(orchestrator, postgres.dsn, job_id)


async def _no_sessions(dsn: str) -> bool | None:
    connection = await store_connection(dsn)
    try:
        count = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'stepstream-status'")
    finally:
        await connection.close()
    return True if count == 0 else None


async def test_ingest_trouble_ends_when_commits_land_again_even_if_the_log_does_not_move(
    tmp_path: Path, postgres: PostgresDatabase
) -> None:
    # Nothing to follow: the only commit is the orchestrator turning stale (a cursor row, no change).
    store = PostgresStatusStore(postgres.dsn)
    await store.open()
    await store.close()
    admin = await store_connection(postgres.dsn)
    try:
        await fail_inserts(admin, "sources")
        async with replicas(tmp_path, f"127.0.0.1:{free_port()}", postgres.dsn, 1) as (replica,):
            await wait_health(replica, health_pb2.HealthCheckResponse.NOT_SERVING)
            await admin.execute("DROP TRIGGER disk_full ON sources")
            await wait_health(replica, health_pb2.HealthCheckResponse.SERVING)
            assert await latest_revision(postgres.dsn) == 0
    finally:
        await admin.close()


async def test_every_session_ended_again_and_again_as_a_restart_does_no_replica_exits_and_nothing_is_lost(
    tmp_path: Path, orchestrator: Orchestrator, postgres: PostgresDatabase
) -> None:
    gate = tmp_path / "gate"
    async with replicas(tmp_path, orchestrator.address, postgres.dsn, 2) as pair:
        job_id = await submit(orchestrator, gate)
        await wait_step(pair[1], job_id, "prep", s.STEP_STATE_COMPLETED)
        for cut in range(12):
            # What a server restart does to every session of the replicas (a statement that meets the
            # ended backend fails with any of three asyncpg errors, depending on when it is sent).
            await postgres.terminate_connections("stepstream-status")
            await asyncio.sleep(0.01 * (cut % 4))
            for replica in pair:
                assert not replica.ingest_task.done() and not replica.tailer_task.done(), "a replica gave up"
        gate.touch()
        for replica in pair:
            await wait_health(replica, health_pb2.HealthCheckResponse.SERVING)
            async with channel(replica.address) as ch:
                await wait_status_job(status_grpc.StatusServiceStub(ch), job_id, status_job_finished, "the end")
        assert not any(task.done() for replica in pair for task in (replica.ingest_task, replica.tailer_task))
    await audit(orchestrator, postgres.dsn, job_id)


async def test_a_replica_on_an_existing_schema_needs_only_rights_on_its_rows(
    tmp_path: Path, orchestrator: Orchestrator, postgres: PostgresDatabase
) -> None:
    first = await start(tmp_path, "first", orchestrator.address, postgres.dsn)  # makes the schema and lease table
    await first.stop()
    role = f"stepstream_test_role_{uuid.uuid4().hex[:12]}"
    admin = await postgres.connect()
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await admin.execute(f'GRANT USAGE ON SCHEMA {PG_SCHEMA} TO "{role}"')
        await admin.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {PG_SCHEMA} TO "{role}"')
        parts = urlsplit(postgres.dsn)
        limited = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rsplit('@', 1)[-1]}"))
        async with replicas(tmp_path, orchestrator.address, limited, 1) as (replica,):
            assert replica.ingest.term is not None and replica.health.serving
    finally:
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()
