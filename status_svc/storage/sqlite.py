"""step_stats and friends in one SQLite file.

Tables: `jobs` (headers with step counts), `step_stats` (one row per step with
child counts), `children`, `changes` (the revision log that watches replay),
and `sources` (one row per orchestrator: its log id, the cursor, staleness).
A batch, its revisions and the cursors that produced it commit in one
transaction. Rows are this module's own: everything else in the service sees
the domain objects of storage/base.py, so this is the one place that makes or
reads one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite
from google.protobuf.message import Message
from stepstream.common.v1 import records_pb2
from stepstream.states import TERMINAL_JOB_STATES
from stepstream.status.v1 import status_service_pb2

from status_svc.domain.projection import Staleness, child_status, freshness
from status_svc.domain.projector import ChildVersion, LoadedJob, StoredChild, StoredHeader, StoredStep
from status_svc.storage.base import (
    ChangeFilter,
    ChildPage,
    JobList,
    JobPage,
    JobSnapshot,
    OpenedStore,
    Source,
    StoredChange,
    WriteBatch,
)
from stepstream_common.errors import CursorOutOfRangeError
from stepstream_common.feed import Page
from stepstream_common.paging import PageTokens, new_secret, scope
from stepstream_common.sqlite import SqliteFile
from stepstream_common.timeutil import seconds, timestamp

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
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

# The count columns follow the messages' fields, in field order (steps_total, steps_pending, ...).
_STEP_COUNTS = tuple(f.name for f in status_service_pb2.StepCounts.DESCRIPTOR.fields)
_CHILD_COUNTS = tuple(f.name for f in records_pb2.ChildCounts.DESCRIPTOR.fields)
_JOB_TIMES = ("created_at", "started_at", "finished_at", "cancel_requested_at")

JOB_COLUMNS = (
    "job_id", "source", "name", "state", "reason", "message", *_JOB_TIMES,
    *(f"steps_{name}" for name in _STEP_COUNTS), "seq", "revision", "lost_since", "lost_detail",
    "submitted_by", "cancelled_by",
)
STEP_COLUMNS = (
    "job_id", "name", "idx", "type", "state", "reason", "message", "attempt", "max_attempts", "started_at",
    "finished_at", "duration", *(f"children_{name}" for name in _CHILD_COUNTS), "seq", "revision",
)
CHILD_COLUMNS = (
    "job_id", "step", "idx", "item", "state", "reason", "message", "attempt", "started_at", "finished_at",
    "seq", "revision",
)
CHANGE_COLUMNS = ("revision", "job_id", "name", "state_before", "state_after", "header", "steps", "child_events")
SOURCE_COLUMNS = ("address", "log_id", "cursor", "stale_since", "detail")

_TERMINAL_JOB_STATES = tuple(sorted(TERMINAL_JOB_STATES))

Row = tuple[object, ...]


def _replace(table: str, columns: Sequence[str]) -> str:
    return f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def _set_times(message: Message, values: dict[str, Any], names: Sequence[str]) -> None:
    for name in names:
        if values[name] is not None:
            getattr(message, name).CopyFrom(timestamp(values[name]))


def _staleness(since: float | None, detail: str | None) -> Staleness | None:
    return Staleness(since, detail or "") if since is not None else None


# --- domain objects <-> rows: the only place rows are made or read ----------------------------------------


def _header_row(header: StoredHeader) -> Row:
    status, lost = header.status, header.lost
    counts = status.steps
    return (
        status.id, header.source, status.name, status.state, status.reason, status.message,
        *(seconds(getattr(status, name)) for name in _JOB_TIMES), *(getattr(counts, name) for name in _STEP_COUNTS),
        header.seq, status.revision, lost.since if lost is not None else None, lost.detail if lost is not None else "",
        status.submitted_by, status.cancelled_by,
    )


# A header is read joined with its source's staleness: _HEADER_SELECT's columns.
_HEADER_FIELDS = (*JOB_COLUMNS, "source_stale_since", "source_detail")
_HEADER_SELECT = (
    f"SELECT {', '.join('j.' + c for c in JOB_COLUMNS)}, src.stale_since, src.detail "
    "FROM jobs j LEFT JOIN sources src ON src.address = j.source"
)


def _header(row: Sequence[Any]) -> StoredHeader:
    """A header from _HEADER_SELECT's columns; its freshness from the lost marker, else from its source."""
    values = dict(zip(_HEADER_FIELDS, row, strict=True))
    status = status_service_pb2.JobStatus(
        id=values["job_id"], name=values["name"], state=values["state"], reason=values["reason"],
        message=values["message"], revision=values["revision"], submitted_by=values["submitted_by"],
        cancelled_by=values["cancelled_by"],
        steps=status_service_pb2.StepCounts(**{name: values[f"steps_{name}"] for name in _STEP_COUNTS}),
    )
    _set_times(status, values, _JOB_TIMES)
    lost = _staleness(values["lost_since"], values["lost_detail"])
    stale = lost if lost is not None else _staleness(values["source_stale_since"], values["source_detail"])
    status.freshness.CopyFrom(freshness(status.state, values["source"], stale))
    return StoredHeader(status, values["source"], values["seq"], lost)


