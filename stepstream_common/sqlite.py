"""SQLite connections as both services use them: WAL, NORMAL sync, explicit transactions.

WAL lets snapshot readers run beside the single writer; synchronous=NORMAL
keeps every committed transaction across a process crash (kill -9), and only a
power loss or OS crash can lose the last few (documented in the README).

Cancellation. gRPC cancels a handler at whatever await it is parked on when
its client goes away or its deadline passes, and an aiosqlite statement whose
await is cancelled still runs in the connection's thread. A transaction driven
statement by statement from the handler's own task can therefore be cut after
BEGIN and before COMMIT/ROLLBACK, leaving a *shared* connection inside a
transaction for good (every later BEGIN fails, every later read sees a frozen
snapshot). So nothing here runs a transaction in the caller's task: every unit
of work on a shared connection (lock, BEGIN, statements, COMMIT or ROLLBACK,
unlock) runs as a task of its own and the caller awaits it through
asyncio.shield(). A cancelled caller stops waiting; the unit still finishes
and leaves the connection and its lock clean. Private connections (one
snapshot stream) are closed by a shielded task too, which ends their read
transaction whatever await the stream was cancelled at.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from stepstream_common.exposure import private_dir

log = logging.getLogger(__name__)

PRAGMAS = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;"

R = TypeVar("R")
Unit = Callable[[aiosqlite.Connection], Awaitable[R]]


async def connect(path: Path) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path, isolation_level=None)
    await db.executescript(PRAGMAS)
    return db


async def _in_transaction(db: aiosqlite.Connection, mode: str, unit: Unit[R]) -> R:
    """BEGIN (IMMEDIATE for writes, DEFERRED for a consistent read), unit, COMMIT or ROLLBACK.

    Only ever awaited from a task nobody cancels (see the module docstring).
    """
    await db.execute(f"BEGIN {mode}")
    try:
        result = await unit(db)
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    await db.execute("COMMIT")
    return result


class SqliteFile:
    """One SQLite file with its two shared connections: the single writer, and
    one reader for every request.

    `read()` and `write()` are the only ways to use them: each runs one unit in
    its own transaction, serialised by a lock per connection, immune to the
    caller's cancellation.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._read_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._units: set[asyncio.Task[Any]] = set()

    @property
    def path(self) -> Path:
        return self._path

    def idle(self) -> bool:
        """No unit running, no lock held, no shared connection inside a transaction
        (what a request that vanished must leave behind; checked by tests)."""
        connections = [db for db in (self._reader, self._writer) if db is not None]
        return (
            not self._units
            and not self._read_lock.locked()
            and not self._write_lock.locked()
            and not any(db.in_transaction for db in connections)
        )

    async def read(self, unit: Unit[R]) -> R:
        """Run `unit` on the shared reader in one DEFERRED transaction: a consistent read."""
        reader = self._reader
        assert reader is not None, "open() first"
        return await self._shielded(self._locked(self._read_lock, reader, "DEFERRED", unit))

    async def write(self, unit: Unit[R]) -> R:
        """Run `unit` on the writer in one IMMEDIATE transaction: it commits whole or not at all."""
        writer = self._writer
        assert writer is not None, "open() first"
        return await self._shielded(self._locked(self._write_lock, writer, "IMMEDIATE", unit))

    @contextlib.asynccontextmanager
    async def private_reader(self) -> AsyncIterator[aiosqlite.Connection]:
        """A connection of its own, inside one DEFERRED transaction, for a read too
        long to hold the shared reader (a snapshot streamed to a slow client).

        Closing it ends the transaction; the close runs as a shielded task, so a
        cancelled stream cannot leave the connection (or its thread) open.
        """
        opening = self._track(connect(self._path))
        try:
            db = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(self._close_when_opened)
            raise
        try:
            await db.execute("BEGIN DEFERRED")
            yield db
        finally:
            await self._shielded(db.close())

    async def _connect(self, schema: str) -> None:
        """Open both connections, creating the schema if needed, in files private to the service."""
        _make_private(self._path)
        self._writer = await connect(self._path)
        await self._writer.executescript(schema)
        self._reader = await connect(self._path)

    async def close(self) -> None:
        """Let units in flight finish, then close both connections."""
        while self._units:
            await asyncio.gather(*list(self._units), return_exceptions=True)
        for db in (self._reader, self._writer):
            if db is not None:
                await db.close()
        self._reader = self._writer = None

    async def _locked(self, lock: asyncio.Lock, db: aiosqlite.Connection, mode: str, unit: Unit[R]) -> R:
        async with lock:
            return await _in_transaction(db, mode, unit)

    def _track(self, work: Coroutine[Any, Any, R]) -> asyncio.Task[R]:
        task = asyncio.ensure_future(work)
        self._units.add(task)
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._units.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here so a unit whose caller left does not log "never retrieved";
            # a caller still waiting gets the same exception through the shield.
            log.debug("database unit failed: %r", task.exception())

    def _close_when_opened(self, opening: asyncio.Task[aiosqlite.Connection]) -> None:
        if not opening.cancelled() and opening.exception() is None:
            self._track(opening.result().close())

    async def _shielded(self, work: Coroutine[Any, Any, R]) -> R:
        return await asyncio.shield(self._track(work))


def _make_private(path: Path) -> None:
    """Before SQLite opens `path`: its directory private (exposure.private_dir),
    the database file created 0600 if new, and the database and any WAL files
    (left by a crash, or by a version that made them with the umask's mode)
    set to 0600. SQLite gives the -wal and -shm files it creates later the
    database file's mode, so none is ever readable by another user, not even
    for the moment between its creation and a chmod."""
    private_dir(path.parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)
