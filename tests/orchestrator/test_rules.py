"""Property tests of the orchestrator's pure domain: the outcome rules (through
the functions the engine calls), the transition tables and durations."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from stepstream.common.v1 import states_pb2 as s
from stepstream.states import TERMINAL_JOB_STATES, TERMINAL_STEP_STATES, step_state_word

from orchestrator_svc.domain import machine, rules
from orchestrator_svc.domain.durations import parse_duration
from orchestrator_svc.domain.spec import MAX_DURATION_SECONDS, MAX_RETRIES

STEP_STATES: list[int] = [v for v in s.StepState.values() if v != s.STEP_STATE_UNSPECIFIED]
JOB_STATES: list[int] = [v for v in s.JobState.values() if v != s.JOB_STATE_UNSPECIFIED]
ANY_STEP_STATE = st.sampled_from(STEP_STATES)
UNENDED_STEP_STATES = [state for state in STEP_STATES if state not in TERMINAL_STEP_STATES]
# A child is never WAITING (nor SKIPPED): it runs one worker.
UNENDED_CHILD_STATES = [s.STEP_STATE_PENDING, s.STEP_STATE_RUNNING]
ENDED_CHILD_STATES = [s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED, s.STEP_STATE_CANCELLED]

# How far along an entity is; a legal transition never lowers it.
STEP_RANK = {
    s.STEP_STATE_PENDING: 0,
    s.STEP_STATE_RUNNING: 1,
    s.STEP_STATE_WAITING: 2,
    **dict.fromkeys(TERMINAL_STEP_STATES, 3),
}
JOB_RANK = {s.JOB_STATE_PENDING: 0, s.JOB_STATE_RUNNING: 1, **dict.fromkeys(TERMINAL_JOB_STATES, 2)}


TOLERANCES = st.one_of(st.integers(0, 60), st.just(10**9))
LIMITS = st.floats(min_value=0.001, max_value=MAX_DURATION_SECONDS)
ERRORS = st.builds(lambda kind, text: kind(text), st.sampled_from([ValueError, RuntimeError, TimeoutError, OSError]),
                   st.text(max_size=20))


def counted(completed: int = 0, failed: int = 0, cancelled: int = 0, *others: int) -> list[int]:
    """Children's states: so many COMPLETED, FAILED and CANCELLED, then `others`."""
    return ([s.STEP_STATE_COMPLETED] * completed + [s.STEP_STATE_FAILED] * failed
            + [s.STEP_STATE_CANCELLED] * cancelled + list(others))


@st.composite
def final_children(draw: st.DrawFn) -> tuple[list[int], int]:
    """Children's states as a fan-out can end on its own (every child ended; children
    are only cancelled, FANOUT_FAILED, once the failures went over the tolerance),
    in any order, with the tolerance."""
    tolerance = draw(TOLERANCES)
    completed = draw(st.integers(0, 50))
    failed = draw(st.integers(0, 50))
    cancelled = draw(st.integers(0, 50)) if failed > tolerance else 0
    return draw(st.permutations(counted(completed, failed, cancelled))), tolerance


ANY_CHILDREN = st.lists(st.sampled_from([*ENDED_CHILD_STATES, *UNENDED_CHILD_STATES]), max_size=60)


@given(st.lists(ANY_STEP_STATE, max_size=60))
def test_tally_counts_each_ended_state(states: list[int]) -> None:
    tally = rules.tally(iter(states))
    assert tally.total == len(states)
    assert (tally.completed, tally.failed, tally.cancelled) == (
        states.count(s.STEP_STATE_COMPLETED), states.count(s.STEP_STATE_FAILED), states.count(s.STEP_STATE_CANCELLED)
    )


