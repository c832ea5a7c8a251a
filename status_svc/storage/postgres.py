"""step_stats on PostgreSQL (asyncpg), for several status replicas on one database.

The tables are those of storage/sqlite.py (the same columns, rows and reads:
storage/sql.py), in the PostgreSQL schema `stepstream` (every connection has it
as its search_path), with PostgreSQL types (_postgres_ddl) and byte-order
("C") collation on text, so that ordering and paging match SQLite's.

Connections. Reads use a pool, each in a read-only REPEATABLE READ
transaction: a consistent snapshot. Commits use one dedicated connection (the
writer is single). As in stepstream_common/sqlite.py, every unit of work
(acquire, BEGIN, statements, COMMIT or ROLLBACK, release) runs as a task of
its own that the caller awaits through asyncio.shield(): a caller cancelled at
any await stops waiting, the unit still ends, its connection goes back clean,
and a commit is all or nothing. A read whose caller is cancelled (a client
gone, its deadline passed) is then cancelled once itself, inside its own task:
asyncpg cancels the statement on the server, the unit's own exits roll back
and release the connection, and nothing goes on working for nobody (holding a
pooled connection, perhaps waiting on a lock) until --store-timeout. A commit
is never cancelled: it ends as it would have.

For several replicas (the hooks the lease and the change tailer use):
- `fence(conn)`, if set, is awaited inside every commit transaction (and the
  prune's) before anything is written; if it raises, the transaction rolls back and the
  exception propagates unchanged (a replica that lost its lease cannot commit).
- Every commit with changes sends NOTIFY on CHANGES_CHANNEL, payload the
  latest revision it wrote, in the same transaction: delivered only if it
  commits. It is a wake-up; the `changes` table is the truth.
- open() creates or migrates the schema under a transaction-level advisory lock
  (SCHEMA_LOCK), so replicas starting together do not race.

Text. PostgreSQL's text cannot hold U+0000 (SQLite's can), yet any string an
orchestrator sends or a client asks for may (a job's name, a child's item, a
step's message, a job id to look up). Every str therefore goes in with NUL
written as ESCAPE "0" and ESCAPE itself as ESCAPE ESCAPE (ESCAPE is U+FFFF, a
noncharacter: no real text has it, so the common case costs one scan), and
comes back out as it was. The mapping is one-to-one, so keys, equality filters
and page tokens work on it unchanged; only the byte order of strings holding
NUL or U+FFFF differs from SQLite's.

Trouble. A lost connection, a server restarting or out of resources (SQLSTATE
classes 08, 53, 57, 58, a socket error, a timeout) is StoreUnavailableError;
the next call reconnects (the pool replaces a dead connection; the writer's is
reopened). Nothing is retried behind the caller's back.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from status_svc.storage.base import OpenedStore, StoreUnavailableError, WriteBatch
from status_svc.storage.sql import META_TABLE, Db, R, SqlReads, batch_rows, open_in
from status_svc.storage.sqlite import SCHEMA
from stepstream_common.paging import PageTokens

log = logging.getLogger(__name__)

PG_SCHEMA = "stepstream"
CHANGES_CHANNEL = "stepstream_changes"  # NOTIFY channel of committed revisions (payload: the latest, as text)
SCHEMA_LOCK = 0x5354_4550_5354_5245  # pg_advisory_xact_lock key held while the schema is made or migrated
APPLICATION_NAME = "stepstream-status"
UNAVAILABLE_CLASSES = ("08", "53", "57", "58")  # SQLSTATE classes: connection, resources, operator, system

Fence = Callable[[asyncpg.Connection], Awaitable[None]]


def _postgres_ddl(sqlite_schema: str) -> list[str]:
    """The SQLite schema's statements in PostgreSQL's types: 64-bit integers, double
    precision, bytea, byte-order text; no WITHOUT ROWID."""
    types = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "BLOB": "BYTEA", "TEXT": 'TEXT COLLATE "C"'}
    translated = re.sub(r"\b(INTEGER|REAL|BLOB|TEXT)\b", lambda match: types[match.group(1)], sqlite_schema)
    translated = translated.replace(" WITHOUT ROWID", "")
    return [statement.strip() for statement in translated.split(";") if statement.strip()]


TABLES_DDL = _postgres_ddl(SCHEMA)


def numbered(sql: str) -> str:
    """The shared SQL's '?' placeholders as PostgreSQL's $1, $2, ... (no '?' occurs otherwise)."""
    counter = iter(range(1, sql.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


def where(dsn: str) -> str:
    """The DSN's host, port and database, for messages (never a user or password)."""
    parts = urlsplit(dsn)
    return f"postgresql://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


