"""The deployment's one ingest lease, with a fencing token, in a PostgreSQL row.

The row (table LEASE_TABLE) says who holds it (`holder`), its fencing token
(`epoch`, +1 at every acquisition), the backend pid of the holder's lease
connection (`holder_pid`) and when it expires (`expires_at`, database clock).

- Acquire is one UPDATE that succeeds only if the lease is free: expired, or
  its holder's lease connection is gone from pg_stat_activity (its process was
  killed: the server closed its backend), so a kill -9 is taken over at the
  next poll while a hung holder that keeps its connection (SIGSTOP) is taken
  over once its lease expires.
- The holder renews every TTL/3 on the same dedicated connection; a renewal
  that fails (the epoch moved, the connection is gone) is LeaseLost.
- The fence (fence_for) runs inside every commit transaction: it locks the row (FOR UPDATE)
  and lets the commit go on only if the epoch is still ours and unexpired.
  A takeover updates the same row, so it waits for a commit in flight, and a
  commit that starts after it sees the new epoch and rolls back: once the
  epoch has moved, the old holder can never commit. The fence also sets
  idle_in_transaction_session_timeout (to the TTL) for its transaction, so a
  holder frozen mid-commit cannot keep the row locked (and the takeover
  waiting) longer than that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from status_svc.replication.health import DATABASE_ERRORS, describe

log = logging.getLogger(__name__)

LEASE_TABLE = "ingest_lease"  # in the store's schema (the connections' search_path)
LEASE_NAME = "ingest"
# Serialises the table's creation between replicas starting at once (any constant of our own).
_CREATE_LOCK = 0x5374_6570_4C65_6173  # "StepLeas"

Connect = Callable[[], Awaitable[asyncpg.Connection]]
Fence = Callable[[asyncpg.Connection], Awaitable[None]]

_CREATE = f"""
CREATE TABLE IF NOT EXISTS {LEASE_TABLE} (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    holder_pid INTEGER NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
)"""
_SEED = f"""
INSERT INTO {LEASE_TABLE} (name, holder, epoch, holder_pid, expires_at)
VALUES ($1, '', 0, 0, '-infinity') ON CONFLICT (name) DO NOTHING"""
_ACQUIRE = f"""
UPDATE {LEASE_TABLE} AS lease
SET holder = $2, epoch = lease.epoch + 1, holder_pid = pg_backend_pid(),
    expires_at = clock_timestamp() + make_interval(secs => $3)
WHERE name = $1 AND (
    lease.expires_at <= clock_timestamp()
    OR NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = lease.holder_pid)
)
RETURNING epoch"""
_RENEW = f"""
UPDATE {LEASE_TABLE} SET expires_at = clock_timestamp() + make_interval(secs => $3), holder_pid = pg_backend_pid()
WHERE name = $1 AND epoch = $2
RETURNING epoch"""
_RELEASE = f"UPDATE {LEASE_TABLE} SET expires_at = '-infinity' WHERE name = $1 AND epoch = $2"
_FENCE = f"SELECT epoch, expires_at > clock_timestamp() FROM {LEASE_TABLE} WHERE name = $1 FOR UPDATE"
_HOLDER = f"SELECT holder, epoch, expires_at > clock_timestamp() FROM {LEASE_TABLE} WHERE name = $1"


class LeaseLost(Exception):
    """This replica does not hold the ingest lease (any more): it must not commit."""


async def create_lease_table(connection: asyncpg.Connection, name: str = LEASE_NAME) -> None:
    """Create the lease table and its row if missing (safe with several replicas starting at once).
    No DDL once the table exists: a replica's role then needs only rights on its rows."""
    async with connection.transaction():
        if await connection.fetchval("SELECT to_regclass($1)", LEASE_TABLE) is None:
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _CREATE_LOCK)
            await connection.execute(_CREATE)
        await connection.execute(_SEED, name)


class IngestLease:
    """One replica's side of the lease: try to acquire, renew, release, fence.

    Uses one connection of its own (made by `connect`), whose backend pid is
    what the row records: it must live as long as the holding does.
    """

    def __init__(self, connect: Connect, *, holder: str, ttl: float, name: str = LEASE_NAME) -> None:
        self._connect = connect
        self.holder = holder
        self.ttl = ttl
        self.name = name
        # The fencing token while held, else None.
        self.epoch: int | None = None
        self._connection: asyncpg.Connection | None = None

    async def try_acquire(self) -> int | None:
        """The new epoch if the lease was free and is now ours, else None."""
        connection = await self._open()
        epoch: int | None = await connection.fetchval(_ACQUIRE, self.name, self.holder, self.ttl)
        self.epoch = epoch
        return epoch

    async def renew(self) -> None:
        """Push the expiry a TTL ahead; LeaseLost if the lease is not ours any more."""
        epoch = self.epoch
        if epoch is None:
            raise LeaseLost("not holding the ingest lease")
        try:
            async with asyncio.timeout(self.ttl):
                renewed = await (await self._open()).fetchval(_RENEW, self.name, epoch, self.ttl)
        except DATABASE_ERRORS as error:
            self.epoch = None
            await self.close()
            raise LeaseLost(f"could not renew the ingest lease (epoch {epoch}): {describe(error)}") from error
        if renewed is None:
            self.epoch = None
            raise LeaseLost(f"the ingest lease (epoch {epoch}) was taken over")

    async def keep(self) -> None:
        """Renew every TTL/3 until cancelled; raises LeaseLost when that fails."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            await self.renew()

    async def release(self) -> None:
        """Give the lease up (if held), so another replica need not wait for it to expire."""
        epoch, self.epoch = self.epoch, None
        if epoch is None or self._connection is None or self._connection.is_closed():
            return
        try:
            await self._connection.execute(_RELEASE, self.name, epoch)
        except DATABASE_ERRORS as error:
            log.warning("could not release the ingest lease (epoch %d; it expires by itself): %s", epoch,
                        describe(error))

    def fence_for(self, epoch: int | None) -> Fence:
        """The store's fence for commits made under `epoch` (None: refuse every commit).

        Bound to the epoch of the term that made the batch, not to whatever this
        replica holds when the commit runs: a commit of an earlier term that
        reaches the database late (after this replica stepped down and won the
        lease again) is refused too."""

        async def fence(connection: asyncpg.Connection) -> None:
            await self._fence(connection, epoch)

        return fence

    async def _fence(self, connection: asyncpg.Connection, epoch: int | None) -> None:
        """Inside a commit transaction: go on only under `epoch`, ours and unexpired (see the module docstring)."""
        if epoch is None:
            raise LeaseLost("not holding the ingest lease")
        await connection.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', $1, true)", str(round(self.ttl * 1000))
        )
        row = await connection.fetchrow(_FENCE, self.name)
        if row is None or row[0] != epoch:
            if self.epoch == epoch:
                self.epoch = None
            raise LeaseLost(f"the ingest lease moved to epoch {row[0] if row else '?'} (this commit's was {epoch})")
        if not row[1]:
            raise LeaseLost(f"the ingest lease (epoch {epoch}) expired before this commit")

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            connection.terminate()

    async def _open(self) -> asyncpg.Connection:
        if self._connection is None or self._connection.is_closed():
            self._connection = await self._connect()
        return self._connection


async def lease_holder(connection: asyncpg.Connection, name: str = LEASE_NAME) -> tuple[str, int, bool] | None:
    """(holder, epoch, unexpired) of the lease row, None if there is none yet (for operators' tools and tests)."""
    row = await connection.fetchrow(_HOLDER, name)
    return None if row is None else (row[0], row[1], row[2])
