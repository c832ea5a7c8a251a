"""The event log in one SQLite file: `events` plus the latest record of every
job, step and child (each stored as the StepEvent bytes that set it)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import definition_pb2
from stepstream.states import TERMINAL_JOB_STATES, TERMINAL_STEP_STATES

from orchestrator_svc.storage.base import (
    LogInfo,
    NewJob,
    RequestedJob,
    Snapshot,
    StoredEvent,
    StoredJob,
    UnfinishedJob,
)
from stepstream_common.errors import CURSOR_TOO_OLD, CursorOutOfRangeError
from stepstream_common.feed import Page
from stepstream_common.paging import PageTokens, new_secret, scope
from stepstream_common.sqlite import SqliteFile
from stepstream_common.timeutil import seconds

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE,
    definition BLOB NOT NULL,
    first_seq INTEGER NOT NULL DEFAULT 0,
    name TEXT NOT NULL DEFAULT '',
    state INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL DEFAULT 0,
    finished_at REAL,
    seq INTEGER NOT NULL DEFAULT 0,
    record BLOB NOT NULL DEFAULT x''
);
CREATE INDEX IF NOT EXISTS jobs_newest_first ON jobs (created_at DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE TABLE IF NOT EXISTS steps (
    job_id TEXT NOT NULL, name TEXT NOT NULL, idx INTEGER NOT NULL,
    state INTEGER NOT NULL, seq INTEGER NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (job_id, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS children (
    job_id TEXT NOT NULL, step TEXT NOT NULL, idx INTEGER NOT NULL,
    state INTEGER NOT NULL, seq INTEGER NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (job_id, step, idx)
) WITHOUT ROWID;
"""

UPSERT_STEP = """
INSERT INTO steps (job_id, name, idx, state, seq, record) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (job_id, name) DO UPDATE SET state = excluded.state, seq = excluded.seq, record = excluded.record
"""
UPSERT_CHILD = """
INSERT INTO children (job_id, step, idx, state, seq, record) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (job_id, step, idx) DO UPDATE SET state = excluded.state, seq = excluded.seq, record = excluded.record
"""
UPDATE_JOB = """
UPDATE jobs SET name = ?, state = ?, created_at = ?, finished_at = ?, seq = ?, record = ? WHERE job_id = ?
"""

_UNFINISHED_JOB_STATES = tuple(sorted({s.JOB_STATE_PENDING, s.JOB_STATE_RUNNING}))
_TERMINAL_STEP_STATES = tuple(sorted(TERMINAL_STEP_STATES))
_SNAPSHOT_PAGE = 1000


def _event(data: bytes) -> records_pb2.StepEvent:
    return records_pb2.StepEvent.FromString(data)


