"""Ingest into PostgreSQL: the real IngestWriter committing to PostgresStatusStore.

Measured: events per second from the first batch submitted to the writer until
the last event's cursor is committed (fold, projection, change log, one
transaction per batch taken, as the status service runs it; no gRPC, so the
figure is the store's path). The events are a pre-written orchestrator log
(bench/workload.py), submitted in stream-message batches of BATCH. Baselines in
the same run, on the same server and events:
- bare asyncpg COPY (copy_records_to_table): one row per event, BATCH rows per
  transaction, the driver's fastest bulk path (no upsert, no index beyond the key);
- bare asyncpg executemany of guarded upserts, BATCH per transaction (what a
  hand-written ingest of the same rows would do);
- the same IngestWriter on SQLite (the default store), for scale.
Needs a PostgreSQL server: STEPSTREAM_TEST_POSTGRES, as the tests (tests/helpers/postgres.py).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import pytest
from stepstream.common.v1 import records_pb2

from bench.ingest import BATCH, CHILDREN_PER_JOB, Row, event_rows, read_log
from bench.report import Report, fmt_rate, rate
from bench.workload import events_per_job, write_fanout_log
from status_svc.ingest.writer import Events, IngestWriter
from status_svc.storage.base import StatusStore
from status_svc.storage.postgres import PostgresStatusStore
from status_svc.storage.sqlite import SqliteStatusStore
from tests.helpers.postgres import fresh_database

SOURCE = "bench-orchestrator:1"
LOG_ID = "bench-log"


async def through_the_writer(store: StatusStore, events: Sequence[records_pb2.StepEvent]) -> tuple[float, int]:
    """Events per second through IngestWriter into `store`, and the revisions it made."""
    opened = await store.open()
    try:
        writer = IngestWriter(store, None, latest_revision=opened.revision, sources=opened.sources,
                              followed=[SOURCE])
        task = asyncio.create_task(writer.run())
        started = time.perf_counter()
        for start in range(0, len(events), BATCH):
            await writer.submit(Events(SOURCE, LOG_ID, events[start:start + BATCH]))
        await writer.applied.wait(LOG_ID, events[-1].seq, 600)
        elapsed = time.perf_counter() - started
        await writer.stop()
        await task
        revisions = await store.latest_revision()
    finally:
        await store.close()
    return rate(len(events), elapsed), revisions


TABLE = ("CREATE TABLE status (job_id TEXT COLLATE \"C\", step TEXT COLLATE \"C\", idx BIGINT, state INTEGER, "
         "seq BIGINT, PRIMARY KEY (job_id, step, idx, seq))")
UPSERT = """
INSERT INTO upserted (job_id, step, idx, state, seq) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (job_id, step, idx) DO UPDATE SET state = excluded.state, seq = excluded.seq
WHERE excluded.seq > upserted.seq
"""


async def bare_copy(dsn: str, rows: Sequence[Row]) -> float:
    """Rows per second with COPY, BATCH per transaction (every event a row of its own: no upsert)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(TABLE)
        started = time.perf_counter()
        for start in range(0, len(rows), BATCH):
            async with conn.transaction():
                await conn.copy_records_to_table("status", records=rows[start:start + BATCH])
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return rate(len(rows), elapsed)


async def bare_upserts(dsn: str, rows: Sequence[Row]) -> float:
    """Rows per second with executemany of guarded upserts, BATCH per transaction."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE upserted (job_id TEXT COLLATE \"C\", step TEXT COLLATE \"C\", idx BIGINT, "
                           "state INTEGER, seq BIGINT, PRIMARY KEY (job_id, step, idx))")
        started = time.perf_counter()
        for start in range(0, len(rows), BATCH):
            async with conn.transaction():
                await conn.executemany(UPSERT, rows[start:start + BATCH])
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return rate(len(rows), elapsed)


async def run(quick: bool) -> Report:
    jobs = 10 if quick else 200  # ~3k or ~60k events
    report = Report("pg_ingest")
    with tempfile.TemporaryDirectory(prefix="stepstream-bench-") as tmp:
        work = Path(tmp)
        last_seq = await write_fanout_log(work / "orchestrator", jobs, CHILDREN_PER_JOB)
        assert last_seq == jobs * events_per_job(CHILDREN_PER_JOB)
        events = read_log(work / "orchestrator")
        rows = event_rows(events)
        try:
            async with fresh_database("stepstream_bench") as database:
                dsn = database.dsn
                ours, revisions = await through_the_writer(PostgresStatusStore(dsn), events)
                copy_rate = await bare_copy(dsn, rows)
                upsert_rate = await bare_upserts(dsn, rows)
        except (pytest.skip.Exception, pytest.fail.Exception) as unreachable:  # the tests' skip-or-fail
            raise SystemExit(f"python -m bench pg_ingest: {unreachable.msg}") from None
        sqlite_rate, _ = await through_the_writer(SqliteStatusStore(work / "status.sqlite3"), events)
    report.add("events", f"{last_seq:,}", f"{jobs} fan-out jobs x {CHILDREN_PER_JOB} children, {BATCH} per batch")
    report.add("IngestWriter -> PostgreSQL", fmt_rate(ours, "events"), f"fold -> commit; {revisions:,} revisions")
    report.add("baseline: bare asyncpg COPY", fmt_rate(copy_rate, "rows"), f"one row per event, {BATCH} per COPY")
    report.add("baseline: bare asyncpg upserts", fmt_rate(upsert_rate, "rows"), f"executemany, {BATCH} per transaction")
    report.add("IngestWriter -> SQLite", fmt_rate(sqlite_rate, "events"), "the default store, same events")
    report.add("ratio to bare COPY", f"{ours / copy_rate:.0%}", "")
    report.add("ratio to bare upserts", f"{ours / upsert_rate:.0%}", "")
    report.figures.update(
        events=last_seq,
        events_per_second=round(ours),
        baseline_copy_rows_per_second=round(copy_rate),
        baseline_upsert_rows_per_second=round(upsert_rate),
        sqlite_events_per_second=round(sqlite_rate),
        ratio_to_copy=round(ours / copy_rate, 3),
        ratio_to_upserts=round(ours / upsert_rate, 3),
        revisions=revisions,
        batch=BATCH,
    )
    return report
