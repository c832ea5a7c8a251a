"""Accepts, cancels and recovers jobs; owns the runs in flight."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from typing import Any

from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import definition_pb2
from stepstream.states import job_state_word

from orchestrator_svc.domain import machine, rules
from orchestrator_svc.domain.spec import stored_definition, validate_job
from orchestrator_svc.engine.journal import Journal
from orchestrator_svc.engine.recorder import Recorder
from orchestrator_svc.engine.runner import JobRun, RunSettings, stop_everything
from orchestrator_svc.storage.base import EventStore, NewJob, StoredJob
from orchestrator_svc.workers.registry import WorkerRegistry
from stepstream_common.errors import FailedPreconditionError, NotFoundError, quoted
from stepstream_common.wire import clone

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        store: EventStore,
        journal: Journal,
        recorder: Recorder,
        workers: WorkerRegistry,
        settings: RunSettings,
    ) -> None:
        self._store = store
        self._journal = journal
        self._recorder = recorder
        self._workers = workers
        self._settings = settings
        self._runs: dict[str, JobRun] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._submitting: dict[str, asyncio.Task[tuple[records_pb2.Job, int]]] = {}
        self._accepting = True

    @property
    def active_jobs(self) -> int:
        return len(self._runs)

    def is_running(self, job_id: str) -> bool:
        """Whether `job_id` is in flight here (its output must stay)."""
        return job_id in self._runs

    async def recover(self) -> int:
        """End the jobs a previous process left in flight; returns how many."""
        unfinished = await self._store.unfinished_jobs()
        for found in unfinished:
            cause = rules.left_in_flight(cancel_requested=found.job.HasField("cancel_requested_at"))
            await stop_everything(self._recorder, found.job, found.steps, found.children, cause)
        if unfinished:
            await self._journal.durable(self._journal.appended_seq)
            log.warning("ended %d job(s) left in flight by a previous run", len(unfinished))
        return len(unfinished)

    async def submit(
        self, definition: definition_pb2.JobDefinition, request_id: str = "", *, submitted_by: str = ""
    ) -> tuple[records_pb2.Job, int]:
        """Validate, durably record and start a job; returns it and its first seq.
        `submitted_by`: the caller's token name, kept in the job record.

        The submission runs as a task of its own that the caller awaits through a
        shield: a caller cancelled between recording the job and starting it would
        otherwise leave a job PENDING forever. Concurrent submits with one
        request_id share that task.
        """
        if not self._accepting:
            raise FailedPreconditionError("the orchestrator is shutting down")
        submission = self._submitting.get(request_id) if request_id else None
        if submission is None:
            submission = asyncio.create_task(self._submit_once(definition, request_id, submitted_by), name="submit")
            self._tasks.add(submission)
            submission.add_done_callback(self._submitted)
            if request_id:
                self._submitting[request_id] = submission
                submission.add_done_callback(lambda _: self._submitting.pop(request_id, None))
        return await asyncio.shield(submission)

    def _submitted(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that left must not turn it into a log line

    async def _submit_once(
        self, definition: definition_pb2.JobDefinition, request_id: str, submitted_by: str
    ) -> tuple[records_pb2.Job, int]:
        # Encoding and validating a definition near the size limits takes up to a
        # second of CPU: in a thread, so the loop keeps serving streams and jobs.
        encoded = await asyncio.to_thread(stored_definition, definition)  # secrets redacted: GetJob echoes this
        if request_id:
            existing = await self._store.job_for_request(request_id)
            if existing is not None:
                if existing.definition != encoded:
                    raise FailedPreconditionError(
                        f"request_id {request_id!r} already created job {existing.job.id} from another definition"
                    )
                return existing.job, existing.first_seq
        spec = await asyncio.to_thread(validate_job, definition, self._workers)
        job_id = secrets.token_hex(8)
        job = records_pb2.Job(id=job_id, name=spec.name, submitted_by=submitted_by)
        if self._settings.tracing is not None:  # the SubmitJob call's span: the job's trace
            job.trace_context.update(self._settings.tracing.context())
        steps = [
            records_pb2.Step(
                job_id=job_id, name=step.name, index=step.index, type=step.execution.type,
                max_attempts=step.execution.max_attempts,
            )
            for step in spec.steps
        ]
        seq = self._recorder.create_job(job, steps, NewJob(job_id, request_id, encoded))
        await self._journal.durable(seq)
        run = JobRun(job, spec, steps, self._recorder, self._workers, self._settings)
        self._runs[job_id] = run
        task = asyncio.create_task(self._drive(run), name=f"run-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return clone(job), seq

    async def _drive(self, run: JobRun) -> None:
        try:
            await run.run()
            await self._journal.durable(self._journal.appended_seq)
        finally:
            self._runs.pop(run.job.id, None)

    async def cancel(self, job_id: str, *, cancelled_by: str = "") -> records_pb2.Job:
        """Record the cancellation (durably, with the caller's token name
        `cancelled_by`) and start stopping the job.

        A job already CANCELLED is returned unchanged; a COMPLETED or FAILED one
        is FAILED_PRECONDITION.
        """
        run = self._runs.get(job_id)
        if run is not None:
            seq = run.request_cancel(cancelled_by)
            # As recorded by the cancellation itself: the run keeps changing it.
            job = clone(run.job)
            if seq is not None:
                await self._journal.durable(seq)
        else:
            view = await self._store.get_job(job_id)
            if view is None:
                raise NotFoundError(f"no job {quoted(job_id)}")
            job = view.job
        if machine.job_is_terminal(job.state) and job.state != s.JOB_STATE_CANCELLED:
            raise FailedPreconditionError(
                f"job {job_id} already {job_state_word(job.state)}; only a pending or running job can be cancelled"
            )
        return clone(job)

    async def get(self, job_id: str) -> StoredJob:
        view = await self._store.get_job(job_id)
        if view is None:
            raise NotFoundError(f"no job {quoted(job_id)}")
        return view

    async def list(
        self, states: Sequence[int], name: str, page_size: int, page_token: str
    ) -> tuple[list[records_pb2.Job], str]:
        return await self._store.list_jobs(states, name, page_size, page_token)

    async def shutdown(self) -> None:
        """Stop accepting, stop every run (recording why), wait for them."""
        self._accepting = False
        for run in list(self._runs.values()):
            run.interrupt(rules.SHUT_DOWN)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
