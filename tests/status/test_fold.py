"""Property tests of the status service's fold (status_svc/domain/fold.py): the
one rule deciding whether an orchestrator event changes anything.

No asyncio, no I/O: histories of one job are generated the way the orchestrator
produces them (job pending -> running -> terminal; steps with retries, skips and
cancels; fan-out steps whose children are spawned, run, retry and end), as real
records_pb2.StepEvent messages with strictly increasing seqs. Then any
permutation with any duplication must fold to exactly what the in-order sequence
folds to, and to the last record of every entity; no entity's (terminal, seq)
version may ever decrease, a terminal record is never replaced, and the counts
always equal a recount of the held states.

The same histories go through the projector (status_svc/domain/projector.py)
as ingest sends them, JobFold.apply's changes cut into transactions: the change
log it writes and the entities it stores must agree with the fold and with each
other, and what it stores must rebuild the fold after a restart.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.states import TERMINAL_JOB_STATES, TERMINAL_STEP_STATES
from stepstream.status.v1 import status_service_pb2

from status_svc.domain.fold import NO_VERSION, Change, JobFold, Version
from status_svc.domain.projection import Staleness, freshness, job_status, step_stats
from status_svc.domain.projector import (
    ChangeEntry,
    ChildVersion,
    HeldJob,
    LoadedJob,
    Projection,
    Projector,
    StoredChild,
    StoredHeader,
    StoredStep,
    restore,
)
from tests.helpers import entity_key

Event = records_pb2.StepEvent
Key = tuple[Any, ...]
JOB_ID = "job-1"
SOURCE = "orch:1"
BASE_NANOS = 1_700_000_000 * 10**9

PENDING, RUNNING, WAITING = s.STEP_STATE_PENDING, s.STEP_STATE_RUNNING, s.STEP_STATE_WAITING
COMPLETED, FAILED, CANCELLED, SKIPPED = (
    s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED, s.STEP_STATE_CANCELLED, s.STEP_STATE_SKIPPED,
)
OK, RETRYING = s.REASON_UNSPECIFIED, s.REASON_RETRYING

FOLD_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# One scripted transition: (state, reason, attempt, message).
Transition = tuple[int, int, int, str]


# --- generating histories --------------------------------------------------------------------------------------


@dataclass
class Entity:
    key: Key
    record: records_pb2.Job | records_pb2.Step | records_pb2.Child
    script: list[Transition]
    pos: int = 0
    ready: Callable[[Entity], bool] = lambda _: True
    children: list[Entity] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.pos >= len(self.script)

    @property
    def finished(self) -> bool:
        """Its terminal transition has been emitted."""
        return self.done and is_terminal(self.key, self.script[-1][0])


def is_terminal(key: Key, state: int) -> bool:
    return state in (TERMINAL_JOB_STATES if key[0] == "job" else TERMINAL_STEP_STATES)


def _ts(seq: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(BASE_NANOS + seq * 1_000_003)
    return ts


class Recorder:
    """Emits the entities' scripted transitions as StepEvents, numbering them."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, entity: Entity) -> None:
        state, reason, attempt, message = entity.script[entity.pos]
        entity.pos += 1
        seq = len(self.events) + 1
        record = entity.record
        record.state, record.reason, record.message = state, reason, message  # type: ignore[assignment]
        if isinstance(record, records_pb2.Job):
            if state == s.JOB_STATE_RUNNING and not record.HasField("started_at"):
                record.started_at.CopyFrom(_ts(seq))
            if message == "cancellation requested":
                record.cancel_requested_at.CopyFrom(_ts(seq))
            if state in TERMINAL_JOB_STATES:
                record.finished_at.CopyFrom(_ts(seq))
            event = Event(seq=seq, time=_ts(seq), job=record)
        else:
            record.attempt = attempt
            if state == RUNNING and not record.HasField("started_at"):
                record.started_at.CopyFrom(_ts(seq))
            if state in TERMINAL_STEP_STATES:
                record.finished_at.CopyFrom(_ts(seq))
            event = Event(seq=seq, time=_ts(seq))
            getattr(event, entity.key[0]).CopyFrom(record)
        # The recorder keeps mutating its record; the event holds a copy.
        self.events.append(Event.FromString(event.SerializeToString()))