@given(final_children())
@example((counted(failed=3), 10**9))
@example(([], 0))
@example((counted(completed=1, failed=1), 1))
@example((counted(1, 1, 1), 0))
def test_fanout_outcome(case: tuple[list[int], int]) -> None:
    states, tolerance = case
    tally = rules.tally(states)
    outcome = rules.fanout_outcome(tally, tolerance)
    should_fail = tally.failed > tolerance or (tally.completed == 0 and tally.failed > 0)
    assert (outcome.state == s.STEP_STATE_FAILED) == should_fail
    assert outcome.state in (s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED)
    machine.check_step(s.STEP_STATE_WAITING, outcome.state)
    if should_fail:
        assert outcome.reason == s.REASON_CHILD_FAILURES
    elif not states:
        assert outcome.reason == s.REASON_NO_CHILDREN
    else:
        assert outcome.reason == s.REASON_UNSPECIFIED
    assert outcome.message


@given(ANY_CHILDREN, TOLERANCES)
@example(counted(failed=3), 10**9)
@example(counted(cancelled=2), 10**9)
def test_fanout_outcome_never_completed_without_a_completed_child(states: list[int], tolerance: int) -> None:
    """Whatever the children (even states the runner cannot end on) and tolerance:
    children that failed and none that completed is never COMPLETED; nor is a
    fan-out with children of which none completed."""
    tally = rules.tally(states)
    outcome = rules.fanout_outcome(tally, tolerance)
    if tally.completed == 0 and tally.failed > 0:
        assert outcome.state == s.STEP_STATE_FAILED
    if tally.total > 0 and tally.completed == 0:
        assert outcome.state == s.STEP_STATE_FAILED
    if rules.fanout_over_tolerance(tally.failed, tolerance):
        assert outcome.state == s.STEP_STATE_FAILED


def stopped(stop: rules.Stop, states: list[int]) -> list[int]:
    """The children's states once `stop` ended the unfinished ones, as the runner records them."""
    return [new if (new := stop.stopped_state(state)) is not None else state for state in states]


@given(ANY_CHILDREN, st.integers(0, 60))
def test_a_fanout_stopped_over_its_tolerance_fails_with_every_child_ended(states: list[int], tolerance: int) -> None:
    """As the runner goes: failures over the tolerance, the unfinished children
    stopped (OVER_TOLERANCE), then the outcome of the tally."""
    ended = stopped(rules.OVER_TOLERANCE, [*states, *counted(failed=tolerance + 1)])
    assert all(state in ENDED_CHILD_STATES for state in ended)
    outcome = rules.fanout_outcome(rules.tally(ended), tolerance)
    assert (outcome.state, outcome.reason) == (s.STEP_STATE_FAILED, s.REASON_CHILD_FAILURES)


@given(ANY_CHILDREN, LIMITS)
def test_a_fanout_that_timed_out_fails_with_every_child_ended(states: list[int], limit: float) -> None:
    ended = stopped(rules.fanout_timeout(limit), states)
    assert all(state in ENDED_CHILD_STATES for state in ended)
    # Of the children, those that ran fail and those that never started are cancelled.
    for before, after in zip(states, ended, strict=True):
        if before == s.STEP_STATE_PENDING:
            assert after == s.STEP_STATE_CANCELLED
    outcome = rules.fanout_timed_out(limit, rules.tally(ended))
    assert (outcome.state, outcome.reason) == (s.STEP_STATE_FAILED, s.REASON_TIMEOUT)
    machine.check_step(s.STEP_STATE_WAITING, outcome.state)
    assert outcome.message.endswith(f"{ended.count(s.STEP_STATE_COMPLETED)} of {len(states)} children completed")


@given(st.integers(0, 100_000), st.integers(1, 100_000))
def test_a_fanout_waits_for_its_children(children: int, concurrency: int) -> None:
    waiting = rules.fanout_started(children, concurrency)
    machine.check_step(s.STEP_STATE_RUNNING, waiting.state)
    assert waiting.state == s.STEP_STATE_WAITING


@given(st.lists(ANY_STEP_STATE, max_size=8))
def test_job_outcome_completed_iff_every_step_completed(states: list[int]) -> None:
    steps = {f"step-{index}": state for index, state in enumerate(states)}
    outcome = rules.job_outcome(steps)
    every_completed = all(state == s.STEP_STATE_COMPLETED for state in states)
    assert (outcome.state == s.JOB_STATE_COMPLETED) == every_completed
    machine.check_job(s.JOB_STATE_RUNNING, outcome.state)
    if every_completed:
        assert outcome.reason == s.REASON_UNSPECIFIED
    else:
        assert (outcome.state, outcome.reason) == (s.JOB_STATE_FAILED, s.REASON_STEP_FAILED)
        failed = [name for name, state in steps.items() if state == s.STEP_STATE_FAILED]
        if failed:
            assert outcome.message == "failed steps: " + ", ".join(failed)