def _step_row(step: StoredStep) -> Row:
    stats = step.stats
    counts = stats.children
    duration = stats.duration.ToNanoseconds() / 1e9 if stats.HasField("duration") else None
    return (
        step.job_id, stats.name, stats.index, stats.type, stats.state, stats.reason, stats.message, stats.attempt,
        stats.max_attempts, seconds(stats.started_at), seconds(stats.finished_at), duration,
        *(getattr(counts, name) for name in _CHILD_COUNTS), step.seq, stats.revision,
    )


def _step(row: Sequence[Any]) -> StoredStep:
    values = dict(zip(STEP_COLUMNS, row, strict=True))
    stats = status_service_pb2.StepStats(
        name=values["name"], index=values["idx"], type=values["type"], state=values["state"],
        reason=values["reason"], message=values["message"], attempt=values["attempt"],
        max_attempts=values["max_attempts"], revision=values["revision"],
        children=records_pb2.ChildCounts(**{name: values[f"children_{name}"] for name in _CHILD_COUNTS}),
    )
    _set_times(stats, values, ("started_at", "finished_at"))
    if values["duration"] is not None:
        stats.duration.FromNanoseconds(round(values["duration"] * 1e9))
    return StoredStep(values["job_id"], stats, values["seq"])


def _child_row(child: StoredChild) -> Row:
    record = child.record
    return (
        record.job_id, record.step_name, record.index, record.item, record.state, record.reason, record.message,
        record.attempt, seconds(record.started_at), seconds(record.finished_at), child.seq, child.revision,
    )


def _child(row: Sequence[Any]) -> StoredChild:
    values = dict(zip(CHILD_COLUMNS, row, strict=True))
    record = records_pb2.Child(
        job_id=values["job_id"], step_name=values["step"], index=values["idx"], item=values["item"],
        state=values["state"], reason=values["reason"], message=values["message"], attempt=values["attempt"],
    )
    _set_times(record, values, ("started_at", "finished_at"))
    return StoredChild(record, values["seq"], values["revision"])


def _change_row(change: StoredChange) -> Row:
    return (change.revision, change.job_id, change.name, change.state_before, change.state_after, change.header,
            change.steps, change.child_events)


def _source_row(source: Source) -> Row:
    return (source.address, source.log_id, source.cursor, source.stale_since, source.detail)


_SNAPSHOT_SELECT = (
    f"SELECT {', '.join('j.' + c for c in JOB_COLUMNS)}, src.stale_since, src.detail, "
    f"(SELECT MAX(revision) FROM changes), {', '.join('s.' + c for c in STEP_COLUMNS)} "
    "FROM jobs j LEFT JOIN sources src ON src.address = j.source "
    "LEFT JOIN step_stats s ON s.job_id = j.job_id WHERE j.job_id = ? ORDER BY s.idx, s.name"
)


def _job_filter(states: Sequence[int], name: str) -> tuple[list[str], list[object]]:
    where: list[str] = ["1"]
    params: list[object] = []
    if states:
        where.append(f"j.state IN ({', '.join('?' * len(states))})")
        params.extend(states)
    if name:
        where.append("j.name = ?")
        params.append(name)
    return where, params


# --- the store ---------------------------------------------------------------------------------------------