def _work_script(draw: st.DrawFn, can_skip: bool) -> list[Transition]:
    """A step or child that does work: maybe never starts; else attempts until it ends."""
    script: list[Transition] = [(PENDING, OK, 0, "")]
    if draw(st.integers(0, 5)) == 0:
        options = [(CANCELLED, s.REASON_CANCELLED_BY_REQUEST)] + ([(SKIPPED, s.REASON_DEPENDENCY_FAILED)] * can_skip)
        state, reason = draw(st.sampled_from(options))
        return [*script, (state, reason, 0, "never ran")]
    attempts = draw(st.integers(1, 3))
    script.append((RUNNING, OK, 1, ""))
    for attempt in range(1, attempts):
        script.append((RUNNING, RETRYING, attempt, f"attempt {attempt} failed; retrying"))
        script.append((RUNNING, RETRYING, attempt + 1, f"attempt {attempt + 1}"))
    state, reason = draw(st.sampled_from([
        (COMPLETED, OK), (FAILED, s.REASON_WORK_FAILED), (FAILED, s.REASON_TIMEOUT),
        (CANCELLED, s.REASON_CANCELLED_BY_REQUEST),
    ]))
    return [*script, (state, reason, attempts, f"ended {state}")]


@dataclass
class History:
    events: list[Event]
    step_names: list[str]
    children: dict[str, int]


@st.composite
def histories(draw: st.DrawFn) -> History:
    """One job's events in the order an orchestrator could record them."""
    rnd: random.Random = draw(st.randoms(use_true_random=False))
    job = Entity(("job",), records_pb2.Job(id=JOB_ID, name="prop-job", created_at=_ts(1)), [
        (s.JOB_STATE_PENDING, OK, 0, ""), (s.JOB_STATE_RUNNING, OK, 0, ""),
    ])
    cancel = draw(st.booleans())
    steps: list[Entity] = []
    every: list[Entity] = []
    for index in range(draw(st.integers(1, 3))):
        name = f"step-{index}"
        fanout = draw(st.booleans())
        step = Entity(("step", name), records_pb2.Step(job_id=JOB_ID, name=name, index=index,
                                                        type="fanout" if fanout else "command", max_attempts=3),
                      [])
        if not fanout:
            step.script = _work_script(draw, can_skip=index > 0)
        elif draw(st.integers(0, 4)) == 0:
            step.script = [(PENDING, OK, 0, ""), (RUNNING, OK, 1, ""), (COMPLETED, s.REASON_NO_CHILDREN, 1, "none")]
        else:
            step.script = [(PENDING, OK, 0, ""), (RUNNING, OK, 1, ""), (WAITING, OK, 1, "")]
            for child_index in range(draw(st.integers(1, 5))):
                child = Entity(("child", name, child_index),
                               records_pb2.Child(job_id=JOB_ID, step_name=name, index=child_index,
                                                 item=f"item-{child_index}"),
                               _work_script(draw, can_skip=False))
                step.children.append(child)
            outcome = draw(st.sampled_from([(COMPLETED, OK), (FAILED, s.REASON_CHILD_FAILURES),
                                            (CANCELLED, s.REASON_CANCELLED_BY_REQUEST)]))
            step.script.append((*outcome, 1, "children ended"))
        steps.append(step)
        every.append(step)
        every.extend(step.children)

    def step_ready(step: Entity, previous: Entity | None) -> bool:
        nxt = step.script[step.pos][0]
        if step.pos == 1 and nxt in (RUNNING, SKIPPED) and previous is not None and not previous.finished:
            return False  # depends on the step before it
        if nxt == WAITING:
            return all(child.pos >= 1 for child in step.children)
        if step.script[step.pos - 1][0] == WAITING:
            return all(child.finished for child in step.children)
        return True

    def child_ready(child: Entity, step: Entity) -> bool:
        if child.pos == 0:
            return step.pos == 2  # spawned while the step runs, before it waits
        return step.pos >= 3  # run once the step is waiting

    def bind_step(previous: Entity | None) -> Callable[[Entity], bool]:
        return lambda entity: step_ready(entity, previous)

    def bind_child(step: Entity) -> Callable[[Entity], bool]:
        return lambda entity: child_ready(entity, step)

    for position, step in enumerate(steps):
        step.ready = bind_step(steps[position - 1] if position else None)
        for child in step.children:
            child.ready = bind_child(step)

    recorder = Recorder()
    recorder.emit(job)  # PENDING, then every step PENDING, then RUNNING: as the orchestrator creates them
    for step in steps:
        recorder.emit(step)
    recorder.emit(job)
    cancel_pending = cancel
    while True:
        candidates = [e for e in every if not e.done and e.ready(e)]
        if cancel_pending and rnd.random() < 0.1:
            job.script.append((s.JOB_STATE_RUNNING, OK, 0, "cancellation requested"))
            recorder.emit(job)
            cancel_pending = False
            continue
        if not candidates:
            break
        recorder.emit(rnd.choice(candidates))
    assert all(e.finished for e in every), "the generator left an entity unfinished"
    final = s.JOB_STATE_CANCELLED if cancel else draw(st.sampled_from([s.JOB_STATE_COMPLETED, s.JOB_STATE_FAILED]))
    job.script.append((final, OK, 0, "job ended"))
    recorder.emit(job)
    return History(recorder.events, [step.key[1] for step in steps],
                   {step.key[1]: len(step.children) for step in steps})


