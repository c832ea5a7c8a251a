"""The bugs this project exists to make impossible (/work/shared/seeds), each
reproduced against the real services and shown not to happen.

(a) "The badge stayed pending while the step was running": status travelled on
    two paths and only one updated the view. Here a running step is RUNNING, with
    its attempt, in every read (GetJob and a watch) while it still runs.
(b) "A refresh showed 'spawned' after completion": a writer rewrote the stats
    from stale memory. Here no read ever shows an older state than one already
    shown, even when every old event is delivered again.
(c) "Terminal paths never updated step_stats": cancel, timeout, no children,
    all children failed, orchestrator restart. Here the step_stats rows in the
    SQLite file are terminal, with finished_at, on every one of those paths.
"""

from __future__ import annotations

import random
import shlex
import sqlite3
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.states import TERMINAL_JOB_STATES, TERMINAL_STEP_STATES
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from orchestrator_svc.app import Orchestrator
from orchestrator_svc.app import start as start_orchestrator
from status_svc.app import DATABASE_FILE, StatusService
from status_svc.app import start as start_status
from status_svc.domain.fold import JobFold
from tests.conftest import orchestrator_config, status_config
from tests.helpers import (
    WatchedJob,
    channel,
    eventually,
    free_port,
    open_sqlite_readonly,
    read_watch,
    read_whole_log,
    status_job_finished,
    wait_job_state,
    wait_status_job,
    watch_until,
)
from tests.status.test_paths import submit

if TYPE_CHECKING:
    OrchStub = orch_grpc.OrchestratorServiceAsyncStub
    StatusStub = status_grpc.StatusServiceAsyncStub

# How far along a step is; a later read may never show a lower rank.
RANK = {s.STEP_STATE_UNSPECIFIED: 0, s.STEP_STATE_PENDING: 1, s.STEP_STATE_RUNNING: 2, s.STEP_STATE_WAITING: 3,
        **dict.fromkeys(TERMINAL_STEP_STATES, 4)}
JOB_RANK = {s.JOB_STATE_PENDING: 1, s.JOB_STATE_RUNNING: 2, **dict.fromkeys(TERMINAL_JOB_STATES, 3)}


def waits_for(path: Path, name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": "command",
            "command": ["sh", "-c", f"while [ ! -f {shlex.quote(str(path))} ]; do sleep 0.02; done"], **fields}


def step_named(response: status_pb.GetJobResponse, name: str) -> status_pb.StepStats:
    return next(stats for stats in response.steps if stats.name == name)


# --- (a) the badge says running while the step runs ----------------------------------------------------------


async def test_a_running_step_is_running_in_every_read_before_it_completes(
    orchestrator_stub: OrchStub, status_stub: StatusStub, tmp_path: Path
) -> None:
    first_gate, work_gate = tmp_path / "first", tmp_path / "work"
    job_id = await submit(orchestrator_stub, [waits_for(first_gate, "first"), waits_for(work_gate, "work")])
    await wait_status_job(status_stub, job_id, lambda r: r.steps[0].state == s.STEP_STATE_RUNNING, "first to run")
    watch = status_stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id))
    watched = WatchedJob()
    watched.apply((await read_watch(watch)).updates.updates[0])
    assert (await read_watch(watch)).WhichOneof("event") == "initial_state_complete"
    assert watched.steps["work"].state == s.STEP_STATE_PENDING

    first_gate.touch()
    # The watcher is told the moment "work" starts, while it still runs (its gate is closed).
    updates, _ = await watch_until(watch, lambda u: any(st.name == "work" and st.state == s.STEP_STATE_RUNNING
                                                        for st in u.steps))
    for update in updates:
        watched.apply(update)
    live = watched.steps["work"]
    assert (live.state, live.attempt, live.max_attempts) == (s.STEP_STATE_RUNNING, 1, 1)
    assert live.HasField("started_at") and not live.HasField("finished_at")
    assert watched.job.state == s.JOB_STATE_RUNNING and watched.job.steps.running == 1
    # A refresh says the same: not "pending".
    snapshot = await status_stub.GetJob(status_pb.GetJobRequest(job_id=job_id))
    assert step_named(snapshot, "work") == live
    assert snapshot.job.steps == status_pb.StepCounts(total=2, running=1, completed=1)
    assert not work_gate.exists(), "the step completed: this proves nothing"

    work_gate.touch()
    rest, _ = await watch_until(watch, lambda u: u.HasField("job") and u.job.state in TERMINAL_JOB_STATES)
    watch.cancel()
    for update in rest:
        watched.apply(update)
    assert watched.steps["work"].state == s.STEP_STATE_COMPLETED
    assert watched.job.state == s.JOB_STATE_COMPLETED


