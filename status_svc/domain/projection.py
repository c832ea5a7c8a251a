"""What clients see, made from what the fold holds (and back, to reload a fold).

Counts are kept by bucket (status_svc.domain.fold): a bucket of its own for
each state with a count field, UNKNOWN for the rest, which maps to the
`unknown` field. Records keep their raw state and reason, whatever the value.
"""

from __future__ import annotations

from collections import Counter

from google.protobuf.timestamp_pb2 import Timestamp
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.states import TERMINAL_JOB_STATES
from stepstream.status.v1 import status_service_pb2

from status_svc.domain.fold import (
    CHILD_COUNTED,
    UNKNOWN,
    JobFold,
    StepEntry,
    job_version,
    work_version,
)
from stepstream_common.timeutil import seconds

_STEP_COUNT_FIELDS: dict[int, str] = {
    s.STEP_STATE_PENDING: "pending",
    s.STEP_STATE_RUNNING: "running",
    s.STEP_STATE_WAITING: "waiting",
    s.STEP_STATE_COMPLETED: "completed",
    s.STEP_STATE_FAILED: "failed",
    s.STEP_STATE_CANCELLED: "cancelled",
    s.STEP_STATE_SKIPPED: "skipped",
    UNKNOWN: "unknown",
}
_CHILD_COUNT_FIELDS: dict[int, str] = {
    bucket: name for bucket, name in _STEP_COUNT_FIELDS.items() if bucket in CHILD_COUNTED or bucket == UNKNOWN
}


def _fill(message: records_pb2.ChildCounts | status_service_pb2.StepCounts, fields: dict[int, str],
          counts: Counter[int]) -> None:
    # Added, not set: a key without a field of its own (never one the fold makes) is still counted, as unknown.
    for bucket, count in counts.items():
        name = fields.get(bucket, "unknown")
        setattr(message, name, getattr(message, name) + count)


def step_counts(counts: Counter[int]) -> status_service_pb2.StepCounts:
    message = status_service_pb2.StepCounts(total=sum(counts.values()))
    _fill(message, _STEP_COUNT_FIELDS, counts)
    return message


def child_counts(counts: Counter[int]) -> records_pb2.ChildCounts:
    message = records_pb2.ChildCounts(total=sum(counts.values()))
    _fill(message, _CHILD_COUNT_FIELDS, counts)
    return message


def counter_of(counts: records_pb2.ChildCounts | status_service_pb2.StepCounts) -> Counter[int]:
    """The fold's counter (by bucket) of persisted counts: `unknown` becomes UNKNOWN."""
    fields = _STEP_COUNT_FIELDS if isinstance(counts, status_service_pb2.StepCounts) else _CHILD_COUNT_FIELDS
    return Counter({bucket: getattr(counts, name) for bucket, name in fields.items() if getattr(counts, name)})


def _duration_of(message: status_service_pb2.StepStats | status_service_pb2.ChildStatus,
                 started: Timestamp, finished: Timestamp) -> None:
    # In whole nanoseconds: through float seconds it would be off by up to ~0.2µs.
    if seconds(started) is not None and seconds(finished) is not None:
        message.duration.FromNanoseconds(max(0, finished.ToNanoseconds() - started.ToNanoseconds()))


def step_stats(name: str, entry: StepEntry, revision: int) -> status_service_pb2.StepStats:
    stats = status_service_pb2.StepStats(name=name, children=child_counts(entry.children), revision=revision)
    record = entry.record
    if record is not None:
        stats.index, stats.type = record.index, record.type
        stats.state, stats.reason, stats.message = record.state, record.reason, record.message
        stats.attempt, stats.max_attempts = record.attempt, record.max_attempts
        if record.HasField("started_at"):
            stats.started_at.CopyFrom(record.started_at)
        if record.HasField("finished_at"):
            stats.finished_at.CopyFrom(record.finished_at)
        _duration_of(stats, record.started_at, record.finished_at)
    return stats


def step_entry(job_id: str, stats: status_service_pb2.StepStats, seq: int) -> StepEntry:
    """The fold's entry for persisted stats. A step with no record yet (only
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
    version = work_version(stats.state, seq) if record is not None else (False, 0)
    return StepEntry(record=record, version=version, children=counter_of(stats.children))


def freshness(
    job_state: int, source: str, stale_since: float | None, detail: str
) -> status_service_pb2.Freshness:
    """A finished job is never stale: its state is final whatever happens to its source."""
    message = status_service_pb2.Freshness(source=source)
    if stale_since is not None and job_state not in TERMINAL_JOB_STATES:
        message.stale = True
        message.stale_since.FromNanoseconds(round(stale_since * 1e9))
        message.detail = detail
    return message


def job_status(
    fold: JobFold, fresh: status_service_pb2.Freshness, revision: int
) -> status_service_pb2.JobStatus:
    status = status_service_pb2.JobStatus(
        id=fold.job_id, steps=step_counts(fold.step_counts), freshness=fresh, revision=revision
    )
    job = fold.job
    if job is not None:
        status.name, status.state, status.reason, status.message = job.name, job.state, job.reason, job.message
        for name in ("created_at", "started_at", "finished_at", "cancel_requested_at"):
            if job.HasField(name):
                getattr(status, name).CopyFrom(getattr(job, name))
    return status


def job_record(status: status_service_pb2.JobStatus, seq: int) -> records_pb2.Job | None:
    """The fold's job record for a persisted header and the seq of its last job
    event (None if no job event arrived yet: seq 0 and state UNSPECIFIED, as
    in step_entry)."""
    if seq <= 0 and status.state == s.JOB_STATE_UNSPECIFIED:
        return None
    job = records_pb2.Job(id=status.id, name=status.name, state=status.state, reason=status.reason,
                          message=status.message)
    for name in ("created_at", "started_at", "finished_at", "cancel_requested_at"):
        if status.HasField(name):
            getattr(job, name).CopyFrom(getattr(status, name))
    return job


def job_fold(
    status: status_service_pb2.JobStatus,
    seq: int,
    steps: list[tuple[status_service_pb2.StepStats, int]],
    children: list[tuple[str, int, int, int]],
) -> JobFold:
    """Rebuild the fold of a persisted job: its header (with the seq of its last
    job event), its steps' stats with their seqs, and (step, index, state, seq)
    of every child."""
    job = job_record(status, seq)
    fold = JobFold(
        job_id=status.id,
        job=job,
        job_version=job_version(job.state, seq) if job is not None else (False, 0),
        step_counts=counter_of(status.steps),
    )
    for stats, step_seq in steps:
        fold.steps[stats.name] = step_entry(status.id, stats, step_seq)
    for step_name, index, state, child_seq in children:
        fold.children[(step_name, index)] = (state, work_version(state, child_seq))
    return fold


def child_status(child: records_pb2.Child, revision: int) -> status_service_pb2.ChildStatus:
    status = status_service_pb2.ChildStatus(
        index=child.index, item=child.item, state=child.state, reason=child.reason, message=child.message,
        attempt=child.attempt, revision=revision,
    )
    if child.HasField("started_at"):
        status.started_at.CopyFrom(child.started_at)
    if child.HasField("finished_at"):
        status.finished_at.CopyFrom(child.finished_at)
    _duration_of(status, child.started_at, child.finished_at)
    return status
