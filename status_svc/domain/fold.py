"""How orchestrator events become persisted status: the only place that decides
whether an event changes anything. Pure: no I/O, no gRPC.

The rule. Every event carries the full new record of one job, step or child,
and its seq. A record replaces the one held for the same entity only if
(terminal, seq) is greater, compared in that order. So:

- a duplicate (same seq) or an older event (lower seq) changes nothing;
- a terminal state is never replaced by a non-terminal one, whatever its seq;
- any order and any duplication of a job's events folds to the same result as
  the in-order sequence, because the winner for each entity is simply the
  maximum of a total order.

Counts (a job's steps by state, a step's children by state) are kept by
applying the difference between an entity's old and new state each time a
record wins, so they always equal what the records say.

Unknown states. Enums are open: a newer orchestrator may send a state (or a
reason) this service does not know, and the record keeps that raw value. For
counting, every state is put in a bucket: itself if it has a count of its own
(STEP_COUNTED, CHILD_COUNTED), else UNKNOWN (also a child's WAITING or SKIPPED,
which children never take, and an explicit UNSPECIFIED). Counters hold
buckets, not raw states, so that what is persisted (the `unknown` count) reloads
into the same counter, and a later move out of any unknown state takes one from
UNKNOWN. Unknown states are not terminal: a later known record replaces one,
and one never replaces a terminal record.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.states import TERMINAL_JOB_STATES, TERMINAL_STEP_STATES

Version = tuple[bool, int]
NO_VERSION: Version = (False, 0)

# The count bucket of every state without a count of its own (see the module docstring).
UNKNOWN = -1
STEP_COUNTED = frozenset({
    s.STEP_STATE_PENDING, s.STEP_STATE_RUNNING, s.STEP_STATE_WAITING, s.STEP_STATE_COMPLETED,
    s.STEP_STATE_FAILED, s.STEP_STATE_CANCELLED, s.STEP_STATE_SKIPPED,
})
# Children never take WAITING or SKIPPED (states.proto): ChildCounts has no field for them.
CHILD_COUNTED = STEP_COUNTED - {s.STEP_STATE_WAITING, s.STEP_STATE_SKIPPED}


def step_bucket(state: int) -> int:
    """Where a step in `state` is counted."""
    return state if state in STEP_COUNTED else UNKNOWN


def child_bucket(state: int) -> int:
    """Where a child in `state` is counted."""
    return state if state in CHILD_COUNTED else UNKNOWN


def job_version(state: int, seq: int) -> Version:
    return (state in TERMINAL_JOB_STATES, seq)


def work_version(state: int, seq: int) -> Version:
    """For steps and children."""
    return (state in TERMINAL_STEP_STATES, seq)


@dataclass
class StepEntry:
    """A step as held: its record (None until its first event arrives, which
    can come after its children's in a resync) and its children by count
    bucket (see child_bucket)."""

    record: records_pb2.Step | None = None
    version: Version = NO_VERSION
    children: Counter[int] = field(default_factory=Counter)

    @property
    def state(self) -> int:
        return self.record.state if self.record is not None else s.STEP_STATE_UNSPECIFIED


@dataclass(slots=True)
class Change:
    """What one winning event changed, for the store and the watchers."""

    job_id: str
    # The job header changed: its record or its step counts.
    header: bool = False
    # Steps whose stats changed: their record or their child counts.
    steps: list[str] = field(default_factory=list)
    # The child's record, for a child event.
    child: records_pb2.Child | None = None
    job_state_before: int = s.JOB_STATE_UNSPECIFIED
    job_state_after: int = s.JOB_STATE_UNSPECIFIED


@dataclass
class JobFold:
    """Everything held about one job, enough to apply any further event."""

    job_id: str
    job: records_pb2.Job | None = None
    job_version: Version = NO_VERSION
    steps: dict[str, StepEntry] = field(default_factory=dict)
    # (step, index) -> the child's raw state and version.
    children: dict[tuple[str, int], tuple[int, Version]] = field(default_factory=dict)
    # Steps by count bucket (see step_bucket).
    step_counts: Counter[int] = field(default_factory=Counter)
    # The held job record's state (kept apart: read for every event).
    state: int = s.JOB_STATE_UNSPECIFIED

    def __post_init__(self) -> None:
        if self.job is not None:
            self.state = self.job.state

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_JOB_STATES

    def apply(self, event: records_pb2.StepEvent) -> Change | None:
        """Apply one event of this job; the change it made, or None if it was superseded.

        The one way in, for ingest and the property tests alike."""
        kind = event.WhichOneof("record")
        if kind == "child":  # the hot path of ingest: most events are children's
            child = event.child
            moved = self._apply_child(child, event.seq)
            if moved is None:
                return None
            state = self.state
            # Positional: this is built for most events ingest sees.
            return Change(self.job_id, False, [child.step_name] if moved else [], child, state, state)
        if kind == "step":
            return self._apply_step(event.step, event.seq)
        if kind == "job":
            return self._apply_job(event.job, event.seq)
        return None

    def _apply_job(self, job: records_pb2.Job, seq: int) -> Change | None:
        version = job_version(job.state, seq)
        if version <= self.job_version:
            return None
        before = self.state
        self.job, self.job_version, self.state = job, version, job.state
        return Change(self.job_id, header=True, job_state_before=before, job_state_after=job.state)

    def _apply_step(self, step: records_pb2.Step, seq: int) -> Change | None:
        entry = self.steps.get(step.name)
        if entry is None:
            entry = self.steps[step.name] = StepEntry()
        version = work_version(step.state, seq)
        if version <= entry.version:
            return None
        held = entry.record
        entry.record, entry.version = step, version
        change = Change(self.job_id, steps=[step.name], job_state_before=self.state, job_state_after=self.state)
        old = step_bucket(held.state) if held is not None else None
        new = step_bucket(step.state)
        if old != new:
            _move(self.step_counts, old, new)
            change.header = True
        return change

    def _apply_child(self, child: records_pb2.Child, seq: int) -> bool | None:
        """None if the event was superseded; else whether its step's child counts
        changed (the child moved to another bucket)."""
        step_name, state = child.step_name, int(child.state)
        key = (step_name, child.index)
        version = (state in TERMINAL_STEP_STATES, seq)
        held = self.children.get(key)
        old: int | None
        if held is None:
            old = None
        elif version <= held[1]:
            return None
        elif held[0] == state:
            self.children[key] = (state, version)
            return False
        else:
            old = held[0] if held[0] in CHILD_COUNTED else UNKNOWN
        self.children[key] = (state, version)
        new = state if state in CHILD_COUNTED else UNKNOWN  # child_bucket, inlined on the hot path
        if old == new:
            return False
        entry = self.steps.get(step_name)
        if entry is None:
            entry = self.steps[step_name] = StepEntry()
        _move(entry.children, old, new)
        return True


def _move(counts: Counter[int], old: int | None, new: int) -> None:
    """Move one entity from bucket `old` to bucket `new`; None means "did not exist"."""
    if old is not None:
        left = counts[old] - 1
        if left:
            counts[old] = left
        else:
            del counts[old]
    counts[new] = counts.get(new, 0) + 1
