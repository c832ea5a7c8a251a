"""SQLite connections as both services use them: WAL, NORMAL sync, explicit transactions.

WAL lets snapshot readers run beside the single writer; synchronous=NORMAL
keeps every committed transaction across a process crash (kill -9), and only a
power loss or OS crash can lose the last few (documented in the README).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

PRAGMAS = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;"


async def connect(path: Path) -> aiosqlite.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path, isolation_level=None)
    await db.executescript(PRAGMAS)
    return db


@asynccontextmanager
async def transaction(db: aiosqlite.Connection, mode: str = "IMMEDIATE") -> AsyncIterator[None]:
    """BEGIN (IMMEDIATE for writes, DEFERRED for a consistent read) ... COMMIT."""
    await db.execute(f"BEGIN {mode}")
    try:
        yield
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    await db.execute("COMMIT")


class SqliteFile:
    """One SQLite file with its two connections: the single writer, and one
    reader shared by every request.

    Reads through the shared reader must not interleave (a second BEGIN fails,
    and a query run inside another request's transaction reads that one's
    snapshot), so each read, or read transaction, holds `_read_lock`.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._read_lock = asyncio.Lock()

    @property
    def writer(self) -> aiosqlite.Connection:
        assert self._writer is not None, "open() first"
        return self._writer

    @property
    def reader(self) -> aiosqlite.Connection:
        assert self._reader is not None, "open() first"
        return self._reader

    async def _connect(self, schema: str) -> None:
        """Open both connections, creating the schema if needed."""
        self._writer = await connect(self._path)
        await self._writer.executescript(schema)
        self._reader = await connect(self._path)

    async def close(self) -> None:
        for db in (self._reader, self._writer):
            if db is not None:
                await db.close()
        self._reader = self._writer = None
