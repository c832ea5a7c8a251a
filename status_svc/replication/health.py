"""What a replica tells health checks and readers while the database is in trouble.

Two kinds of trouble, each with its reason: DATABASE (the change tailer cannot
read the database: a cut connection, a restarted or unreachable server) and
INGEST (this replica held the lease and its commits failed: e.g. a disk-full
error). While either lasts, grpc.health says NOT_SERVING for every service
name (a load balancer sends readers to another replica) and every read that
still gets an answer shows unfinished jobs stale with the reason (a reader
that stays is never shown silently old data); a read the database cannot
answer fails UNAVAILABLE with the reason. When the last trouble clears, both
turn back by themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import asyncpg

from stepstream_common.errors import UnavailableError
from stepstream_common.rpc import describe_error

log = logging.getLogger(__name__)

DATABASE = "database"
INGEST = "ingest"

# What the database (or the way to it) raises when it cannot do its part right
# now. asyncpg.InternalClientError included: a statement on a connection whose
# backend the server has just ended (pg_terminate_backend, a restart) raises it,
# InterfaceError or ConnectionDoesNotExistError, depending on timing.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
    UnavailableError,
)


def describe(error: BaseException) -> str:
    """One line, bounded: what a reader and a log are told of a database error."""
    text = describe_error(error)
    return text if len(text) <= 300 else text[:300] + "…"


class ReplicaHealth:
    def __init__(
        self, set_serving: Callable[[bool], Awaitable[None]], set_stale: Callable[[str | None], None]
    ) -> None:
        self._set_serving = set_serving
        self._set_stale = set_stale
        # kind -> reason, for each trouble that lasts.
        self.problems: dict[str, str] = {}

    @property
    def serving(self) -> bool:
        return not self.problems

    async def trouble(self, kind: str, reason: str) -> None:
        """`kind` of trouble began (or goes on, for `reason`)."""
        if self.problems.get(kind) == reason:
            return
        first = not self.problems
        self.problems[kind] = reason
        self._set_stale(self._reasons())
        if first:
            log.error("health NOT_SERVING: %s", reason)
            await self._set_serving(False)

    async def fine(self, kind: str) -> None:
        """`kind` of trouble is over (if it was there)."""
        if self.problems.pop(kind, None) is None:
            return
        if self.problems:
            self._set_stale(self._reasons())
            return
        log.warning("health SERVING again: the %s trouble is over", kind)
        self._set_stale(None)
        await self._set_serving(True)

    def _reasons(self) -> str:
        return "; ".join(self.problems.values())