ESCAPE = "\uffff"  # see "Text" in the module docstring
_NUL = "\x00"
_ESCAPED = re.compile(ESCAPE + "(.)", re.DOTALL)


def to_text(value: str) -> str:
    """`value` as stored: NUL and ESCAPE escaped (see the module docstring)."""
    return value.replace(ESCAPE, ESCAPE + ESCAPE).replace(_NUL, ESCAPE + "0")


def from_text(stored: str) -> str:
    """A stored string as it was given (to_text's inverse)."""
    return _ESCAPED.sub(lambda match: _NUL if match.group(1) == "0" else match.group(1), stored)


def _stored(value: Any) -> Any:
    return to_text(value) if value.__class__ is str and (_NUL in value or ESCAPE in value) else value


def stored_rows(rows: Sequence[Sequence[Any]]) -> Sequence[Sequence[Any]]:
    """`rows` to send: any with a str to escape copied, escaped (most rows have none: they go as they are)."""
    out: list[Sequence[Any]] | None = None
    for index, row in enumerate(rows):
        for value in row:
            if value.__class__ is str and (_NUL in value or ESCAPE in value):
                break
        else:
            continue
        if out is None:
            out = list(rows)
        out[index] = tuple(map(_stored, row))
    return rows if out is None else out


def _loaded(row: asyncpg.Record) -> tuple[Any, ...]:
    for value in row:
        if value.__class__ is str and ESCAPE in value:
            return tuple(from_text(each) if each.__class__ is str else each for each in row)
    return tuple(row)


class _Connection:
    """An asyncpg connection as the shared queries use it (sql.Db): strings escaped in, unescaped out."""

    def __init__(self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
        self.conn = conn

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return [_loaded(row) for row in await self.conn.fetch(numbered(sql), *stored_rows([params])[0])]


async def _migrate(db: Db, found: int) -> None:
    """From `found` (0: a new database) to SCHEMA_VERSION: the tables."""
    for statement in TABLES_DDL:
        await db.rows(statement)


class PostgresStatusStore(SqlReads):
    def __init__(self, dsn: str, *, password: str | None = None, pool_size: int = 10, timeout: float = 60.0,
                 fence: Fence | None = None) -> None:
        """`timeout`: seconds a statement, a connection attempt or a wait for a pooled
        connection may take (--store-timeout); past it, StoreUnavailableError."""
        self.fence = fence
        self._timeout = timeout
        self._dsn = dsn
        self._password = password
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._writer: asyncpg.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._units: set[asyncio.Task[Any]] = set()
        self._tokens = PageTokens("")

    @property
    def where(self) -> str:
        return where(self._dsn)

    def idle(self) -> bool:
        """No unit running and no pooled connection lent out (checked by tests)."""
        pool = self._pool
        lent = pool is not None and pool.get_size() - pool.get_idle_size() > 0
        return not self._units and not self._write_lock.locked() and not lent

    async def connect(self) -> asyncpg.Connection:
        """A connection of its own with this store's settings (password, search_path,
        application_name), for a session of the caller's (the lease, LISTEN); the caller closes it."""
        return await _unavailable_on_trouble(asyncpg.connect(self._dsn, **self._connect_args()), self.where)

    def _connect_args(self) -> dict[str, Any]:
        return {
            "password": self._password, "command_timeout": self._timeout, "timeout": self._timeout,
            "server_settings": {"search_path": PG_SCHEMA, "application_name": APPLICATION_NAME},
        }

    async def open(self) -> OpenedStore:
        """Connect; create the schema or migrate it to SCHEMA_VERSION (storage/schema.py),
        under SCHEMA_LOCK; SchemaTooNewError, with the database untouched, if a newer release made it."""
        try:
            if self._pool is None:  # opened again: the same pool
                self._pool = await _unavailable_on_trouble(asyncpg.create_pool(
                    self._dsn, min_size=1, max_size=self._pool_size, **self._connect_args()
                ), self.where)

            async def unit(conn: asyncpg.Connection) -> tuple[OpenedStore, str]:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                if await conn.fetchval("SELECT to_regclass('meta')") is None:  # a new database: the only DDL
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {PG_SCHEMA}")  # then, needing CREATE on it
                    await conn.execute(META_TABLE)
                return await open_in(_Connection(conn), _migrate, self.where)

            opened, secret = await self._writing(unit)
        except BaseException:
            await self.close()
            raise
        self._tokens = PageTokens(secret)
        log.info("status store: %s (schema %s), revision %d", self.where, PG_SCHEMA, opened.revision)
        return opened

    async def close(self) -> None:
        """Let units in flight finish, then close the writer's connection and the pool."""
        while self._units:
            await asyncio.gather(*list(self._units), return_exceptions=True)
        writer, pool = self._writer, self._pool
        self._writer = self._pool = None
        if writer is not None:
            await _quietly(writer.close(timeout=self._timeout), writer.terminate)
        if pool is not None:
            await _quietly(pool.close(), pool.terminate)

    async def commit(self, batch: WriteBatch) -> None:
        """One transaction: the fence, every row, NOTIFY CHANGES_CHANNEL with the latest revision."""
        tables = batch_rows(batch)
        latest = max((change.revision for change in batch.changes), default=None)
        fence = self.fence

        async def unit(conn: asyncpg.Connection) -> None:
            if fence is not None:
                await fence(conn)
            for statement, rows in tables:
                await conn.executemany(numbered(statement), stored_rows(rows))
            if latest is not None:
                await conn.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, str(latest))

        await self._writing(unit)

    async def _read(self, unit: Callable[[Db], Awaitable[R]]) -> R:
        pool = self._pool
        assert pool is not None, "open() first"

        async def run() -> R:
            async with pool.acquire(timeout=self._timeout) as conn, conn.transaction(
                isolation="repeatable_read", readonly=True
            ):
                return await unit(_Connection(conn))

        return await self._shielded(_unavailable_when_troubled(run, self.where), abandon=True)

    async def _write(self, unit: Callable[[Db], Awaitable[R]]) -> R:
        """A write other than commit() (the prune), fenced as commit() is."""
        fence = self.fence

        async def fenced(conn: asyncpg.Connection) -> R:
            if fence is not None:
                await fence(conn)
            return await unit(_Connection(conn))

        return await self._writing(fenced)

    async def _writing(self, unit: Callable[[asyncpg.Connection], Awaitable[R]]) -> R:
        """`unit` in one transaction on the writer's connection (reopened if it was lost)."""

        async def run() -> R:
            async with self._write_lock:
                if self._writer is None or self._writer.is_closed():
                    self._writer = await self.connect()
                writer = self._writer
                try:
                    async with writer.transaction():
                        return await unit(writer)
                except Exception as error:
                    if _is_trouble(error):  # whatever state it was left in, the next call starts afresh
                        writer.terminate()
                    raise

        return await self._shielded(_unavailable_when_troubled(run, self.where))

    async def _shielded(self, work: Coroutine[Any, Any, R], *, abandon: bool = False) -> R:
        """`work` as a unit of its own, awaited; `abandon`: cancelled (once) if the caller is."""
        task = asyncio.ensure_future(work)
        self._units.add(task)
        task.add_done_callback(self._settled)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if abandon:
                task.cancel()
            raise

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._units.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here so a unit whose caller left does not log "never retrieved".
            log.debug("database unit failed: %r", task.exception())


