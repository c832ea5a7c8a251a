"""From what the fold changed to what is stored and what watchers replay. Pure.

Revisions. Every job or step transition gets a revision of its own. Child
transitions change what watchers see only through their step's child counts,
so those of one step that arrive in the same transaction are folded into one
revision (its change says how many: `child_events`); a job's pending child
revisions are assigned before its next job or step transition, so within a
job the change log keeps the order of the events. Each stored child carries
the revision that last changed it, each stored header and step the revision
of the last change that carried it.

What is stored is in the terms of the API (JobStatus, StepStats, the child's
record) with the seq that the fold's version rule needs; `restore` is the
inverse, what a restart rebuilds the fold from. A storage backend maps these
to its own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.status.v1 import status_service_pb2

from status_svc.domain.fold import NO_VERSION, Change, JobFold, StepEntry, job_version, work_version
from status_svc.domain.projection import Staleness, copy_job_fields, counter_of, freshness, job_status, step_stats


@dataclass(frozen=True, slots=True)
class StoredHeader:
    """A job's header as stored: what clients see (its revision inside), the
    source that owns the job, the seq of its last job event (0: none yet), and
    whether that source has lost the job. `status.freshness` is not stored:
    reads derive it from `lost` and the source's staleness."""

    status: status_service_pb2.JobStatus
    source: str
    seq: int
    lost: Staleness | None = None


@dataclass(frozen=True, slots=True)
class StoredStep:
    """A step's stats as stored (its revision inside), with the seq of its last
    step event (0: only its children have arrived)."""

    job_id: str
    stats: status_service_pb2.StepStats
    seq: int


@dataclass(frozen=True, slots=True)
class StoredChild:
    """A child's last record, the seq of its event and the revision that stored it."""

    record: records_pb2.Child
    seq: int
    revision: int


@dataclass(frozen=True, slots=True)
class ChildVersion:
    """What rebuilding a fold needs of a stored child (a fan-out may have thousands)."""

    step: str
    index: int
    state: int
    seq: int


@dataclass(frozen=True)
class LoadedJob:
    """A job as stored, enough to rebuild its fold."""

    header: StoredHeader
    steps: Sequence[StoredStep]
    children: Sequence[ChildVersion]


@dataclass(frozen=True, slots=True)
class ChangeEntry:
    """One revision of one job, for the change log: the header if it changed,
    the stats of the steps that changed, and how many child events it folds (0
    for a job or step transition)."""

    revision: int
    job_id: str
    name: str
    state_before: int
    state_after: int
    header: status_service_pb2.JobStatus | None
    steps: Sequence[status_service_pb2.StepStats]
    child_events: int


@dataclass
class Projection:
    """What one transaction stores and publishes. Keyed, so that an entity
    changed several times in one transaction is stored once, as it ended."""

    headers: dict[str, StoredHeader] = field(default_factory=dict)
    steps: dict[tuple[str, str], StoredStep] = field(default_factory=dict)
    children: dict[tuple[str, str, int], StoredChild] = field(default_factory=dict)
    changes: list[ChangeEntry] = field(default_factory=list)


@dataclass
class HeldJob:
    """A job as ingest holds it: its fold, the source that owns it, and
    whether that source has lost it (its data was replaced or pruned)."""

    fold: JobFold
    source: str
    lost: Staleness | None = None


@dataclass(slots=True)
class _ChildRun:
    """Child events of one step not yet given a revision: the last record of
    each child, and how many. Its entry shows the job and the step as they were
    during the run: it is flushed after the fold has applied the job's next
    transition, which the entry must not show (it precedes it in the log)."""

    name: str
    state: int
    step: StepEntry
    records: dict[int, records_pb2.Child] = field(default_factory=dict)
    events: int = 0


