"""How outcomes are decided. These are the documented rules (README, "Status rules").

Every state the engine records, with its reason and message, is built here;
the engine only sequences the work and applies what these functions return.

Attempts: a unit of work (a step, or one fan-out child) is COMPLETED with the
message its worker returned, or FAILED (WORK_FAILED when the worker said so or
raised, TIMEOUT when the attempt outlived its timeout). A failed attempt is
retried while attempts remain, after a backoff that doubles from retry_backoff
up to MAX_BACKOFF.

Fan-out step: FAILED as soon as more children failed than max_child_failures
(the rest are cancelled), and FAILED when it ends without a single completed
child, whatever the tolerance; COMPLETED otherwise. No children at all is
COMPLETED with reason NO_CHILDREN. On its own timeout it is FAILED (TIMEOUT):
running children fail, children not yet started are cancelled.

Job: CANCELLED if cancelled by request; FAILED on its own timeout, on an
orchestrator restart or shutdown, on an internal error, or when any step
FAILED; COMPLETED when every step COMPLETED. Steps SKIPPED because a dependency
failed only happen after a FAILED step, so they never make a job COMPLETED.

Dependencies: a step is considered once all its dependencies ended. It runs
when they all COMPLETED. When one ended any other way the step is SKIPPED
(reason DEPENDENCY_FAILED), unless it is always_run, in which case it runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from stepstream.common.v1 import states_pb2 as s
from stepstream.states import TERMINAL_STEP_STATES, step_state_word

# The longest wait between two attempts, however many failed.
MAX_BACKOFF = 60.0


@dataclass(frozen=True)
class Outcome:
    """A state to record with its reason and message: how a unit of work or a
    job ended, or how a running one progresses (an attempt starting, a retry,
    a fan-out waiting for its children)."""

    state: int
    reason: int
    message: str


# --- Attempts ---------------------------------------------------------------------------------


def attempt_started(attempt: int, max_attempts: int, previous: Outcome | None) -> Outcome:
    """RUNNING for `attempt`; after a failed one (`previous`) the retry says why."""
    if previous is None:
        return Outcome(s.STEP_STATE_RUNNING, s.REASON_UNSPECIFIED, "")
    return Outcome(
        s.STEP_STATE_RUNNING, s.REASON_RETRYING,
        f"attempt {attempt} of {max_attempts}; previous: {previous.message}",
    )


def work_completed(message: str) -> Outcome:
    """The worker returned: its message becomes the unit's."""
    return Outcome(s.STEP_STATE_COMPLETED, s.REASON_UNSPECIFIED, message)


def work_failed(message: str) -> Outcome:
    """The worker reported a failure (WorkFailed): its text becomes the unit's message."""
    return Outcome(s.STEP_STATE_FAILED, s.REASON_WORK_FAILED, message)


def worker_error(error: BaseException) -> Outcome:
    """The worker raised something else: still the work's failure, named by its type."""
    return Outcome(s.STEP_STATE_FAILED, s.REASON_WORK_FAILED, f"worker error: {type(error).__name__}: {error}")


def attempt_timed_out(attempt: int, limit: float) -> Outcome:
    return Outcome(s.STEP_STATE_FAILED, s.REASON_TIMEOUT, f"attempt {attempt} timed out after {limit:g}s")


def backoff_delay(retry_backoff: float, failed_attempt: int) -> float:
    """Seconds to wait after `failed_attempt` (1-based): doubling, capped at MAX_BACKOFF."""
    return float(min(MAX_BACKOFF, retry_backoff * 2 ** (failed_attempt - 1)))


def retrying(failed_attempt: int, failure: Outcome, delay: float) -> Outcome:
    """Still RUNNING between attempts, saying what failed and when the next one starts."""
    return Outcome(
        s.STEP_STATE_RUNNING, s.REASON_RETRYING,
        f"attempt {failed_attempt} failed: {failure.message}; retrying in {delay:g}s",
    )


