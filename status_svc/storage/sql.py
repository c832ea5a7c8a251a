"""What the SQL backends share: the columns of each table, the only functions
that make a row of a domain object or read one back (a row is a plain tuple in
column order), and the reads (SqlReads), written once in SQL that SQLite and
PostgreSQL both run. storage/sqlite.py and storage/postgres.py keep only what
differs: the schema and its migration, the transactions, the commit's upsert."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

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
from status_svc.storage.schema import SCHEMA_VERSION, VERSION_KEY, known_version
from stepstream_common.errors import CursorOutOfRangeError
from stepstream_common.feed import Page
from stepstream_common.paging import PageTokens, new_secret, scope
from stepstream_common.timeutil import seconds, timestamp

# The count columns follow the messages' fields, in field order (steps_total, steps_pending, ...).
STEP_COUNTS = tuple(f.name for f in status_service_pb2.StepCounts.DESCRIPTOR.fields)
CHILD_COUNTS = tuple(f.name for f in records_pb2.ChildCounts.DESCRIPTOR.fields)
JOB_TIMES = ("created_at", "started_at", "finished_at", "cancel_requested_at")

JOB_COLUMNS = (
    "job_id", "source", "name", "state", "reason", "message", *JOB_TIMES,
    *(f"steps_{name}" for name in STEP_COUNTS), "seq", "revision", "lost_since", "lost_detail",
    "submitted_by", "cancelled_by",
)
STEP_COLUMNS = (
    "job_id", "name", "idx", "type", "state", "reason", "message", "attempt", "max_attempts", "started_at",
    "finished_at", "duration", *(f"children_{name}" for name in CHILD_COUNTS), "seq", "revision",
)
CHILD_COLUMNS = (
    "job_id", "step", "idx", "item", "state", "reason", "message", "attempt", "started_at", "finished_at",
    "seq", "revision",
)
CHANGE_COLUMNS = ("revision", "job_id", "name", "state_before", "state_after", "header", "steps", "child_events")
SOURCE_COLUMNS = ("address", "log_id", "cursor", "stale_since", "detail")

TERMINAL_STATES = tuple(sorted(TERMINAL_JOB_STATES))

Row = tuple[object, ...]
R = TypeVar("R")
T = TypeVar("T")

# Values one statement names in an IN list, at most: a statement binds at most
# 32767 parameters on PostgreSQL (asyncpg refuses more) and 32766 on SQLite's
# default build, and a writer may load every unfinished job of a source at once.
MAX_IN_LIST = 1000


def chunks(values: Sequence[T], size: int = MAX_IN_LIST) -> list[Sequence[T]]:
    """`values` in consecutive runs of at most `size`."""
    return [values[start:start + size] for start in range(0, len(values), size)]


def _set_times(message: Message, values: dict[str, Any], names: Sequence[str]) -> None:
    for name in names:
        if values[name] is not None:
            getattr(message, name).CopyFrom(timestamp(values[name]))


def _staleness(since: float | None, detail: str | None) -> Staleness | None:
    return Staleness(since, detail or "") if since is not None else None


# --- domain objects <-> rows: the only place rows are made or read ----------------------------------------


def header_row(header: StoredHeader) -> Row:
    status, lost = header.status, header.lost
    counts = status.steps
    return (
        status.id, header.source, status.name, status.state, status.reason, status.message,
        *(seconds(getattr(status, name)) for name in JOB_TIMES), *(getattr(counts, name) for name in STEP_COUNTS),
        header.seq, status.revision, lost.since if lost is not None else None, lost.detail if lost is not None else "",
        status.submitted_by, status.cancelled_by,
    )


# A header is read joined with its source's staleness: HEADER_SELECT's columns.
HEADER_FIELDS = (*JOB_COLUMNS, "source_stale_since", "source_detail")
HEADER_SELECT = (
    f"SELECT {', '.join('j.' + c for c in JOB_COLUMNS)}, src.stale_since, src.detail "
    "FROM jobs j LEFT JOIN sources src ON src.address = j.source"
)


def header_of(row: Sequence[Any]) -> StoredHeader:
    """A header from HEADER_SELECT's columns; its freshness from the lost marker, else from its source."""
    values = dict(zip(HEADER_FIELDS, row, strict=True))
    status = status_service_pb2.JobStatus(
        id=values["job_id"], name=values["name"], state=values["state"], reason=values["reason"],
        message=values["message"], revision=values["revision"], submitted_by=values["submitted_by"],
        cancelled_by=values["cancelled_by"],
        steps=status_service_pb2.StepCounts(**{name: values[f"steps_{name}"] for name in STEP_COUNTS}),
    )
    _set_times(status, values, JOB_TIMES)
    lost = _staleness(values["lost_since"], values["lost_detail"])
    stale = lost if lost is not None else _staleness(values["source_stale_since"], values["source_detail"])
    status.freshness.CopyFrom(freshness(status.state, values["source"], stale))
    return StoredHeader(status, values["source"], values["seq"], lost)


