"""The workload of the kill -9 tests (tests/status/test_crash.py on SQLite,
tests/status/test_failover.py on PostgreSQL) and their audit: the stored rows,
row by row, against the orchestrator's whole event log folded here
independently: every job, step_stats and children row, the cursor, and the
`changes` log, under contiguous revisions, where every orchestrator event (each
one a real transition) is recorded exactly once, in seq order: a job or step
event by a change of its own, a run of child events by changes that say how
many they fold (`child_events`).

The same SELECTs read both backends (STATEMENTS): stored_rows() builds what
the audit checks from their results, however they were fetched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.status.v1 import status_service_pb2 as status_pb

from status_svc.storage.postgres import PG_SCHEMA
from stepstream_common.timeutil import seconds
from tests.helpers import entity_key, job_definition, open_sqlite_readonly

Event = records_pb2.StepEvent
COUNT_NAMES = ("pending", "running", "completed", "failed", "cancelled")

# What the audit reads, in the order StoredRows holds it; plain SQL both SQLite and PostgreSQL run.
STATEMENTS = {
    "sources": "SELECT address, cursor FROM sources",
    "jobs": "SELECT state, reason, message, created_at, started_at, finished_at, steps_total, steps_completed, "
            "seq, revision, lost_since FROM jobs",
    "steps": "SELECT job_id, name, idx, type, state, reason, message, attempt, max_attempts, started_at, "
             "finished_at, children_total, children_pending, children_running, children_completed, "
             "children_failed, children_cancelled, seq, revision FROM step_stats",
    "children": "SELECT job_id, step, idx, item, state, reason, message, attempt, started_at, finished_at, seq, "
                "revision FROM children",
    "changes": "SELECT revision, job_id, state_before, state_after, header, steps, child_events FROM changes "
               "ORDER BY revision",
}


@dataclass(frozen=True)
class StoredRows:
    """A status store's rows as STATEMENTS select them (bytes for blobs, floats for times)."""

    sources: list[tuple[Any, ...]]
    jobs: list[tuple[Any, ...]]
    steps: list[tuple[Any, ...]]
    children: list[tuple[Any, ...]]
    changes: list[tuple[Any, ...]]


def stored_rows(results: dict[str, Sequence[Any]]) -> StoredRows:
    """StoredRows from each statement's result rows (any row type a driver returns)."""
    return StoredRows(**{name: [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                                for row in results[name]] for name in STATEMENTS})


def sqlite_rows(path: Path) -> StoredRows:
    """A status service's SQLite file, read read-only."""
    db = open_sqlite_readonly(path)
    try:
        return stored_rows({name: db.execute(sql).fetchall() for name, sql in STATEMENTS.items()})
    finally:
        db.close()


def crash_workload(release: Path, count: int, concurrency: int, delay: float = 0.02) -> Any:
    """A busy fan-out (children of `delay` seconds; every 13th fails twice: retried once),
    then a gate that keeps the job running until the test has finished killing."""
    gate = f"while [ ! -f {release} ]; do sleep 0.02; done"
    return job_definition([
        {"name": "prep", "type": "sleep", "seconds": 0},
        {"name": "fan", "type": "fanout", "count": count, "concurrency": concurrency, "max_child_failures": count,
         "child": {"type": "python", "function": "tests.helpers:flaky_child", "retries": 1, "retry_backoff": "10ms",
                   "args": {"index": "{index}", "fail_every": "13", "delay": str(delay)}}},
        {"name": "gate", "type": "command", "command": ["sh", "-c", gate]},
    ], name="crash-loop")



def time_of(ts: Any) -> float | None:
    return seconds(ts)


def decode_steps(blob: bytes | None) -> list[status_pb.StepStats]:
    return list(status_pb.JobUpdate.FromString(blob).steps) if blob else []