class SqliteStatusStore(SqliteFile):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._tokens = PageTokens("")

    async def open(self) -> OpenedStore:
        """Create the schema if needed (and add the columns an older file lacks)."""
        await self._connect(SCHEMA)

        async def unit(db: aiosqlite.Connection) -> tuple[OpenedStore, str]:
            await _add_missing_columns(db)
            await db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('page_secret', ?)", (new_secret(),))
            secret = next(iter(await db.execute_fetchall("SELECT value FROM meta WHERE key = 'page_secret'")))[0]
            rows = await db.execute_fetchall(f"SELECT {', '.join(SOURCE_COLUMNS)} FROM sources")
            sources = {row[0]: Source(*row) for row in rows}
            return OpenedStore(await _latest_revision(db), sources), str(secret)

        opened, secret = await self.write(unit)
        self._tokens = PageTokens(secret)
        return opened

    async def commit(self, batch: WriteBatch) -> None:
        tables = (
            ("jobs", JOB_COLUMNS, [_header_row(header) for header in batch.headers]),
            ("step_stats", STEP_COLUMNS, [_step_row(step) for step in batch.steps]),
            ("children", CHILD_COLUMNS, [_child_row(child) for child in batch.children]),
            ("changes", CHANGE_COLUMNS, [_change_row(change) for change in batch.changes]),
            ("sources", SOURCE_COLUMNS, [_source_row(source) for source in batch.sources]),
        )

        async def unit(db: aiosqlite.Connection) -> None:
            for table, columns, rows in tables:
                if rows:
                    await db.executemany(_replace(table, columns), rows)

        await self.write(unit)

    async def load_jobs(self, job_ids: Sequence[str]) -> dict[str, LoadedJob]:
        """Read on the reader connection, so it runs beside a commit in flight on the
        writer's; the writer only asks for jobs none of its uncommitted work touches."""
        if not job_ids:
            return {}

        async def unit(db: aiosqlite.Connection) -> tuple[list[Any], list[Any], list[Any]]:
            marks = ", ".join("?" * len(job_ids))
            jobs = list(await db.execute_fetchall(f"{_HEADER_SELECT} WHERE j.job_id IN ({marks})", job_ids))
            if not jobs:
                return [], [], []
            found = [row[0] for row in jobs]
            marks = ", ".join("?" * len(found))
            step_rows = await db.execute_fetchall(
                f"SELECT {', '.join(STEP_COLUMNS)} FROM step_stats WHERE job_id IN ({marks})", found
            )
            child_rows = await db.execute_fetchall(
                f"SELECT job_id, step, idx, state, seq FROM children WHERE job_id IN ({marks})", found
            )
            return jobs, list(step_rows), list(child_rows)

        jobs, step_rows, child_rows = await self.read(unit)
        steps: dict[str, list[StoredStep]] = {}
        for row in step_rows:
            step = _step(row)
            steps.setdefault(step.job_id, []).append(step)
        children: dict[str, list[ChildVersion]] = {}
        for job_id, step_name, index, state, seq in child_rows:
            children.setdefault(job_id, []).append(ChildVersion(step_name, index, state, seq))
        loaded = {}
        for row in jobs:
            header = _header(row)
            job_id = header.status.id
            loaded[job_id] = LoadedJob(header, steps.get(job_id, []), children.get(job_id, []))
        return loaded

    async def unfinished_jobs(self, source: str) -> list[str]:
        marks = ", ".join("?" * len(_TERMINAL_JOB_STATES))

        async def unit(db: aiosqlite.Connection) -> list[str]:
            rows = await db.execute_fetchall(
                f"SELECT job_id FROM jobs WHERE source = ? AND state NOT IN ({marks})",
                (source, *_TERMINAL_JOB_STATES),
            )
            return [row[0] for row in rows]

        return await self.read(unit)

    async def get_job(self, job_id: str) -> JobSnapshot | None:
        """The job, its steps and the revision they are valid at, from one consistent read."""
        async def unit(db: aiosqlite.Connection) -> list[Any]:
            return list(await db.execute_fetchall(_SNAPSHOT_SELECT, (job_id,)))

        rows = await self.read(unit)
        if not rows:
            return None
        revision_at = len(_HEADER_FIELDS)  # after the header's columns
        steps = [_step(row[revision_at + 1:]).stats for row in rows if row[revision_at + 1] is not None]
        return JobSnapshot(_header(rows[0][:revision_at]).status, steps, int(rows[0][revision_at] or 0))

    async def list_jobs(self, states: Sequence[int], name: str, page_size: int, page_token: str) -> JobPage:
        where, params = _job_filter(states, name)
        query = scope("status.ListJobs", sorted(states), name)
        after = self._tokens.decode(page_token, query, (float, str))
        if after is not None:
            where.append("(j.created_at, j.job_id) < (?, ?)")
            params.extend(after)

        async def unit(db: aiosqlite.Connection) -> tuple[list[Any], int]:
            rows = list(await db.execute_fetchall(
                f"{_HEADER_SELECT} WHERE {' AND '.join(where)} ORDER BY j.created_at DESC, j.job_id DESC LIMIT ?",
                (*params, page_size + 1),
            ))
            return rows, await _latest_revision(db)

        rows, revision = await self.read(unit)
        jobs = [_header(row).status for row in rows[:page_size]]
        token = ""
        if len(rows) > page_size:
            last = rows[page_size - 1]
            token = self._tokens.encode(query, [last[JOB_COLUMNS.index("created_at")], last[0]])
        return JobPage(jobs, token, revision)

    async def all_jobs(self, states: Sequence[int], name: str) -> JobList:
        where, params = _job_filter(states, name)

        async def unit(db: aiosqlite.Connection) -> tuple[list[Any], int]:
            rows = await db.execute_fetchall(
                f"{_HEADER_SELECT} WHERE {' AND '.join(where)} ORDER BY j.created_at DESC, j.job_id DESC", params
            )
            return list(rows), await _latest_revision(db)

        rows, revision = await self.read(unit)
        return JobList([_header(row).status for row in rows], revision)

    async def list_children(
        self, job_id: str, step: str, states: Sequence[int], page_size: int, page_token: str
    ) -> ChildPage | None:
        where: list[str] = ["job_id = ?", "step = ?"]
        params: list[object] = [job_id, step]
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)
        query = scope("status.ListChildren", job_id, step, sorted(states))
        after = self._tokens.decode(page_token, query, (int,))
        if after is not None:
            where.append("idx > ?")
            params.append(after[0])

        async def unit(db: aiosqlite.Connection) -> tuple[list[Any], int] | None:
            known = list(await db.execute_fetchall(
                "SELECT 1 FROM step_stats WHERE job_id = ? AND name = ?", (job_id, step)
            ))
            if not known:
                return None
            rows = list(await db.execute_fetchall(
                f"SELECT {', '.join(CHILD_COLUMNS)} FROM children WHERE {' AND '.join(where)} ORDER BY idx LIMIT ?",
                (*params, page_size + 1),
            ))
            return rows, await _latest_revision(db)

        found = await self.read(unit)
        if found is None:
            return None
        rows, revision = found
        children = [_child(row) for row in rows[:page_size]]
        token = self._tokens.encode(query, [children[-1].record.index]) if len(rows) > page_size else ""
        return ChildPage([child_status(child.record, child.revision) for child in children], token, revision)

    async def read_changes(
        self, after: int, limit: int, job_id: str | None = None, matching: ChangeFilter | None = None
    ) -> Page[StoredChange]:
        where: list[str] = ["revision > ?"]
        params: list[Any] = [after]
        if job_id is not None:
            where.append("job_id = ?")
            params.append(job_id)
        if matching is not None:
            where.append("header IS NOT NULL")
            if matching.name:
                where.append("name = ?")
                params.append(matching.name)
            if matching.states:
                marks = ", ".join("?" * len(matching.states))
                where.append(f"(state_before IN ({marks}) OR state_after IN ({marks}))")
                params.extend([*matching.states, *matching.states])

        async def unit(db: aiosqlite.Connection) -> Page[StoredChange]:
            latest = await _check_retained(db, after)
            rows = await db.execute_fetchall(
                f"SELECT {', '.join(CHANGE_COLUMNS)} FROM changes WHERE {' AND '.join(where)} "
                "ORDER BY revision LIMIT ?",
                (*params, limit),
            )
            return Page([StoredChange(*row) for row in rows], latest)

        return await self.read(unit)

    async def check_retained(self, after: int) -> None:
        await self.read(lambda db: _check_retained(db, after))

    async def prune(self, keep_changes: int) -> None:
        async def unit(db: aiosqlite.Connection) -> None:
            await db.execute(
                "DELETE FROM changes WHERE revision <= (SELECT MAX(revision) FROM changes) - ?", (max(1, keep_changes),)
            )

        await self.write(unit)


