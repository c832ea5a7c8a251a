"""Drives one job through its steps: runs, waits, stops and times out its work
in order, and records through the Recorder the statuses domain/rules.py decides."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s

from orchestrator_svc.domain import machine, rules
from orchestrator_svc.domain.rules import Interruption, Outcome, Stop
from orchestrator_svc.domain.spec import JobSpec, StepSpec
from orchestrator_svc.engine.attempts import AttemptHooks, run_attempts
from orchestrator_svc.engine.recorder import Recorder
from orchestrator_svc.workers import FanoutPlan, FanoutWorker, WorkContext, Worker
from orchestrator_svc.workers.processes import ProcessRegistry
from orchestrator_svc.workers.registry import WorkerRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    # Seconds between SIGTERM and SIGKILL when a command is stopped.
    kill_grace: float = 5.0
    processes: ProcessRegistry | None = None


class _OverTolerance(Exception):
    pass


def stop_everything(
    recorder: Recorder,
    job: records_pb2.Job,
    steps: Sequence[records_pb2.Step],
    children: Mapping[str, Sequence[records_pb2.Child]],
    interruption: Interruption,
) -> None:
    """End every unfinished child, then step, then the job, for `interruption`.

    Children end before their step and steps before the job, so nothing is
    ever shown finished while something under it is not.
    """
    for step in steps:
        stop_children(recorder, children.get(step.name, ()), interruption)
        state = interruption.stopped_state(step.state)
        if state is not None:
            recorder.step(step, state, interruption.reason, interruption.message)
    recorder.job(job, interruption.job_state, interruption.reason, interruption.message)


def stop_children(recorder: Recorder, children: Iterable[records_pb2.Child], stop: Stop) -> None:
    for child in children:
        state = stop.stopped_state(child.state)
        if state is not None:
            recorder.child(child, state, stop.reason, stop.message)


class JobRun:
    """One job in flight."""

    def __init__(
        self,
        job: records_pb2.Job,
        spec: JobSpec,
        steps: Sequence[records_pb2.Step],
        recorder: Recorder,
        workers: WorkerRegistry,
        settings: RunSettings,
    ) -> None:
        self.job = job
        self._spec = spec
        self._steps = {step.name: step for step in steps}
        self._children: dict[str, list[records_pb2.Child]] = {}
        self._recorder = recorder
        self._workers = workers
        self._settings = settings
        self._interruption: Interruption | None = None
        self._schedule_task: asyncio.Task[None] | None = None

    @property
    def finished(self) -> bool:
        return machine.job_is_terminal(self.job.state)

    def request_cancel(self) -> int | None:
        """Record the cancellation and start stopping; the seq of the record, or
        None if there was nothing to do (already ended or already cancelling)."""
        if self.finished or self.job.HasField("cancel_requested_at"):
            return None
        seq = self._recorder.cancel_requested(self.job)
        self.interrupt(rules.CANCELLED_BY_REQUEST)
        return seq

    def interrupt(self, interruption: Interruption) -> None:
        """Stop the job for `interruption` unless it is already stopping or done."""
        if self._interruption is not None or self.finished:
            return
        if self._schedule_task is not None and self._schedule_task.done():
            return
        self._interruption = interruption
        if self._schedule_task is not None:
            self._schedule_task.cancel()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        timer = None
        if self._spec.timeout is not None:
            timer = loop.call_later(self._spec.timeout, self.interrupt, rules.job_timed_out(self._spec.timeout))
        try:
            await self._run()
        except Exception as error:
            log.exception("job %s: internal error", self.job.id)
            if not self.finished:
                self._interruption = None
                self._stop(rules.job_internal_error(error))
        finally:
            if timer is not None:
                timer.cancel()

    async def _run(self) -> None:
        if self._interruption is None:
            self._recorder.job(self.job, s.JOB_STATE_RUNNING)
            self._schedule_task = asyncio.create_task(self._schedule(), name=f"job-{self.job.id}")
            try:
                await self._schedule_task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._interruption is None or (current is not None and current.cancelling()):
                    raise
        if self._interruption is not None:
            self._stop(self._interruption)
            return
        outcome = rules.job_outcome({name: step.state for name, step in self._steps.items()})
        self._recorder.job(self.job, outcome.state, outcome.reason, outcome.message)

    def _stop(self, interruption: Interruption) -> None:
        steps = [self._steps[step.name] for step in self._spec.steps]
        stop_everything(self._recorder, self.job, steps, self._children, interruption)

    async def _schedule(self) -> None:
        """Consider each step once, when its last dependency has ended: run it or
        skip it as the rules say. A step's end only looks at its dependents."""
        specs = self._spec.steps
        dependents: dict[str, list[StepSpec]] = {spec.name: [] for spec in specs}
        unended = {spec.name: len(spec.depends_on) for spec in specs}
        for spec in specs:
            for name in spec.depends_on:
                dependents[name].append(spec)

        async with asyncio.TaskGroup() as group:

            def ended(name: str) -> None:
                for dependent in dependents[name]:
                    unended[dependent.name] -= 1
                    if not unended[dependent.name]:
                        consider(dependent)

            def consider(spec: StepSpec) -> None:
                skipped = rules.skip_outcome({name: self._steps[name].state for name in spec.depends_on},
                                             spec.always_run)
                if skipped is None:
                    group.create_task(self._run_step(spec, ended))
                else:
                    self._record_step(self._steps[spec.name], skipped)
                    ended(spec.name)

            for spec in specs:
                if not spec.depends_on:
                    consider(spec)

    def _record_step(self, record: records_pb2.Step, status: Outcome, attempt: int | None = None) -> None:
        self._recorder.step(record, status.state, status.reason, status.message, attempt=attempt)

    def _record_child(self, child: records_pb2.Child, status: Outcome, attempt: int | None = None) -> None:
        self._recorder.child(child, status.state, status.reason, status.message, attempt=attempt)

    async def _run_step(self, spec: StepSpec, ended: Callable[[str], None]) -> None:
        record = self._steps[spec.name]
        worker = self._workers.get(spec.execution.type)
        try:
            if isinstance(worker, FanoutWorker):
                outcome = await self._run_fanout(spec, record, worker)
            else:
                outcome = await run_attempts(
                    worker, spec.execution, self._context(spec.name, None), self._step_hooks(record)
                )
        except Exception as error:
            log.exception("job %s step %s: internal error", self.job.id, spec.name)
            outcome = rules.internal_error(error)
        self._record_step(record, outcome)
        ended(spec.name)

    def _context(self, step_name: str, child_index: int | None) -> WorkContextFactory:
        return WorkContextFactory(self.job.id, step_name, child_index, self._settings)

    def _step_hooks(self, record: records_pb2.Step) -> AttemptHooks:
        return AttemptHooks(lambda status, attempt: self._record_step(record, status, attempt), self._may_start)

    async def _may_start(self) -> None:
        """Return at once while the job runs; once it is being stopped, wait for
        the cancellation interrupt() already sent, so no work starts after the
        interruption was decided (a task already woken would otherwise run one
        more step before the cancellation reaches it)."""
        if self._interruption is not None:
            await asyncio.get_running_loop().create_future()

    def _child_hooks(self, child: records_pb2.Child) -> AttemptHooks:
        return AttemptHooks(lambda status, attempt: self._record_child(child, status, attempt), self._may_start)

    async def _run_fanout(self, spec: StepSpec, record: records_pb2.Step, worker: FanoutWorker) -> Outcome:
        await self._may_start()
        self._record_step(record, rules.attempt_started(1, 1, None), attempt=1)
        plan = worker.plan(spec.execution.params)
        children = [
            records_pb2.Child(job_id=self.job.id, step_name=spec.name, index=index, item=item)
            for index, item in enumerate(plan.items)
        ]
        self._children[spec.name] = children
        self._recorder.create_children(children)
        self._record_step(record, rules.fanout_started(len(children), plan.concurrency))
        limit = spec.execution.timeout
        try:
            async with asyncio.timeout(limit):
                over = await self._run_children(plan, children)
        except TimeoutError:
            assert limit is not None  # children catch their own TimeoutErrors: this is the fan-out's
            stop_children(self._recorder, children, rules.fanout_timeout(limit))
            return rules.fanout_timed_out(limit, rules.tally(child.state for child in children))
        if over:
            stop_children(self._recorder, children, rules.OVER_TOLERANCE)
        return rules.fanout_outcome(rules.tally(child.state for child in children), plan.max_child_failures)

    async def _run_children(self, plan: FanoutPlan, children: Sequence[records_pb2.Child]) -> bool:
        """Run children `plan.concurrency` at a time; True if stopped early
        because the failures went over the tolerance."""
        worker = self._workers.get(plan.child.type)
        assert isinstance(worker, Worker), "validation rejects fan-out children that are fan-outs"
        queue = iter(range(len(children)))
        failed = 0

        async def take_children() -> None:
            nonlocal failed
            for index in queue:
                if rules.fanout_over_tolerance(failed, plan.max_child_failures):
                    return  # the step already failed: start nothing more (the rest are cancelled)
                child = children[index]
                outcome = await run_attempts(
                    worker, plan.child_execution(index), self._context(child.step_name, index),
                    self._child_hooks(child),
                )
                self._record_child(child, outcome)
                if outcome.state == s.STEP_STATE_FAILED:
                    failed += 1
                    if rules.fanout_over_tolerance(failed, plan.max_child_failures):
                        raise _OverTolerance

        over = False
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(plan.concurrency, len(children))):
                    group.create_task(take_children())
        except* _OverTolerance:
            over = True
        return over


@dataclass(frozen=True)
class WorkContextFactory:
    job_id: str
    step_name: str
    child_index: int | None
    settings: RunSettings

    def __call__(self, attempt: int) -> WorkContext:
        return WorkContext(self.job_id, self.step_name, attempt, self.child_index, self.settings.kill_grace,
                           self.settings.processes)