def assert_rows_match_the_log(
    rows: StoredRows, source: str, job_id: str, events: list[Event], view: orch_pb.GetJobResponse
) -> None:
    """The stored rows of the one job `job_id`, checked against the orchestrator's whole log `events`
    (folded here independently) and its final view: see the module docstring."""
    assert {e.job.id if e.HasField("job") else (e.step.job_id if e.HasField("step") else e.child.job_id)
            for e in events} == {job_id}
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(events) + 1))
    sources, job_rows, changes = rows.sources, rows.jobs, rows.changes
    assert {row[0] for row in rows.steps} == {row[0] for row in rows.children} == {job_id}
    step_rows = {row[1]: row[2:] for row in rows.steps}
    child_rows = {(row[1], row[2]): row[3:] for row in rows.children}

    # The cursor is the orchestrator's last seq: committed with the state it produced.
    assert [(address, cursor) for address, cursor in sources] == [(source, seqs[-1])]

    # The change log: every orchestrator event recorded once, in seq order, under contiguous revisions.
    assert [row[0] for row in changes] == list(range(1, len(changes) + 1)), "a revision is missing or repeated"
    assert {row[1] for row in changes} == {job_id}

    last: dict[tuple[Any, ...], Event] = {}
    revision_of: dict[tuple[Any, ...], int] = {}
    stats_revision: dict[str, int] = {}
    child_counts: dict[str, Counter[int]] = {}
    step_state: dict[str, int] = {}
    job_state = s.JOB_STATE_UNSPECIFIED
    for (revision, _, before, after, header, steps, _), recorded in recorded_events(events, changes):
        stats = decode_steps(steps)
        if recorded[0].HasField("child"):
            step_name = recorded[0].child.step_name
            counts = child_counts.setdefault(step_name, Counter())
            for event in recorded:
                key = entity_key(event)
                previous = last.get(key)
                if previous is not None:
                    counts[previous.child.state] -= 1
                counts[event.child.state] += 1
                last[key] = event
                revision_of[key] = revision
            assert header is None and before == after == job_state, f"revision {revision}"
            assert [(st.name, st.revision) for st in stats] == [(step_name, revision)], f"revision {revision}"
            assert counts_of(stats[0].children) == +counts, f"revision {revision}: counts after its last event"
            stats_revision[step_name] = revision
            continue
        (event,) = recorded
        key = entity_key(event)
        if key[0] == "job":
            assert header is not None and stats == [], f"seq {event.seq}"
            decoded = status_pb.JobStatus.FromString(header)
            assert (decoded.state, decoded.reason, decoded.message) == (event.job.state, event.job.reason,
                                                                         event.job.message), f"seq {event.seq}"
            assert (before, after) == (job_state, event.job.state)
            job_state = event.job.state
        elif key[0] == "step":
            moved = step_state.get(event.step.name, s.STEP_STATE_UNSPECIFIED) != event.step.state
            step_state[event.step.name] = event.step.state
            assert (header is not None) == moved, f"seq {event.seq}: header iff the step's state moved"
            assert [(st.name, st.state, st.reason, st.attempt, st.message, st.revision) for st in stats] == [
                (event.step.name, event.step.state, event.step.reason, event.step.attempt, event.step.message,
                 revision)], f"seq {event.seq}"
        last[key] = event
        revision_of[key] = revision
        for st in stats:
            stats_revision[st.name] = revision

    # Every row equals the last record of its entity.
    job = last[("job",)].job
    assert len(job_rows) == 1
    state, reason, message, created, started, finished, total, completed, seq, revision, lost = job_rows[0]
    header_revision = max(row[0] for row in changes if row[4] is not None)
    assert (state, reason, message, seq, revision, lost) == (
        job.state, job.reason, job.message, last[("job",)].seq, header_revision, None)
    assert (created, started, finished) == (time_of(job.created_at), time_of(job.started_at),
                                            time_of(job.finished_at))
    assert (total, completed) == (3, 3)

    assert set(step_rows) == {k[1] for k in last if k[0] == "step"}
    for step_view in view.steps:
        step = last[("step", step_view.step.name)].step
        assert step == step_view.step
        row = step_rows[step.name]
        assert row[:9] == (step.index, step.type, step.state, step.reason, step.message, step.attempt,
                           step.max_attempts, time_of(step.started_at), time_of(step.finished_at)), step.name
        c = step_view.children
        assert row[9:15] == (c.total, c.pending, c.running, c.completed, c.failed, c.cancelled), step.name
        recount = Counter(e.child.state for k, e in last.items() if k[0] == "child" and k[1] == step.name)
        assert counts_of(c) == +recount, step.name
        assert row[15] == last[("step", step.name)].seq
        assert row[16] == stats_revision[step.name], step.name

    children = {k[1:]: e for k, e in last.items() if k[0] == "child"}
    assert set(child_rows) == set(children)
    for key, event in children.items():
        child = event.child
        assert child_rows[key] == (child.item, child.state, child.reason, child.message, child.attempt,
                                   time_of(child.started_at), time_of(child.finished_at), event.seq,
                                   revision_of[("child", *key)]), key
    fan = last[("step", "fan")].step
    assert fan.state == s.STEP_STATE_COMPLETED
    failing = len([k for k in children if k[1] % 13 == 0])
    assert step_rows["fan"][9:15] == (len(children), 0, 0, len(children) - failing, failing, 0)