class SqliteEventStore(SqliteFile):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._log_id = ""
        self._tokens = PageTokens("")

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def page_tokens(self) -> PageTokens:
        return self._tokens

    async def open(self) -> LogInfo:
        await self._connect(SCHEMA)

        async def unit(db: aiosqlite.Connection) -> tuple[LogInfo, str]:
            await db.executemany(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                [("log_id", uuid.uuid4().hex), ("page_secret", new_secret())],
            )
            meta = {str(key): str(value) for key, value in await db.execute_fetchall("SELECT key, value FROM meta")}
            return LogInfo(log_id=meta["log_id"], latest_seq=await _latest_seq(db)), meta["page_secret"]

        info, secret = await self.write(unit)
        self._log_id = info.log_id
        self._tokens = PageTokens(secret)
        return info

    async def append(
        self, events: Sequence[tuple[records_pb2.StepEvent, bytes]], new_jobs: Sequence[NewJob]
    ) -> None:
        event_rows = [(event.seq, data) for event, data in events]
        first_seqs: dict[str, int] = {}
        job_rows: list[tuple[Any, ...]] = []
        step_rows: list[tuple[Any, ...]] = []
        child_rows: list[tuple[Any, ...]] = []
        for event, data in events:
            kind = event.WhichOneof("record")
            if kind == "job":
                job = event.job
                first_seqs.setdefault(job.id, event.seq)
                job_rows.append((job.name, job.state, seconds(job.created_at) or 0.0,
                                 seconds(job.finished_at), event.seq, data, job.id))
            elif kind == "step":
                step = event.step
                step_rows.append((step.job_id, step.name, step.index, step.state, event.seq, data))
            else:
                child = event.child
                child_rows.append((child.job_id, child.step_name, child.index, child.state, event.seq, data))
        job_inserts = [(j.job_id, j.request_id or None, j.definition, first_seqs[j.job_id]) for j in new_jobs]

        async def unit(db: aiosqlite.Connection) -> None:
            if job_inserts:
                await db.executemany(
                    "INSERT INTO jobs (job_id, request_id, definition, first_seq) VALUES (?, ?, ?, ?)", job_inserts
                )
            await db.executemany("INSERT INTO events (seq, data) VALUES (?, ?)", event_rows)
            if job_rows:
                await db.executemany(UPDATE_JOB, job_rows)
            if step_rows:
                await db.executemany(UPSERT_STEP, step_rows)
            if child_rows:
                await db.executemany(UPSERT_CHILD, child_rows)

        await self.write(unit)

    async def read_events(self, after_seq: int, limit: int) -> Page[StoredEvent]:
        async def unit(db: aiosqlite.Connection) -> Page[StoredEvent]:
            rows = [
                StoredEvent(int(seq), bytes(data))
                for seq, data in await db.execute_fetchall(
                    "SELECT seq, data FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
                )
            ]
            latest = await _latest_seq(db)
            if rows and rows[0].position != after_seq + 1:
                raise CursorOutOfRangeError(
                    CURSOR_TOO_OLD,
                    f"events after seq {after_seq} are no longer retained; the oldest is {rows[0].position}: "
                    "resync with StreamSnapshot",
                    oldest=rows[0].position,
                    latest=latest,
                    log_id=self._log_id,
                )
            return Page(rows, latest)

        return await self.read(unit)

    async def oldest_seq(self) -> int:
        async def unit(db: aiosqlite.Connection) -> int:
            rows = list(await db.execute_fetchall("SELECT MIN(seq) FROM events"))
            return int(rows[0][0] or 0)

        return await self.read(unit)

    async def get_job(self, job_id: str) -> StoredJob | None:
        async def unit(db: aiosqlite.Connection) -> StoredJob | None:
            rows = list(await db.execute_fetchall(
                "SELECT record, definition FROM jobs WHERE job_id = ? AND seq > 0", (job_id,)
            ))
            if not rows:
                return None
            steps = await db.execute_fetchall(
                "SELECT record FROM steps WHERE job_id = ? ORDER BY idx", (job_id,)
            )
            counts = await db.execute_fetchall(
                "SELECT step, state, COUNT(*) FROM children WHERE job_id = ? GROUP BY step, state", (job_id,)
            )
            seq = await _latest_seq(db)
            return _job_view(rows[0], steps, counts, seq)

        return await self.read(unit)

    async def job_for_request(self, request_id: str) -> RequestedJob | None:
        async def unit(db: aiosqlite.Connection) -> RequestedJob | None:
            rows = list(await db.execute_fetchall(
                "SELECT record, first_seq, definition FROM jobs WHERE request_id = ? AND seq > 0", (request_id,)
            ))
            if not rows:
                return None
            record, first_seq, definition = rows[0]
            return RequestedJob(_event(record).job, int(first_seq), bytes(definition))

        return await self.read(unit)

    async def list_jobs(
        self, states: Sequence[int], name: str, page_size: int, page_token: str
    ) -> tuple[list[records_pb2.Job], str]:
        where = ["seq > 0"]
        params: list[Any] = []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)
        if name:
            where.append("name = ?")
            params.append(name)
        query = scope("orchestrator.ListJobs", sorted(states), name)
        after = self._tokens.decode(page_token, query, (float, str))
        if after is not None:
            where.append("(created_at, job_id) < (?, ?)")
            params.extend(after)

        async def unit(db: aiosqlite.Connection) -> list[Any]:
            return list(await db.execute_fetchall(
                f"SELECT record, created_at, job_id FROM jobs WHERE {' AND '.join(where)} "
                "ORDER BY created_at DESC, job_id DESC LIMIT ?",
                (*params, page_size + 1),
            ))

        rows = await self.read(unit)
        token = ""
        if len(rows) > page_size:
            token = self._tokens.encode(query, [rows[page_size - 1][1], rows[page_size - 1][2]])
        return [_event(row[0]).job for row in rows[:page_size]], token

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Snapshot]:
        async with self.private_reader() as db:
            yield Snapshot(seq=await _latest_seq(db), pages=_snapshot_pages(db))

    async def unfinished_jobs(self) -> list[UnfinishedJob]:
        marks = ", ".join("?" * len(_UNFINISHED_JOB_STATES))
        terminal = ", ".join("?" * len(_TERMINAL_STEP_STATES))

        async def unit(db: aiosqlite.Connection) -> list[UnfinishedJob]:
            found: dict[str, UnfinishedJob] = {}
            for (data,) in await db.execute_fetchall(
                f"SELECT record FROM jobs WHERE state IN ({marks}) AND seq > 0", _UNFINISHED_JOB_STATES
            ):
                job = _event(data).job
                found[job.id] = UnfinishedJob(job=job, steps=[])
            for job_id, data in await db.execute_fetchall(
                f"SELECT s.job_id, s.record FROM steps s JOIN jobs j USING (job_id) "
                f"WHERE j.state IN ({marks}) ORDER BY s.job_id, s.idx", _UNFINISHED_JOB_STATES
            ):
                found[job_id].steps.append(_event(data).step)
            for job_id, step, data in await db.execute_fetchall(
                f"SELECT c.job_id, c.step, c.record FROM children c JOIN jobs j USING (job_id) "
                f"WHERE j.state IN ({marks}) AND c.state NOT IN ({terminal}) ORDER BY c.job_id, c.step, c.idx",
                (*_UNFINISHED_JOB_STATES, *_TERMINAL_STEP_STATES),
            ):
                found[job_id].children.setdefault(step, []).append(_event(data).child)
            return list(found.values())

        return await self.read(unit)

    async def prune(self, keep_events: int, job_age_seconds: float) -> None:
        cutoff = time.time() - job_age_seconds
        finished = f"SELECT job_id FROM jobs WHERE state IN ({', '.join('?' * len(TERMINAL_JOB_STATES))}) " \
                   "AND finished_at < ?"
        terminal = (*sorted(TERMINAL_JOB_STATES), cutoff)

        async def unit(db: aiosqlite.Connection) -> None:
            await db.execute(
                "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?", (max(1, keep_events),)
            )
            await db.execute(f"DELETE FROM children WHERE job_id IN ({finished})", terminal)
            await db.execute(f"DELETE FROM steps WHERE job_id IN ({finished})", terminal)
            await db.execute(f"DELETE FROM jobs WHERE job_id IN ({finished})", terminal)

        await self.write(unit)


def _job_view(job: Sequence[Any], steps: Iterable[Any], counts: Iterable[Any], seq: int) -> StoredJob:
    child_counts: dict[str, records_pb2.ChildCounts] = {}
    for step_name, state, count in counts:
        tally = child_counts.setdefault(step_name, records_pb2.ChildCounts())
        tally.total += count
        field = s.StepState.Name(state).removeprefix("STEP_STATE_").lower()
        setattr(tally, field, getattr(tally, field) + count)
    return StoredJob(
        job=_event(job[0]).job,
        steps=[_event(row[0]).step for row in steps],
        child_counts=child_counts,
        definition=definition_pb2.JobDefinition.FromString(job[1]),
        seq=seq,
    )


async def _snapshot_pages(db: aiosqlite.Connection) -> AsyncIterator[list[bytes]]:
    for query in (
        "SELECT record FROM jobs WHERE seq > 0",
        "SELECT record FROM steps",
        "SELECT record FROM children",
    ):
        async with db.execute(query) as cursor:
            while rows := await cursor.fetchmany(_SNAPSHOT_PAGE):
                yield [bytes(row[0]) for row in rows]


async def _latest_seq(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("SELECT MAX(seq) FROM events"))
    return int(rows[0][0] or 0)