@given(st.lists(st.sampled_from(sorted(TERMINAL_STEP_STATES)), max_size=6), st.booleans())
@example([], False)
def test_a_step_whose_dependencies_ended_runs_or_is_skipped(dependencies: list[int], always_run: bool) -> None:
    states = {f"dep-{index}": state for index, state in enumerate(dependencies)}
    skipped = rules.skip_outcome(states, always_run)
    if always_run or all(state == s.STEP_STATE_COMPLETED for state in dependencies):
        assert skipped is None
        return
    assert skipped is not None
    machine.check_step(s.STEP_STATE_PENDING, skipped.state)
    assert (skipped.state, skipped.reason) == (s.STEP_STATE_SKIPPED, s.REASON_DEPENDENCY_FAILED)
    named = [f"{name} ({step_state_word(state)})" for name, state in states.items() if state != s.STEP_STATE_COMPLETED]
    assert skipped.message == "dependencies did not complete: " + ", ".join(named)


@given(st.lists(ANY_STEP_STATE, max_size=5), st.sampled_from(UNENDED_STEP_STATES), st.booleans())
def test_a_step_is_never_decided_before_its_dependencies_ended(
    dependencies: list[int], unended: int, always_run: bool
) -> None:
    states = {f"dep-{index}": state for index, state in enumerate([*dependencies, unended])}
    with pytest.raises(ValueError, match="have not ended"):
        rules.skip_outcome(states, always_run)


INTERRUPTIONS = st.one_of(
    st.sampled_from([rules.CANCELLED_BY_REQUEST, rules.ORCHESTRATOR_RESTARTED, rules.SHUT_DOWN]),
    st.builds(rules.job_timed_out, LIMITS),
    st.builds(rules.job_internal_error, ERRORS),
    st.builds(rules.left_in_flight, st.booleans()),
)
STOPS = st.one_of(INTERRUPTIONS, st.just(rules.OVER_TOLERANCE), st.builds(rules.fanout_timeout, LIMITS))


@given(STOPS, ANY_STEP_STATE)
def test_a_stop_ends_only_unfinished_work_by_a_legal_transition(stop: rules.Stop, current: int) -> None:
    new = stop.stopped_state(current)
    if current in TERMINAL_STEP_STATES:
        assert new is None, "work that ended keeps its own state"
        return
    assert new in TERMINAL_STEP_STATES
    machine.check_step(current, new)
    if current in UNENDED_CHILD_STATES:
        machine.check_child(current, new)
    if current == s.STEP_STATE_PENDING:
        assert new == s.STEP_STATE_CANCELLED, "work that never started is never shown FAILED"
    assert stop.message


@given(INTERRUPTIONS, st.sampled_from([s.JOB_STATE_PENDING, s.JOB_STATE_RUNNING]))
def test_an_interruption_ends_the_job_by_a_legal_transition(interruption: rules.Interruption, current: int) -> None:
    machine.check_job(current, interruption.job_state)
    assert interruption.job_state in TERMINAL_JOB_STATES
    cancelled = interruption.job_state == s.JOB_STATE_CANCELLED
    assert cancelled == (interruption.reason == s.REASON_CANCELLED_BY_REQUEST)


def test_a_job_left_in_flight_keeps_a_recorded_cancellation() -> None:
    assert rules.left_in_flight(cancel_requested=True).job_state == s.JOB_STATE_CANCELLED
    restarted = rules.left_in_flight(cancel_requested=False)
    assert (restarted.job_state, restarted.reason) == (s.JOB_STATE_FAILED, s.REASON_ORCHESTRATOR_RESTARTED)


