"""What the SDK hands out: frozen dataclasses mapped field by field from server messages.

Nothing here computes a status, a count or a progress figure: every value is a
field the server sent (enums become their lower-case words, Timestamps become
UTC datetimes, Durations become seconds). The only client-side facts are the
watch's connection state (`JobView.live`, `JobView.last_heard`), which say how
current the data is, not what it says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from stepstream.common.v1 import records_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2
from stepstream.states import (
    TERMINAL_JOB_STATES,
    job_state_word,
    reason_word,
    step_state_word,
)
from stepstream.status.v1 import status_service_pb2

TERMINAL_JOB_WORDS = frozenset(job_state_word(state) for state in TERMINAL_JOB_STATES)


@dataclass(frozen=True)
class ChildCounts:
    """A fan-out step's children by state, as counted by the status service."""

    total: int = 0
    pending: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    # In a state the status service does not know (a newer orchestrator's); each
    # child keeps its raw state on the server.
    unknown: int = 0


@dataclass(frozen=True)
class StepCounts:
    """A job's steps by state, as counted by the status service."""

    total: int = 0
    pending: int = 0
    running: int = 0
    waiting: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    skipped: int = 0
    # In a state the status service does not know (a newer orchestrator's); each
    # step keeps its raw state on the server.
    unknown: int = 0


@dataclass(frozen=True)
class StepView:
    name: str
    index: int
    type: str
    state: str
    reason: str
    message: str
    attempt: int
    max_attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    # finished_at - started_at as the server computed it; None until finished.
    duration: float | None
    children: ChildCounts
    # The revision of the last change to this step.
    revision: int


@dataclass(frozen=True)
class JobSummary:
    """A job's header as the status service persisted it (what ListJobs returns)."""

    id: str
    name: str
    state: str
    reason: str
    message: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None
    # Who submitted and who cancelled the job: the names of their tokens ("" when
    # nobody cancelled it, or the orchestrator runs without tokens).
    submitted_by: str
    cancelled_by: str
    step_counts: StepCounts
    # Server freshness: the job is unfinished and its orchestrator cannot be followed.
    stale: bool
    stale_since: datetime | None
    stale_detail: str
    # Address of the orchestrator the job comes from.
    source: str
    # For a summary: the revision of the header's last change. For a JobView:
    # the revision the whole view is valid at (a watch can resume after it).
    revision: int

    @property
    def terminal(self) -> bool:
        """The server says the job has ended (its state is one marked terminal in the contract)."""
        return self.state in TERMINAL_JOB_WORDS


@dataclass(frozen=True)
class JobView(JobSummary):
    """A job with its steps (in definition order), valid at `revision`."""

    steps: tuple[StepView, ...] = ()
    # Connection state of the watch that produced the view (always True for
    # get()): False while the watch is reconnecting or has heard nothing for
    # stale_after_heartbeats heartbeat intervals. Not server data, so left out
    # of equality: a watched view equals the fetched view of the same state.
    live: bool = field(default=True, compare=False)
    # When the last message arrived from the status service (None for get()).
    last_heard: datetime | None = field(default=None, compare=False)

    def step(self, name: str) -> StepView:
        """The step called `name`; KeyError if the job has none."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


@dataclass(frozen=True)
class JobsView:
    """Every job a watch's filter matches (newest first), valid at `revision`."""

    jobs: tuple[JobSummary, ...]
    revision: int
    # As JobView's: the watch's connection state, not server data.
    live: bool = field(default=True, compare=False)
    last_heard: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ChildView:
    """One child of a fan-out step."""

    index: int
    item: str
    state: str
    reason: str
    message: str
    attempt: int
    started_at: datetime | None
    finished_at: datetime | None
    duration: float | None
    revision: int


@dataclass(frozen=True)
class JobRecord:
    """A job as the orchestrator recorded it (what SubmitJob and CancelJob answer)."""

    id: str
    name: str
    state: str
    reason: str
    message: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None
    # As in JobSummary: token names, "" without auth.
    submitted_by: str
    cancelled_by: str


@dataclass(frozen=True)
class SubmittedJob(JobRecord):
    # The seq of the job's first event in the orchestrator's log, and that log's id.
    seq: int = 0
    log_id: str = ""

    @property
    def position(self) -> LogPosition:
        """Pass as `not_older_than` to read this job from the status service at once."""
        return LogPosition(self.log_id, self.seq)


@dataclass(frozen=True)
class LogPosition:
    """A point in one orchestrator's event log: reads that name it wait until it is applied."""

    log_id: str
    seq: int

    def message(self) -> status_service_pb2.LogPosition:
        return status_service_pb2.LogPosition(log_id=self.log_id, seq=self.seq)


# The words of orchestrator_service.OutputStream, as LogLine.stream and the `streams` filter take them.
OUTPUT_STREAM_WORDS: dict[str, int] = {
    "stdout": orchestrator_service_pb2.OUTPUT_STREAM_STDOUT,
    "stderr": orchestrator_service_pb2.OUTPUT_STREAM_STDERR,
    "notice": orchestrator_service_pb2.OUTPUT_STREAM_NOTICE,
}
_OUTPUT_STREAMS = {value: word for word, value in OUTPUT_STREAM_WORDS.items()}


