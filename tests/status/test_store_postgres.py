"""What only the PostgreSQL store has to show, on a real server (tests/helpers/postgres.py):
statements cancelled or connections killed while the server runs them, the
schema version both backends refuse to run past, replicas opening one database
at once, the service end to end on --store postgresql://, and a password that
never shows in a flag, an error or a log. (Everything else the store does is
tests/status/test_store_conformance.py, run on both backends.)"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from orchestrator_svc.app import start as start_orchestrator
from status_svc.app import start_service
from status_svc.storage.base import StatusStore, StoreUnavailableError
from status_svc.storage.postgres import APPLICATION_NAME, PG_SCHEMA, PostgresStatusStore
from status_svc.storage.schema import SCHEMA_VERSION, VERSION_KEY, SchemaTooNewError
from status_svc.storage.sqlite import SqliteStatusStore
from tests.conftest import orchestrator_config, status_config
from tests.helpers import (
    DEADLINE,
    REPO,
    channel,
    ends_job,
    eventually,
    job_definition,
    orchestrator_process,
    private_file,
    status_job_finished,
    status_process,
    wait_status_job,
    watch_until,
)
from tests.helpers.postgres import PostgresDatabase
from tests.status.test_store_conformance import Ingest, a_busy_day, commit_all, job

PASSWORD = "pw-never-shown-7f3a9c"  # trust auth accepts any: what matters is where it shows up


@asynccontextmanager
async def opened(dsn: str) -> AsyncIterator[PostgresStatusStore]:
    store = PostgresStatusStore(dsn)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def changes_locked(database: PostgresDatabase) -> AsyncIterator[None]:
    """The changes table locked by another session (every read and commit of it waits) until the block ends."""
    blocker = await database.connect()
    try:
        async with blocker.transaction():
            await blocker.execute(f"LOCK TABLE {PG_SCHEMA}.changes IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await blocker.close()


async def waiting_on_the_lock(database: PostgresDatabase, count: int = 1) -> None:
    """Until `count` of the store's statements are waiting for the lock in the server."""

    async def waiting() -> bool | None:
        conn = await database.connect()
        try:
            found = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2 "
                "AND wait_event_type = 'Lock'", database.name, APPLICATION_NAME,
            )
        finally:
            await conn.close()
        return True if int(found) >= count else None  # eventually() waits out None only

    await eventually(waiting, f"{count} statement(s) of the store waiting on the lock")


async def idle(store: PostgresStatusStore) -> bool | None:
    return True if store.idle() else None


async def test_a_read_and_a_commit_cancelled_while_the_server_runs_them(postgres: PostgresDatabase) -> None:
    """Callers cancelled while their statements wait in the server: both stop waiting at
    once; the read's connection goes back to the pool and the commit lands whole."""
    ingest = Ingest()
    async with opened(postgres.dsn) as store:
        await commit_all(store, a_busy_day(ingest))
        before = await store.latest_revision()
        batch = ingest.events(job("new-job", s.JOB_STATE_RUNNING))
        async with changes_locked(postgres):
            read = asyncio.create_task(store.read_changes(0, 10))
            commit = asyncio.create_task(store.commit(batch))
            await waiting_on_the_lock(postgres, 2)
            read.cancel()
            commit.cancel()
            for task in (read, commit):
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert not store.idle()  # both still run in the server, shielded from their callers
        await eventually(lambda: idle(store), "the cancelled units to end")
        assert await store.latest_revision() == before + len(batch.changes)
        snapshot = await store.get_job("new-job")
        assert snapshot is not None and snapshot.job.state == s.JOB_STATE_RUNNING
        assert (await store.read_changes(before, 10)).items == list(batch.changes)


async def test_connections_killed_mid_use_fail_clearly_and_the_next_call_reconnects(
    postgres: PostgresDatabase,
) -> None:
    """pg_terminate_backend of every store connection while a read and a commit wait in the
    server: both raise StoreUnavailableError (UNAVAILABLE to a caller), the commit left
    nothing, and the next calls work on new connections."""
    ingest = Ingest()
    async with opened(postgres.dsn) as store:
        await commit_all(store, a_busy_day(ingest))
        before = await store.latest_revision()
        batch = ingest.events(job("new-job", s.JOB_STATE_RUNNING))
        async with changes_locked(postgres):
            read = asyncio.create_task(store.read_changes(0, 10))
            commit = asyncio.create_task(store.commit(batch))
            await waiting_on_the_lock(postgres, 2)
            assert await postgres.terminate_connections(APPLICATION_NAME) >= 2
            for task in (read, commit):
                with pytest.raises(StoreUnavailableError, match="cannot be used"):
                    await task
        assert await store.latest_revision() == before  # the commit was all or nothing: nothing
        assert await store.get_job("new-job") is None
        await store.commit(batch)  # the writer's connection is reopened
        assert await store.latest_revision() == before + len(batch.changes)