ATTEMPT_ENDS = st.one_of(
    st.builds(rules.work_completed, st.text(max_size=20)),
    st.builds(rules.work_failed, st.text(max_size=20)),
    st.builds(rules.worker_error, ERRORS),
    st.builds(rules.attempt_timed_out, st.integers(1, MAX_RETRIES + 1), LIMITS),
    st.builds(rules.internal_error, ERRORS),
)


@given(ATTEMPT_ENDS, st.integers(1, MAX_RETRIES + 1), st.floats(min_value=0, max_value=3600))
def test_an_attempt_ends_and_retries_by_legal_transitions(end: rules.Outcome, attempt: int, delay: float) -> None:
    """Steps and children alike: started from PENDING, ended from RUNNING, and
    kept RUNNING while a failed attempt waits for the next."""
    for check in (machine.check_step, machine.check_child):
        check(s.STEP_STATE_PENDING, rules.attempt_started(1, MAX_RETRIES + 1, None).state)
        check(s.STEP_STATE_RUNNING, end.state)
        if end.state == s.STEP_STATE_FAILED:
            waiting = rules.retrying(attempt, end, delay)
            check(s.STEP_STATE_RUNNING, waiting.state)
            check(waiting.state, rules.attempt_started(attempt + 1, attempt + 1, end).state)
    assert end.state in (s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED)


@given(st.text(max_size=20), ERRORS, st.integers(2, MAX_RETRIES + 1))
def test_attempt_messages_carry_what_the_worker_said(text: str, error: Exception, attempt: int) -> None:
    assert rules.work_completed(text) == rules.Outcome(s.STEP_STATE_COMPLETED, s.REASON_UNSPECIFIED, text)
    assert rules.work_failed(text) == rules.Outcome(s.STEP_STATE_FAILED, s.REASON_WORK_FAILED, text)
    for failure in (rules.worker_error(error), rules.internal_error(error)):
        assert (failure.state, failure.reason) == (s.STEP_STATE_FAILED, s.REASON_WORK_FAILED)
        assert failure.message.endswith(f"{type(error).__name__}: {error}")
    failed = rules.work_failed(text)
    retry = rules.attempt_started(attempt, MAX_RETRIES + 1, failed)
    assert retry.reason == s.REASON_RETRYING
    assert retry.message.startswith(f"attempt {attempt} of ") and retry.message.endswith(f"previous: {text}")
    assert rules.retrying(attempt, failed, 1.0).message.startswith(f"attempt {attempt} failed: {text}; ")


@given(st.integers(1, MAX_RETRIES + 1), LIMITS)
def test_an_attempt_that_timed_out_says_which(attempt: int, limit: float) -> None:
    timed_out = rules.attempt_timed_out(attempt, limit)
    assert (timed_out.state, timed_out.reason) == (s.STEP_STATE_FAILED, s.REASON_TIMEOUT)
    assert timed_out.message.startswith(f"attempt {attempt} timed out after ")


@given(st.floats(min_value=0.001, max_value=10**6))
def test_backoff_doubles_up_to_its_cap(retry_backoff: float) -> None:
    delays = [rules.backoff_delay(retry_backoff, attempt) for attempt in range(1, MAX_RETRIES + 2)]
    assert delays[0] == min(retry_backoff, rules.MAX_BACKOFF)
    for before, after in itertools.pairwise(delays):
        assert after == min(rules.MAX_BACKOFF, 2 * before)
    assert max(delays) <= rules.MAX_BACKOFF


@dataclass(frozen=True)
class Kind:
    check: Callable[[int, int], None]
    initial: int
    rank: dict[int, int]
    terminal: frozenset[int]
    states: list[int]


KINDS = {
    "job": Kind(machine.check_job, machine.INITIAL_JOB_STATE, JOB_RANK, TERMINAL_JOB_STATES, JOB_STATES),
    "step": Kind(machine.check_step, machine.INITIAL_STEP_STATE, STEP_RANK, TERMINAL_STEP_STATES, STEP_STATES),
    "child": Kind(machine.check_child, machine.INITIAL_STEP_STATE, STEP_RANK, TERMINAL_STEP_STATES, STEP_STATES),
}