# --- observing a fold ------------------------------------------------------------------------------------------


def versions(fold: JobFold) -> dict[Key, Version]:
    held: dict[Key, Version] = {("job",): fold.job_version}
    held.update({("step", name): entry.version for name, entry in fold.steps.items()})
    held.update({("child", *key): version for key, (_, version) in fold.children.items()})
    return held


def states(fold: JobFold) -> dict[Key, int]:
    held: dict[Key, int] = {("job",): fold.state}
    held.update({("step", name): entry.state for name, entry in fold.steps.items()})
    held.update({("child", *key): state for key, (state, _) in fold.children.items()})
    return held


def records(fold: JobFold) -> dict[Key, bytes]:
    held: dict[Key, bytes] = {}
    if fold.job is not None:
        held[("job",)] = fold.job.SerializeToString(deterministic=True)
    for name, entry in fold.steps.items():
        if entry.record is not None:
            held[("step", name)] = entry.record.SerializeToString(deterministic=True)
    return held


def picture(fold: JobFold) -> dict[str, Any]:
    """Everything a fold holds, comparable with ==."""
    return {
        "records": records(fold),
        "versions": versions(fold),
        "children": dict(fold.children),
        "step_counts": dict(+fold.step_counts),
        "child_counts": {name: dict(+entry.children) for name, entry in fold.steps.items()},
    }


def assert_counts_match_a_recount(fold: JobFold) -> None:
    assert all(count > 0 for count in fold.step_counts.values()), fold.step_counts
    recount = Counter(entry.state for entry in fold.steps.values() if entry.record is not None)
    assert dict(fold.step_counts) == dict(recount)
    for name, entry in fold.steps.items():
        assert all(count > 0 for count in entry.children.values()), (name, entry.children)
        children = Counter(state for (step, _), (state, _) in fold.children.items() if step == name)
        assert dict(entry.children) == dict(children), name


def fold_all(events: Sequence[Event], fold: JobFold | None = None) -> JobFold:
    fold = fold or JobFold(JOB_ID)
    for event in events:
        fold.apply(event)
    return fold


def last_records(events: Sequence[Event]) -> dict[Key, Event]:
    """The independent oracle: each entity's last event in seq order."""
    last: dict[Key, Event] = {}
    for event in sorted(events, key=lambda e: e.seq):
        last[entity_key(event)] = event
    return last