def step_row(step: StoredStep) -> Row:
    stats = step.stats
    counts = stats.children
    duration = stats.duration.ToNanoseconds() / 1e9 if stats.HasField("duration") else None
    return (
        step.job_id, stats.name, stats.index, stats.type, stats.state, stats.reason, stats.message, stats.attempt,
        stats.max_attempts, seconds(stats.started_at), seconds(stats.finished_at), duration,
        *(getattr(counts, name) for name in CHILD_COUNTS), step.seq, stats.revision,
    )


def step_of(row: Sequence[Any]) -> StoredStep:
    values = dict(zip(STEP_COLUMNS, row, strict=True))
    stats = status_service_pb2.StepStats(
        name=values["name"], index=values["idx"], type=values["type"], state=values["state"],
        reason=values["reason"], message=values["message"], attempt=values["attempt"],
        max_attempts=values["max_attempts"], revision=values["revision"],
        children=records_pb2.ChildCounts(**{name: values[f"children_{name}"] for name in CHILD_COUNTS}),
    )
    _set_times(stats, values, ("started_at", "finished_at"))
    if values["duration"] is not None:
        stats.duration.FromNanoseconds(round(values["duration"] * 1e9))
    return StoredStep(values["job_id"], stats, values["seq"])


def child_row(child: StoredChild) -> Row:
    record = child.record
    return (
        record.job_id, record.step_name, record.index, record.item, record.state, record.reason, record.message,
        record.attempt, seconds(record.started_at), seconds(record.finished_at), child.seq, child.revision,
    )


def child_of(row: Sequence[Any]) -> StoredChild:
    values = dict(zip(CHILD_COLUMNS, row, strict=True))
    record = records_pb2.Child(
        job_id=values["job_id"], step_name=values["step"], index=values["idx"], item=values["item"],
        state=values["state"], reason=values["reason"], message=values["message"], attempt=values["attempt"],
    )
    _set_times(record, values, ("started_at", "finished_at"))
    return StoredChild(record, values["seq"], values["revision"])


def change_row(change: StoredChange) -> Row:
    return (change.revision, change.job_id, change.name, change.state_before, change.state_after, change.header,
            change.steps, change.child_events)


def source_row(source: Source) -> Row:
    return (source.address, source.log_id, source.cursor, source.stale_since, source.detail)


SNAPSHOT_SELECT = (
    f"SELECT {', '.join('j.' + c for c in JOB_COLUMNS)}, src.stale_since, src.detail, "
    f"(SELECT MAX(revision) FROM changes), {', '.join('s.' + c for c in STEP_COLUMNS)} "
    "FROM jobs j LEFT JOIN sources src ON src.address = j.source "
    "LEFT JOIN step_stats s ON s.job_id = j.job_id WHERE j.job_id = ? ORDER BY s.idx, s.name"
)


def job_filter(states: Sequence[int], name: str) -> tuple[list[str], list[object]]:
    where: list[str] = ["TRUE"]
    params: list[object] = []
    if states:
        distinct = sorted(set(states))  # a state named twice is one (and binds one parameter)
        where.append(f"j.state IN ({', '.join('?' * len(distinct))})")
        params.extend(distinct)
    if name:
        where.append("j.name = ?")
        params.append(name)
    return where, params


# --- the reads (and the prune) every SQL backend runs as they are -------------------------------------------


class Db(Protocol):
    """One connection inside a unit's transaction, as the shared queries use it."""

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """The rows of `sql` (placeholders '?', in order) with `params`."""
        ...