def _is_trouble(error: BaseException | None) -> bool:
    """The database, not the query, is at fault (see the module docstring). The
    error itself or the one it was raised while handling: a transaction's exit on
    a connection that died mid-statement fails with "the connection is closed".
    A statement on a connection whose backend the server has just ended raises,
    by timing, InternalClientError ("another operation is in progress"),
    InterfaceError ("connection is closed") or ConnectionDoesNotExistError (class 08)."""
    for each in (error, error.__context__ if error is not None else None):
        if isinstance(each, asyncpg.PostgresError):
            if str(getattr(each, "sqlstate", "") or "")[:2] in UNAVAILABLE_CLASSES:
                return True
        elif isinstance(each, OSError | TimeoutError | asyncpg.InternalClientError) or (
            isinstance(each, asyncpg.InterfaceError) and "connection is closed" in str(each)
        ):
            return True
    return False


async def _unavailable_on_trouble(work: Awaitable[R], where: str) -> R:
    try:
        return await work
    except Exception as error:
        if _is_trouble(error):
            raise StoreUnavailableError(f"the status database {where} cannot be used: {error}") from error
        raise


async def _unavailable_when_troubled(work: Callable[[], Awaitable[R]], where: str) -> R:
    """_unavailable_on_trouble of `work()`, made only once this runs (a unit cancelled
    before it starts leaves no coroutine behind that was never awaited)."""
    return await _unavailable_on_trouble(work(), where)


async def _quietly(closing: Awaitable[None], terminate: Callable[[], None]) -> None:
    """Close gracefully; on any trouble (the server gone), drop the connection(s) instead."""
    try:
        await closing
    except Exception:
        terminate()