def internal_error(error: BaseException) -> Outcome:
    """The orchestrator itself failed while running a step: the step FAILS rather than hangs."""
    return Outcome(s.STEP_STATE_FAILED, s.REASON_WORK_FAILED, f"internal error: {type(error).__name__}: {error}")


# --- Dependencies -----------------------------------------------------------------------------


def skip_outcome(dependency_states: Mapping[str, int], always_run: bool) -> Outcome | None:
    """None when a step whose dependencies (name: final state) all ended runs;
    otherwise the SKIPPED outcome naming those that did not complete.

    ValueError if a dependency has not ended: the runner asks once, when the
    last one ends, so an earlier question is a bug that must not skip a step.
    """
    unended = [name for name, state in dependency_states.items() if state not in TERMINAL_STEP_STATES]
    if unended:
        raise ValueError(f"dependencies have not ended: {', '.join(unended)}")
    unfinished = [f"{name} ({step_state_word(state)})" for name, state in dependency_states.items()
                  if state != s.STEP_STATE_COMPLETED]
    if always_run or not unfinished:
        return None
    return Outcome(
        s.STEP_STATE_SKIPPED, s.REASON_DEPENDENCY_FAILED, "dependencies did not complete: " + ", ".join(unfinished)
    )


# --- Stopping work from outside -----------------------------------------------------------------

_STARTED = frozenset({s.STEP_STATE_RUNNING, s.STEP_STATE_WAITING})


@dataclass(frozen=True)
class Stop:
    """How unfinished steps or children end when something above them stops them."""

    reason: int
    message: str
    # What work already started becomes, and what work that never started becomes.
    running_state: int
    pending_state: int

    def stopped_state(self, current: int) -> int | None:
        """The state work in `current` ends in; None when it already ended (it keeps its own)."""
        if current in TERMINAL_STEP_STATES:
            return None
        return self.running_state if current in _STARTED else self.pending_state


@dataclass(frozen=True)
class Interruption(Stop):
    """Why a job is being stopped before its steps ended on their own."""

    job_state: int


CANCELLED_BY_REQUEST = Interruption(
    reason=s.REASON_CANCELLED_BY_REQUEST,
    message="cancelled by request",
    running_state=s.STEP_STATE_CANCELLED,
    pending_state=s.STEP_STATE_CANCELLED,
    job_state=s.JOB_STATE_CANCELLED,
)

def _failing(reason: int, message: str) -> Interruption:
    """An interruption that fails the job: running work FAILED, pending work CANCELLED."""
    return Interruption(
        reason=reason,
        message=message,
        running_state=s.STEP_STATE_FAILED,
        pending_state=s.STEP_STATE_CANCELLED,
        job_state=s.JOB_STATE_FAILED,
    )


ORCHESTRATOR_RESTARTED = _failing(
    s.REASON_ORCHESTRATOR_RESTARTED, "the orchestrator restarted while this was in flight"
)

SHUT_DOWN = _failing(s.REASON_ORCHESTRATOR_RESTARTED, "the orchestrator shut down while this was in flight")


def job_timed_out(limit: float) -> Interruption:
    return _failing(s.REASON_JOB_TIMEOUT, f"job timed out after {limit:g}s")


def job_internal_error(error: BaseException) -> Interruption:
    """The orchestrator failed while driving the job: FAILED rather than left hanging."""
    return _failing(s.REASON_WORK_FAILED, f"internal error: {type(error).__name__}: {error}")


def left_in_flight(cancel_requested: bool) -> Interruption:
    """How a job a previous process left unfinished ends: a cancellation it had
    recorded is honoured; anything else was cut short by the restart."""
    return CANCELLED_BY_REQUEST if cancel_requested else ORCHESTRATOR_RESTARTED


# --- Fan-out ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildTally:
    total: int
    completed: int
    failed: int
    cancelled: int


def tally(child_states: Iterable[int]) -> ChildTally:
    """How a fan-out's children (by state) stand."""
    return tally_counts(Counter(child_states))


