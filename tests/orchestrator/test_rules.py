"""Property tests of the orchestrator's pure domain: outcome rules, readiness,
the transition tables and durations."""

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
from stepstream.states import TERMINAL_JOB_STATES, TERMINAL_STEP_STATES

from orchestrator_svc.domain import machine
from orchestrator_svc.domain.durations import parse_duration
from orchestrator_svc.domain.rules import ChildTally, Readiness, fanout_outcome, job_outcome, readiness

STEP_STATES: list[int] = [v for v in s.StepState.values() if v != s.STEP_STATE_UNSPECIFIED]
JOB_STATES: list[int] = [v for v in s.JobState.values() if v != s.JOB_STATE_UNSPECIFIED]
ANY_STEP_STATE = st.sampled_from(STEP_STATES)

# How far along an entity is; a legal transition never lowers it.
STEP_RANK = {
    s.STEP_STATE_PENDING: 0,
    s.STEP_STATE_RUNNING: 1,
    s.STEP_STATE_WAITING: 2,
    **dict.fromkeys(TERMINAL_STEP_STATES, 3),
}
JOB_RANK = {s.JOB_STATE_PENDING: 0, s.JOB_STATE_RUNNING: 1, **dict.fromkeys(TERMINAL_JOB_STATES, 2)}


TOLERANCES = st.one_of(st.integers(0, 60), st.just(10**9))


@st.composite
def final_tallies(draw: st.DrawFn) -> tuple[ChildTally, int]:
    """Tallies as a fan-out can end: every child ended, and children are only
    cancelled (FANOUT_FAILED) once the failures went over the tolerance."""
    tolerance = draw(TOLERANCES)
    completed = draw(st.integers(0, 50))
    failed = draw(st.integers(0, 50))
    cancelled = draw(st.integers(0, 50)) if failed > tolerance else 0
    return ChildTally(completed + failed + cancelled, completed, failed, cancelled), tolerance


@st.composite
def any_tallies(draw: st.DrawFn) -> ChildTally:
    completed, failed, cancelled = (draw(st.integers(0, 50)) for _ in range(3))
    total = completed + failed + cancelled + draw(st.sampled_from([0, 0, 1, 5]))
    return ChildTally(total=total, completed=completed, failed=failed, cancelled=cancelled)


@given(final_tallies())
@example((ChildTally(total=3, failed=3), 10**9))
@example((ChildTally(total=0), 0))
@example((ChildTally(total=2, completed=1, failed=1), 1))
@example((ChildTally(total=3, completed=1, failed=1, cancelled=1), 0))
def test_fanout_outcome(case: tuple[ChildTally, int]) -> None:
    tally, tolerance = case
    outcome = fanout_outcome(tally, tolerance)
    should_fail = tally.failed > tolerance or (tally.completed == 0 and tally.failed > 0)
    assert (outcome.state == s.STEP_STATE_FAILED) == should_fail
    assert outcome.state in (s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED)
    if should_fail:
        assert outcome.reason == s.REASON_CHILD_FAILURES
    elif tally.total == 0:
        assert outcome.reason == s.REASON_NO_CHILDREN
    else:
        assert outcome.reason == s.REASON_UNSPECIFIED
    assert outcome.message


@given(any_tallies(), TOLERANCES)
@example(ChildTally(total=3, failed=3), 10**9)
@example(ChildTally(total=2, cancelled=2), 10**9)
def test_fanout_outcome_never_completed_without_a_completed_child(tally: ChildTally, tolerance: int) -> None:
    """Whatever the tally (even ones the runner cannot produce) and tolerance:
    children that failed and none that completed is never COMPLETED; nor is a
    fan-out with children of which none completed."""
    outcome = fanout_outcome(tally, tolerance)
    if tally.completed == 0 and tally.failed > 0:
        assert outcome.state == s.STEP_STATE_FAILED
    if tally.total > 0 and tally.completed == 0:
        assert outcome.state == s.STEP_STATE_FAILED
    if tally.failed > tolerance:
        assert outcome.state == s.STEP_STATE_FAILED


@given(st.lists(ANY_STEP_STATE, max_size=8))
def test_job_outcome_completed_iff_every_step_completed(states: list[int]) -> None:
    steps = {f"step-{index}": state for index, state in enumerate(states)}
    outcome = job_outcome(steps)
    every_completed = all(state == s.STEP_STATE_COMPLETED for state in states)
    assert (outcome.state == s.JOB_STATE_COMPLETED) == every_completed
    if every_completed:
        assert outcome.reason == s.REASON_UNSPECIFIED
    else:
        assert (outcome.state, outcome.reason) == (s.JOB_STATE_FAILED, s.REASON_STEP_FAILED)
        failed = [name for name, state in steps.items() if state == s.STEP_STATE_FAILED]
        if failed:
            assert outcome.message == "failed steps: " + ", ".join(failed)


@given(st.lists(ANY_STEP_STATE, max_size=6), st.booleans())
def test_readiness(dependencies: list[int], always_run: bool) -> None:
    ready = readiness(iter(dependencies), always_run)
    all_ended = all(state in TERMINAL_STEP_STATES for state in dependencies)
    all_completed = all(state == s.STEP_STATE_COMPLETED for state in dependencies)
    if not all_ended:
        assert ready is Readiness.WAIT
    elif always_run or all_completed:
        assert ready is Readiness.RUN
    else:
        assert ready is Readiness.SKIP
    if always_run:
        assert ready is not Readiness.SKIP
    if not dependencies:
        assert ready is Readiness.RUN


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