@given(st.sampled_from(sorted(KINDS)), st.data())
def test_transitions_never_leave_a_terminal_state_nor_go_backwards(kind: str, data: st.DataObject) -> None:
    machine_kind = KINDS[kind]
    check, state, rank, terminal = machine_kind.check, machine_kind.initial, machine_kind.rank, machine_kind.terminal
    proposals = data.draw(st.lists(st.sampled_from([*machine_kind.states, 0]), max_size=30))
    history = [state]
    for proposed in proposals:
        try:
            check(state, proposed)
        except machine.IllegalTransition:
            continue
        assert state not in terminal, f"{kind} left terminal state {state} for {proposed}"
        assert rank[proposed] >= rank[state], f"{kind} went back from {state} to {proposed}"
        state = proposed
        history.append(state)
    if kind == "child":
        assert s.STEP_STATE_WAITING not in history and s.STEP_STATE_SKIPPED not in history
    if kind != "job":
        # Only a step that never started is skipped.
        for before, after in itertools.pairwise(history):
            if after == s.STEP_STATE_SKIPPED:
                assert before == s.STEP_STATE_PENDING


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_terminal_state_is_final(kind: str) -> None:
    machine_kind = KINDS[kind]
    for current in machine_kind.terminal:
        for new in [*machine_kind.states, 0]:
            with pytest.raises(machine.IllegalTransition):
                machine_kind.check(current, new)


def test_terminal_states_come_from_the_contract() -> None:
    assert {s.JOB_STATE_COMPLETED, s.JOB_STATE_FAILED, s.JOB_STATE_CANCELLED} == TERMINAL_JOB_STATES
    assert {s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED, s.STEP_STATE_CANCELLED,
            s.STEP_STATE_SKIPPED} == TERMINAL_STEP_STATES


UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@given(st.lists(st.tuples(st.sampled_from(sorted(UNITS)), st.integers(0, 10_000)), min_size=1, max_size=5),
       st.booleans(), st.booleans())
def test_parse_duration_round_trips(parts: list[tuple[str, int]], upper: bool, spaced: bool) -> None:
    text = (" " if spaced else "").join(f"{amount}{unit}" for unit, amount in parts)
    if upper:
        text = text.upper()
    expected = sum(amount * UNITS[unit] for unit, amount in parts)
    assert math.isclose(parse_duration(text), expected, rel_tol=1e-9, abs_tol=1e-9)


@given(st.integers(0, 10**6), st.integers(0, 999))
def test_parse_duration_plain_and_fractional_numbers(whole: int, fraction: int) -> None:
    assert parse_duration(str(whole)) == whole
    assert math.isclose(parse_duration(f"{whole}.{fraction:03d}s"), whole + fraction / 1000)
    assert math.isclose(parse_duration(f"{whole}.{fraction:03d}"), whole + fraction / 1000)


GRAMMAR = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")


@given(st.text(alphabet="0123456789.-+smhdxeEinfa _", max_size=12))
@example("10x")
@example("-5s")
@example("-5")
@example("nan")
@example("inf")
@example("-inf")
@example("infinity")
@example("1e400")
@example("9" * 400 + "s")
@example("")
@example("   ")
@example("s")
@example("1.s")
@example(".5s")
@example("5ss")
@example("1h-30m")
def test_parse_duration_rejects_garbage(text: str) -> None:
    try:
        value = parse_duration(text)
    except ValueError:
        return
    # Accepted: a finite, non-negative number of seconds written as a plain
    # number or as number-unit pairs, nothing else.
    assert math.isfinite(value) and value >= 0
    cleaned = text.strip().lower().replace(" ", "")
    plain = True
    try:
        float(cleaned)
    except ValueError:
        plain = False
    assert plain or GRAMMAR.fullmatch(cleaned), f"accepted {text!r} as {value}"


@pytest.mark.parametrize("text", ["10x", "-5s", "-1", "nan", "inf", "-inf", "infinity", "1e400", "", "  ", "ms",
                                  "1.s", ".5s", "5ss", "1h-30m", "1 hour"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_parse_duration_accepts_every_finite_plain_number(value: float) -> None:
    assume(value >= 0)
    assert parse_duration(repr(value)) == value