def counts_of(counts: Any) -> Counter[int]:
    states = (s.STEP_STATE_PENDING, s.STEP_STATE_RUNNING, s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED,
              s.STEP_STATE_CANCELLED)
    found: Counter[int] = Counter({int(state): getattr(counts, name)
                                   for state, name in zip(states, COUNT_NAMES, strict=True)})
    assert sum(found.values()) == counts.total
    return +found


def recorded_events(events: list[Event], changes: list[tuple[Any, ...]]) -> list[tuple[tuple[Any, ...], list[Event]]]:
    """Pair one job's change-log rows (freshness-only rows dropped) with the events each records.

    Walking both in order: a job or step event is recorded by the next change,
    which folds no child events; a run of child events of one step, with no job
    or step event between them, by one or more changes whose `child_events` add
    up. Fails if an event is missing, recorded twice, or out of order.
    """
    pairs: list[tuple[tuple[Any, ...], list[Event]]] = []
    position = 0
    for row in drop_freshness_only(changes):
        folded = row[6]
        recorded = events[position: position + max(1, folded)]
        position += len(recorded)
        assert recorded, f"revision {row[0]} records no event: more changes than events"
        if folded:
            assert len(recorded) == folded, f"revision {row[0]} folds {folded} child events; only {len(recorded)} left"
            assert all(e.HasField("child") for e in recorded), f"revision {row[0]}: a child run interrupted"
            assert len({e.child.step_name for e in recorded}) == 1, f"revision {row[0]}: children of two steps"
        else:
            assert not recorded[0].HasField("child"), f"revision {row[0]}: seq {recorded[0].seq} is a child event"
        pairs.append((row, recorded))
    assert position == len(events), f"{len(events) - position} events never recorded"
    return pairs


def drop_freshness_only(changes: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The changes that come from orchestrator events: without the header-only rows
    that record the source going stale or fresh again (the job itself unchanged).
    A re-applied job event would be an identical header, so it is not dropped."""
    real = []
    held: status_pb.JobStatus | None = None
    for row in changes:
        _, _, before, after, header, steps = row[:6]
        if header is not None:
            decoded = status_pb.JobStatus.FromString(header)
            if held is not None and steps is None and before == after:
                a, b = status_pb.JobStatus(), status_pb.JobStatus()
                a.CopyFrom(held)
                b.CopyFrom(decoded)
                for message in (a, b):
                    message.ClearField("freshness")
                    message.ClearField("revision")
                if a == b and held.freshness != decoded.freshness:
                    held = decoded
                    continue
            held = decoded
        real.append(row)
    return real


async def store_connection(dsn: str) -> asyncpg.Connection:
    """A connection to a status store's PostgreSQL database that finds its tables (close it)."""
    return await asyncpg.connect(dsn, server_settings={"search_path": PG_SCHEMA})


async def postgres_rows(dsn: str) -> StoredRows:
    """A status store's PostgreSQL database, read on a connection of its own."""
    connection = await store_connection(dsn)
    try:
        return stored_rows({name: await connection.fetch(sql) for name, sql in STATEMENTS.items()})
    finally:
        await connection.close()
