"""The single writer: folds what the followers bring, gives every change the
next revision, and commits state, change log and cursors in one transaction;
only then are the changes handed to watchers.

It takes everything queued at once (one transaction per batch under load, one
per message when idle, so batching adds no latency) and never waits on a
watcher. A crash at any point loses nothing and applies nothing twice: the
cursor is committed with the state it produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from stepstream.v1 import records_pb2

from status_svc.domain.fold import Change, JobFold
from status_svc.domain.views import freshness, job_status, step_stats
from status_svc.storage.base import SourceRow, StatusStore, StoredChange, WriteBatch
from status_svc.storage.sqlite import child_row, job_row, step_row
from stepstream_common import wire
from stepstream_common.feed import Feed

log = logging.getLogger(__name__)

MAX_EVENTS_PER_TRANSACTION = 5000


@dataclass(frozen=True)
class Events:
    """Events from one orchestrator. Stream batches move the cursor to the last
    seq; snapshot pages (cursor None) do not: their records carry old seqs."""

    source: str
    log_id: str
    events: Sequence[records_pb2.StepEvent]
    from_stream: bool = True


@dataclass(frozen=True)
class SnapshotApplied:
    """A snapshot of `source` valid at `seq` has been fully submitted: continue
    after it. Unfinished jobs of the source that it did not contain are marked
    lost (the orchestrator no longer knows them)."""

    source: str
    log_id: str
    seq: int
    jobs_seen: frozenset[str]


@dataclass(frozen=True)
class SourceHealth:
    """Whether `source` can be followed; stale_since None means it can."""

    source: str
    stale_since: float | None
    detail: str = ""


IngestItem = Events | SnapshotApplied | SourceHealth


@dataclass
class _Job:
    fold: JobFold
    source: str
    lost: tuple[float | None, str] = (None, "")


@dataclass
class _Pending:
    """What one transaction will write and publish."""

    batch: WriteBatch = field(default_factory=WriteBatch)
    changes: list[StoredChange] = field(default_factory=list)
    jobs: dict[str, tuple[object, ...]] = field(default_factory=dict)
    steps: dict[tuple[str, str], tuple[object, ...]] = field(default_factory=dict)


def _job_of(event: records_pb2.StepEvent) -> str:
    kind = event.WhichOneof("record")
    if kind == "job":
        return event.job.id
    return event.step.job_id if kind == "step" else event.child.job_id


class IngestWriter:
    def __init__(
        self,
        store: StatusStore,
        feed: Feed[StoredChange],
        *,
        latest_revision: int,
        sources: dict[str, SourceRow],
        keep_changes: int = 1_000_000,
        prune_every: float = 60.0,
        queue_size: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._feed = feed
        self._revision = latest_revision
        self._sources = dict(sources)
        self._keep_changes = keep_changes
        self._prune_every = prune_every
        self._clock = clock
        self._queue: asyncio.Queue[IngestItem | None] = asyncio.Queue(queue_size)
        self._stopping = False
        self._jobs: dict[str, _Job] = {}
        self.events_applied = 0
        feed.latest = latest_revision

    @property
    def revision(self) -> int:
        return self._revision

    def source(self, address: str) -> SourceRow:
        """What is known of `address` (its cursor counts everything submitted and applied)."""
        return self._sources.get(address) or SourceRow(address, "", 0, None, "")

    async def submit(self, item: IngestItem) -> None:
        """Queue `item` (waits while the queue is full: backpressure to the stream)."""
        await self._queue.put(item)

    async def run(self) -> None:
        """Apply until stop(); a storage failure propagates (the service must not go on)."""
        next_prune = time.monotonic() + self._prune_every
        while not (self._stopping and self._queue.empty()):
            items: list[IngestItem | None] = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_prune - time.monotonic())):
                    items.append(await self._queue.get())
            size = 0
            while not self._queue.empty() and size < MAX_EVENTS_PER_TRANSACTION:
                item = self._queue.get_nowait()
                items.append(item)
                if isinstance(item, Events):
                    size += len(item.events)
            work = [item for item in items if item is not None]
            if work:
                await self._apply(work)
            if time.monotonic() >= next_prune:
                await self._store.prune(self._keep_changes)
                next_prune = time.monotonic() + self._prune_every

    async def stop(self) -> None:
        """Ask run() to return once everything queued is applied."""
        self._stopping = True
        await self._queue.put(None)

    async def _apply(self, items: Sequence[IngestItem]) -> None:
        await self._load_jobs(items)
        pending = _Pending()
        touched_sources: set[str] = set()
        for item in items:
            touched_sources.add(item.source)
            if isinstance(item, Events):
                self._apply_events(item, pending)
            elif isinstance(item, SnapshotApplied):
                self._apply_snapshot_end(item, pending)
            else:
                self._apply_health(item, pending)
        pending.batch.jobs.extend(pending.jobs.values())
        pending.batch.steps.extend(pending.steps.values())
        pending.batch.sources.extend(tuple(self._sources[address]) for address in touched_sources)
        await self._store.commit(pending.batch)
        self._feed.publish(pending.changes, self._revision)
        for job_id in [job_id for job_id, job in self._jobs.items() if job.fold.finished]:
            del self._jobs[job_id]

    async def _load_jobs(self, items: Sequence[IngestItem]) -> None:
        """Bring every job the items touch into memory (one read for all of them)."""
        wanted: set[str] = set()
        for item in items:
            if isinstance(item, Events):
                wanted.update(_job_of(event) for event in item.events)
            else:
                wanted.update(await self._store.unfinished_jobs(item.source))
        missing = [job_id for job_id in wanted if job_id not in self._jobs]
        for job_id, (fold, source, lost) in (await self._store.load_folds(missing)).items():
            self._jobs[job_id] = _Job(fold, source, lost)

    def _apply_events(self, item: Events, pending: _Pending) -> None:
        source = self.source(item.source)
        if source.log_id and item.log_id != source.log_id and item.from_stream:
            log.error("dropping events from %s: log %s, expected %s", item.source, item.log_id, source.log_id)
            return
        cursor = source.cursor
        for event in item.events:
            if item.from_stream and event.seq <= cursor:
                continue
            job_id = _job_of(event)
            job = self._jobs.get(job_id)
            if job is None:
                job = self._jobs[job_id] = _Job(JobFold(job_id), item.source)
            change = job.fold.apply(event)
            if change is not None:
                self._record(job, change, pending, event.seq)
            self.events_applied += 1
        if item.from_stream and item.events:
            cursor = max(cursor, item.events[-1].seq)
        self._sources[item.source] = source._replace(log_id=source.log_id or item.log_id, cursor=cursor)

    def _apply_snapshot_end(self, item: SnapshotApplied, pending: _Pending) -> None:
        source = self.source(item.source)
        self._sources[item.source] = source._replace(log_id=item.log_id, cursor=item.seq)
        now = self._clock()
        for job in self._jobs.values():
            if job.source == item.source and not job.fold.finished and job.fold.job_id not in item.jobs_seen:
                job.lost = (now, f"unknown to {item.source} (log {item.log_id}): its data was replaced or pruned")
                self._record(job, _header_change(job), pending, None)

    def _apply_health(self, item: SourceHealth, pending: _Pending) -> None:
        source = self.source(item.source)
        if (source.stale_since is None) == (item.stale_since is None) and source.detail == item.detail:
            return
        self._sources[item.source] = source._replace(stale_since=item.stale_since, detail=item.detail)
        for job in self._jobs.values():
            if job.source == item.source and not job.fold.finished:
                self._record(job, _header_change(job), pending, None)

    def _record(self, job: _Job, change: Change, pending: _Pending, seq: int | None) -> None:
        """Give `change` the next revision and add its rows and its change-log entry."""
        self._revision += 1
        revision = self._revision
        fold = job.fold
        header = None
        if change.header:
            source = self.source(job.source)
            stale_since, detail = (job.lost if job.lost[0] is not None else (source.stale_since, source.detail))
            status = job_status(fold, freshness(fold.state, job.source, stale_since, detail), revision)
            header = status.SerializeToString()
            pending.jobs[fold.job_id] = job_row(status, job.source, fold.job_version[1], job.lost)
        encoded_steps = []
        for name in change.steps:
            entry = fold.steps[name]
            stats = step_stats(name, entry, revision)
            encoded_steps.append(stats.SerializeToString())
            pending.steps[(fold.job_id, name)] = step_row(fold.job_id, stats, entry.version[1])
        if change.child is not None and seq is not None:
            pending.batch.children.append(child_row(change.child, seq, revision))
        steps = wire.repeated(4, encoded_steps) if encoded_steps else None
        name = fold.job.name if fold.job is not None else ""
        stored = StoredChange(revision, fold.job_id, name, change.job_state_before, change.job_state_after,
                              header, steps)
        pending.batch.changes.append(tuple(stored))
        pending.changes.append(stored)


def _header_change(job: _Job) -> Change:
    state = job.fold.state
    return Change(job.fold.job_id, header=True, job_state_before=state, job_state_after=state)
