"""What clients see, made from what the fold holds.

Counts are kept by bucket (status_svc.domain.fold): a bucket of its own for
each state with a count field, UNKNOWN for the rest, which maps to the
`unknown` field. Records keep their raw state and reason, whatever the value.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.states import TERMINAL_JOB_STATES
from stepstream.status.v1 import status_service_pb2

from status_svc.domain.fold import CHILD_COUNTED, STEP_COUNTED, UNKNOWN, JobFold, StepEntry
from stepstream_common.timeutil import seconds


def _count_field(state: int) -> str:
    """StepCounts and ChildCounts name their fields after the states (STEP_STATE_RUNNING: running)."""
    return s.StepState.Name(s.StepState.ValueType(state)).removeprefix("STEP_STATE_").lower()


_STEP_COUNT_FIELDS: dict[int, str] = {state: _count_field(state) for state in STEP_COUNTED} | {UNKNOWN: "unknown"}
_CHILD_COUNT_FIELDS: dict[int, str] = {state: _count_field(state) for state in CHILD_COUNTED} | {UNKNOWN: "unknown"}


@dataclass(frozen=True)
class Staleness:
    """Since when, and why, what is held may be out of date: its source cannot
    be followed, or no longer knows the job."""

    since: float
    detail: str


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


def _set_times(
    record: records_pb2.Step | records_pb2.Child, message: status_service_pb2.StepStats | status_service_pb2.ChildStatus
) -> None:
    """Copy the record's start and end into `message`, and the one place a duration
    is computed: from those, if both are set.

    In whole nanoseconds: through float seconds it would be off by up to ~0.2µs."""
    if record.HasField("started_at"):
        message.started_at.CopyFrom(record.started_at)
    if record.HasField("finished_at"):
        message.finished_at.CopyFrom(record.finished_at)
    started, finished = message.started_at, message.finished_at
    if seconds(started) is not None and seconds(finished) is not None:
        message.duration.FromNanoseconds(max(0, finished.ToNanoseconds() - started.ToNanoseconds()))


def step_stats(name: str, entry: StepEntry, revision: int) -> status_service_pb2.StepStats:
    stats = status_service_pb2.StepStats(name=name, children=child_counts(entry.children), revision=revision)
    record = entry.record
    if record is not None:
        stats.index, stats.type = record.index, record.type
        stats.state, stats.reason, stats.message = record.state, record.reason, record.message
        stats.attempt, stats.max_attempts = record.attempt, record.max_attempts
        _set_times(record, stats)
    return stats


def freshness(job_state: int, source: str, staleness: Staleness | None) -> status_service_pb2.Freshness:
    """A finished job is never stale: its state is final whatever happens to its source."""
    message = status_service_pb2.Freshness(source=source)
    if staleness is not None and job_state not in TERMINAL_JOB_STATES:
        message.stale = True
        message.stale_since.FromNanoseconds(round(staleness.since * 1e9))
        message.detail = staleness.detail
    return message


def job_status(
    fold: JobFold, fresh: status_service_pb2.Freshness, revision: int
) -> status_service_pb2.JobStatus:
    status = status_service_pb2.JobStatus(
        id=fold.job_id, steps=step_counts(fold.step_counts), freshness=fresh, revision=revision
    )
    if fold.job is not None:
        copy_job_fields(fold.job, status)
    return status


# What a job record and a job's header both hold by the same names, besides the id.
_JOB_VALUES = ("name", "state", "reason", "message", "submitted_by", "cancelled_by")
_JobTime = Literal["created_at", "started_at", "finished_at", "cancel_requested_at"]
_JOB_TIMES: tuple[_JobTime, ...] = ("created_at", "started_at", "finished_at", "cancel_requested_at")


def copy_job_fields(
    source: records_pb2.Job | status_service_pb2.JobStatus, target: records_pb2.Job | status_service_pb2.JobStatus
) -> None:
    """Copy into `target` what a job record and its header share: one list of fields
    both for projecting a record into a header and for restoring a record from a stored one."""
    for name in _JOB_VALUES:
        setattr(target, name, getattr(source, name))
    for time_field in _JOB_TIMES:
        if source.HasField(time_field):
            getattr(target, time_field).CopyFrom(getattr(source, time_field))


def child_status(child: records_pb2.Child, revision: int) -> status_service_pb2.ChildStatus:
    status = status_service_pb2.ChildStatus(
        index=child.index, item=child.item, state=child.state, reason=child.reason, message=child.message,
        attempt=child.attempt, revision=revision,
    )
    _set_times(child, status)
    return status