@dataclass(frozen=True)
class LogLine:
    """One line a step (or a fan-out child: `child`) printed in one attempt, as
    the bytes it wrote without the newline; `text` decodes them. `number` is
    the line's place in the attempt (0 first). `stream` is "stdout", "stderr",
    or "notice" (the orchestrator's own line, e.g. "… 123,456 bytes dropped …").
    `continued`: the step's line goes on in the next line of that stream (it was
    longer than a line may be)."""

    step: str
    child: int | None
    attempt: int
    number: int
    stream: str
    data: bytes
    time: datetime
    continued: bool

    @property
    def text(self) -> str:
        """The bytes as UTF-8, with a replacement character for each invalid sequence."""
        return self.data.decode("utf-8", errors="replace")


def log_line(step: str, child: int | None, attempt: int, line: orchestrator_service_pb2.OutputLine) -> LogLine:
    return LogLine(step, child, attempt, line.number, _OUTPUT_STREAMS.get(line.stream, f"unknown({line.stream})"),
                   line.data, line.time.ToDatetime(tzinfo=UTC), line.continued)


@dataclass(frozen=True)
class OutputSummary:
    """One attempt's output, measured without reading it (ListOutput): `lines`
    and `bytes` kept, `dropped_bytes` not kept; `state` its final state once
    `finished`, else "unspecified"."""

    step: str
    child: int | None
    attempt: int
    lines: int
    bytes: int
    dropped_bytes: int
    first_retained_line: int
    finished: bool
    state: str


def output_summary(summary: orchestrator_service_pb2.OutputSummary) -> OutputSummary:
    return OutputSummary(
        summary.step, summary.child if summary.HasField("child") else None, summary.attempt, summary.lines,
        summary.bytes, summary.dropped_bytes, summary.first_retained_line, summary.finished,
        step_state_word(summary.state),
    )


def when(message: Message, name: str) -> datetime | None:
    """A Timestamp field as an aware UTC datetime, None when unset."""
    if not message.HasField(name):
        return None
    stamp: Timestamp = getattr(message, name)
    return stamp.ToDatetime(tzinfo=UTC)


def seconds_of(message: Message, name: str) -> float | None:
    if not message.HasField(name):
        return None
    value: Duration = getattr(message, name)
    return value.ToNanoseconds() / 1e9


def child_counts(counts: records_pb2.ChildCounts) -> ChildCounts:
    return ChildCounts(counts.total, counts.pending, counts.running, counts.completed, counts.failed,
                       counts.cancelled, counts.unknown)


def step_counts(counts: status_service_pb2.StepCounts) -> StepCounts:
    return StepCounts(counts.total, counts.pending, counts.running, counts.waiting, counts.completed,
                      counts.failed, counts.cancelled, counts.skipped, counts.unknown)


def step_view(stats: status_service_pb2.StepStats) -> StepView:
    return StepView(
        name=stats.name, index=stats.index, type=stats.type, state=step_state_word(stats.state),
        reason=reason_word(stats.reason), message=stats.message, attempt=stats.attempt,
        max_attempts=stats.max_attempts, started_at=when(stats, "started_at"),
        finished_at=when(stats, "finished_at"), duration=seconds_of(stats, "duration"),
        children=child_counts(stats.children), revision=stats.revision,
    )


def _header(status: status_service_pb2.JobStatus) -> dict[str, Any]:
    """The header fields JobSummary and JobView share, by name."""
    fresh = status.freshness
    return {
        "id": status.id, "name": status.name, "state": job_state_word(status.state),
        "reason": reason_word(status.reason), "message": status.message,
        "created_at": when(status, "created_at"), "started_at": when(status, "started_at"),
        "finished_at": when(status, "finished_at"), "cancel_requested_at": when(status, "cancel_requested_at"),
        "submitted_by": status.submitted_by, "cancelled_by": status.cancelled_by,
        "step_counts": step_counts(status.steps), "stale": fresh.stale,
        "stale_since": when(fresh, "stale_since"), "stale_detail": fresh.detail, "source": fresh.source,
    }


def job_summary(status: status_service_pb2.JobStatus) -> JobSummary:
    return JobSummary(**_header(status), revision=status.revision)


def job_view(
    status: status_service_pb2.JobStatus,
    steps: list[status_service_pb2.StepStats],
    revision: int,
    *,
    live: bool = True,
    last_heard: datetime | None = None,
) -> JobView:
    """The view of a header and its steps (ordered by their index in the definition)."""
    ordered = sorted(steps, key=lambda stats: (stats.index, stats.name))
    return JobView(
        **_header(status),
        revision=revision, steps=tuple(step_view(stats) for stats in ordered), live=live, last_heard=last_heard,
    )


def child_view(child: status_service_pb2.ChildStatus) -> ChildView:
    return ChildView(
        index=child.index, item=child.item, state=step_state_word(child.state), reason=reason_word(child.reason),
        message=child.message, attempt=child.attempt, started_at=when(child, "started_at"),
        finished_at=when(child, "finished_at"), duration=seconds_of(child, "duration"), revision=child.revision,
    )


def _record_fields(job: records_pb2.Job) -> dict[str, Any]:
    return {
        "id": job.id, "name": job.name, "state": job_state_word(job.state), "reason": reason_word(job.reason),
        "message": job.message, "created_at": when(job, "created_at"), "started_at": when(job, "started_at"),
        "finished_at": when(job, "finished_at"), "cancel_requested_at": when(job, "cancel_requested_at"),
        "submitted_by": job.submitted_by, "cancelled_by": job.cancelled_by,
    }


def job_record(job: records_pb2.Job) -> JobRecord:
    return JobRecord(**_record_fields(job))


def submitted_job(response: orchestrator_service_pb2.SubmitJobResponse) -> SubmittedJob:
    return SubmittedJob(**_record_fields(response.job), seq=response.seq, log_id=response.log_id)