async def _add_missing_columns(db: aiosqlite.Connection) -> None:
    """The in-place migration: ADDED_COLUMNS that the file lacks (see there)."""
    for table, column, definition in ADDED_COLUMNS:
        present = {row[1] for row in await db.execute_fetchall(f"PRAGMA table_info({table})")}
        if column not in present:
            await db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


async def _check_retained(db: aiosqlite.Connection, after: int) -> int:
    """The latest revision; CursorOutOfRangeError unless `after` can be resumed from."""
    rows = list(await db.execute_fetchall("SELECT MIN(revision), MAX(revision) FROM changes"))
    oldest, latest = rows[0]
    if oldest is not None and after < oldest - 1:
        raise CursorOutOfRangeError(
            "CURSOR_TOO_OLD",
            f"changes after revision {after} are no longer retained (oldest {oldest}): take a new snapshot",
            oldest=oldest, latest=latest,
        )
    if after > (latest or 0):
        raise CursorOutOfRangeError(
            "CURSOR_UNKNOWN", f"revision {after} is ahead of this service (latest {latest or 0})",
            oldest=oldest or 0, latest=latest or 0,
        )
    return int(latest or 0)


async def _latest_revision(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("SELECT MAX(revision) FROM changes"))
    return int(rows[0][0] or 0)