async def test_reads_just_after_the_server_ends_the_sessions_are_answered_or_unavailable(
    postgres: PostgresDatabase,
) -> None:
    """Reads sent at once after every session is ended (as a server restart does) meet the
    dead connections at every moment of asyncpg's noticing it: each is answered or raises
    StoreUnavailableError, never another error (a caller would see INTERNAL)."""
    ingest = Ingest()
    async with opened(postgres.dsn) as store:
        await commit_all(store, a_busy_day(ingest))
        outcomes: Counter[str] = Counter()

        async def reads() -> list[str]:
            results = await asyncio.gather(*(store.read_changes(0, 1) for _ in range(3)), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    assert isinstance(result, StoreUnavailableError), repr(result)
            return ["unavailable" if isinstance(result, BaseException) else "answered" for result in results]

        async def sessions_open() -> bool | None:
            """Three reads answered at once (a session the last round's reads did not meet is still dead)."""
            return True if await reads() == ["answered"] * 3 else None

        for delay in [0.0, 0.001, 0.002, 0.005] * 10:
            await eventually(sessions_open, "the pool's sessions to open")
            await postgres.terminate_connections(APPLICATION_NAME)
            await asyncio.sleep(delay)
            outcomes.update(await reads())
        assert outcomes["unavailable"] > 0, outcomes  # the dead sessions were met, not dodged


async def test_a_statement_past_the_store_timeout_is_unavailable_and_the_store_goes_on(
    postgres: PostgresDatabase,
) -> None:
    """A read and a commit waiting on a lock past --store-timeout: UNAVAILABLE, the commit
    left nothing, and both go on once the lock is gone."""
    ingest = Ingest()
    store = PostgresStatusStore(postgres.dsn, timeout=0.2)
    await store.open()
    try:
        await store.commit(ingest.events(job("j", s.JOB_STATE_RUNNING)))
        batch = ingest.events(job("k", s.JOB_STATE_RUNNING))
        async with changes_locked(postgres):
            with pytest.raises(StoreUnavailableError, match="cannot be used"):
                await store.read_changes(0, 10)
            with pytest.raises(StoreUnavailableError, match="cannot be used"):
                await store.commit(batch)
        assert [change.revision for change in (await store.read_changes(0, 10)).items] == [1]
        assert await store.get_job("k") is None
        await store.commit(batch)
        assert [change.revision for change in (await store.read_changes(0, 10)).items] == [1, 2]
        assert store.idle()
    finally:
        await store.close()


async def test_a_server_that_cannot_be_reached_is_unavailable_not_a_crash() -> None:
    store = PostgresStatusStore("postgresql://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(StoreUnavailableError, match=re.escape("postgresql://127.0.0.1:1/nowhere")):
        await store.open()
    assert store.idle()


async def test_replicas_opening_one_new_database_at_once_make_one_schema(postgres: PostgresDatabase) -> None:
    stores = [PostgresStatusStore(postgres.dsn) for _ in range(4)]
    try:
        opened_all = await asyncio.gather(*(store.open() for store in stores))
        assert {each.revision for each in opened_all} == {0}
        await stores[0].commit(Ingest().events(job("j", s.JOB_STATE_RUNNING)))
        assert [await store.latest_revision() for store in stores] == [1, 1, 1, 1]
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    conn = await postgres.connect()
    try:
        assert await conn.fetchval(f"SELECT value FROM {PG_SCHEMA}.meta WHERE key = $1", VERSION_KEY) == str(
            SCHEMA_VERSION)
    finally:
        await conn.close()


async def test_a_replica_on_an_existing_schema_needs_only_rights_on_its_tables(postgres: PostgresDatabase) -> None:
    """No DDL once the schema exists: a role with USAGE and DML rights alone (no CREATE
    on the database) opens the store, commits and reads."""
    async with opened(postgres.dsn):
        pass
    role = f"stepstream_test_role_{uuid.uuid4().hex[:12]}"
    admin = await postgres.connect()
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await admin.execute(f'GRANT USAGE ON SCHEMA {PG_SCHEMA} TO "{role}"')
        await admin.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {PG_SCHEMA} TO "{role}"')
        parts = urlsplit(postgres.dsn)
        limited = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rsplit('@', 1)[-1]}"))
        async with opened(limited) as store:
            await store.commit(Ingest().events(job("j", s.JOB_STATE_RUNNING)))
            assert await store.latest_revision() == 1
        conn = await asyncpg.connect(limited)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # the role really cannot make a schema
                await conn.execute("CREATE SCHEMA elsewhere")
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


# --- schema versions, both backends ---------------------------------------------------------------------------


async def _refused(new: Callable[[], StatusStore], set_version: Callable[[str], Awaitable[None]],
                   read_version: Callable[[], Awaitable[str]]) -> None:
    """A store made by a newer release (version SCHEMA_VERSION + 1) is refused at open, untouched."""
    store = new()
    await store.open()
    await store.commit(Ingest().events(job("j", s.JOB_STATE_RUNNING)))
    await store.close()
    newer = str(SCHEMA_VERSION + 1)
    await set_version(newer)
    with pytest.raises(SchemaTooNewError, match=f"schema version {newer}, newer than the {SCHEMA_VERSION}"):
        await new().open()
    assert await read_version() == newer


async def test_postgres_refuses_a_schema_newer_than_it_knows(postgres: PostgresDatabase) -> None:
    async def set_version(version: str) -> None:
        conn = await postgres.connect()
        await conn.execute(f"UPDATE {PG_SCHEMA}.meta SET value = $1 WHERE key = $2", version, VERSION_KEY)
        await conn.close()

    async def read_version() -> str:
        conn = await postgres.connect()
        try:
            return str(await conn.fetchval(f"SELECT value FROM {PG_SCHEMA}.meta WHERE key = $1", VERSION_KEY))
        finally:
            await conn.close()

    await _refused(lambda: PostgresStatusStore(postgres.dsn), set_version, read_version)


async def test_sqlite_refuses_a_schema_newer_than_it_knows_and_versions_an_old_file(tmp_path: Path) -> None:
    path = tmp_path / "status.sqlite3"

    async def set_version(version: str) -> None:
        with sqlite3.connect(path) as db:
            db.execute("UPDATE meta SET value = ? WHERE key = ?", (version, VERSION_KEY))
        db.close()

    async def read_version() -> str:
        db = sqlite3.connect(path)
        try:
            return str(db.execute("SELECT value FROM meta WHERE key = ?", (VERSION_KEY,)).fetchone()[0])
        finally:
            db.close()

    await _refused(lambda: SqliteStatusStore(path), set_version, read_version)
    # A file from before versions (no version recorded) is migrated and gets one.
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM meta WHERE key = ?", (VERSION_KEY,))
    db.close()
    store = SqliteStatusStore(path)
    assert (await store.open()).revision == 1
    await store.close()
    assert await read_version() == str(SCHEMA_VERSION)


def run_status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m status_svc ARGS` to its end (for what refuses to start)."""
    return subprocess.run([sys.executable, "-m", "status_svc", "--listen", "127.0.0.1:0", *args],
                          capture_output=True, text=True, timeout=DEADLINE, cwd=REPO, env=env, check=False)


async def test_the_service_refuses_a_newer_schema_in_one_line_with_exit_code_2(
    postgres: PostgresDatabase, tmp_path: Path
) -> None:
    async with opened(postgres.dsn):
        pass
    conn = await postgres.connect()
    await conn.execute(f"UPDATE {PG_SCHEMA}.meta SET value = '99' WHERE key = $1", VERSION_KEY)
    await conn.close()
    done = await asyncio.to_thread(run_status, "--data-dir", str(tmp_path), "--store", postgres.dsn)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"python -m status_svc: error: the status store {PostgresStatusStore(postgres.dsn).where} has schema "
        f"version 99, newer than the {SCHEMA_VERSION} this stepstream-status knows: run the release that wrote "
        "it, or a newer one"
    ]


# --- the password ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("how", "url"), [
    ("flag", f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/postgres"),
    ("env", f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/postgres"),
    ("flag", f"postgresql://postgres@127.0.0.1:5432/postgres?sslmode=prefer&password={PASSWORD}"),
])
async def test_a_password_in_the_store_url_is_refused_without_repeating_it(how: str, url: str, tmp_path: Path) -> None:
    if how == "flag":
        done = await asyncio.to_thread(run_status, "--data-dir", str(tmp_path), "--store", url)
    else:
        env = {**os.environ, "STEPSTREAM_STATUS_STORE": url}
        done = await asyncio.to_thread(run_status, "--data-dir", str(tmp_path), env=env)
    assert done.returncode == 2
    assert "PGPASSWORD" in done.stderr and "--store-password-file" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr


async def test_the_password_from_its_file_never_shows_in_the_logs(
    postgres: PostgresDatabase, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The service on PostgreSQL with --store-password-file, every logger at debug, a job
    followed to its end: the password is in no log record and no output."""
    caplog.set_level(logging.DEBUG)
    password_file = private_file(tmp_path / "pgpassword", PASSWORD + "\n")
    orchestrator = await start_orchestrator(orchestrator_config(tmp_path / "orchestrator"))
    try:
        status = await start_service(status_config(
            tmp_path / "status", orchestrator.address, store=postgres.dsn, store_password_file=password_file,
            log_level="debug",
        ))
        try:
            async with channel(orchestrator.address) as orch_ch, channel(status.server.address) as status_ch:
                submitted = await orch_grpc.OrchestratorServiceStub(orch_ch).SubmitJob(orch_pb.SubmitJobRequest(
                    definition=job_definition([{"name": "one", "type": "sleep", "seconds": 0}])))
                await wait_status_job(status_grpc.StatusServiceStub(status_ch), submitted.job.id,
                                      status_job_finished, "the job finished on the PostgreSQL store")
        finally:
            await status.stop()
    finally:
        await orchestrator.stop()
    captured = capsys.readouterr()
    assert caplog.records, "nothing was logged: the test would prove nothing"
    assert PASSWORD not in caplog.text + captured.out + captured.err
    assert not any(PASSWORD in repr(record.args) for record in caplog.records)


# --- the fixture itself ---------------------------------------------------------------------------------------


PROBE = """
async def test_probe(postgres):
    assert postgres.name
"""


@pytest.mark.parametrize("ci", ["", "true"])
def test_without_a_server_the_postgres_tests_skip_in_one_line_or_fail_in_ci(ci: str, tmp_path: Path) -> None:
    """A test using the `postgres` fixture, run by pytest against a port where nothing
    listens: skipped with one line saying how to enable it, or (CI=true) an error naming the DSN."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    dsn = "postgresql://postgres@127.0.0.1:9/postgres"
    env = {**os.environ, "STEPSTREAM_TEST_POSTGRES": dsn, "CI": ci, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "pytest_asyncio.plugin", "-p", "tests.helpers.postgres",
         "-c", os.devnull, "-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function",
         "--rootdir", str(tmp_path), "-rs", "-q", str(tmp_path / "test_probe.py")],
        capture_output=True, text=True, timeout=DEADLINE, cwd=REPO, env=env, check=False,
    )
    if ci:
        assert done.returncode == 1, done.stdout
        assert f"CI is set but no PostgreSQL at {dsn}" in done.stdout and "1 error" in done.stdout
    else:
        assert done.returncode == 0, done.stdout
        skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
        assert len(skipped) == 1 and f"no PostgreSQL at {dsn}" in skipped[0], done.stdout
        assert "docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:15" in skipped[0]


# --- end to end -------------------------------------------------------------------------------------------------


async def test_the_service_on_postgres_follows_a_job_to_the_end_for_get_and_watch(
    postgres: PostgresDatabase, tmp_path: Path
) -> None:
    """Both services as subprocesses, the status service on --store postgresql://: a
    fan-out job to its end, GetJob and WatchJob answer from PostgreSQL, and the rows are there."""
    orchestrator = orchestrator_process(tmp_path / "orchestrator", 0)
    orchestrator.start()
    status = status_process(tmp_path / "status", orchestrator.address, "--store", postgres.dsn)
    try:
        status.start()
        async with channel(orchestrator.address) as orch_ch, channel(status.address) as status_ch:
            stub = status_grpc.StatusServiceStub(status_ch)
            submitted = await orch_grpc.OrchestratorServiceStub(orch_ch).SubmitJob(orch_pb.SubmitJobRequest(
                definition=job_definition([
                    {"name": "fan", "type": "fanout", "count": 5, "child": {"type": "sleep", "seconds": 0}},
                ])))
            job_id = submitted.job.id
            await wait_status_job(stub, job_id, lambda _: True, "the job known to the status service")
            watch = stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id, after_revision=0))
            try:
                updates, _ = await watch_until(watch, ends_job)
            finally:
                watch.cancel()
            response = await wait_status_job(stub, job_id, status_job_finished, "the job finished")
            assert response.job.state == s.JOB_STATE_COMPLETED
            assert response.steps[0].children.completed == 5
            assert updates[-1].job.state == s.JOB_STATE_COMPLETED
            assert [u.revision for u in updates] == sorted({u.revision for u in updates})
    finally:
        status.stop()
        orchestrator.stop()
    assert not (tmp_path / "status" / "status.sqlite3").exists()  # nothing went to SQLite
    conn = await postgres.connect()
    try:
        stored = await conn.fetch(f"SELECT revision FROM {PG_SCHEMA}.changes WHERE job_id = $1 ORDER BY revision",
                                  job_id)
        state = await conn.fetchval(f"SELECT state FROM {PG_SCHEMA}.jobs WHERE job_id = $1", job_id)
    finally:
        await conn.close()
    assert [row[0] for row in stored] == [u.revision for u in updates]
    assert state == s.JOB_STATE_COMPLETED
