"""Drives one job through its steps: runs, waits, stops and times out its work
in order, and records through the Recorder the statuses domain/rules.py decides.

Scale. A fan-out may have MAX_CHILDREN children, and a job several fan-outs,
so what a fan-out costs follows how many of its children run, not how many it
has: a child that has not started is only an index into its plan's items (no
record in memory), a running child holds its record, an ended one is only
counted. Every child is still recorded PENDING before the step is WAITING
(the status service counts a fan-out's children from those records), but in
chunks of CHUNK with the loop let run between them (Recorder.yield_to_writer),
as are the CANCELLED records of children stopped before they started. And
every unit of work (a step that is not a fan-out, or a fan-out child) takes a
slot of the service-wide WorkSlots while it runs, so the work in flight is
bounded across all jobs; a unit waiting for a slot stays PENDING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.states import step_state_word

from orchestrator_svc.domain import machine, rules
from orchestrator_svc.domain.rules import Interruption, Outcome, Stop
from orchestrator_svc.domain.spec import JobSpec, StepSpec
from orchestrator_svc.engine.attempts import AttemptHooks, run_attempts
from orchestrator_svc.engine.recorder import Recorder, pending_child
from orchestrator_svc.output import OutputKey, OutputStore
from orchestrator_svc.workers import FanoutPlan, FanoutWorker, WorkContext, Worker
from orchestrator_svc.workers.processes import ProcessRegistry
from orchestrator_svc.workers.registry import WorkerRegistry
from stepstream_common.logs import log_context, set_log_context
from stepstream_common.tracing import UNTRACED, Note, Tracing, untraced

log = logging.getLogger(__name__)


# Children recorded (created or stopped) between two turns of the loop: a few ms of work.
CHUNK = 500


class WorkSlots:
    """The service-wide cap on units of work running at once: steps that are
    not fan-outs, and fan-out children, across every job (--max-concurrent-work).

    A unit holds its slot from before its first attempt until its outcome is
    recorded, retries and their backoff included, so the RUNNING units in the
    event log never outnumber the slots. A fan-out step holds none (it only
    waits for its children, which hold theirs). Waiters are served in turn.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = asyncio.Semaphore(limit)

    async def __aenter__(self) -> None:
        await self._free.acquire()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._free.release()


@dataclass(frozen=True)
class RunSettings:
    # Where every attempt's output goes (one sink per attempt, see WorkContextFactory).
    output: OutputStore
    # Seconds between SIGTERM and SIGKILL when a command is stopped.
    kill_grace: float = 5.0
    processes: ProcessRegistry | None = None
    # Shared by every run of one orchestrator; the service sets its cap from its config.
    slots: WorkSlots = field(default_factory=lambda: WorkSlots(sys.maxsize))
    # Spans of steps and attempts (None: tracing off).
    tracing: Tracing | None = None


class _OverTolerance(Exception):
    pass


async def stop_everything(
    recorder: Recorder,
    job: records_pb2.Job,
    steps: Sequence[records_pb2.Step],
    children: Mapping[str, Iterable[records_pb2.Child]],
    interruption: Interruption,
) -> None:
    """End every unfinished child, then step, then the job, for `interruption`.

    Children end before their step and steps before the job, so nothing is
    ever shown finished while something under it is not.
    """
    for step in steps:
        await stop_children(recorder, children.get(step.name, ()), interruption)
        state = interruption.stopped_state(step.state)
        if state is not None:
            recorder.step(step, state, interruption.reason, interruption.message)
    recorder.job(job, interruption.job_state, interruption.reason, interruption.message)


async def stop_children(recorder: Recorder, children: Iterable[records_pb2.Child], stop: Stop) -> Counter[int]:
    """End each of `children` still unfinished for `stop`, letting the loop run
    every CHUNK children; how many of them end in each state."""
    ended: Counter[int] = Counter()
    for number, child in enumerate(children, 1):
        state = stop.stopped_state(child.state)
        if state is not None:
            recorder.child(child, state, stop.reason, stop.message)
        ended[child.state] += 1
        if number % CHUNK == 0:
            await recorder.yield_to_writer()
    return ended