def tally_counts(children_by_state: Mapping[int, int]) -> ChildTally:
    """The same, from how many children are in each state: what the runner
    keeps, since it keeps no record of a child once it ended."""
    return ChildTally(
        total=sum(children_by_state.values()),
        completed=children_by_state.get(s.STEP_STATE_COMPLETED, 0),
        failed=children_by_state.get(s.STEP_STATE_FAILED, 0),
        cancelled=children_by_state.get(s.STEP_STATE_CANCELLED, 0),
    )


def fanout_started(children: int, concurrency: int) -> Outcome:
    """WAITING while its children run."""
    return Outcome(s.STEP_STATE_WAITING, s.REASON_UNSPECIFIED, f"{children} children, up to {concurrency} at a time")


def fanout_over_tolerance(failed: int, max_child_failures: int) -> bool:
    """True once the step's failure is certain: stop the remaining children."""
    return failed > max_child_failures


# What the children still unfinished become once the fan-out went over its tolerance.
OVER_TOLERANCE = Stop(
    reason=s.REASON_FANOUT_FAILED,
    message="stopped: more children failed than the step tolerates",
    running_state=s.STEP_STATE_CANCELLED,
    pending_state=s.STEP_STATE_CANCELLED,
)


def fanout_outcome(children: ChildTally, max_child_failures: int) -> Outcome:
    """The final state of a fan-out step whose children have all ended."""
    if children.total == 0:
        return Outcome(s.STEP_STATE_COMPLETED, s.REASON_NO_CHILDREN, "no children to run")
    summary = f"{children.completed} of {children.total} children completed, {children.failed} failed"
    if children.cancelled:
        summary += f", {children.cancelled} cancelled"
    if fanout_over_tolerance(children.failed, max_child_failures):
        return Outcome(
            s.STEP_STATE_FAILED,
            s.REASON_CHILD_FAILURES,
            f"{summary} (more than the {max_child_failures} tolerated)",
        )
    if children.completed == 0:
        return Outcome(s.STEP_STATE_FAILED, s.REASON_CHILD_FAILURES, f"{summary}: none completed")
    if children.failed:
        return Outcome(s.STEP_STATE_COMPLETED, s.REASON_UNSPECIFIED, f"{summary} (tolerated)")
    return Outcome(s.STEP_STATE_COMPLETED, s.REASON_UNSPECIFIED, summary)


def fanout_timeout(limit: float) -> Stop:
    """What the unfinished children of a fan-out that timed out become."""
    return Stop(
        reason=s.REASON_TIMEOUT,
        message=f"the fan-out timed out after {limit:g}s",
        running_state=s.STEP_STATE_FAILED,
        pending_state=s.STEP_STATE_CANCELLED,
    )


def fanout_timed_out(limit: float, children: ChildTally) -> Outcome:
    """The fan-out step's own outcome on its timeout, once its children were stopped."""
    return Outcome(
        s.STEP_STATE_FAILED, s.REASON_TIMEOUT,
        f"{fanout_timeout(limit).message}: {children.completed} of {children.total} children completed",
    )


# --- Job --------------------------------------------------------------------------------------


def job_outcome(step_states: Mapping[str, int]) -> Outcome:
    """The final state of a job whose steps have all ended on their own."""
    failed = [name for name, state in step_states.items() if state == s.STEP_STATE_FAILED]
    if failed:
        return Outcome(s.JOB_STATE_FAILED, s.REASON_STEP_FAILED, "failed steps: " + ", ".join(failed))
    unfinished = [name for name, state in step_states.items() if state != s.STEP_STATE_COMPLETED]
    if unfinished:
        return Outcome(
            s.JOB_STATE_FAILED, s.REASON_STEP_FAILED, "steps did not complete: " + ", ".join(unfinished)
        )
    return Outcome(s.JOB_STATE_COMPLETED, s.REASON_UNSPECIFIED, f"{len(step_states)} steps completed")
