"""How outcomes are decided. These are the documented rules (README, "Status rules").

Fan-out step: FAILED as soon as more children failed than max_child_failures
(the rest are cancelled), and FAILED when it ends without a single completed
child, whatever the tolerance; COMPLETED otherwise. No children at all is
COMPLETED with reason NO_CHILDREN.

Job: CANCELLED if cancelled by request; FAILED on its own timeout, on an
orchestrator restart, or when any step FAILED; COMPLETED when every step
COMPLETED. Steps SKIPPED because a dependency failed only happen after a FAILED
step, so they never make a job COMPLETED.

Dependencies: a step runs when all its dependencies COMPLETED. When one ended
any other way the step is SKIPPED (reason DEPENDENCY_FAILED), unless it is
always_run, in which case it runs once all its dependencies are terminal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from stepstream.common.v1 import states_pb2 as s
from stepstream.states import TERMINAL_STEP_STATES


@dataclass(frozen=True)
class Outcome:
    state: int
    reason: int
    message: str


@dataclass(frozen=True)
class ChildTally:
    total: int
    completed: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def finished(self) -> int:
        return self.completed + self.failed + self.cancelled


def fanout_over_tolerance(failed: int, max_child_failures: int) -> bool:
    """True once the step's failure is certain: stop the remaining children."""
    return failed > max_child_failures


def fanout_outcome(tally: ChildTally, max_child_failures: int) -> Outcome:
    """The final state of a fan-out step whose children have all ended."""
    if tally.total == 0:
        return Outcome(s.STEP_STATE_COMPLETED, s.REASON_NO_CHILDREN, "no children to run")
    summary = f"{tally.completed} of {tally.total} children completed, {tally.failed} failed"
    if tally.cancelled:
        summary += f", {tally.cancelled} cancelled"
    if tally.failed > max_child_failures:
        return Outcome(
            s.STEP_STATE_FAILED,
            s.REASON_CHILD_FAILURES,
            f"{summary} (more than the {max_child_failures} tolerated)",
        )
    if tally.completed == 0:
        return Outcome(s.STEP_STATE_FAILED, s.REASON_CHILD_FAILURES, f"{summary}: none completed")
    if tally.failed:
        return Outcome(s.STEP_STATE_COMPLETED, s.REASON_UNSPECIFIED, f"{summary} (tolerated)")
    return Outcome(s.STEP_STATE_COMPLETED, s.REASON_UNSPECIFIED, summary)


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


class Readiness(Enum):
    WAIT = "wait"
    RUN = "run"
    SKIP = "skip"


def readiness(dependency_states: Iterable[int], always_run: bool) -> Readiness:
    """Whether a pending step can run now, must be skipped, or must wait."""
    states = list(dependency_states)
    if any(state not in TERMINAL_STEP_STATES for state in states):
        return Readiness.WAIT
    if always_run or all(state == s.STEP_STATE_COMPLETED for state in states):
        return Readiness.RUN
    return Readiness.SKIP


@dataclass(frozen=True)
class Interruption:
    """Why a job is being stopped before its steps ended on their own."""

    job_state: int
    reason: int
    message: str
    # What running work becomes, and what work that never started becomes.
    running_state: int
    pending_state: int


CANCELLED_BY_REQUEST = Interruption(
    s.JOB_STATE_CANCELLED,
    s.REASON_CANCELLED_BY_REQUEST,
    "cancelled by request",
    s.STEP_STATE_CANCELLED,
    s.STEP_STATE_CANCELLED,
)


def job_timed_out(limit: float) -> Interruption:
    return Interruption(
        s.JOB_STATE_FAILED,
        s.REASON_JOB_TIMEOUT,
        f"job timed out after {limit:g}s",
        s.STEP_STATE_FAILED,
        s.STEP_STATE_CANCELLED,
    )


ORCHESTRATOR_RESTARTED = Interruption(
    s.JOB_STATE_FAILED,
    s.REASON_ORCHESTRATOR_RESTARTED,
    "the orchestrator restarted while this was in flight",
    s.STEP_STATE_FAILED,
    s.STEP_STATE_CANCELLED,
)
