"""step_stats and friends in one SQLite file.

Tables: `jobs` (headers with step counts), `step_stats` (one row per step with
child counts), `children`, `changes` (the revision log that watches replay),
and `sources` (one row per orchestrator: its log id, the cursor, staleness).
A batch, its revisions and the cursors that produced it commit in one
transaction. The rows and the reads are storage/sql.py's, shared with the
PostgreSQL backend; this module has the schema, its migration and the SQLite
transactions (stepstream_common.sqlite).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from status_svc.storage.base import OpenedStore, WriteBatch
from status_svc.storage.sql import META_TABLE, Db, R, SqlReads, batch_rows, open_in
from stepstream_common.paging import PageTokens
from stepstream_common.sqlite import SqliteFile

SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
    address TEXT PRIMARY KEY,
    log_id TEXT NOT NULL DEFAULT '',
    cursor INTEGER NOT NULL DEFAULT 0,
    stale_since REAL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, source TEXT NOT NULL, name TEXT NOT NULL, state INTEGER NOT NULL,
    reason INTEGER NOT NULL, message TEXT NOT NULL, created_at REAL, started_at REAL, finished_at REAL,
    cancel_requested_at REAL, steps_total INTEGER NOT NULL, steps_pending INTEGER NOT NULL,
    steps_running INTEGER NOT NULL, steps_waiting INTEGER NOT NULL, steps_completed INTEGER NOT NULL,
    steps_failed INTEGER NOT NULL, steps_cancelled INTEGER NOT NULL, steps_skipped INTEGER NOT NULL,
    seq INTEGER NOT NULL, revision INTEGER NOT NULL, lost_since REAL, lost_detail TEXT NOT NULL DEFAULT '',
    steps_unknown INTEGER NOT NULL DEFAULT 0, submitted_by TEXT NOT NULL DEFAULT '',
    cancelled_by TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_newest_first ON jobs (created_at DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS jobs_by_source_state ON jobs (source, state);
CREATE TABLE IF NOT EXISTS step_stats (
    job_id TEXT NOT NULL, name TEXT NOT NULL, idx INTEGER NOT NULL, type TEXT NOT NULL,
    state INTEGER NOT NULL, reason INTEGER NOT NULL, message TEXT NOT NULL, attempt INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL, started_at REAL, finished_at REAL, duration REAL,
    children_total INTEGER NOT NULL, children_pending INTEGER NOT NULL, children_running INTEGER NOT NULL,
    children_completed INTEGER NOT NULL, children_failed INTEGER NOT NULL, children_cancelled INTEGER NOT NULL,
    seq INTEGER NOT NULL, revision INTEGER NOT NULL, children_unknown INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS children (
    job_id TEXT NOT NULL, step TEXT NOT NULL, idx INTEGER NOT NULL, item TEXT NOT NULL,
    state INTEGER NOT NULL, reason INTEGER NOT NULL, message TEXT NOT NULL, attempt INTEGER NOT NULL,
    started_at REAL, finished_at REAL, seq INTEGER NOT NULL, revision INTEGER NOT NULL,
    PRIMARY KEY (job_id, step, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY, job_id TEXT NOT NULL, name TEXT NOT NULL,
    state_before INTEGER NOT NULL, state_after INTEGER NOT NULL, header BLOB, steps BLOB,
    child_events INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_job ON changes (job_id, revision);
"""

# Columns added after the first release, each (table, column, definition). A
# database file made before them lacks them and CREATE TABLE IF NOT EXISTS does
# not add them, so open() adds each one that is missing (ALTER TABLE ADD COLUMN
# appends it with its default, where SCHEMA puts it for a new file): an existing
# data directory keeps working. steps_unknown and children_unknown count steps
# and children in a state this service does not know (StepCounts.unknown,
# ChildCounts.unknown); submitted_by and cancelled_by, who did (token names,
# '' for jobs stored before them or without auth).
ADDED_COLUMNS = (
    ("jobs", "steps_unknown", "INTEGER NOT NULL DEFAULT 0"),
    ("step_stats", "children_unknown", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "submitted_by", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "cancelled_by", "TEXT NOT NULL DEFAULT ''"),
)

# --- the store ---------------------------------------------------------------------------------------------


class _Connection:
    """An aiosqlite connection as the shared queries use it (sql.Db)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return list(await self.db.execute_fetchall(sql, params))


class SqliteStatusStore(SqliteFile, SqlReads):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._tokens = PageTokens("")

    async def open(self) -> OpenedStore:
        """Create the schema, or migrate the file's to SCHEMA_VERSION (storage/schema.py);
        SchemaTooNewError, with the file untouched, if a newer release made it."""
        await self._connect(META_TABLE)
        try:
            opened, secret = await self._write(lambda db: open_in(db, _migrate, str(self.path)))
        except BaseException:
            await self.close()
            raise
        self._tokens = PageTokens(secret)
        return opened

    async def commit(self, batch: WriteBatch) -> None:
        tables = batch_rows(batch)

        async def unit(db: aiosqlite.Connection) -> None:
            for statement, rows in tables:
                await db.executemany(statement, rows)

        await self.write(unit)

    async def _read(self, unit: Callable[[Db], Awaitable[R]]) -> R:
        return await self.read(lambda db: unit(_Connection(db)))

    async def _write(self, unit: Callable[[Db], Awaitable[R]]) -> R:
        return await self.write(lambda db: unit(_Connection(db)))


async def _migrate(db: Db, found: int) -> None:
    """From `found` (0: a new file, or one from before versions) to SCHEMA_VERSION:
    the tables, then the ADDED_COLUMNS a file from before them lacks."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            await db.rows(statement)
    await _add_missing_columns(db)


async def _add_missing_columns(db: Db) -> None:
    """The in-place migration: ADDED_COLUMNS that the file lacks (see there)."""
    for table, column, definition in ADDED_COLUMNS:
        present = {row[1] for row in await db.rows(f"PRAGMA table_info({table})")}
        if column not in present:
            await db.rows(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
