"""Every change to a job, step or child record goes through here: checked
against the state machine, time-stamped, and appended to the journal as an
event carrying the record's full new value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.states import job_state_word, step_state_word

from orchestrator_svc.domain import machine
from orchestrator_svc.engine.journal import Journal
from orchestrator_svc.storage.base import NewJob
from stepstream_common.metrics import OrchestratorMetrics
from stepstream_common.timeutil import timestamp


class Recorder:
    def __init__(
        self, journal: Journal, clock: Callable[[], float] = time.time, metrics: OrchestratorMetrics | None = None
    ) -> None:
        self._journal = journal
        self._clock = clock
        self._metrics = metrics

    def create_job(
        self, job: records_pb2.Job, steps: Sequence[records_pb2.Step], new_job: NewJob
    ) -> int:
        """Record a new job and its steps, all PENDING; returns the job event's seq."""
        now = self._clock()
        job.state = machine.INITIAL_JOB_STATE
        job.created_at.CopyFrom(timestamp(now))
        seq = self._journal.append(records_pb2.StepEvent(time=timestamp(now), job=job), new_job)
        for step in steps:
            step.state = machine.INITIAL_STEP_STATE
            self._journal.append(records_pb2.StepEvent(time=timestamp(now), step=step))
        return seq

    def create_children(self, children: Iterable[records_pb2.Child]) -> None:
        """Record `children` PENDING. A large fan-out passes them a chunk at a
        time, with yield_to_writer() between chunks."""
        now = timestamp(self._clock())
        for child in children:
            child.state = machine.INITIAL_STEP_STATE
            self._journal.append(records_pb2.StepEvent(time=now, child=child))

    async def yield_to_writer(self) -> None:
        """Let the loop run, and wait while the journal's uncommitted backlog is
        over its bound (Journal.room): what keeps recording a chunk of many
        events from blocking the loop or growing memory without bound."""
        await self._journal.room()

    def job(self, job: records_pb2.Job, state: int, reason: int = 0, message: str = "") -> int:
        machine.check_job(job.state, state, f"job {job.id}")
        now = self._clock()
        job.state, job.reason, job.message = s.JobState.ValueType(state), s.Reason.ValueType(reason), message
        if state == s.JOB_STATE_RUNNING and not job.HasField("started_at"):
            job.started_at.CopyFrom(timestamp(now))
        if machine.job_is_terminal(state):
            job.finished_at.CopyFrom(timestamp(now))
            if self._metrics is not None:
                since = job.started_at if job.HasField("started_at") else job.created_at
                self._metrics.finish("jobs", job_state_word(state), now - since.ToNanoseconds() / 1e9)
        return self._journal.append(records_pb2.StepEvent(time=timestamp(now), job=job))

    def cancel_requested(self, job: records_pb2.Job, cancelled_by: str) -> int:
        """Record that `cancelled_by` (a token name, "" without auth) asked to cancel the job."""
        machine.check_job(job.state, job.state, f"job {job.id}")
        now = self._clock()
        job.cancel_requested_at.CopyFrom(timestamp(now))
        job.cancelled_by = cancelled_by
        job.message = "cancellation requested"
        return self._journal.append(records_pb2.StepEvent(time=timestamp(now), job=job))

    def step(
        self,
        step: records_pb2.Step,
        state: int,
        reason: int = 0,
        message: str = "",
        attempt: int | None = None,
    ) -> int:
        machine.check_step(step.state, state, f"step {step.job_id}/{step.name}")
        now = self._clock()
        _apply(step, now, state, reason, message, attempt)
        if self._metrics is not None and machine.step_is_terminal(state):
            self._finished("steps", step, state, now)
        return self._journal.append(records_pb2.StepEvent(time=timestamp(now), step=step))

    def child(
        self,
        child: records_pb2.Child,
        state: int,
        reason: int = 0,
        message: str = "",
        attempt: int | None = None,
    ) -> int:
        machine.check_child(child.state, state, f"child {child.job_id}/{child.step_name}[{child.index}]")
        now = self._clock()
        _apply(child, now, state, reason, message, attempt)
        if self._metrics is not None and machine.step_is_terminal(state):
            self._finished("children", child, state, now)
        return self._journal.append(records_pb2.StepEvent(time=timestamp(now), child=child))

    def _finished(self, kind: str, record: records_pb2.Step | records_pb2.Child, state: int, now: float) -> None:
        assert self._metrics is not None
        seconds = now - record.started_at.ToNanoseconds() / 1e9 if record.HasField("started_at") else None
        self._metrics.finish(kind, step_state_word(state), seconds)


def pending_child(job_id: str, step_name: str, index: int, item: str) -> records_pb2.Child:
    """A child's record as create_children() recorded it: what a fan-out
    rebuilds from the child's index when it starts or stops a child, instead
    of keeping a record in memory for every child that has not started."""
    return records_pb2.Child(
        job_id=job_id, step_name=step_name, index=index, item=item, state=machine.INITIAL_STEP_STATE
    )


def _apply(
    record: records_pb2.Step | records_pb2.Child,
    now: float,
    state: int,
    reason: int,
    message: str,
    attempt: int | None,
) -> None:
    record.state, record.reason = s.StepState.ValueType(state), s.Reason.ValueType(reason)
    record.message = message
    if attempt is not None:
        record.attempt = attempt
    if state == s.STEP_STATE_RUNNING and not record.HasField("started_at"):
        record.started_at.CopyFrom(timestamp(now))
    if machine.step_is_terminal(state):
        record.finished_at.CopyFrom(timestamp(now))