@dataclass
class Kept:
    """What a store keeps of one job's projections: each entity as it was last
    stored (tests/status/test_store_conformance.py holds every backend to this)."""

    headers: dict[str, StoredHeader] = field(default_factory=dict)
    steps: dict[tuple[str, str], StoredStep] = field(default_factory=dict)
    children: dict[tuple[str, str, int], StoredChild] = field(default_factory=dict)

    def keep(self, projected: Projection) -> None:
        self.headers.update(projected.headers)
        self.steps.update(projected.steps)
        self.children.update(projected.children)

    def reopened(self) -> HeldJob:
        """The job as a restart rebuilds it (a job never stored starts afresh)."""
        header = self.headers.get(JOB_ID)
        if header is None:
            assert not self.steps and not self.children, "steps or children stored without their job"
            return HeldJob(JobFold(JOB_ID), SOURCE)
        children = [ChildVersion(c.record.step_name, c.record.index, c.record.state, c.seq)
                    for c in self.children.values()]
        return restore(LoadedJob(header, list(self.steps.values()), children))


def project_all(events: Sequence[Event], job: HeldJob, projector: Projector) -> None:
    """Apply and project each event, as the writer does."""
    for event in events:
        change = job.fold.apply(event)
        if change is not None:
            projector.project(job, change)


def first_job_event(events: Sequence[Event], delivery: Sequence[int]) -> int:
    """Where in `delivery` the job's first record arrives: the writer creates a job
    (and so stores anything of it) only in a transaction that brings its record."""
    return next(i for i, position in enumerate(delivery) if events[position].HasField("job"))


# --- properties ----------------------------------------------------------------------------------------------


@FOLD_SETTINGS
@given(histories())
def test_in_order_history_folds_to_every_entitys_last_record(history: History) -> None:
    fold = JobFold(JOB_ID)
    for event in history.events:
        # Every orchestrator event is a real transition: in order, each one wins.
        assert fold.apply(event) is not None, f"in-order event {event.seq} was ignored"
    last = last_records(history.events)
    assert fold.job == last[("job",)].job
    assert fold.finished
    assert set(fold.steps) == set(history.step_names)
    for name in history.step_names:
        assert fold.steps[name].record == last[("step", name)].step
        assert fold.steps[name].version == (True, last[("step", name)].seq)
        assert sum(fold.steps[name].children.values()) == history.children[name]
    expected_children = {key[1:]: (e.child.state, (True, e.seq)) for key, e in last.items() if key[0] == "child"}
    assert fold.children == expected_children
    assert sum(fold.step_counts.values()) == len(history.step_names)
    assert_counts_match_a_recount(fold)


@FOLD_SETTINGS
@given(history=histories(), data=st.data())
def test_any_order_with_duplicates_folds_to_the_in_order_result(history: History, data: st.DataObject) -> None:
    events = history.events
    expected = picture(fold_all(events))
    extra = data.draw(st.lists(st.integers(0, len(events) - 1), max_size=len(events)), label="duplicates")
    delivery = data.draw(st.permutations([*range(len(events)), *extra]), label="delivery")

    fold = JobFold(JOB_ID)
    applied: set[int] = set()
    for position in delivery:
        event = events[position]
        before_versions, before_records, before_states = versions(fold), records(fold), states(fold)
        change = fold.apply(event)
        after_versions, after_states = versions(fold), states(fold)
        key = entity_key(event)
        # The event wins exactly when it is newer, by (terminal, seq), than what is held.
        newer = (event_version(event) > before_versions.get(key, NO_VERSION))
        assert (change is not None) == newer, (event.seq, before_versions.get(key))
        if position in applied:
            assert change is None, f"duplicate of seq {event.seq} changed something"
        applied.add(position)
        for held, version in before_versions.items():
            assert after_versions[held] >= version, f"{held} went back from {version} to {after_versions[held]}"
            state = before_states[held]
            if is_terminal(held, state):
                assert after_states[held] == state, f"terminal {held} replaced"
                if held in before_records:
                    assert records(fold)[held] == before_records[held], f"terminal {held} rewritten"
        if change is None:
            assert after_versions == before_versions and records(fold) == before_records
        else:
            assert after_versions[key] == event_version(event)
            assert_change_describes(change, event, before_states, after_states)
        assert_counts_match_a_recount(fold)
    assert picture(fold) == expected