async def test_every_attempt_of_a_retried_step_shows_running_with_its_number(
    orchestrator_stub: OrchStub, status_stub: StatusStub, tmp_path: Path
) -> None:
    gate = tmp_path / "release"
    # Attempt 1 fails at once; attempt 2 runs until the gate opens.
    script = f"if [ -f tried ]; then while [ ! -f {shlex.quote(str(gate))} ]; do sleep 0.02; done; exit 0; fi; " \
             "touch tried; echo first try fails; exit 1"
    job_id = await submit(orchestrator_stub, [{"name": "flaky", "type": "command", "command": ["sh", "-c", script],
                                               "cwd": str(tmp_path), "retries": 2, "retry_backoff": "10ms"}])

    def second_attempt(response: status_pb.GetJobResponse) -> bool:
        return response.steps[0].attempt == 2

    running = await wait_status_job(status_stub, job_id, second_attempt, "the second attempt to run")
    flaky = running.steps[0]
    assert (flaky.state, flaky.reason, flaky.attempt, flaky.max_attempts) == (
        s.STEP_STATE_RUNNING, s.REASON_RETRYING, 2, 3)
    assert flaky.message == "attempt 2 of 3; previous: exit 1: first try fails"
    assert not gate.exists()
    gate.touch()
    done = await wait_status_job(status_stub, job_id, status_job_finished, "the job to end")
    assert (done.steps[0].state, done.steps[0].attempt) == (s.STEP_STATE_COMPLETED, 2)


# --- (b) no read ever goes back ------------------------------------------------------------------------------