class SqlReads(ABC):
    """The StatusStore reads and the prune, once for every SQL backend: the SQL is
    what SQLite and PostgreSQL both run (a backend turns '?' into its own
    placeholders). A backend gives `_read` (a consistent read-only transaction)
    and `_write` (one transaction of the single writer), and `_tokens`."""

    _tokens: PageTokens

    @abstractmethod
    async def _read(self, unit: Callable[[Db], Awaitable[R]]) -> R: ...

    @abstractmethod
    async def _write(self, unit: Callable[[Db], Awaitable[R]]) -> R: ...

    async def latest_revision(self) -> int:
        """The newest committed revision (0 if none)."""
        return await self._read(latest_revision_in)

    async def sources(self) -> dict[str, Source]:
        """Every source as committed: its log id, cursor and staleness."""
        return await self._read(sources_in)

    async def load_jobs(self, job_ids: Sequence[str]) -> dict[str, LoadedJob]:
        """A read (the reader connection, or the pool), so it runs beside a commit in flight
        on the writer's; the writer only asks for jobs none of its uncommitted work touches."""
        if not job_ids:
            return {}

        async def unit(db: Db) -> tuple[list[Any], list[Any], list[Any]]:
            jobs: list[Any] = []
            step_rows: list[Any] = []
            child_rows: list[Any] = []
            for some in chunks(job_ids):  # one read transaction: one consistent view of them all
                marks = ", ".join("?" * len(some))
                rows = await db.rows(f"{HEADER_SELECT} WHERE j.job_id IN ({marks})", some)
                if not rows:
                    continue
                jobs += rows
                found = [row[0] for row in rows]
                marks = ", ".join("?" * len(found))
                step_rows += await db.rows(
                    f"SELECT {', '.join(STEP_COLUMNS)} FROM step_stats WHERE job_id IN ({marks})", found
                )
                child_rows += await db.rows(
                    f"SELECT job_id, step, idx, state, seq FROM children WHERE job_id IN ({marks})", found
                )
            return jobs, step_rows, child_rows

        jobs, step_rows, child_rows = await self._read(unit)
        steps: dict[str, list[StoredStep]] = {}
        for row in step_rows:
            step = step_of(row)
            steps.setdefault(step.job_id, []).append(step)
        children: dict[str, list[ChildVersion]] = {}
        for job_id, step_name, index, state, seq in child_rows:
            children.setdefault(job_id, []).append(ChildVersion(step_name, index, state, seq))
        loaded = {}
        for row in jobs:
            header = header_of(row)
            job_id = header.status.id
            loaded[job_id] = LoadedJob(header, steps.get(job_id, []), children.get(job_id, []))
        return loaded

    async def unfinished_jobs(self, source: str) -> list[str]:
        marks = ", ".join("?" * len(TERMINAL_STATES))

        async def unit(db: Db) -> list[str]:
            rows = await db.rows(
                f"SELECT job_id FROM jobs WHERE source = ? AND state NOT IN ({marks})",
                (source, *TERMINAL_STATES),
            )
            return [row[0] for row in rows]

        return await self._read(unit)

    async def get_job(self, job_id: str) -> JobSnapshot | None:
        """The job, its steps and the revision they are valid at, from one consistent read."""
        async def unit(db: Db) -> list[Any]:
            return (await db.rows(SNAPSHOT_SELECT, (job_id,)))

        rows = await self._read(unit)
        if not rows:
            return None
        revision_at = len(HEADER_FIELDS)  # after the header's columns
        steps = [step_of(row[revision_at + 1:]).stats for row in rows if row[revision_at + 1] is not None]
        return JobSnapshot(header_of(rows[0][:revision_at]).status, steps, int(rows[0][revision_at] or 0))

    async def list_jobs(self, states: Sequence[int], name: str, page_size: int, page_token: str) -> JobPage:
        where, params = job_filter(states, name)
        query = scope("status.ListJobs", sorted(states), name)
        after = self._tokens.decode(page_token, query, (float, str))
        if after is not None:
            where.append("(j.created_at, j.job_id) < (?, ?)")
            params.extend(after)

        async def unit(db: Db) -> tuple[list[Any], int]:
            rows = (await db.rows(
                f"{HEADER_SELECT} WHERE {' AND '.join(where)} ORDER BY j.created_at DESC, j.job_id DESC LIMIT ?",
                (*params, page_size + 1),
            ))
            return rows, await latest_revision_in(db)

        rows, revision = await self._read(unit)
        jobs = [header_of(row).status for row in rows[:page_size]]
        token = ""
        if len(rows) > page_size:
            last = rows[page_size - 1]
            token = self._tokens.encode(query, [last[JOB_COLUMNS.index("created_at")], last[0]])
        return JobPage(jobs, token, revision)

    async def all_jobs(self, states: Sequence[int], name: str) -> JobList:
        where, params = job_filter(states, name)

        async def unit(db: Db) -> tuple[list[Any], int]:
            rows = await db.rows(
                f"{HEADER_SELECT} WHERE {' AND '.join(where)} ORDER BY j.created_at DESC, j.job_id DESC", params
            )
            return list(rows), await latest_revision_in(db)

        rows, revision = await self._read(unit)
        return JobList([header_of(row).status for row in rows], revision)

    async def list_children(
        self, job_id: str, step: str, states: Sequence[int], page_size: int, page_token: str
    ) -> ChildPage | None:
        where: list[str] = ["job_id = ?", "step = ?"]
        params: list[object] = [job_id, step]
        if states:
            distinct = sorted(set(states))
            where.append(f"state IN ({', '.join('?' * len(distinct))})")
            params.extend(distinct)
        query = scope("status.ListChildren", job_id, step, sorted(states))
        after = self._tokens.decode(page_token, query, (int,))
        if after is not None:
            where.append("idx > ?")
            params.append(after[0])

        async def unit(db: Db) -> tuple[list[Any], int] | None:
            known = (await db.rows(
                "SELECT 1 FROM step_stats WHERE job_id = ? AND name = ?", (job_id, step)
            ))
            if not known:
                return None
            rows = (await db.rows(
                f"SELECT {', '.join(CHILD_COLUMNS)} FROM children WHERE {' AND '.join(where)} ORDER BY idx LIMIT ?",
                (*params, page_size + 1),
            ))
            return rows, await latest_revision_in(db)

        found = await self._read(unit)
        if found is None:
            return None
        rows, revision = found
        children = [child_of(row) for row in rows[:page_size]]
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

        async def unit(db: Db) -> Page[StoredChange]:
            latest = await check_retained(db, after)
            rows = await db.rows(
                f"SELECT {', '.join(CHANGE_COLUMNS)} FROM changes WHERE {' AND '.join(where)} "
                "ORDER BY revision LIMIT ?",
                (*params, limit),
            )
            return Page([StoredChange(*row) for row in rows], latest)

        return await self._read(unit)

    async def check_retained(self, after: int) -> None:
        await self._read(lambda db: check_retained(db, after))

    async def prune(self, keep_changes: int) -> None:
        async def unit(db: Db) -> None:
            await db.rows(
                "DELETE FROM changes WHERE revision <= (SELECT MAX(revision) FROM changes) - ?", (max(1, keep_changes),)
            )

        await self._write(unit)


