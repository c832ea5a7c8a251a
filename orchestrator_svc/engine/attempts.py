"""Runs one unit of work with its retries, backoff and per-attempt timeout."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from stepstream.common.v1 import states_pb2 as s

from orchestrator_svc.domain.rules import Outcome
from orchestrator_svc.domain.spec import Execution
from orchestrator_svc.workers.base import WorkContext, Worker, WorkFailed

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0


@dataclass(frozen=True)
class AttemptHooks:
    """How attempts are reported: `starting(attempt, reason, message)` and
    `retrying(attempt, failure, delay)`, called before each attempt and before
    each backoff sleep. `may_start()`, when set, is awaited before each attempt
    is started: it does not return once the work is being stopped, so nothing
    starts after a cancellation was recorded (the stop is on its way as
    CancelledError)."""

    starting: Callable[[int, int, str], None]
    retrying: Callable[[int, Outcome, float], None]
    may_start: Callable[[], Awaitable[None]] | None = None


def backoff_delay(execution: Execution, failed_attempt: int) -> float:
    return float(min(MAX_BACKOFF, execution.retry_backoff * 2 ** (failed_attempt - 1)))


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
    failure = Outcome(s.STEP_STATE_FAILED, s.REASON_WORK_FAILED, "no attempt ran")
    for attempt in range(1, execution.max_attempts + 1):
        if hooks.may_start is not None:
            await hooks.may_start()
        if attempt == 1:
            hooks.starting(attempt, s.REASON_UNSPECIFIED, "")
        else:
            hooks.starting(attempt, s.REASON_RETRYING, f"attempt {attempt} of {execution.max_attempts}; "
                           f"previous: {failure.message}")
        try:
            async with asyncio.timeout(execution.timeout):
                message = await worker.run(execution.params, context(attempt))
        except TimeoutError:
            failure = Outcome(
                s.STEP_STATE_FAILED, s.REASON_TIMEOUT,
                f"attempt {attempt} timed out after {execution.timeout:g}s",
            )
        except WorkFailed as error:
            failure = Outcome(s.STEP_STATE_FAILED, s.REASON_WORK_FAILED, str(error))
        except Exception as error:
            log.exception("worker %r raised unexpectedly", execution.type)
            failure = Outcome(
                s.STEP_STATE_FAILED, s.REASON_WORK_FAILED, f"worker error: {type(error).__name__}: {error}"
            )
        else:
            return Outcome(s.STEP_STATE_COMPLETED, s.REASON_UNSPECIFIED, message)
        if attempt < execution.max_attempts:
            delay = backoff_delay(execution, attempt)
            hooks.retrying(attempt, failure, delay)
            await asyncio.sleep(delay)
    return failure
