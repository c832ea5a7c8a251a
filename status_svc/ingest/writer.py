"""The single writer: folds what the followers bring, gives every change the
next revision, and commits state, change log and cursors in one transaction;
only then are the changes handed to watchers (by the writer itself, or, with
feed None, by whoever reads the committed log: several replicas on one
PostgreSQL database, see status_svc.replication).

It takes everything queued at once (one transaction per batch under load, one
per message when idle, so batching adds no latency) and never waits on a
watcher. A crash at any point loses nothing and applies nothing twice: the
cursor is committed with the state it produced.

Revisions are given by the projector (status_svc/domain/projector.py, where
the rules are): the writer hands it every change the fold makes, and commits
what it makes of one batch.

Sources. A service may follow several orchestrators; each keeps its own jobs.
Job ids stay the key of the API (an orchestrator draws them at random), and the
first source whose `job` record creates a job owns it: an event from any other
source for that job is rejected, whatever it says. So is an event for a job
this service does not know unless the same item brings that job's creation (a
`job` record): the orchestrator sends a job's record before its steps, and a
snapshot item holds its job records (after their steps and children). So is a
malformed event: no job id, or a job id or step name over MAX_KEY_CHARS. Rejected
events are not applied but are passed over like applied ones (the cursor still
moves past them: a hostile or confused source cannot stall its own ingest),
and each (source, job, owner) is logged once per transaction, as a warning
naming the sources.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stepstream.common.v1 import records_pb2
from stepstream.states import job_state_word

from status_svc.domain.fold import JobFold
from status_svc.domain.projection import Staleness
from status_svc.domain.projector import ChangeEntry, HeldJob, Projector, restore
from status_svc.ingest.progress import AppliedPositions
from status_svc.storage.base import Source, StatusStore, StoredChange, WriteBatch
from stepstream_common import wire
from stepstream_common.feed import Feed
from stepstream_common.metrics import IngestMetrics
from stepstream_common.tracing import Tracing

log = logging.getLogger(__name__)

MAX_EVENTS_PER_TRANSACTION = 5000
# The longest job id and step name an event may carry, in characters. They are keys of the store's
# indexes, and PostgreSQL refuses an index entry over about 2.7 kB (4 bytes a character at most): one
# such event would fail every commit. This service's orchestrator makes 16-character ids and step
# names of at most 100.
MAX_KEY_CHARS = 256
# The `owner` of a rejection for a malformed event (an address never holds a NUL).
MALFORMED = "\0"


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
class _Pending:
    """What one transaction will write, and then publish."""

    batch: WriteBatch
    changes: list[StoredChange]
    # The latest revision once folded: what the feed announces after the commit.
    revision: int
    # Jobs this transaction changes.
    touched: set[str]
    # Events it applies (for the metrics).
    events: int = 0
    # Job records it applies that carry a trace context (only when tracing).
    traced: list[records_pb2.Job] = dataclasses.field(default_factory=list)


class IngestWriter:
    def __init__(
        self,
        store: StatusStore,
        feed: Feed[StoredChange] | None,
        *,
        latest_revision: int,
        sources: dict[str, Source],
        keep_changes: int = 1_000_000,
        prune_every: float = 60.0,
        queue_size: int = 64,
        clock: Callable[[], float] = time.time,
        followed: Sequence[str] = (),
        metrics: IngestMetrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._store = store
        self._feed = feed
        self._metrics = metrics
        self._tracing = tracing
        self._sources = dict(sources)
        self._projector = Projector(latest_revision, lambda address: self.source(address).staleness)
        self._keep_changes = keep_changes
        self._prune_every = prune_every
        self._clock = clock
        self._queue: asyncio.Queue[IngestItem | None] = asyncio.Queue(queue_size)
        self._stopping = False
        self._jobs: dict[str, HeldJob] = {}
        # Folded batches touching each job whose commit has not landed yet: while
        # any remains, the job must stay in memory (the database is behind it).
        self._uncommitted: Counter[str] = Counter()
        self.events_applied = 0
        self.events_rejected = 0
        # Transactions committed (with changes or not): that commits land at all.
        self.commits = 0
        # What each log has committed up to: reads that must not be older wait on it.
        self.applied = AppliedPositions(sources.values(), followed)
        if feed is not None:
            feed.latest = latest_revision

    def source(self, address: str) -> Source:
        """What is known of `address` (its cursor counts everything submitted and applied)."""
        return self._sources.get(address) or Source(address)

    async def submit(self, item: IngestItem) -> None:
        """Queue `item` (waits while the queue is full: backpressure to the stream)."""
        await self._queue.put(item)

    async def run(self) -> None:
        """Apply until stop(); a storage failure propagates (the service must not go on).

        Pipelined: the next batch is folded while the previous one commits on
        the database thread; commits (and the publishing after each) stay in order.
        """
        next_prune = time.monotonic() + self._prune_every
        committing: asyncio.Task[None] | None = None
        try:
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
                if committing is not None and committing.done():
                    await committing  # raises what a commit that failed meanwhile raised
                    committing = None
                work = [item for item in items if item is not None]
                if work:
                    job_ids, touched = await self._load_jobs(work)
                    pending = self._fold(work, job_ids, touched)
                    if committing is not None:
                        await committing
                    committing = asyncio.create_task(self._commit(pending), name="ingest-commit")
                    committing.add_done_callback(self._wake_if_failed)
                if time.monotonic() >= next_prune:
                    if committing is not None:
                        await committing
                        committing = None
                    await self._store.prune(self._keep_changes)
                    next_prune = time.monotonic() + self._prune_every
            if committing is not None:
                await committing
        finally:
            if committing is not None and not committing.done():
                # Cancelled (a replica stepping down): the commit itself runs on,
                # shielded by the store, to its end; its task need not be awaited.
                committing.cancel()

    def _wake_if_failed(self, commit: asyncio.Task[None]) -> None:
        """A commit failed: wake run() now (it raises it), not when the next item arrives."""
        if not commit.cancelled() and commit.exception() is not None:
            with contextlib.suppress(asyncio.QueueFull):  # full: run() is about to take from it anyway
                self._queue.put_nowait(None)

    async def stop(self) -> None:
        """Ask run() to return once everything queued is applied."""
        self._stopping = True
        await self._queue.put(None)

    def _fold(self, items: Sequence[IngestItem], job_ids: Sequence[list[str]], touched: set[str]) -> _Pending:
        applied_before = self.events_applied
        touched_sources: set[str] = set()
        # (source, job id, owner: "" if none) -> events rejected, logged after the fold.
        rejected: Counter[tuple[str, str, str]] = Counter()
        for item, ids in zip(items, job_ids, strict=True):
            touched_sources.add(item.source)
            if isinstance(item, Events):
                self._apply_events(item, ids, rejected)
            elif isinstance(item, SnapshotApplied):
                self._apply_snapshot_end(item)
            else:
                self._apply_health(item)
        projection = self._projector.finish()
        for (address, job_id, owner), count in rejected.items():
            self.events_rejected += count
            if owner == MALFORMED:
                log.warning("rejected %d event(s) from %s: no job id, or a job id or step name over %d characters",
                            count, address, MAX_KEY_CHARS)
            elif owner:
                log.warning("rejected %d event(s) from %s for job %s: the job belongs to %s",
                            count, address, job_id, owner, extra={"job_id": job_id})
            else:
                log.warning("rejected %d event(s) from %s for job %s: its source never created it "
                            "(no job record for it)", count, address, job_id, extra={"job_id": job_id})
        changes = [_stored(entry) for entry in projection.changes]
        batch = WriteBatch(
            headers=list(projection.headers.values()), steps=list(projection.steps.values()),
            children=list(projection.children.values()), changes=changes,
            sources=[self._sources[address] for address in touched_sources],
        )
        pending = _Pending(batch, changes, self._projector.revision, touched & self._jobs.keys(),
                           self.events_applied - applied_before)
        if self._tracing is not None:
            pending.traced = [event.job for item in items if isinstance(item, Events) for event in item.events
                              if event.HasField("job") and event.job.trace_context]
        self._uncommitted.update(pending.touched)
        return pending

    async def _commit(self, pending: _Pending) -> None:
        started, started_ns = time.perf_counter(), time.time_ns()
        await self._store.commit(pending.batch)
        self.commits += 1
        if self._metrics is not None:
            self._metrics.committed(pending.events, time.perf_counter() - started)
        if self._tracing is not None:
            ended_ns = time.time_ns()
            for job in pending.traced:  # a span of this commit in each job's trace
                self._tracing.record(f"apply job {job_state_word(job.state)}", job.trace_context, started_ns,
                                     ended_ns, job_id=job.id, revision=pending.revision)
        if self._feed is not None:
            self._feed.publish(pending.changes, pending.revision)
        self.applied.advance(pending.batch.sources)
        # A finished job receives no more events; once all its changes are
        # committed it leaves memory (a stray event reads it back).
        for job_id in pending.touched:
            self._uncommitted[job_id] -= 1
            if not self._uncommitted[job_id]:
                del self._uncommitted[job_id]
                if self._jobs[job_id].fold.finished:
                    del self._jobs[job_id]

    async def _load_jobs(self, items: Sequence[IngestItem]) -> tuple[list[list[str]], set[str]]:
        """Bring every job the items touch into memory (one read for all of them);
        return the job id of each event (an empty list for other items), and the
        set of jobs touched.

        Only jobs not in memory are read, and a job stays in memory until every
        change to it is committed, so what is read is never behind.
        """
        wanted: set[str] = set()
        job_ids: list[list[str]] = []
        for item in items:
            ids: list[str] = []
            if isinstance(item, Events):
                ids = [_job_id(event) for event in item.events]
                wanted.update(ids)
            else:
                wanted.update(await self._store.unfinished_jobs(item.source))
            job_ids.append(ids)
        missing = [job_id for job_id in wanted if job_id not in self._jobs]
        if missing:
            for job_id, loaded in (await self._store.load_jobs(missing)).items():
                self._jobs[job_id] = restore(loaded)
        return job_ids, wanted

    def _apply_events(self, item: Events, job_ids: list[str], rejected: Counter[tuple[str, str, str]]) -> None:
        source = self.source(item.source)
        if source.log_id and item.log_id != source.log_id and item.from_stream:
            log.error("dropping events from %s: log %s, expected %s", item.source, item.log_id, source.log_id)
            return
        cursor = source.cursor
        from_stream = item.from_stream
        address = item.source
        jobs = self._jobs
        project = self._projector.project
        applied = 0
        # Jobs this item creates, found only when it mentions a job not yet known (rare).
        created: set[str] | None = None
        for event, job_id in zip(item.events, job_ids, strict=True):
            if from_stream and event.seq <= cursor:
                continue
            if not job_id:
                rejected[(address, "", MALFORMED)] += 1
                continue
            job = jobs.get(job_id)
            if job is None:
                if created is None:
                    created = _created(item, job_ids, cursor)
                if job_id not in created:
                    rejected[(address, job_id, "")] += 1
                    continue
                job = jobs[job_id] = HeldJob(JobFold(job_id), address)
            elif job.source != address:
                rejected[(address, job_id, job.source)] += 1
                continue
            applied += 1
            change = job.fold.apply(event)
            if change is not None:
                project(job, change)
        self.events_applied += applied
        if from_stream and item.events:
            cursor = max(cursor, item.events[-1].seq)
        self._sources[address] = dataclasses.replace(source, log_id=source.log_id or item.log_id, cursor=cursor)

    def _apply_snapshot_end(self, item: SnapshotApplied) -> None:
        source = self.source(item.source)
        self._sources[item.source] = dataclasses.replace(source, log_id=item.log_id, cursor=item.seq)
        lost = Staleness(
            self._clock(), f"unknown to {item.source} (log {item.log_id}): its data was replaced or pruned"
        )
        for job in self._jobs.values():
            if job.source == item.source and not job.fold.finished and job.fold.job_id not in item.jobs_seen:
                job.lost = lost
                self._projector.refresh(job)

    def _apply_health(self, item: SourceHealth) -> None:
        source = self.source(item.source)
        if (source.stale_since is None) == (item.stale_since is None) and source.detail == item.detail:
            return
        self._sources[item.source] = dataclasses.replace(source, stale_since=item.stale_since, detail=item.detail)
        for job in self._jobs.values():
            if job.source == item.source and not job.fold.finished:
                self._projector.refresh(job)


def _job_id(event: records_pb2.StepEvent) -> str:
    """The event's job id; "" for a malformed event: none, or a job id or step name over MAX_KEY_CHARS."""
    kind = event.WhichOneof("record")
    if kind == "child":
        job_id, step = event.child.job_id, event.child.step_name
    elif kind == "step":
        job_id, step = event.step.job_id, event.step.name
    else:
        job_id, step = event.job.id, ""
    return job_id if len(job_id) <= MAX_KEY_CHARS and len(step) <= MAX_KEY_CHARS else ""


def _created(item: Events, job_ids: list[str], cursor: int) -> set[str]:
    """The jobs whose `job` record `item` brings (and would apply): the jobs it may create."""
    return {
        job_id for event, job_id in zip(item.events, job_ids, strict=True)
        if job_id and event.HasField("job") and not (item.from_stream and event.seq <= cursor)
    }


def _stored(entry: ChangeEntry) -> StoredChange:
    """A change as stored and sent: its header and steps encoded once, for every watcher."""
    encoded = [stats.SerializeToString() for stats in entry.steps]
    return StoredChange(
        entry.revision, entry.job_id, entry.name, entry.state_before, entry.state_after,
        entry.header.SerializeToString() if entry.header is not None else None,
        wire.job_update_steps(encoded) if encoded else None, entry.child_events,
    )