@FOLD_SETTINGS
@given(history=histories(), data=st.data())
def test_persisting_and_reloading_midway_changes_nothing(history: History, data: st.DataObject) -> None:
    """A restart: what the projector stores of a fold, read back by restore(), is
    enough to go on applying any later delivery, duplicates included, to the same result."""
    events = history.events
    expected = picture(fold_all(events))
    delivery = data.draw(st.permutations(range(len(events))), label="delivery")
    split = data.draw(st.sampled_from([0, *range(first_job_event(events, delivery) + 1, len(events) + 1)]),
                      label="split")
    replayed = data.draw(st.lists(st.integers(0, len(events) - 1), max_size=10), label="replayed")
    first = HeldJob(JobFold(JOB_ID), SOURCE)
    projector = Projector(0, lambda _: None)
    project_all([events[i] for i in delivery[:split]], first, projector)
    kept = Kept()
    kept.keep(projector.finish())
    reloaded = kept.reopened()
    assert picture(reloaded.fold) == picture(first.fold)
    assert reloaded.source == SOURCE
    for position in replayed:  # re-delivered after the restart
        if position in delivery[:split]:
            assert reloaded.fold.apply(events[position]) is None
    fold_all([events[i] for i in delivery[split:]], reloaded.fold)
    assert picture(reloaded.fold) == expected


@dataclass
class Expected:
    """The change log one transaction should write, by the projector's rules,
    worked out from the winning events alone: each job or step event (and
    each freshness change) is an entry of its own, after the child events of
    the job not yet in one; a step's child events in between are one entry,
    showing the step as it was during them."""

    entries: list[tuple[Any, ...]] = field(default_factory=list)
    # step -> [child events awaiting an entry, the step's state meanwhile], in the order their runs began
    runs: dict[str, list[int]] = field(default_factory=dict)
    # for each child event taken: (the child, the run's step), resolved to an entry index on flush
    waiting: list[Key] = field(default_factory=list)
    # child -> the index of the entry its last event is in
    child_entry: dict[Key, int] = field(default_factory=dict)

    def child(self, key: Key, step_state: int) -> None:
        self.runs.setdefault(key[1], [0, step_state])[0] += 1
        self.waiting.append(key)

    def transition(self, entry: tuple[Any, ...]) -> None:
        self.flush()
        self.entries.append(entry)

    def flush(self) -> None:
        index_of = {}
        for step, (count, state) in self.runs.items():
            index_of[step] = len(self.entries)
            self.entries.append(("children", step, count, state))
        for key in self.waiting:
            self.child_entry[key] = index_of[key[1]]
        self.runs, self.waiting = {}, []


def entry_shape(entry: ChangeEntry) -> tuple[Any, ...]:
    if entry.child_events:
        assert entry.header is None and len(entry.steps) == 1, entry
        return ("children", entry.steps[0].name, entry.child_events, entry.steps[0].state)
    if entry.header is not None and not entry.steps:
        return ("header",)
    assert [stats.name for stats in entry.steps] != [], entry
    return ("step", entry.steps[0].name)


