"""SQLite connections as both services use them: WAL, NORMAL sync, explicit transactions.

WAL lets snapshot readers run beside the single writer; synchronous=NORMAL
keeps every committed transaction across a process crash (kill -9), and only a
power loss or OS crash can lose the last few (documented in the README).
"""

from __future__ import annotations

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
