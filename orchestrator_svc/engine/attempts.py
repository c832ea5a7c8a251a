"""Runs one unit of work with its retries, backoff and per-attempt timeout.
What each attempt's end means is decided in domain/rules.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from stepstream.common.v1 import states_pb2 as s
from stepstream.states import step_state_word

from orchestrator_svc.domain import rules
from orchestrator_svc.domain.rules import Outcome
from orchestrator_svc.domain.spec import Execution, masked, secret_values
from orchestrator_svc.output import capturing
from orchestrator_svc.workers import WorkContext, Worker, WorkFailed
from stepstream_common.tracing import Note, untraced

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttemptHooks:
    """How attempts are reported: `report(status, attempt)` records the unit's
    status before each attempt and before each backoff sleep. `may_start()` is
    awaited before each attempt is started: it does not return once the work
    is being stopped, so nothing starts after a cancellation was recorded (the
    stop is on its way as CancelledError). `trace(attempt)` is the attempt's
    span (stepstream_common.tracing), untraced by default."""

    report: Callable[[Outcome, int], None]
    may_start: Callable[[], Awaitable[None]]
    trace: Callable[[int], contextlib.AbstractContextManager[Note]] = untraced


async def run_attempts(
    worker: Worker,
    execution: Execution,
    context: Callable[[int], WorkContext],
    hooks: AttemptHooks,
) -> Outcome:
    """The final outcome (COMPLETED or FAILED) after up to max_attempts attempts.

    Cancellation from outside (CancelJob, a job or fan-out timeout) propagates
    as CancelledError, after the worker has stopped what it started.
    """
    attempt = 1
    previous: Outcome | None = None
    while True:
        await hooks.may_start()
        hooks.report(rules.attempt_started(attempt, execution.max_attempts, previous), attempt)
        with hooks.trace(attempt) as note:
            outcome = await _attempt(worker, execution, context(attempt), attempt)
            note(step_state_word(outcome.state), outcome.message if outcome.state != s.STEP_STATE_COMPLETED else "")
        if outcome.state == s.STEP_STATE_COMPLETED or attempt == execution.max_attempts:
            return outcome
        delay = rules.backoff_delay(execution.retry_backoff, attempt)
        hooks.report(rules.retrying(attempt, outcome, delay), attempt)
        await asyncio.sleep(delay)
        attempt, previous = attempt + 1, outcome


async def _attempt(worker: Worker, execution: Execution, context: WorkContext, attempt: int) -> Outcome:
    """One attempt; its output sink is closed with its final state however it ends
    (CANCELLED when stopped from outside)."""
    secrets = secret_values(execution.params)
    context.output.hide(secrets)
    try:
        outcome = await _run_once(worker, execution, context, attempt)
    except BaseException:
        await context.output.close(s.STEP_STATE_CANCELLED)
        raise
    # run_attempts' rule: a failed attempt with attempts left is retried (unless stopped first).
    await context.output.close(outcome.state, outcome.state != s.STEP_STATE_COMPLETED
                               and attempt < execution.max_attempts)
    return dataclasses.replace(outcome, message=masked(outcome.message, secrets)) if secrets else outcome


async def _run_once(worker: Worker, execution: Execution, context: WorkContext, attempt: int) -> Outcome:
    deadline = asyncio.timeout(execution.timeout)
    try:
        # What the worker's code prints (a python step's function, a plugin) is the attempt's output.
        async with deadline:
            with capturing(context.output):
                message = await worker.run(execution.params, context)
    except WorkFailed as error:
        return rules.work_failed(str(error))
    except Exception as error:
        # A TimeoutError the worker raised itself is its failure, not this attempt's timeout.
        if isinstance(error, TimeoutError) and deadline.expired() and execution.timeout is not None:
            return rules.attempt_timed_out(attempt, execution.timeout)
        secrets = secret_values(execution.params)
        if secrets:  # a traceback's last line quotes the exception, which may quote a secret
            log.error("worker %r raised unexpectedly: %s", execution.type,
                      masked(f"{type(error).__name__}: {error}", secrets))
        else:
            log.exception("worker %r raised unexpectedly", execution.type)
        return rules.worker_error(error)
    return rules.work_completed(message)
