"""Feeds one replica's watches from the database's committed change log.

Every replica runs one (the lease holder too: there is one path). It LISTENs
on the store's notification channel (each commit transaction notifies, and
the notification is delivered only once it has committed) and, on every
notification and every `poll_interval` seconds, reads the change log after
the feed's latest revision to its end and publishes it to the local Feed, in
order. The notification is only the wake-up: the log is the truth, so a lost
notification (or a LISTEN connection that died) delays an update by at most
one poll interval and never loses it. Each catch-up also reads the committed
cursors of the followed orchestrators, so a read that asks for
`not_older_than` a position waits for the commit on every replica.

While the database cannot be read, it reports the trouble (health
NOT_SERVING, reads marked stale: see status_svc.replication.health) and
retries with backoff; once a catch-up succeeds again it reports it fine. Only
committed changes are ever published: nothing a watcher is told can be rolled
back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from stepstream.backoff import DEFAULT_BACKOFF, Backoff

from status_svc.ingest.progress import AppliedPositions
from status_svc.replication.health import DATABASE, DATABASE_ERRORS, INGEST, ReplicaHealth, describe
from status_svc.replication.lease import Connect
from status_svc.storage.base import StatusStore, StoredChange
from stepstream_common.errors import CURSOR_TOO_OLD, CursorOutOfRangeError
from stepstream_common.feed import Feed

log = logging.getLogger(__name__)


class ChangeTailer:
    """One replica's feed from the committed log (see the module docstring)."""

    def __init__(
        self,
        store: StatusStore,
        feed: Feed[StoredChange],
        applied: AppliedPositions,
        listen: Connect,
        *,
        channel: str,
        poll_interval: float,
        health: ReplicaHealth,
        page_size: int = 1000,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self._store = store
        self._feed = feed
        self._applied = applied
        self._listen = listen
        self._channel = channel
        self._poll_interval = poll_interval
        self._health = health
        self._page_size = page_size
        self._backoff = backoff
        self._wake = asyncio.Event()
        # Attempts that failed in a row (the backoff's input).
        self._failures = 0
        self.notifications = 0
        self.polls = 0

    async def run(self) -> None:
        """Tail until cancelled, through any database trouble."""
        while True:
            try:
                await self._tail()
            except DATABASE_ERRORS as error:
                reason = f"cannot read the status database: {describe(error)}"
                log.warning("%s; retrying", reason)
                await self._health.trouble(DATABASE, reason)
            await asyncio.sleep(self._backoff.delay(self._failures))
            self._failures += 1

    async def catch_up(self) -> None:
        """Publish every committed change after the feed's latest, then refresh the committed cursors."""
        while True:
            try:
                page = await self._store.read_changes(self._feed.latest, self._page_size)
            except CursorOutOfRangeError as error:
                if error.reason != CURSOR_TOO_OLD:
                    # The database is behind what this replica has published (restored
                    # from a backup?): its revisions would be given again. Not trouble
                    # to wait out: the tailer ends and with it the process (see app.py).
                    raise
                # Pruned past us (the database was unreachable for long): every watch
                # goes back to storage from its own cursor and learns it is too old.
                log.error("the change log was pruned past revision %d (oldest kept: %d); watches must resync",
                          self._feed.latest, error.oldest)
                self._feed.skip_to(error.oldest - 1)
                continue
            if page.items:
                self._feed.publish(page.items, page.items[-1].revision)
                # Whoever holds the lease commits again: ingest trouble seen here is over.
                await self._health.fine(INGEST)
            if len(page.items) < self._page_size:
                break
        self._applied.advance((await self._store.sources()).values())

    async def _tail(self) -> None:
        connection = await self._listen()
        try:
            await connection.add_listener(self._channel, self._notified)
            connection.add_termination_listener(self._terminated)
            self._wake.clear()
            await self.catch_up()
            await self._health.fine(DATABASE)
            self._failures = 0
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval):
                        await self._wake.wait()
                if not self._wake.is_set():
                    self.polls += 1
                self._wake.clear()
                if connection.is_closed():
                    raise ConnectionError("the LISTEN connection was closed")
                await self.catch_up()
        finally:
            connection.terminate()

    def _notified(self, connection: object, pid: int, channel: str, payload: object) -> None:
        self.notifications += 1
        self._wake.set()

    def _terminated(self, connection: object) -> None:
        self._wake.set()