class Projector:
    """Gives changes their revisions and makes what one transaction stores and publishes.

    `stale(source)` is the source's staleness as of now: a header made now
    shows it (unless the job is lost, or finished)."""

    def __init__(self, revision: int, stale: Callable[[str], Staleness | None]) -> None:
        self._revision = revision
        self._stale = stale
        # job id -> its fold and, per step, the child events awaiting a revision
        self._runs: dict[str, tuple[JobFold, dict[str, _ChildRun]]] = {}
        self._out = Projection()

    @property
    def revision(self) -> int:
        """The latest revision given."""
        return self._revision

    def project(self, job: HeldJob, change: Change) -> None:
        """Take a change that JobFold.apply made to `job.fold`."""
        child = change.child
        if child is not None:
            fold = job.fold
            found = self._runs.get(change.job_id)
            if found is None:
                found = self._runs[change.job_id] = (fold, {})
            run = found[1].get(child.step_name)
            if run is None:
                step = fold.steps[child.step_name]
                run = found[1][child.step_name] = _ChildRun(
                    _name(fold), fold.state, StepEntry(step.record, step.version, step.children)
                )
            run.records[child.index] = child
            run.events += 1
            return
        self._flush(change.job_id)
        fold = job.fold
        revision = self._next_revision()
        header = None
        if change.header:
            stale = job.lost if job.lost is not None else self._stale(job.source)
            header = job_status(fold, freshness(fold.state, job.source, stale), revision)
            self._out.headers[fold.job_id] = StoredHeader(header, job.source, fold.job_version[1], job.lost)
        steps = [self._step(fold.job_id, name, fold.steps[name], revision) for name in change.steps]
        self._out.changes.append(ChangeEntry(
            revision, fold.job_id, _name(fold), change.job_state_before, change.job_state_after, header, steps, 0,
        ))

    def refresh(self, job: HeldJob) -> None:
        """The job's freshness changed (its source went stale or came back, or lost it): a header of its own."""
        state = job.fold.state
        self.project(job, Change(job.fold.job_id, header=True, job_state_before=state, job_state_after=state))

    def finish(self) -> Projection:
        """Everything projected since the last finish(), child events included: one transaction's worth."""
        for job_id in list(self._runs):
            self._flush(job_id)
        out, self._out = self._out, Projection()
        return out

    def _flush(self, job_id: str) -> None:
        """Give each step's pending child events of the job one revision."""
        found = self._runs.pop(job_id, None)
        if found is None:
            return
        fold, runs = found
        for step_name, run in runs.items():
            revision = self._next_revision()
            for index, record in run.records.items():
                seq = fold.children[(step_name, index)][1][1]
                self._out.children[(job_id, step_name, index)] = StoredChild(record, seq, revision)
            steps = [self._step(job_id, step_name, run.step, revision)]
            self._out.changes.append(ChangeEntry(
                revision, job_id, run.name, run.state, run.state, None, steps, run.events
            ))

    def _step(self, job_id: str, name: str, entry: StepEntry, revision: int) -> status_service_pb2.StepStats:
        stats = step_stats(name, entry, revision)
        self._out.steps[(job_id, name)] = StoredStep(job_id, stats, entry.version[1])
        return stats

    def _next_revision(self) -> int:
        self._revision += 1
        return self._revision


def _name(fold: JobFold) -> str:
    return fold.job.name if fold.job is not None else ""


# --- back to a fold -------------------------------------------------------------------------------------------


def restore(loaded: LoadedJob) -> HeldJob:
    """The held job that was stored: the inverse of what the projector stores."""
    header = loaded.header
    status = header.status
    job = _job_record(status, header.seq)
    fold = JobFold(
        job_id=status.id,
        job=job,
        job_version=job_version(job.state, header.seq) if job is not None else NO_VERSION,
        step_counts=counter_of(status.steps),
    )
    for step in loaded.steps:
        fold.steps[step.stats.name] = _step_entry(status.id, step.stats, step.seq)
    for child in loaded.children:
        fold.children[(child.step, child.index)] = (child.state, work_version(child.state, child.seq))
    return HeldJob(fold, header.source, header.lost)


def _job_record(status: status_service_pb2.JobStatus, seq: int) -> records_pb2.Job | None:
    """The fold's job record for a stored header (None if no job event arrived
    yet: seq 0 and state UNSPECIFIED, as in _step_entry)."""
    if seq <= 0 and status.state == s.JOB_STATE_UNSPECIFIED:
        return None
    job = records_pb2.Job(id=status.id)
    copy_job_fields(status, job)
    return job


def _step_entry(job_id: str, stats: status_service_pb2.StepStats, seq: int) -> StepEntry:
    """The fold's entry for stored stats. A step with no record yet (only
    children so far) is stored with seq 0 and state UNSPECIFIED; any record that
    won has a seq or a terminal state, so a record in an unknown state, or even
    an explicit UNSPECIFIED, is reloaded as the record it was."""
    record = None
    if seq > 0 or stats.state != s.STEP_STATE_UNSPECIFIED:
        record = records_pb2.Step(
            job_id=job_id, name=stats.name, index=stats.index, type=stats.type, state=stats.state,
            reason=stats.reason, message=stats.message, attempt=stats.attempt, max_attempts=stats.max_attempts,
        )
        for name in ("started_at", "finished_at"):
            if stats.HasField(name):
                getattr(record, name).CopyFrom(getattr(stats, name))
    version = work_version(stats.state, seq) if record is not None else NO_VERSION
    return StepEntry(record=record, version=version, children=counter_of(stats.children))
