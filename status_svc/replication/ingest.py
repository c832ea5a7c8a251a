"""Ingest under the lease: a replica ingests only while it holds it.

LeasedIngest competes for the lease every poll interval. Once it holds it,
it reads where the database stands (latest revision, every source's cursor)
*after* acquiring, so that its projector continues the global revisions and
its followers resume from the committed cursors, and starts a term: a writer,
one follower per orchestrator and the lease renewal. The term ends at the
first of: the lease lost (a renewal failed, or a commit's fence saw another
epoch), a database error in the writer, any other failure of its tasks (a
bug: logged with its traceback and handled like a database error, so that a
poison one replica chokes on does not stop every replica from serving
reads), or a stop. Then the followers and the writer are stopped at once (a
commit still in flight is fenced: it lands only if the lease is still ours),
their in-memory state is dropped, the lease is released, and the replica is a
reader again, competing for the lease (after a backoff if the term ended in
trouble: health NOT_SERVING and reads stale until commits land again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from stepstream.backoff import DEFAULT_BACKOFF, Backoff

from status_svc.ingest.follower import OrchestratorFollower
from status_svc.ingest.writer import IngestWriter
from status_svc.replication.health import DATABASE_ERRORS, INGEST, ReplicaHealth, describe
from status_svc.replication.lease import IngestLease, LeaseLost
from status_svc.storage.base import OpenedStore
from status_svc.storage.postgres import PostgresStatusStore

log = logging.getLogger(__name__)


@dataclass
class Term:
    """What ingests during one holding of the lease."""

    epoch: int
    writer: IngestWriter
    followers: list[OrchestratorFollower]


# Builds a term's writer and followers from where the database stands.
MakeTerm = Callable[[OpenedStore], tuple[IngestWriter, list[OrchestratorFollower]]]


class LeasedIngest:
    def __init__(
        self,
        store: PostgresStatusStore,
        lease: IngestLease,
        make: MakeTerm,
        *,
        poll_interval: float,
        health: ReplicaHealth,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self._store = store
        self.lease = lease
        store.fence = lease.fence_for(None)  # no commit outside a term
        self._make = make
        self._poll_interval = poll_interval
        self._health = health
        self._backoff = backoff
        self.term: Term | None = None
        self.terms = 0
        self._stopping = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._follower_tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        """Compete, ingest while holding, step down, again: until cancelled or stop()ped."""
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    epoch = await self.lease.try_acquire()
                except DATABASE_ERRORS as error:
                    log.warning("cannot compete for the ingest lease: %s", describe(error))
                    await self.lease.close()
                    await self._pause(self._backoff.delay(failures))
                    failures += 1
                    continue
                if epoch is None:
                    await self._pause(self._poll_interval)
                    continue
                try:
                    await self._hold(epoch)
                    failures = 0
                except LeaseLost as error:
                    log.warning("stepping down: %s; reading only", error)
                except Exception as error:  # the database's trouble, or a bug: never a reason to stop serving
                    reason = f"ingest failed: {describe(error)}"
                    log.error("stepping down (epoch %d): %s", epoch, reason,
                              exc_info=None if isinstance(error, DATABASE_ERRORS) else error)
                    await self._health.trouble(INGEST, reason)
                    failures += 1
                finally:
                    await self.lease.release()
                await self._pause(self._backoff.delay(failures))
        finally:
            await self.lease.close()  # however run() ends, its session ends with it

    async def stop(self) -> None:
        """Graceful: stop following and let the writer commit what it has (under the
        lease); run() then releases the lease and returns."""
        self._stopping.set()
        await _cancel(self._follower_tasks)
        term, writer_task = self.term, self._writer_task
        if term is not None and writer_task is not None and not writer_task.done():
            await term.writer.stop()
            await asyncio.gather(writer_task, return_exceptions=True)

    async def _hold(self, epoch: int) -> None:
        log.info("holding the ingest lease (epoch %d, holder %s)", epoch, self.lease.holder)
        self._store.fence = self.lease.fence_for(epoch)
        opened = OpenedStore(await self._store.latest_revision(), await self._store.sources())
        if self._stopping.is_set():
            return
        writer, followers = self._make(opened)
        self.term = Term(epoch, writer, followers)
        self.terms += 1
        self._writer_task = asyncio.create_task(writer.run(), name=f"ingest-writer-{epoch}")
        self._follower_tasks = [asyncio.create_task(f.run(), name=f"follow-{f.address}") for f in followers]
        keeper = asyncio.create_task(self.lease.keep(), name=f"lease-{epoch}")
        tasks = {self._writer_task, keeper, *self._follower_tasks}
        try:
            while True:
                done, _ = await asyncio.wait(tasks, timeout=self._poll_interval, return_when=asyncio.FIRST_COMPLETED)
                if done:
                    break
                if writer.commits:
                    # Its commits land (with changes or not: the log may not move): any
                    # ingest trouble this replica reported is over.
                    await self._health.fine(INGEST)
            if self._stopping.is_set():
                await asyncio.gather(self._writer_task, return_exceptions=True)
                return
            ended = done.pop()
            if ended.cancelled():
                raise RuntimeError(f"{ended.get_name()} was cancelled")
            error = ended.exception()
            if error is not None:
                raise error
            raise RuntimeError(f"{ended.get_name()} ended unexpectedly")
        finally:
            await _cancel([*self._follower_tasks, self._writer_task, keeper])
            self.term = None
            self._writer_task = None
            self._follower_tasks = []

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less if stop() is called meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