async def test_after_a_fanout_completes_no_read_ever_shows_an_older_state(
    orchestrator: Orchestrator, orchestrator_stub: OrchStub, tmp_path: Path
) -> None:
    data_dir = tmp_path / "status"
    fan = {"name": "fan", "type": "fanout", "count": 120, "concurrency": 4,
           "child": {"type": "python", "function": "tests.helpers:flaky_child", "args": {"index": "{index}",
                                                                                          "delay": "0.01"}}}
    status = await start_status(status_config(data_dir, orchestrator.address))
    try:
        async with channel(status.address) as ch:
            stub: StatusStub = status_grpc.StatusServiceStub(ch)
            job_id = await submit(orchestrator_stub, [fan, {"name": "after", "type": "sleep", "seconds": 0}])
            seen = await refresh_until_done(stub, job_id)
            assert any(r.steps[0].state == s.STEP_STATE_WAITING for r in seen), "no refresh while the fan-out ran"
            final = seen[-1]
            assert final.steps[0].state == s.STEP_STATE_COMPLETED
            assert final.steps[0].children == records_pb2.ChildCounts(total=120, completed=120)
            for _ in range(20):
                again = await stub.GetJob(status_pb.GetJobRequest(job_id=job_id))
                assert again == final
    finally:
        await status.stop()

    # Re-deliver every old event: rewind the cursor to 0 (nothing is deleted) and restart.
    db = sqlite3.connect(data_dir / DATABASE_FILE)
    with db:
        assert db.execute("UPDATE sources SET cursor = 0").rowcount == 1
    revision_before = db.execute("SELECT MAX(revision), COUNT(*) FROM changes").fetchone()
    db.close()
    events = await read_whole_log(orchestrator_stub)
    status = await start_status(status_config(data_dir, orchestrator.address))
    try:
        async with channel(status.address) as ch:
            stub = status_grpc.StatusServiceStub(ch)
            watch = stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id, after_revision=final.revision))

            async def replayed() -> bool | None:
                return True if status.writer.source(orchestrator.address).cursor == events[-1].seq else None

            await eventually(replayed, "the whole log to be delivered again")
            assert status.writer.events_applied == len(events), "not every old event was re-delivered"
            # Nothing moved: no new revision, the same answer, and the watcher hears only heartbeats.
            assert await stub.GetJob(status_pb.GetJobRequest(job_id=job_id)) == final
            for _ in range(3):
                message = await read_watch(watch)
                assert message.WhichOneof("event") == "heartbeat", message
                assert message.heartbeat.revision == final.revision
            watch.cancel()
    finally:
        await status.stop()
    db = open_sqlite_readonly(data_dir / DATABASE_FILE)
    try:
        assert db.execute("SELECT MAX(revision), COUNT(*) FROM changes").fetchone() == revision_before
        assert db.execute("SELECT cursor FROM sources").fetchone() == (events[-1].seq,)
    finally:
        db.close()

    # The same events, in any order and duplicated, folded by the status service's own rule.
    mine = [e for e in events if (e.job.id if e.HasField("job") else
                                  e.step.job_id if e.HasField("step") else e.child.job_id) == job_id]
    in_order = JobFold(job_id)
    for event in mine:
        assert in_order.apply(event) is not None
    rnd = random.Random(7)
    for _ in range(5):
        shuffled = JobFold(job_id)
        delivery = mine + rnd.sample(mine, len(mine) // 2)
        rnd.shuffle(delivery)
        for event in delivery:
            shuffled.apply(event)
        assert shuffled.job == in_order.job
        assert {n: (e.record, dict(e.children)) for n, e in shuffled.steps.items()} == {
            n: (e.record, dict(e.children)) for n, e in in_order.steps.items()}
        assert shuffled.steps["fan"].state == s.STEP_STATE_COMPLETED
        # Every old event delivered again to the finished fold changes nothing.
        assert [shuffled.apply(event) for event in delivery] == [None] * len(delivery)


async def refresh_until_done(stub: StatusStub, job_id: str) -> list[status_pb.GetJobResponse]:
    """GetJob again and again until the job ended, checking that no answer is older than one before it."""
    seen: list[status_pb.GetJobResponse] = []

    async def probe() -> bool | None:
        try:
            response = await stub.GetJob(status_pb.GetJobRequest(job_id=job_id))
        except grpc.aio.AioRpcError as error:  # NOT_FOUND until the first event is in
            if seen or error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return None
        if seen:
            previous = seen[-1]
            assert response.revision >= previous.revision
            assert response.job.revision >= previous.job.revision
            assert JOB_RANK[response.job.state] >= JOB_RANK[previous.job.state]
            for old, new in zip(previous.steps, response.steps, strict=True):
                assert RANK[new.state] >= RANK[old.state], f"{new.name} went back from {old.state} to {new.state}"
                assert new.revision >= old.revision
                assert new.children.completed >= old.children.completed
        seen.append(response)
        return True if status_job_finished(response) else None

    await eventually(probe, "the job to end")
    return seen


# --- (c) every terminal path updates step_stats --------------------------------------------------------------


def stored_rows(status: StatusService, job_id: str) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    db = open_sqlite_readonly(status.config.data_dir / DATABASE_FILE)
    try:
        job = db.execute("SELECT state, reason, finished_at, steps_pending, steps_running, steps_waiting "
                         "FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        steps = db.execute("SELECT name, state, reason, finished_at, children_pending, children_running "
                           "FROM step_stats WHERE job_id = ? ORDER BY idx", (job_id,)).fetchall()
    finally:
        db.close()
    return job, steps


def assert_all_terminal_in_the_file(status: StatusService, job_id: str,
                                    expected: Mapping[str, tuple[int, int]]) -> None:
    job, steps = stored_rows(status, job_id)
    assert job[0] in TERMINAL_JOB_STATES and job[2] is not None, job
    assert job[3:] == (0, 0, 0), "steps counted as unfinished"
    assert {name: (state, reason) for name, state, reason, *_ in steps} == expected
    for name, state, _, finished_at, pending, running in steps:
        assert state in TERMINAL_STEP_STATES, name
        assert finished_at is not None, f"{name}: terminal without finished_at"
        assert (pending, running) == (0, 0), f"{name}: children still counted as unfinished"


CANCELLED = (s.STEP_STATE_CANCELLED, s.REASON_CANCELLED_BY_REQUEST)
TERMINAL_CASES: dict[str, tuple[list[dict[str, Any]], dict[str, Any], dict[str, tuple[int, int]]]] = {
    "step-timeout": (
        [{"name": "slow", "type": "sleep", "seconds": 30, "timeout": "200ms"}],
        {}, {"slow": (s.STEP_STATE_FAILED, s.REASON_TIMEOUT)},
    ),
    "job-timeout": (
        [{"name": "fan", "type": "fanout", "count": 3, "concurrency": 1, "child": {"type": "sleep", "seconds": 30}},
         {"name": "after", "type": "sleep", "seconds": 0}],
        {"timeout": "500ms"},
        {"fan": (s.STEP_STATE_FAILED, s.REASON_JOB_TIMEOUT), "after": (s.STEP_STATE_CANCELLED, s.REASON_JOB_TIMEOUT)},
    ),
    "zero-children": (
        [{"name": "fan", "type": "fanout", "items": [], "child": {"type": "sleep", "seconds": 0}}],
        {}, {"fan": (s.STEP_STATE_COMPLETED, s.REASON_NO_CHILDREN)},
    ),
    "all-children-failed": (
        [{"name": "fan", "type": "fanout", "count": 4, "max_child_failures": 10,
          "child": {"type": "python", "function": "tests.helpers:flaky_child",
                    "args": {"index": "{index}", "fail_every": "1"}}},
         {"name": "after", "type": "sleep", "seconds": 0}],
        {}, {"fan": (s.STEP_STATE_FAILED, s.REASON_CHILD_FAILURES),
             "after": (s.STEP_STATE_SKIPPED, s.REASON_DEPENDENCY_FAILED)},
    ),
}


@pytest.mark.parametrize("case", list(TERMINAL_CASES))
async def test_terminal_paths_update_step_stats(
    case: str, orchestrator_stub: OrchStub, status_stub: StatusStub, status: StatusService
) -> None:
    steps, fields, expected = TERMINAL_CASES[case]
    job_id = await submit(orchestrator_stub, steps, **fields)
    await wait_status_job(status_stub, job_id, status_job_finished, "the job to end")
    assert_all_terminal_in_the_file(status, job_id, expected)


@pytest.mark.parametrize("where", ["mid-command", "mid-fanout", "before-start"])
async def test_cancel_updates_step_stats(
    where: str, orchestrator_stub: OrchStub, status_stub: StatusStub, status: StatusService, tmp_path: Path
) -> None:
    never = tmp_path / "never"
    if where == "mid-fanout":
        steps = [{"name": "fan", "type": "fanout", "count": 5, "concurrency": 2,
                  "child": {"type": "sleep", "seconds": 30}}, {"name": "after", "type": "sleep", "seconds": 0}]
        expected = {"fan": CANCELLED, "after": CANCELLED}
    else:
        steps = [waits_for(never, "work"), {"name": "after", "type": "sleep", "seconds": 0}]
        expected = {"work": CANCELLED, "after": CANCELLED}
    job_id = await submit(orchestrator_stub, steps)
    if where == "mid-fanout":
        await wait_status_job(status_stub, job_id, lambda r: r.steps[0].children.running == 2, "children to run")
    elif where == "mid-command":
        await wait_status_job(status_stub, job_id, lambda r: r.steps[0].state == s.STEP_STATE_RUNNING, "work to run")
    await orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=job_id))
    done = await wait_status_job(status_stub, job_id, status_job_finished, "the job to end")
    assert done.job.state == s.JOB_STATE_CANCELLED
    assert_all_terminal_in_the_file(status, job_id, expected)
    if where == "mid-fanout":
        assert done.steps[0].children == records_pb2.ChildCounts(total=5, cancelled=5)