@FOLD_SETTINGS
@given(history=histories(), data=st.data())
def test_the_change_log_replays_to_what_is_stored(history: History, data: st.DataObject) -> None:
    """Any delivery (duplicates included), cut into transactions anywhere, with
    the source going stale and fresh in between: revisions are contiguous; each
    transaction's change log records every winning event once, in order, a
    step's run of child events as one entry; a watcher replaying the log ends
    with exactly the stored header and steps; every stored entity is the
    fold's own (its last record, seq and the revision that last changed it);
    and what is stored rebuilds the fold."""
    events = history.events
    extra = data.draw(st.lists(st.integers(0, len(events) - 1), max_size=len(events)), label="duplicates")
    delivery = data.draw(st.permutations([*range(len(events)), *extra]), label="delivery")
    start = first_job_event(events, delivery) + 1
    cuts = set(data.draw(st.lists(st.integers(start, len(delivery)), max_size=6), label="cuts"))
    flips = set(data.draw(st.lists(st.integers(0, len(delivery) - 1), max_size=4), label="staleness flips"))

    stale: list[Staleness | None] = [None]
    job = HeldJob(JobFold(JOB_ID), SOURCE)
    projector = Projector(100, lambda source: stale[0] if source == SOURCE else None)
    kept = Kept()
    log: list[ChangeEntry] = []
    winners: dict[Key, Event] = {}
    child_revision: dict[Key, int] = {}
    winning_children = 0
    expected = Expected()

    def finish() -> None:
        projected = projector.finish()
        expected.flush()
        assert [entry_shape(entry) for entry in projected.changes] == expected.entries
        for key, index in expected.child_entry.items():
            child_revision[key] = projected.changes[index].revision
        log.extend(projected.changes)
        kept.keep(projected)
        expected.entries, expected.child_entry = [], {}

    for i, position in enumerate(delivery):
        if i in cuts:
            finish()
        if i in flips and i >= start:
            stale[0] = None if stale[0] is not None else Staleness(1_700_000_000.5, "gone quiet")
            projector.refresh(job)
            expected.transition(("header",))
        event = events[position]
        change = job.fold.apply(event)
        if change is None:
            continue
        key = entity_key(event)
        winners[key] = event
        projector.project(job, change)
        if key[0] == "child":
            winning_children += 1
            expected.child(key, job.fold.steps[key[1]].state)
        else:
            expected.transition(("header",) if key[0] == "job" else ("step", key[1]))
    finish()

    assert [entry.revision for entry in log] == list(range(101, 101 + len(log)))
    assert projector.revision == 100 + len(log)
    assert sum(entry.child_events for entry in log) == winning_children
    assert {entry.job_id for entry in log} == {JOB_ID}

    # A watcher replaying the log ends where a read of the store does.
    header: status_service_pb2.JobStatus | None = None
    steps: dict[str, status_service_pb2.StepStats] = {}
    state: int = s.JOB_STATE_UNSPECIFIED
    for entry in log:
        assert entry.state_before == state and entry.name in ("", "prop-job")
        state = entry.state_after
        if entry.header is not None:
            header = entry.header
            assert entry.header.revision == entry.revision
        for stats in entry.steps:
            assert stats.revision == entry.revision
            steps[stats.name] = stats
    assert state == job.fold.state
    stored = kept.headers[JOB_ID]
    assert header is not None and stored.status == header
    assert {name: kept_step.stats for (_, name), kept_step in kept.steps.items()} == steps

    # What is stored is the fold's own.
    fold = job.fold
    fresh = freshness(fold.state, SOURCE, stale[0])
    assert stored.status == job_status(fold, stored.status.freshness, stored.status.revision)
    assert (stored.source, stored.seq, stored.lost) == (SOURCE, fold.job_version[1], None)
    assert fold.finished or stored.status.freshness == fresh
    for name, held in fold.steps.items():
        kept_step = kept.steps[(JOB_ID, name)]
        assert kept_step.stats == step_stats(name, held, kept_step.stats.revision)
        assert kept_step.seq == held.version[1]
    assert set(kept.children) == {(JOB_ID, *key) for key in fold.children}
    for (_, step_name, index), child in kept.children.items():
        last = winners[("child", step_name, index)]
        assert (child.record, child.seq) == (last.child, last.seq)
        assert child.revision == child_revision[("child", step_name, index)]

    assert picture(kept.reopened().fold) == picture(fold)


def event_version(event: Event) -> Version:
    kind = event.WhichOneof("record")
    if kind == "job":
        return (event.job.state in TERMINAL_JOB_STATES, event.seq)
    record = event.step if kind == "step" else event.child
    return (record.state in TERMINAL_STEP_STATES, event.seq)


def assert_change_describes(change: Change, event: Event, before: dict[Key, int], after: dict[Key, int]) -> None:
    """What a winning event reports as changed is exactly what changed."""
    key = entity_key(event)
    assert change.job_id == JOB_ID
    state_changed = before.get(key, s.STEP_STATE_UNSPECIFIED) != after[key]
    if key[0] == "job":
        assert change.header and change.steps == [] and change.child is None
        assert (change.job_state_before, change.job_state_after) == (before.get(key, 0), event.job.state)
    elif key[0] == "step":
        assert change.steps == [key[1]] and change.child is None
        assert change.header == state_changed  # step counts in the header moved
    else:
        assert change.child == event.child and not change.header
        assert change.steps == ([key[1]] if state_changed else [])


# --- units -----------------------------------------------------------------------------------------------------


