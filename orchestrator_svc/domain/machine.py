"""The transitions that exist. Every state change the orchestrator makes is
checked here; anything else is a bug and raises.

Terminal states (marked in states.proto) have no way out. A record may also be
re-emitted in the same state when another field changes: a job when its
cancellation is requested, a step or child when it starts another attempt.
"""

from __future__ import annotations

from stepstream.common.v1 import states_pb2 as s
from stepstream.states import TERMINAL_JOB_STATES, TERMINAL_STEP_STATES, job_state_word, step_state_word

JOB_TRANSITIONS: dict[int, frozenset[int]] = {
    s.JOB_STATE_PENDING: frozenset(
        {s.JOB_STATE_PENDING, s.JOB_STATE_RUNNING, s.JOB_STATE_FAILED, s.JOB_STATE_CANCELLED}
    ),
    s.JOB_STATE_RUNNING: frozenset(
        {s.JOB_STATE_RUNNING, s.JOB_STATE_COMPLETED, s.JOB_STATE_FAILED, s.JOB_STATE_CANCELLED}
    ),
}

STEP_TRANSITIONS: dict[int, frozenset[int]] = {
    s.STEP_STATE_PENDING: frozenset({s.STEP_STATE_RUNNING, s.STEP_STATE_SKIPPED, s.STEP_STATE_CANCELLED}),
    s.STEP_STATE_RUNNING: frozenset(
        {
            s.STEP_STATE_RUNNING,
            s.STEP_STATE_WAITING,
            s.STEP_STATE_COMPLETED,
            s.STEP_STATE_FAILED,
            s.STEP_STATE_CANCELLED,
        }
    ),
    s.STEP_STATE_WAITING: frozenset({s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED, s.STEP_STATE_CANCELLED}),
}

CHILD_TRANSITIONS: dict[int, frozenset[int]] = {
    s.STEP_STATE_PENDING: frozenset({s.STEP_STATE_RUNNING, s.STEP_STATE_CANCELLED}),
    s.STEP_STATE_RUNNING: frozenset(
        {s.STEP_STATE_RUNNING, s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED, s.STEP_STATE_CANCELLED}
    ),
}

INITIAL_JOB_STATE = s.JOB_STATE_PENDING
INITIAL_STEP_STATE = s.STEP_STATE_PENDING


class IllegalTransition(RuntimeError):
    pass


def check_job(current: int, new: int, what: str = "job") -> None:
    if new not in JOB_TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(f"{what}: {job_state_word(current)} -> {job_state_word(new)} is not a transition")


def check_step(current: int, new: int, what: str = "step") -> None:
    _check_work(STEP_TRANSITIONS, current, new, what)


def check_child(current: int, new: int, what: str = "child") -> None:
    _check_work(CHILD_TRANSITIONS, current, new, what)


def _check_work(table: dict[int, frozenset[int]], current: int, new: int, what: str) -> None:
    if new not in table.get(current, frozenset()):
        raise IllegalTransition(f"{what}: {step_state_word(current)} -> {step_state_word(new)} is not a transition")


def job_is_terminal(state: int) -> bool:
    return state in TERMINAL_JOB_STATES


def step_is_terminal(state: int) -> bool:
    return state in TERMINAL_STEP_STATES