class FanoutChildren:
    """One fan-out's children, costing memory only while they run.

    Children [0, created) are recorded PENDING; of those, [0, next) were taken
    to run, in index order. A taken child's record is in `_running` until it
    ended; an ended child is only counted by its final state. A child not
    taken has no record in memory: its PENDING record is rebuilt from its index
    (recorder.pending_child) when it is taken or stopped.
    """

    def __init__(self, job_id: str, step_name: str, items: Sequence[str]) -> None:
        self._job_id = job_id
        self._step_name = step_name
        self._items = items
        self.total = len(items)
        self._created = 0
        self._next = 0
        self._running: dict[int, records_pb2.Child] = {}
        self._ended: Counter[int] = Counter()

    def _record(self, index: int) -> records_pb2.Child:
        return pending_child(self._job_id, self._step_name, index, self._items[index])

    async def create(self, recorder: Recorder) -> None:
        """Record every child PENDING, CHUNK at a time. If the run is cancelled
        meanwhile, the children recorded so far are the fan-out's children."""
        while self._created < self.total:
            end = min(self._created + CHUNK, self.total)
            recorder.create_children(map(self._record, range(self._created, end)))
            self._created = end
            await recorder.yield_to_writer()

    def take(self) -> records_pb2.Child | None:
        """The next child to run (its PENDING record), or None when none is left."""
        if self._next >= self._created:
            return None
        child = self._record(self._next)
        self._running[self._next] = child
        self._next += 1
        return child

    def ended(self, child: records_pb2.Child) -> None:
        """`child` (taken) has its final state recorded: keep only its count."""
        del self._running[child.index]
        self._ended[child.state] += 1

    def unfinished(self) -> Iterator[records_pb2.Child]:
        """Every child that has not ended, in index order, for the caller to
        stop each as it gets it: the taken ones, then those never taken (none
        of which can be taken any more). Each leaves this bookkeeping only as
        it is handed out, so a stop cut short leaves the rest to the next one."""
        for index in sorted(self._running):
            yield self._running.pop(index)
        while self._next < self._created:
            self._next += 1
            yield self._record(self._next - 1)

    async def stop(self, recorder: Recorder, stop: Stop) -> None:
        """End every unfinished child for `stop`, counting how they ended."""
        self._ended.update(await stop_children(recorder, self.unfinished(), stop))

    def tally(self) -> rules.ChildTally:
        """How the children stand; once all ended, their final tally."""
        return rules.tally_counts(self._ended)


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
        self._children: dict[str, FanoutChildren] = {}
        self._recorder = recorder
        self._workers = workers
        self._settings = settings
        self._interruption: Interruption | None = None
        self._schedule_task: asyncio.Task[None] | None = None

    @property
    def finished(self) -> bool:
        return machine.job_is_terminal(self.job.state)

    def request_cancel(self, cancelled_by: str) -> int | None:
        """Record the cancellation (by `cancelled_by`) and start stopping; the seq of
        the record, or None if there was nothing to do (already ended or already cancelling)."""
        if self.finished or self.job.HasField("cancel_requested_at"):
            return None
        seq = self._recorder.cancel_requested(self.job, cancelled_by)
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
        # Every line logged from this job's task, and the tasks it starts, carries its id
        # (and not the method of the call that submitted it, whose context the task copied).
        set_log_context(job_id=self.job.id, method=None)
        log.debug("job %s started", self.job.id)
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
                await self._stop(rules.job_internal_error(error))
        finally:
            if timer is not None:
                timer.cancel()
            if self.finished:  # one line per job; its steps' and children's ends are debug
                log.info("job %s ended %s", self.job.id, s.JobState.Name(self.job.state))

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
            await self._stop(self._interruption)
            return
        outcome = rules.job_outcome({name: step.state for name, step in self._steps.items()})
        self._recorder.job(self.job, outcome.state, outcome.reason, outcome.message)

    async def _stop(self, interruption: Interruption) -> None:
        steps = [self._steps[step.name] for step in self._spec.steps]
        children = {name: fanout.unfinished() for name, fanout in self._children.items()}
        await stop_everything(self._recorder, self.job, steps, children, interruption)

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
        set_log_context(step=spec.name)  # this step's own task
        record = self._steps[spec.name]
        worker = self._workers.get(spec.execution.type)
        with self._trace(f"step {spec.name}", self.job.trace_context, step=spec.name) as note:
            if isinstance(worker, FanoutWorker):
                self._record_step(record, await self._outcome(spec.name, self._run_fanout(spec, record, worker)))
            else:
                # PENDING until a slot is free; the outcome is recorded before the slot is.
                async with self._settings.slots:
                    context, hooks = self._context(spec, None), self._step_hooks(record)
                    attempts = run_attempts(worker, spec.execution, context, hooks)
                    self._record_step(record, await self._outcome(spec.name, attempts))
            note(step_state_word(record.state), record.message if record.state == s.STEP_STATE_FAILED else "")
        log.debug("job %s step %s ended %s", self.job.id, spec.name, s.StepState.Name(record.state))
        ended(spec.name)

    async def _outcome(self, step_name: str, work: Awaitable[Outcome]) -> Outcome:
        """`work`'s outcome; an error of the orchestrator's own FAILS the step rather than hang it."""
        try:
            return await work
        except Exception as error:
            log.exception("job %s step %s: internal error", self.job.id, step_name)
            return rules.internal_error(error)

    def _context(self, spec: StepSpec, child_index: int | None) -> WorkContextFactory:
        return WorkContextFactory(self.job.id, spec.name, child_index, self._settings, spec.output_limit)

    def _trace(
        self, name: str, parent: Mapping[str, str] | None = None, **attributes: str | int
    ) -> contextlib.AbstractContextManager[Note]:
        """A span (under `parent`, else the current one) when tracing is on."""
        tracing = self._settings.tracing
        if tracing is None:
            return UNTRACED
        return tracing.span(name, parent, job_id=self.job.id, **attributes)

    def _step_hooks(self, record: records_pb2.Step) -> AttemptHooks:
        trace = untraced if self._settings.tracing is None else (
            lambda attempt: self._trace(f"attempt {attempt}", step=record.name, attempt=attempt))
        return AttemptHooks(lambda status, attempt: self._record_step(record, status, attempt), self._may_start, trace)

    def _child_hooks(self, child: records_pb2.Child, may_start: Callable[[], Awaitable[None]]) -> AttemptHooks:
        trace = untraced if self._settings.tracing is None else (
            lambda attempt: self._trace(f"child {child.index} attempt {attempt}", step=child.step_name,
                                        child=child.index, attempt=attempt))
        return AttemptHooks(lambda status, attempt: self._record_child(child, status, attempt), may_start, trace)

    async def _may_start(self) -> None:
        """Return at once while the job runs; once it is being stopped, wait for
        the cancellation interrupt() already sent, so no work starts after the
        interruption was decided (a task already woken would otherwise run one
        more step before the cancellation reaches it)."""
        if self._interruption is not None:
            await asyncio.get_running_loop().create_future()

    async def _run_fanout(self, spec: StepSpec, record: records_pb2.Step, worker: FanoutWorker) -> Outcome:
        await self._may_start()
        self._record_step(record, rules.attempt_started(1, 1, None), attempt=1)
        plan = worker.plan(spec.execution.params)
        children = FanoutChildren(self.job.id, spec.name, plan.items)
        self._children[spec.name] = children
        await children.create(self._recorder)
        self._record_step(record, rules.fanout_started(children.total, plan.concurrency))
        limit = spec.execution.timeout
        try:
            async with asyncio.timeout(limit):
                over = await self._run_children(spec, plan, children)
        except TimeoutError:
            assert limit is not None  # children catch their own TimeoutErrors: this is the fan-out's
            await children.stop(self._recorder, rules.fanout_timeout(limit))
            return rules.fanout_timed_out(limit, children.tally())
        if over:
            await children.stop(self._recorder, rules.OVER_TOLERANCE)
        return rules.fanout_outcome(children.tally(), plan.max_child_failures)

    async def _run_children(self, spec: StepSpec, plan: FanoutPlan, children: FanoutChildren) -> bool:
        """Run children `plan.concurrency` at a time (fewer if the service has
        fewer slots); True if stopped early because the failures went over the
        tolerance."""
        worker = self._workers.get(plan.child.type)
        assert isinstance(worker, Worker), "validation rejects fan-out children that are fan-outs"
        failed = 0

        def over() -> bool:
            return rules.fanout_over_tolerance(failed, plan.max_child_failures)

        async def may_start() -> None:
            """As _may_start; and once the step's failure is certain, no child
            starts either, not even one whose slot was freed by the decisive
            failure (the TaskGroup's cancellation is on its way)."""
            if over():
                await asyncio.get_running_loop().create_future()
            await self._may_start()

        async def take_children() -> None:
            nonlocal failed
            # Once over the tolerance, start nothing more (the rest are cancelled).
            while not over() and (child := children.take()) is not None:
                async with self._settings.slots:
                    with log_context(child=child.index):
                        outcome = await run_attempts(
                            worker, plan.child_execution(child.index), self._context(spec, child.index),
                            self._child_hooks(child, may_start),
                        )
                    self._record_child(child, outcome)
                    children.ended(child)
                    failed += outcome.state == s.STEP_STATE_FAILED
                if over():
                    raise _OverTolerance
                # A child whose work never suspends (a python function that just
                # returns) must not let the fan-out hold the loop, nor outrun the journal.
                await self._recorder.yield_to_writer()

        stopped_early = False
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(plan.concurrency, children.total, self._settings.slots.limit)):
                    group.create_task(take_children())
        except* _OverTolerance:
            stopped_early = True
        return stopped_early


@dataclass(frozen=True)
class WorkContextFactory:
    job_id: str
    step_name: str
    child_index: int | None
    settings: RunSettings
    # The step's own output limit, if it has one.
    output_limit: int | None = None

    def __call__(self, attempt: int) -> WorkContext:
        """The context of `attempt`, with its output sink opened: run_attempts closes it."""
        key = OutputKey(self.job_id, self.step_name, self.child_index, attempt)
        output = self.settings.output.sink(key, self.output_limit)
        return WorkContext(self.job_id, self.step_name, attempt, self.child_index, output, self.settings.kill_grace,
                           self.settings.processes)
