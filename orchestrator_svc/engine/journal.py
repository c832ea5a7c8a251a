"""The event log's single writer: numbers events, commits them in groups, and
only then hands them to streams.

Callers append synchronously, so seq order is exactly the order in which the
orchestrator decided things. A background task commits whatever has piled up
in one transaction (group commit: one batch per loop turn under load, one
event at a time when idle, so batching adds no latency) and then publishes.

Batches are bounded (MAX_BATCH) because encoding a batch and building its rows
runs on the event loop: a thousand events cost it about a millisecond. A
caller that appends a great many events at once (a large fan-out creating or
stopping its children) appends them in chunks and awaits room() between them,
so it neither holds the loop nor piles up uncommitted events faster than they
are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from stepstream.common.v1 import records_pb2

from orchestrator_svc.storage.base import EventStore, NewJob, StoredEvent
from stepstream_common.feed import Feed
from stepstream_common.metrics import OrchestratorMetrics

log = logging.getLogger(__name__)

MAX_BATCH = 1000
# room() waits while more events than this await their commit.
MAX_BACKLOG = 2 * MAX_BATCH


@dataclass(frozen=True)
class Retention:
    """Events beyond the newest `keep_events` are dropped; finished jobs older
    than `job_days` days are forgotten (job, steps, children)."""

    keep_events: int = 1_000_000
    job_days: float = 7.0
    every_seconds: float = 60.0


class JournalFailed(RuntimeError):
    """The log could not be written; nothing more can be promised durable."""


class Journal:
    def __init__(
        self,
        store: EventStore,
        feed: Feed[StoredEvent],
        *,
        latest_seq: int,
        retention: Retention,
        metrics: OrchestratorMetrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._feed = feed
        self._retention = retention
        self._next_seq = latest_seq + 1
        self._committed = latest_seq
        self._pending: list[tuple[records_pb2.StepEvent, NewJob | None]] = []
        self._wake = asyncio.Event()
        self._committed_changed = asyncio.Condition()
        self._closing = False
        self._failure: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        feed.latest = latest_seq

    @property
    def committed_seq(self) -> int:
        return self._committed

    @property
    def appended_seq(self) -> int:
        """The last seq given out, committed or not."""
        return self._next_seq - 1

    def append(self, event: records_pb2.StepEvent, new_job: NewJob | None = None) -> int:
        """Give `event` the next seq and queue it for commit; returns the seq."""
        if self._failure is not None:
            raise JournalFailed("the event log is not writable") from self._failure
        if self._closing:
            raise JournalFailed("the event log is closed")
        event.seq = self._next_seq
        self._next_seq += 1
        self._pending.append((event, new_job))
        self._wake.set()
        return event.seq

    async def room(self) -> None:
        """Let the loop run, then return once at most MAX_BACKLOG events await
        their commit: the pause a producer of many events takes between chunks."""
        await asyncio.sleep(0)
        if len(self._pending) <= MAX_BACKLOG:
            return
        async with self._committed_changed:
            await self._committed_changed.wait_for(
                lambda: len(self._pending) <= MAX_BACKLOG or self._failure is not None
            )
        if self._failure is not None:
            raise JournalFailed("the event log is not writable") from self._failure

    async def durable(self, seq: int) -> None:
        """Return once `seq` is committed."""
        async with self._committed_changed:
            await self._committed_changed.wait_for(lambda: self._committed >= seq or self._failure is not None)
        if self._committed < seq:
            raise JournalFailed("the event log is not writable") from self._failure

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._write_forever(), name="journal-writer")
        return self._task

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _write_forever(self) -> None:
        next_prune = time.monotonic() + self._retention.every_seconds
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), max(0.0, next_prune - time.monotonic()))
                if self._pending:
                    await self._commit(self._pending[:MAX_BATCH])
                if time.monotonic() >= next_prune:
                    await self._store.prune(self._retention.keep_events, self._retention.job_days * 86400.0)
                    next_prune = time.monotonic() + self._retention.every_seconds
        except BaseException as error:
            self._failure = error
            log.critical("event log write failed; no further events can be recorded", exc_info=True)
            async with self._committed_changed:
                self._committed_changed.notify_all()
            raise

    async def _commit(self, batch: Sequence[tuple[records_pb2.StepEvent, NewJob | None]]) -> None:
        encoded = [(event, event.SerializeToString()) for event, _ in batch]
        new_jobs = [new_job for _, new_job in batch if new_job is not None]
        started = time.perf_counter()
        await self._store.append(encoded, new_jobs)
        if self._metrics is not None:
            self._metrics.committed(len(batch), time.perf_counter() - started)
        del self._pending[: len(batch)]
        self._committed = batch[-1][0].seq
        self._feed.publish([StoredEvent(event.seq, data) for event, data in encoded], self._committed)
        async with self._committed_changed:
            self._committed_changed.notify_all()
