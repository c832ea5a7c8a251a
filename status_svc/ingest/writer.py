"""The single writer: folds what the followers bring, gives every change the
next revision, and commits state, change log and cursors in one transaction;
only then are the changes handed to watchers.

It takes everything queued at once (one transaction per batch under load, one
per message when idle, so batching adds no latency) and never waits on a
watcher. A crash at any point loses nothing and applies nothing twice: the
cursor is committed with the state it produced.

Revisions. Every job or step transition gets a revision of its own. Child
transitions change what watchers see only through their step's child counts,
so those of one step that arrive in the same transaction are folded into one
revision (its change-log row says how many: `child_events`); a job's pending
child revisions are assigned before its next job or step transition, so
within a job the change log keeps the order of the events. Each child row
carries the revision that last changed it.

Sources. A service may follow several orchestrators; each keeps its own jobs.
Job ids stay the key of the API (an orchestrator draws them at random), and the
first source whose `job` record creates a job owns it: an event from any other
source for that job is rejected, whatever it says. So is an event for a job
this service does not know unless the same item brings that job's creation (a
`job` record): the orchestrator sends a job's record before its steps, and a
snapshot item holds its job records (after their steps and children). Rejected
events are not applied but are passed over like applied ones (the cursor still
moves past them: a hostile or confused source cannot stall its own ingest),
and each (source, job, owner) is logged once per transaction, as a warning
naming the sources.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stepstream.common.v1 import records_pb2

from status_svc.domain.fold import Change, JobFold
from status_svc.domain.projection import freshness, job_status, step_stats
from status_svc.ingest.progress import AppliedPositions
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

# An event's record, with its kind (one of these three, compared by identity) and its job id.
JOB, STEP, CHILD = "job", "step", "child"
_Record = tuple[str, Any, str]


@dataclass
class _Job:
    fold: JobFold
    source: str
    lost: tuple[float | None, str] = (None, "")
    # Folded batches touching this job whose commit has not landed yet: while
    # any remains, the job must stay in memory (the database is behind it).
    uncommitted: int = 0


@dataclass(slots=True)
class _ChildGroup:
    """Child events of one step, folded into one revision: the last record
    (and its seq) of each child, and how many events there were."""

    children: dict[int, tuple[records_pb2.Child, int]] = field(default_factory=dict)
    events: int = 0


@dataclass
class _Pending:
    """What one transaction will write and publish. Rows are keyed so that an
    entity changed several times in one transaction is written once."""

    batch: WriteBatch = field(default_factory=WriteBatch)
    changes: list[StoredChange] = field(default_factory=list)
    jobs: dict[str, tuple[object, ...]] = field(default_factory=dict)
    steps: dict[tuple[str, str], tuple[object, ...]] = field(default_factory=dict)
    children: dict[tuple[str, str, int], tuple[object, ...]] = field(default_factory=dict)
    # job id -> step name -> child events not yet given a revision
    groups: dict[str, dict[str, _ChildGroup]] = field(default_factory=dict)
    # The latest revision once folded: what the feed announces after the commit.
    revision: int = 0
    # Jobs this transaction changes.
    touched: set[str] = field(default_factory=set)
    # (source, job id, owner: "" if none) -> events rejected, logged after the fold.
    rejected: dict[tuple[str, str, str], int] = field(default_factory=dict)


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
        followed: Sequence[str] = (),
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
        self.events_rejected = 0
        # What each log has committed up to: reads that must not be older wait on it.
        self.applied = AppliedPositions(sources.values(), followed)
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
        """Apply until stop(); a storage failure propagates (the service must not go on).

        Pipelined: the next batch is folded while the previous one commits on
        the database thread; commits (and the publishing after each) stay in order.
        """
        next_prune = time.monotonic() + self._prune_every
        committing: asyncio.Task[None] | None = None
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
                records, touched = await self._load_jobs(work)
                pending = self._fold(work, records, touched)
                if committing is not None:
                    await committing
                committing = asyncio.create_task(self._commit(pending), name="ingest-commit")
            if time.monotonic() >= next_prune:
                if committing is not None:
                    await committing
                    committing = None
                await self._store.prune(self._keep_changes)
                next_prune = time.monotonic() + self._prune_every
        if committing is not None:
            await committing

    async def stop(self) -> None:
        """Ask run() to return once everything queued is applied."""
        self._stopping = True
        await self._queue.put(None)

    def _fold(self, items: Sequence[IngestItem], records: Sequence[list[_Record]], touched: set[str]) -> _Pending:
        pending = _Pending()
        touched_sources: set[str] = set()
        for item, found in zip(items, records, strict=True):
            touched_sources.add(item.source)
            if isinstance(item, Events):
                self._apply_events(item, found, pending)
            elif isinstance(item, SnapshotApplied):
                self._apply_snapshot_end(item, pending)
            else:
                self._apply_health(item, pending)
        for job_id in list(pending.groups):
            self._flush_children(self._jobs[job_id], pending)
        for (address, job_id, owner), count in pending.rejected.items():
            self.events_rejected += count
            if owner:
                log.warning("rejected %d event(s) from %s for job %s: the job belongs to %s",
                            count, address, job_id, owner)
            else:
                log.warning("rejected %d event(s) from %s for job %s: its source never created it "
                            "(no job record for it)", count, address, job_id)
        pending.batch.jobs.extend(pending.jobs.values())
        pending.batch.steps.extend(pending.steps.values())
        pending.batch.children.extend(pending.children.values())
        pending.batch.sources.extend(tuple(self._sources[address]) for address in touched_sources)
        pending.revision = self._revision
        pending.touched = {job_id for job_id in touched if job_id in self._jobs}
        for job_id in pending.touched:
            self._jobs[job_id].uncommitted += 1
        return pending

    async def _commit(self, pending: _Pending) -> None:
        await self._store.commit(pending.batch)
        self._feed.publish(pending.changes, pending.revision)
        self.applied.advance(SourceRow(*row) for row in pending.batch.sources)
        # A finished job receives no more events; once all its changes are
        # committed it leaves memory (a stray event reads it back).
        for job_id in pending.touched:
            job = self._jobs[job_id]
            job.uncommitted -= 1
            if not job.uncommitted and job.fold.finished:
                del self._jobs[job_id]

    async def _load_jobs(self, items: Sequence[IngestItem]) -> tuple[list[list[_Record]], set[str]]:
        """Bring every job the items touch into memory (one read for all of them);
        return each event's record with its kind and job id (an empty list for
        other items), and the set of jobs touched.

        Only jobs not in memory are read, and a job stays in memory until every
        change to it is committed, so what is read is never behind.
        """
        wanted: set[str] = set()
        records: list[list[_Record]] = []
        for item in items:
            found: list[_Record] = []
            if isinstance(item, Events):
                for event in item.events:
                    kind = event.WhichOneof("record")
                    if kind == "child":
                        child = event.child
                        found.append((CHILD, child, child.job_id))
                    elif kind == "step":
                        step = event.step
                        found.append((STEP, step, step.job_id))
                    else:
                        job = event.job
                        found.append((JOB, job, job.id))
                wanted.update(record[2] for record in found)
            else:
                wanted.update(await self._store.unfinished_jobs(item.source))
            records.append(found)
        missing = [job_id for job_id in wanted if job_id not in self._jobs]
        if missing:
            for job_id, (fold, source, lost) in (await self._store.load_folds(missing)).items():
                self._jobs[job_id] = _Job(fold, source, lost)
        return records, wanted

    def _apply_events(self, item: Events, records: list[_Record], pending: _Pending) -> None:
        source = self.source(item.source)
        if source.log_id and item.log_id != source.log_id and item.from_stream:
            log.error("dropping events from %s: log %s, expected %s", item.source, item.log_id, source.log_id)
            return
        cursor = source.cursor
        from_stream = item.from_stream
        address = item.source
        jobs = self._jobs
        applied = 0
        # Jobs this item creates, found only when it mentions a job not yet known (rare).
        created: set[str] | None = None
        for event, (kind, record, job_id) in zip(item.events, records, strict=True):
            seq = event.seq
            if from_stream and seq <= cursor:
                continue
            job = jobs.get(job_id)
            if job is None:
                if created is None:
                    created = _created(item, records, cursor)
                if job_id not in created:
                    _reject(pending, address, job_id, "")
                    continue
                job = jobs[job_id] = _Job(JobFold(job_id), address)
            elif job.source != address:
                _reject(pending, address, job_id, job.source)
                continue
            applied += 1
            if kind is not CHILD:
                change = job.fold.apply_step(record, seq) if kind is STEP else job.fold.apply_job(record, seq)
                if change is not None:
                    self._record(job, change, pending)
                continue
            if job.fold.apply_child(record, seq) is None:
                continue
            groups = pending.groups.get(job_id)
            if groups is None:
                groups = pending.groups[job_id] = {}
            group = groups.get(record.step_name)
            if group is None:
                group = groups[record.step_name] = _ChildGroup()
            group.children[record.index] = (record, seq)
            group.events += 1
        self.events_applied += applied
        if from_stream and item.events:
            cursor = max(cursor, item.events[-1].seq)
        self._sources[item.source] = source._replace(log_id=source.log_id or item.log_id, cursor=cursor)

    def _apply_snapshot_end(self, item: SnapshotApplied, pending: _Pending) -> None:
        source = self.source(item.source)
        self._sources[item.source] = source._replace(log_id=item.log_id, cursor=item.seq)
        now = self._clock()
        for job in self._jobs.values():
            if job.source == item.source and not job.fold.finished and job.fold.job_id not in item.jobs_seen:
                job.lost = (now, f"unknown to {item.source} (log {item.log_id}): its data was replaced or pruned")
                self._record(job, _header_change(job), pending)

    def _apply_health(self, item: SourceHealth, pending: _Pending) -> None:
        source = self.source(item.source)
        if (source.stale_since is None) == (item.stale_since is None) and source.detail == item.detail:
            return
        self._sources[item.source] = source._replace(stale_since=item.stale_since, detail=item.detail)
        for job in self._jobs.values():
            if job.source == item.source and not job.fold.finished:
                self._record(job, _header_change(job), pending)

    def _record(self, job: _Job, change: Change, pending: _Pending) -> None:
        """Give a job or step transition the next revision, after the job's pending child events."""
        self._flush_children(job, pending)
        fold = job.fold
        revision = self._next_revision()
        header = None
        if change.header:
            source = self.source(job.source)
            stale_since, detail = (job.lost if job.lost[0] is not None else (source.stale_since, source.detail))
            status = job_status(fold, freshness(fold.state, job.source, stale_since, detail), revision)
            header = status.SerializeToString()
            pending.jobs[fold.job_id] = job_row(status, job.source, fold.job_version[1], job.lost)
        steps = self._encode_steps(fold, change.steps, revision, pending)
        self._log_change(pending, StoredChange(revision, fold.job_id, _name(fold), change.job_state_before,
                                               change.job_state_after, header, steps, 0))

    def _flush_children(self, job: _Job, pending: _Pending) -> None:
        """Give each step's pending child events of `job` one revision."""
        groups = pending.groups.pop(job.fold.job_id, None)
        if not groups:
            return
        fold = job.fold
        for step_name, group in groups.items():
            revision = self._next_revision()
            for index, (child, seq) in group.children.items():
                pending.children[(fold.job_id, step_name, index)] = child_row(child, seq, revision)
            steps = self._encode_steps(fold, [step_name], revision, pending)
            state = fold.state
            self._log_change(pending, StoredChange(revision, fold.job_id, _name(fold), state, state, None, steps,
                                                   group.events))

    def _next_revision(self) -> int:
        self._revision += 1
        return self._revision

    @staticmethod
    def _encode_steps(fold: JobFold, names: Sequence[str], revision: int, pending: _Pending) -> bytes | None:
        encoded = []
        for name in names:
            entry = fold.steps[name]
            stats = step_stats(name, entry, revision)
            encoded.append(stats.SerializeToString())
            pending.steps[(fold.job_id, name)] = step_row(fold.job_id, stats, entry.version[1])
        return wire.repeated(4, encoded) if encoded else None

    @staticmethod
    def _log_change(pending: _Pending, change: StoredChange) -> None:
        pending.batch.changes.append(tuple(change))
        pending.changes.append(change)


def _created(item: Events, records: list[_Record], cursor: int) -> set[str]:
    """The jobs whose `job` record `item` brings (and would apply): the jobs it may create."""
    return {
        job_id for event, (kind, _, job_id) in zip(item.events, records, strict=True)
        if kind is JOB and job_id and not (item.from_stream and event.seq <= cursor)
    }


def _reject(pending: _Pending, address: str, job_id: str, owner: str) -> None:
    """Count an event of `address` for a job it does not own (owner "": nobody)."""
    key = (address, job_id, owner)
    pending.rejected[key] = pending.rejected.get(key, 0) + 1


def _name(fold: JobFold) -> str:
    return fold.job.name if fold.job is not None else ""


def _header_change(job: _Job) -> Change:
    state = job.fold.state
    return Change(job.fold.job_id, header=True, job_state_before=state, job_state_after=state)