@asynccontextmanager
async def orchestrator_at(data_dir: Path, listen: str) -> AsyncIterator[Orchestrator]:
    running = await start_orchestrator(orchestrator_config(data_dir, listen=listen))
    try:
        yield running
    finally:
        await running.stop()


async def test_orchestrator_restart_updates_step_stats(tmp_path: Path) -> None:
    """An orchestrator shut down under a running job ends it (FAILED,
    ORCHESTRATOR_RESTARTED) and the status service records it on its return."""
    listen = f"127.0.0.1:{free_port()}"
    never = tmp_path / "never"
    async with orchestrator_at(tmp_path / "orchestrator", listen) as first:
        status = await start_status(status_config(tmp_path / "status", first.address))
        try:
            async with channel(first.address) as och, channel(status.address) as sch:
                orch: OrchStub = orch_grpc.OrchestratorServiceStub(och)
                stub: StatusStub = status_grpc.StatusServiceStub(sch)
                job_id = await submit(orch, [
                    {"name": "fan", "type": "fanout", "count": 4, "concurrency": 2,
                     "child": {"type": "sleep", "seconds": 30}},
                    waits_for(never, "later"),
                ])
                await wait_status_job(stub, job_id, lambda r: r.steps[0].children.running == 2, "children to run")
                await first.stop()
                async with orchestrator_at(tmp_path / "orchestrator", listen) as second, channel(second.address) as ch:
                    again: OrchStub = orch_grpc.OrchestratorServiceStub(ch)
                    view = await wait_job_state(again, job_id, set(TERMINAL_JOB_STATES))
                    done = await wait_status_job(stub, job_id, status_job_finished, "the job to end in status")
                    assert (done.job.state, done.job.reason) == (view.job.state, view.job.reason) == (
                        s.JOB_STATE_FAILED, s.REASON_ORCHESTRATOR_RESTARTED)
                    restarted = s.REASON_ORCHESTRATOR_RESTARTED
                    assert_all_terminal_in_the_file(status, job_id, {
                        "fan": (s.STEP_STATE_FAILED, restarted), "later": (s.STEP_STATE_CANCELLED, restarted),
                    })
                    children = done.steps[0].children
                    assert (children.total, children.pending, children.running) == (4, 0, 0)
                    assert children == view.steps[0].children
        finally:
            await status.stop()
