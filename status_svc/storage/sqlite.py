"""step_stats and friends in one SQLite file.

Tables: `jobs` (headers with step counts), `step_stats` (one row per step with
child counts), `children`, `changes` (the revision log that watches replay),
and `sources` (one row per orchestrator: its log id, the cursor, staleness).
A batch, its revisions and the cursors that produced it commit in one
transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite
from stepstream.common.v1 import records_pb2
from stepstream.states import TERMINAL_JOB_STATES
from stepstream.status.v1 import status_service_pb2

from status_svc.domain.fold import JobFold
from status_svc.domain.projection import freshness, job_fold
from status_svc.storage.base import ChangeFilter, JobSnapshot, SourceRow, StoredChange, WriteBatch
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
    steps_unknown INTEGER NOT NULL DEFAULT 0
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
# ChildCounts.unknown).
ADDED_COLUMNS = (
    ("jobs", "steps_unknown", "INTEGER NOT NULL DEFAULT 0"),
    ("step_stats", "children_unknown", "INTEGER NOT NULL DEFAULT 0"),
)

JOB_COLUMNS = (
    "job_id", "source", "name", "state", "reason", "message", "created_at", "started_at", "finished_at",
    "cancel_requested_at", "steps_total", "steps_pending", "steps_running", "steps_waiting", "steps_completed",
    "steps_failed", "steps_cancelled", "steps_skipped", "steps_unknown", "seq", "revision", "lost_since",
    "lost_detail",
)
STEP_COLUMNS = (
    "job_id", "name", "idx", "type", "state", "reason", "message", "attempt", "max_attempts", "started_at",
    "finished_at", "duration", "children_total", "children_pending", "children_running", "children_completed",
    "children_failed", "children_cancelled", "children_unknown", "seq", "revision",
)
CHILD_COLUMNS = (
    "job_id", "step", "idx", "item", "state", "reason", "message", "attempt", "started_at", "finished_at",
    "seq", "revision",
)
CHANGE_COLUMNS = ("revision", "job_id", "name", "state_before", "state_after", "header", "steps", "child_events")
SOURCE_COLUMNS = ("address", "log_id", "cursor", "stale_since", "detail")

_TERMINAL_JOB_STATES = tuple(sorted(TERMINAL_JOB_STATES))


def _replace(table: str, columns: Sequence[str]) -> str:
    return f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def _time(value: float | None) -> Any:
    return timestamp(value) if value is not None else None


# --- rows <-> messages -------------------------------------------------------------------------------------


def job_row(
    status: status_service_pb2.JobStatus, source: str, seq: int, lost: tuple[float | None, str]
) -> tuple[Any, ...]:
    c = status.steps
    return (
        status.id, source, status.name, status.state, status.reason, status.message,
        seconds(status.created_at), seconds(status.started_at), seconds(status.finished_at),
        seconds(status.cancel_requested_at), c.total, c.pending, c.running, c.waiting, c.completed, c.failed,
        c.cancelled, c.skipped, c.unknown, seq, status.revision, lost[0], lost[1],
    )


def _job_status(row: Sequence[Any], stale_since: float | None, detail: str) -> status_service_pb2.JobStatus:
    values = dict(zip(JOB_COLUMNS, row, strict=True))
    status = status_service_pb2.JobStatus(
        id=values["job_id"], name=values["name"], state=values["state"], reason=values["reason"],
        message=values["message"], revision=values["revision"],
        steps=status_service_pb2.StepCounts(**{
            name.removeprefix("steps_"): values[name] for name in JOB_COLUMNS if name.startswith("steps_")
        }),
    )
    for name in ("created_at", "started_at", "finished_at", "cancel_requested_at"):
        if values[name] is not None:
            getattr(status, name).CopyFrom(timestamp(values[name]))
    if values["lost_since"] is not None:
        stale_since, detail = values["lost_since"], values["lost_detail"]
    status.freshness.CopyFrom(freshness(status.state, values["source"], stale_since, detail))
    return status


def step_row(job_id: str, stats: status_service_pb2.StepStats, seq: int) -> tuple[Any, ...]:
    c = stats.children
    duration = stats.duration.ToNanoseconds() / 1e9 if stats.HasField("duration") else None
    return (
        job_id, stats.name, stats.index, stats.type, stats.state, stats.reason, stats.message, stats.attempt,
        stats.max_attempts, seconds(stats.started_at), seconds(stats.finished_at), duration, c.total, c.pending,
        c.running, c.completed, c.failed, c.cancelled, c.unknown, seq, stats.revision,
    )


def _step_stats(row: Sequence[Any]) -> status_service_pb2.StepStats:
    values = dict(zip(STEP_COLUMNS, row, strict=True))
    stats = status_service_pb2.StepStats(
        name=values["name"], index=values["idx"], type=values["type"], state=values["state"],
        reason=values["reason"], message=values["message"], attempt=values["attempt"],
        max_attempts=values["max_attempts"], revision=values["revision"],
        children=records_pb2.ChildCounts(**{
            name.removeprefix("children_"): values[name] for name in STEP_COLUMNS if name.startswith("children_")
        }),
    )
    for name in ("started_at", "finished_at"):
        if values[name] is not None:
            getattr(stats, name).CopyFrom(timestamp(values[name]))
    if values["duration"] is not None:
        stats.duration.FromNanoseconds(round(values["duration"] * 1e9))
    return stats


def child_row(child: records_pb2.Child, seq: int, revision: int) -> tuple[Any, ...]:
    return (
        child.job_id, child.step_name, child.index, child.item, child.state, child.reason, child.message,
        child.attempt, seconds(child.started_at), seconds(child.finished_at), seq, revision,
    )


def _child_status(row: Sequence[Any]) -> status_service_pb2.ChildStatus:
    values = dict(zip(CHILD_COLUMNS, row, strict=True))
    status = status_service_pb2.ChildStatus(
        index=values["idx"], item=values["item"], state=values["state"], reason=values["reason"],
        message=values["message"], attempt=values["attempt"], revision=values["revision"],
    )
    start, end = values["started_at"], values["finished_at"]
    if start is not None:
        status.started_at.CopyFrom(timestamp(start))
    if end is not None:
        status.finished_at.CopyFrom(timestamp(end))
    if start is not None and end is not None:
        status.duration.FromNanoseconds(max(0, status.finished_at.ToNanoseconds() - status.started_at.ToNanoseconds()))
    return status


_JOB_SELECT = (
    f"SELECT {', '.join('j.' + c for c in JOB_COLUMNS)}, src.stale_since, src.detail "
    "FROM jobs j LEFT JOIN sources src ON src.address = j.source"
)


_SNAPSHOT_SELECT = (
    f"SELECT {', '.join('j.' + c for c in JOB_COLUMNS)}, src.stale_since, src.detail, "
    f"(SELECT MAX(revision) FROM changes), {', '.join('s.' + c for c in STEP_COLUMNS)} "
    "FROM jobs j LEFT JOIN sources src ON src.address = j.source "
    "LEFT JOIN step_stats s ON s.job_id = j.job_id WHERE j.job_id = ? ORDER BY s.idx, s.name"
)


def _job_from_joined(row: Sequence[Any]) -> status_service_pb2.JobStatus:
    return _job_status(row[: len(JOB_COLUMNS)], row[-2], row[-1] or "")


def _job_filter(states: Sequence[int], name: str) -> tuple[list[str], list[Any]]:
    where: list[str] = ["1"]
    params: list[Any] = []
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

    async def open(self) -> tuple[int, dict[str, SourceRow]]:
        """Create the schema if needed (and add the columns an older file lacks);
        returns the latest revision and the sources."""
        await self._connect(SCHEMA)

        async def unit(db: aiosqlite.Connection) -> tuple[int, dict[str, SourceRow], str]:
            await _add_missing_columns(db)
            await db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('page_secret', ?)", (new_secret(),))
            secret = next(iter(await db.execute_fetchall("SELECT value FROM meta WHERE key = 'page_secret'")))[0]
            rows = await db.execute_fetchall(f"SELECT {', '.join(SOURCE_COLUMNS)} FROM sources")
            return await _latest_revision(db), {row[0]: SourceRow(*row) for row in rows}, str(secret)

        latest, sources, secret = await self.write(unit)
        self._tokens = PageTokens(secret)
        return latest, sources

    async def commit(self, batch: WriteBatch) -> None:
        async def unit(db: aiosqlite.Connection) -> None:
            for table, columns, rows in (
                ("jobs", JOB_COLUMNS, batch.jobs),
                ("step_stats", STEP_COLUMNS, batch.steps),
                ("children", CHILD_COLUMNS, batch.children),
                ("changes", CHANGE_COLUMNS, batch.changes),
                ("sources", SOURCE_COLUMNS, batch.sources),
            ):
                if rows:
                    await db.executemany(_replace(table, columns), rows)

        await self.write(unit)

    async def load_folds(self, job_ids: Sequence[str]) -> dict[str, tuple[JobFold, str, tuple[float | None, str]]]:
        """The committed folds of these jobs (missing ids are new jobs), with source and lost marker.

        Read on the reader connection, so it runs beside a commit in flight on the
        writer's; the writer only asks for jobs none of its uncommitted work touches.
        """
        if not job_ids:
            return {}

        async def unit(db: aiosqlite.Connection) -> tuple[list[Any], list[Any], list[Any]]:
            marks = ", ".join("?" * len(job_ids))
            jobs = list(await db.execute_fetchall(
                f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE job_id IN ({marks})", job_ids
            ))
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
        steps: dict[str, list[tuple[status_service_pb2.StepStats, int]]] = {}
        for row in step_rows:
            steps.setdefault(row[0], []).append((_step_stats(row), row[STEP_COLUMNS.index("seq")]))
        children: dict[str, list[tuple[str, int, int, int]]] = {}
        for job_id, step, index, state, seq in child_rows:
            children.setdefault(job_id, []).append((step, index, state, seq))
        folds = {}
        for row in jobs:
            values = dict(zip(JOB_COLUMNS, row, strict=True))
            status = _job_status(row, None, "")
            fold = job_fold(status, values["seq"], steps.get(status.id, []), children.get(status.id, []))
            folds[status.id] = (fold, values["source"], (values["lost_since"], values["lost_detail"]))
        return folds

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
        revision_at = len(JOB_COLUMNS) + 2  # after the job's columns and its source's two
        steps = [_step_stats(row[revision_at + 1:]) for row in rows if row[revision_at + 1] is not None]
        return JobSnapshot(_job_from_joined(rows[0][:revision_at]), steps, int(rows[0][revision_at] or 0))

    async def list_jobs(
        self, states: Sequence[int], name: str, page_size: int, page_token: str
    ) -> tuple[list[status_service_pb2.JobStatus], str, int]:
        where, params = _job_filter(states, name)
        query = scope("status.ListJobs", sorted(states), name)
        after = self._tokens.decode(page_token, query, (float, str))
        if after is not None:
            where.append("(j.created_at, j.job_id) < (?, ?)")
            params.extend(after)

        async def unit(db: aiosqlite.Connection) -> tuple[list[Any], int]:
            rows = list(await db.execute_fetchall(
                f"{_JOB_SELECT} WHERE {' AND '.join(where)} ORDER BY j.created_at DESC, j.job_id DESC LIMIT ?",
                (*params, page_size + 1),
            ))
            return rows, await _latest_revision(db)

        rows, revision = await self.read(unit)
        jobs = [_job_from_joined(row) for row in rows[:page_size]]
        token = ""
        if len(rows) > page_size:
            last = rows[page_size - 1]
            token = self._tokens.encode(query, [last[JOB_COLUMNS.index("created_at")], last[0]])
        return jobs, token, revision

    async def all_jobs(self, states: Sequence[int], name: str) -> tuple[list[status_service_pb2.JobStatus], int]:
        """Every matching job and the revision they are valid at, from one consistent read."""
        where, params = _job_filter(states, name)

        async def unit(db: aiosqlite.Connection) -> tuple[list[Any], int]:
            rows = await db.execute_fetchall(
                f"{_JOB_SELECT} WHERE {' AND '.join(where)} ORDER BY j.created_at DESC, j.job_id DESC", params
            )
            return list(rows), await _latest_revision(db)

        rows, revision = await self.read(unit)
        return [_job_from_joined(row) for row in rows], revision

    async def list_children(
        self, job_id: str, step: str, states: Sequence[int], page_size: int, page_token: str
    ) -> tuple[list[status_service_pb2.ChildStatus], str, int] | None:
        """None if the job or step is unknown."""
        where: list[str] = ["job_id = ?", "step = ?"]
        params: list[Any] = [job_id, step]
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
        token = self._tokens.encode(query, [rows[page_size - 1][2]]) if len(rows) > page_size else ""
        return [_child_status(row) for row in rows[:page_size]], token, revision

    async def job_exists(self, job_id: str) -> bool:
        async def unit(db: aiosqlite.Connection) -> bool:
            return bool(list(await db.execute_fetchall("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,))))

        return await self.read(unit)

    async def read_changes(
        self, after: int, limit: int, job_id: str | None = None, matching: ChangeFilter | None = None
    ) -> Page[StoredChange]:
        """Changes after revision `after`, in order, and the latest revision when read;
        CursorOutOfRangeError if some were pruned."""
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