async def check_retained(db: Db, after: int) -> int:
    """The latest revision; CursorOutOfRangeError unless `after` can be resumed from."""
    rows = await db.rows("SELECT MIN(revision), MAX(revision) FROM changes")
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


async def latest_revision_in(db: Db) -> int:
    rows = await db.rows("SELECT MAX(revision) FROM changes")
    return int(rows[0][0] or 0)


# --- the writer's side: the commit's rows and the open ------------------------------------------------------

# Each table's columns and primary key, in the order a batch writes them.
TABLES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("jobs", JOB_COLUMNS, ("job_id",)),
    ("step_stats", STEP_COLUMNS, ("job_id", "name")),
    ("children", CHILD_COLUMNS, ("job_id", "step", "idx")),
    ("changes", CHANGE_COLUMNS, ("revision",)),
    ("sources", SOURCE_COLUMNS, ("address",)),
)
META_TABLE = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


def upsert(table: str, columns: Sequence[str], key: Sequence[str]) -> str:
    """INSERT one row, or overwrite every column of the row with its key: committing a batch again changes nothing."""
    updates = ", ".join(f"{column} = excluded.{column}" for column in columns if column not in key)
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}")


def batch_rows(batch: WriteBatch) -> list[tuple[str, list[Row]]]:
    """The batch as (upsert statement, rows) per table that has rows, in TABLES order."""
    rows: list[list[Row]] = [
        [header_row(header) for header in batch.headers],
        [step_row(step) for step in batch.steps],
        [child_row(child) for child in batch.children],
        [change_row(change) for change in batch.changes],
        [source_row(source) for source in batch.sources],
    ]
    return [(upsert(table, columns, key), each) for (table, columns, key), each in zip(TABLES, rows, strict=True)
            if each]


async def open_in(db: Db, migrate: Callable[[Db, int], Awaitable[None]], where: str) -> tuple[OpenedStore, str]:
    """In the opening transaction (META_TABLE made): check the recorded schema
    version (storage/schema.py), `migrate(db, found)` it to SCHEMA_VERSION and
    record that; then where the store stands and its page-token secret."""
    recorded = await db.rows("SELECT value FROM meta WHERE key = ?", (VERSION_KEY,))
    found = known_version(recorded[0][0] if recorded else None, where)
    if found < SCHEMA_VERSION:
        await migrate(db, found)
        await db.rows(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (VERSION_KEY, str(SCHEMA_VERSION)),
        )
    await db.rows("INSERT INTO meta (key, value) VALUES ('page_secret', ?) ON CONFLICT (key) DO NOTHING",
                  (new_secret(),))
    secret = (await db.rows("SELECT value FROM meta WHERE key = 'page_secret'"))[0][0]
    return OpenedStore(await latest_revision_in(db), await sources_in(db)), str(secret)


async def sources_in(db: Db) -> dict[str, Source]:
    rows = await db.rows(f"SELECT {', '.join(SOURCE_COLUMNS)} FROM sources")
    return {row[0]: Source(*row) for row in rows}