def step_event(seq: int, state: int, attempt: int = 1, name: str = "build") -> Event:
    return Event(seq=seq, step=records_pb2.Step(job_id=JOB_ID, name=name, state=state, attempt=attempt))  # type: ignore[arg-type]


def child_event(seq: int, state: int, index: int = 0) -> Event:
    return Event(seq=seq, child=records_pb2.Child(job_id=JOB_ID, step_name="fan", index=index, state=state))  # type: ignore[arg-type]


def job_event(seq: int, state: int) -> Event:
    return Event(seq=seq, job=records_pb2.Job(id=JOB_ID, state=state))  # type: ignore[arg-type]


@pytest.mark.parametrize("late_seq", [3, 11], ids=["older-seq", "newer-seq"])
def test_a_late_running_after_completed_is_ignored(late_seq: int) -> None:
    fold = JobFold(JOB_ID)
    assert fold.apply(step_event(2, PENDING, attempt=0)) is not None
    assert fold.apply(step_event(4, RUNNING)) is not None
    done = fold.apply(step_event(10, COMPLETED))
    assert done is not None and done.header and done.steps == ["build"]
    assert fold.apply(step_event(late_seq, RUNNING, attempt=2)) is None
    entry = fold.steps["build"]
    assert entry.state == COMPLETED and entry.record is not None and entry.record.attempt == 1
    assert entry.version == (True, 10)
    assert dict(fold.step_counts) == {COMPLETED: 1}


def test_a_duplicate_returns_none() -> None:
    fold = JobFold(JOB_ID)
    for event in (job_event(1, s.JOB_STATE_PENDING), step_event(2, PENDING, 0), child_event(3, PENDING)):
        assert fold.apply(event) is not None
        before = picture(fold)
        assert fold.apply(Event.FromString(event.SerializeToString())) is None
        assert picture(fold) == before


def test_a_terminal_job_is_never_reopened() -> None:
    fold = JobFold(JOB_ID)
    fold.apply(job_event(1, s.JOB_STATE_PENDING))
    fold.apply(job_event(5, s.JOB_STATE_CANCELLED))
    assert fold.apply(job_event(9, s.JOB_STATE_RUNNING)) is None
    assert fold.apply(job_event(3, s.JOB_STATE_RUNNING)) is None
    assert fold.state == s.JOB_STATE_CANCELLED and fold.finished


def test_a_late_child_running_does_not_move_the_counts() -> None:
    fold = JobFold(JOB_ID)
    fold.apply(step_event(1, WAITING, name="fan"))
    fold.apply(child_event(2, PENDING, index=0))
    fold.apply(child_event(3, PENDING, index=1))
    fold.apply(child_event(6, FAILED, index=0))
    assert dict(fold.steps["fan"].children) == {FAILED: 1, PENDING: 1}
    assert fold.apply(child_event(4, RUNNING, index=0)) is None
    assert fold.apply(child_event(8, RUNNING, index=0)) is None
    assert dict(fold.steps["fan"].children) == {FAILED: 1, PENDING: 1}
    # A retry (same state, newer seq) is a change of the child only: no counts move.
    fold.apply(child_event(7, RUNNING, index=1))
    retry = fold.apply(child_event(9, RUNNING, index=1))
    assert retry is not None and retry.steps == [] and not retry.header
    assert dict(fold.steps["fan"].children) == {FAILED: 1, RUNNING: 1}


def test_children_arriving_before_their_step_are_counted_once_it_arrives() -> None:
    """A snapshot resync can deliver a child before its step's record."""
    fold = JobFold(JOB_ID)
    fold.apply(child_event(7, COMPLETED, index=0))
    assert fold.steps["fan"].record is None and dict(fold.steps["fan"].children) == {COMPLETED: 1}
    assert dict(fold.step_counts) == {}
    fold.apply(step_event(9, COMPLETED, name="fan"))
    assert dict(fold.step_counts) == {COMPLETED: 1}
    assert_counts_match_a_recount(fold)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories(), data=st.data())
def test_any_order_with_duplicates_soak(history: History, data: st.DataObject) -> None:
    test_any_order_with_duplicates_folds_to_the_in_order_result.hypothesis.inner_test(  # type: ignore[attr-defined]
        history, data
    )
