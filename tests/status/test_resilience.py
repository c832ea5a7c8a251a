"""When the orchestrator goes away, comes back, forgets, or is replaced.

- Silence becomes a state (invariant 6): with the orchestrator killed, its
  unfinished jobs say stale (since when, from where, why) everywhere they are
  read, and keep the last state known: nothing is invented. Finished jobs are
  never stale. When it comes back, the job it lost ends FAILED
  ORCHESTRATOR_RESTARTED here too, and stale clears.
- A cursor the orchestrator no longer retains (OUT_OF_RANGE) makes the status
  service resync from StreamSnapshot and carry on (invariant 5).
- A replaced orchestrator data directory (a new log) is detected, resynced, and
  the unfinished jobs the new log does not know are shown stale with a detail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.states import TERMINAL_JOB_STATES, TERMINAL_STEP_STATES
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc
from stepstream_client.errors import from_rpc_error

from orchestrator_svc.app import start as start_orchestrator
from status_svc.app import DATABASE_FILE, StatusService
from status_svc.app import start as start_status
from tests.conftest import orchestrator_config, status_config
from tests.helpers import (
    DEADLINE,
    ServiceProcess,
    channel,
    ends_job,
    eventually,
    free_port,
    open_sqlite_readonly,
    orchestrator_process,
    read_watch,
    read_whole_log,
    status_job_finished,
    wait_job_state,
    wait_status_job,
    watch_until,
)
from tests.helpers.audit import recorded_events
from tests.status.test_paths import assert_status_equals_orchestrator, submit

if TYPE_CHECKING:
    OrchStub = orch_grpc.OrchestratorServiceAsyncStub
    StatusStub = status_grpc.StatusServiceAsyncStub

QUICK = [{"name": "one", "type": "sleep", "seconds": 0}]
LONG = [{"name": "long", "type": "sleep", "seconds": 60}, {"name": "after", "type": "sleep", "seconds": 0}]


@asynccontextmanager
async def orchestrator_subprocess(data_dir: Path, port: int) -> AsyncIterator[tuple[ServiceProcess, OrchStub]]:
    process = orchestrator_process(data_dir, port)
    try:
        address = await asyncio.to_thread(process.start)
        assert address == f"127.0.0.1:{port}"
        async with channel(address) as ch:
            yield process, orch_grpc.OrchestratorServiceStub(ch)
    finally:
        process.stop()


@asynccontextmanager
async def status_service(data_dir: Path, orchestrator: str) -> AsyncIterator[tuple[StatusService, StatusStub]]:
    service = await start_status(status_config(data_dir, orchestrator))
    try:
        async with channel(service.address) as ch:
            yield service, status_grpc.StatusServiceStub(ch)
    finally:
        await service.stop()


def long_running(response: status_pb.GetJobResponse) -> bool:
    return response.steps[0].state == s.STEP_STATE_RUNNING


async def a_finished_and_a_running_job(
    orch: OrchStub, stub: StatusStub
) -> tuple[str, str, status_pb.GetJobResponse]:
    """A job that has ended and one whose long step runs, both known to the status
    service: the ids, and the running one as the status service shows it."""
    done = await submit(orch, QUICK)
    await wait_status_job(stub, done, status_job_finished, "the quick job to end")
    running = await submit(orch, LONG)
    return done, running, await wait_status_job(stub, running, long_running, "the long step to run")


def without_freshness(job: status_pb.JobStatus) -> status_pb.JobStatus:
    copy = status_pb.JobStatus()
    copy.CopyFrom(job)
    copy.ClearField("freshness")
    copy.ClearField("revision")
    return copy


async def first_update(call: Any) -> status_pb.JobUpdate:
    message = await read_watch(call)
    assert message.WhichOneof("event") == "updates"
    update: status_pb.JobUpdate = message.updates.updates[0]
    return update


def step_stats_rows(status: StatusService, job_id: str) -> list[tuple[Any, ...]]:
    db = open_sqlite_readonly(status.config.data_dir / DATABASE_FILE)
    try:
        return list(db.execute("SELECT name, state, reason, finished_at, children_pending, children_running "
                               "FROM step_stats WHERE job_id = ? ORDER BY idx", (job_id,)))
    finally:
        db.close()


def assert_changes_in_natural_order(status: StatusService, job_id: str) -> None:
    """The job's change log never shows it ended before one of its steps changed,
    nor a step ended while its children still ran (a resync applies a snapshot
    innermost first, the way the orchestrator's own stream orders things)."""
    db = open_sqlite_readonly(status.config.data_dir / DATABASE_FILE)
    try:
        rows = db.execute("SELECT revision, header, steps FROM changes WHERE job_id = ? ORDER BY revision",
                          (job_id,)).fetchall()
    finally:
        db.close()
    ended_at = None
    for revision, header, steps in rows:
        assert ended_at is None, f"{job_id}: revision {revision} changes the job after it ended at {ended_at}"
        for stats in status_pb.JobUpdate.FromString(steps or b"").steps:
            if stats.state in TERMINAL_STEP_STATES:
                assert (stats.children.pending, stats.children.running) == (0, 0), (
                    f"{job_id}: step {stats.name} ended at revision {revision} with children unfinished")
        if header is not None and status_pb.JobStatus.FromString(header).state in TERMINAL_JOB_STATES:
            ended_at = revision


# --- staleness, then the orchestrator comes back --------------------------------------------------------------


async def test_a_dead_orchestrator_makes_its_running_jobs_stale_and_its_return_ends_them(tmp_path: Path) -> None:
    port = free_port()
    async with orchestrator_subprocess(tmp_path / "orchestrator", port) as (first, orch):
        address = first.address
        async with status_service(tmp_path / "status", address) as (status, stub):
            done, running, before = await a_finished_and_a_running_job(orch, stub)
            assert before.job.freshness == status_pb.Freshness(source=address)
            watch = stub.WatchJob(status_pb.WatchJobRequest(job_id=running))
            assert (await first_update(watch)).job.freshness.stale is False
            assert (await read_watch(watch)).WhichOneof("event") == "initial_state_complete"

            await asyncio.to_thread(first.kill)
            killed_at = time.time()

            stale = await wait_status_job(stub, running, lambda r: r.job.freshness.stale, "the job to turn stale")
            fresh = stale.job.freshness
            assert fresh.source == address
            assert fresh.HasField("stale_since") and fresh.stale_since.ToNanoseconds() <= killed_at * 1e9
            assert fresh.stale_since.ToNanoseconds() >= before.job.created_at.ToNanoseconds()
            assert address in fresh.detail
            # Nothing invented: the last known state, untouched.
            assert without_freshness(stale.job) == without_freshness(before.job)
            assert list(stale.steps) == list(before.steps)
            assert [(st.name, st.state, st.attempt) for st in stale.steps] == [
                ("long", s.STEP_STATE_RUNNING, 1), ("after", s.STEP_STATE_PENDING, 0)]
            # Said the same way by every read...
            listed = {job.id: job for job in (await stub.ListJobs(status_pb.ListJobsRequest())).jobs}
            assert listed[running].freshness == fresh and listed[running].state == s.JOB_STATE_RUNNING
            assert listed[done].freshness == status_pb.Freshness(source=address), "a finished job is never stale"
            finished = await stub.GetJob(status_pb.GetJobRequest(job_id=done))
            assert finished.job.freshness == status_pb.Freshness(source=address)
            later_watch = stub.WatchJob(status_pb.WatchJobRequest(job_id=running))
            assert (await first_update(later_watch)).job.freshness == fresh
            later_watch.cancel()
            everything = stub.WatchJobs(status_pb.WatchJobsRequest())
            initial = {u.job_id: u.job for u in (await read_watch(everything)).updates.updates}
            everything.cancel()
            assert initial[running].freshness == fresh and not initial[done].freshness.stale
            # ... and pushed to the watcher that was already there.
            went_stale, _ = await watch_until(watch, lambda u: u.HasField("job") and u.job.freshness.stale)
            assert [without_freshness(u.job) for u in went_stale] == [without_freshness(before.job)]
            assert not [u for u in went_stale if u.steps]

            async with orchestrator_subprocess(tmp_path / "orchestrator", port) as (_, orch_again):
                ended = await wait_status_job(stub, running, status_job_finished, "the job to end after the restart")
                view = await wait_job_state(orch_again, running, set(TERMINAL_JOB_STATES))
                assert (ended.job.state, ended.job.reason) == (s.JOB_STATE_FAILED, s.REASON_ORCHESTRATOR_RESTARTED)
                assert_status_equals_orchestrator(view, ended, address)  # includes: no longer stale
                assert [(st.name, st.state, st.reason) for st in ended.steps] == [
                    ("long", s.STEP_STATE_FAILED, s.REASON_ORCHESTRATOR_RESTARTED),
                    ("after", s.STEP_STATE_CANCELLED, s.REASON_ORCHESTRATOR_RESTARTED),
                ]
                rows = step_stats_rows(status, running)
                assert [row[:3] for row in rows] == [(st.name, st.state, st.reason) for st in ended.steps]
                assert all(row[3] is not None for row in rows), "terminal step_stats without finished_at"
                # The watcher saw it come back fresh, then end.
                came_back, _ = await watch_until(watch, ends_job)
                watch.cancel()
                headers = [u.job for u in came_back if u.HasField("job")]
                assert not headers[0].freshness.stale
                assert not any(h.freshness.stale for h in headers)
                assert headers[-1].state == s.JOB_STATE_FAILED
                # A new job on the restarted orchestrator is followed as usual.
                again = await submit(orch_again, QUICK)
                followed = await wait_status_job(stub, again, status_job_finished, "a new job to end")
                assert followed.job.state == s.JOB_STATE_COMPLETED and not followed.job.freshness.stale


# --- OUT_OF_RANGE: resync from a snapshot ----------------------------------------------------------------------


async def test_a_cursor_the_orchestrator_pruned_is_resynced_from_a_snapshot(tmp_path: Path) -> None:
    orchestrator = await start_orchestrator(orchestrator_config(tmp_path / "orchestrator", retain_events=20,
                                                                prune_interval=0.2))
    try:
        async with channel(orchestrator.address) as ch:
            orch: OrchStub = orch_grpc.OrchestratorServiceStub(ch)
            status_dir = tmp_path / "status"
            fan = {"name": "fan", "type": "fanout", "count": 10, "child": {"type": "sleep", "seconds": 0}}
            async with status_service(status_dir, orchestrator.address) as (status, stub):
                early = await submit(orch, [fan])
                await wait_status_job(stub, early, status_job_finished, "the first job to end")
                cursor = status.writer.source(orchestrator.address).cursor
            # The status service is down; the orchestrator moves on and forgets.
            while_down = await submit(orch, [fan])
            held = await submit(orch, LONG)
            quick = await submit(orch, QUICK)
            for job_id in (while_down, quick):
                await wait_job_state(orch, job_id, set(TERMINAL_JOB_STATES))
            await wait_job_state(orch, held, {s.JOB_STATE_RUNNING})

            async def pruned() -> int | None:
                oldest = await orchestrator.store.oldest_seq()
                return oldest if oldest > cursor + 1 else None

            await eventually(pruned, "the orchestrator to prune the events the status service needs")
            call = orch.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=cursor))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
            assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert from_rpc_error(caught.value).reason == "CURSOR_TOO_OLD"

            async with status_service(status_dir, orchestrator.address) as (status, stub):
                def in_step(job_id: str) -> Any:
                    return lambda r: r.job.state == s.JOB_STATE_RUNNING and r.steps[0].state == s.STEP_STATE_RUNNING

                for job_id in (early, while_down, quick):
                    got = await wait_status_job(stub, job_id, status_job_finished, f"{job_id} to end after resync")
                    view = await orch.GetJob(orch_pb.GetJobRequest(job_id=job_id))
                    assert_status_equals_orchestrator(view, got, orchestrator.address)
                running = await wait_status_job(stub, held, in_step(held), "the held job after resync")
                assert not running.job.freshness.stale
                assert status.followers[0].resyncs >= 1
                # And it carries on following the stream after the snapshot.
                await orch.CancelJob(orch_pb.CancelJobRequest(job_id=held))
                cancelled = await wait_status_job(stub, held, status_job_finished, "the held job to be cancelled")
                view = await orch.GetJob(orch_pb.GetJobRequest(job_id=held))
                assert_status_equals_orchestrator(view, cancelled, orchestrator.address)
                assert cancelled.job.state == s.JOB_STATE_CANCELLED
                after = await submit(orch, QUICK)
                followed = await wait_status_job(stub, after, status_job_finished, "a new job to end")
                assert followed.job.state == s.JOB_STATE_COMPLETED
                assert status.writer.source(orchestrator.address).cursor == orchestrator.journal.committed_seq
            # What the resync wrote reads like a real history: nothing of a job after it ended,
            # no step ended while its children were unfinished.
            for job_id in (early, while_down, held, quick, after):
                assert_changes_in_natural_order(status, job_id)
    finally:
        await orchestrator.stop()


# --- the orchestrator's data replaced ---------------------------------------------------------------------------


async def test_a_replaced_orchestrator_log_is_resynced_and_unknown_jobs_are_stale(tmp_path: Path) -> None:
    port = free_port()
    async with orchestrator_subprocess(tmp_path / "orchestrator-a", port) as (first, orch):
        address = first.address
        async with status_service(tmp_path / "status", address) as (status, stub):
            done, lost, before = await a_finished_and_a_running_job(orch, stub)
            old_log = status.writer.source(address).log_id
            assert old_log
            await asyncio.to_thread(first.kill)

            # Same address, empty data directory: a new log.
            async with orchestrator_subprocess(tmp_path / "orchestrator-b", port) as (_, replaced):
                unknown = await wait_status_job(
                    stub, lost, lambda r: r.job.freshness.stale and "unknown to" in r.job.freshness.detail,
                    "the lost job to be shown stale with why",
                )
                assert status.followers[0].resyncs >= 1
                new_log = status.writer.source(address).log_id
                assert new_log and new_log != old_log
                assert address in unknown.job.freshness.detail and new_log in unknown.job.freshness.detail
                assert unknown.job.freshness.source == address
                assert without_freshness(unknown.job) == without_freshness(before.job)
                assert list(unknown.steps) == list(before.steps)
                finished = await stub.GetJob(status_pb.GetJobRequest(job_id=done))
                assert finished.job.state == s.JOB_STATE_COMPLETED
                assert finished.job.freshness == status_pb.Freshness(source=address)
                # The new log is followed from its start.
                fresh_job = await submit(replaced, QUICK)
                followed = await wait_status_job(stub, fresh_job, status_job_finished, "a job of the new log to end")
                view = await replaced.GetJob(orch_pb.GetJobRequest(job_id=fresh_job))
                assert_status_equals_orchestrator(view, followed, address)
                listed = {job.id: job for job in (await stub.ListJobs(status_pb.ListJobsRequest())).jobs}
                assert set(listed) == {done, lost, fresh_job}
                assert listed[lost].freshness.stale and listed[lost].state == s.JOB_STATE_RUNNING

                async def cursor_caught_up() -> bool | None:
                    db = open_sqlite_readonly(status.config.data_dir / DATABASE_FILE)
                    try:
                        row = db.execute("SELECT log_id, cursor FROM sources").fetchone()
                    finally:
                        db.close()
                    return True if row == (new_log, view.seq) else None

                await eventually(cursor_caught_up, "the committed cursor to belong to the new log", DEADLINE)



@pytest.mark.slow
async def test_orchestrator_kill_9_loop_soak(tmp_path: Path) -> None:
    """kill -9 the orchestrator again and again while jobs run; after each return
    the status service converges to what the orchestrator recorded, and over the
    whole run it applied each of the orchestrator's events exactly once."""
    port = free_port()
    rounds = 5
    jobs: list[str] = []
    fan = {"name": "fan", "type": "fanout", "count": 300, "concurrency": 10, "max_child_failures": 300,
           "child": {"type": "python", "function": "tests.helpers:flaky_child",
                     "args": {"index": "{index}", "fail_every": "17", "delay": "0.01"}}}
    async with status_service(tmp_path / "status", f"127.0.0.1:{port}") as (status, stub):
        for _ in range(rounds):
            async with orchestrator_subprocess(tmp_path / "orchestrator", port) as (process, orch):
                for job_id in jobs:  # the previous round's job ended FAILED on this restart, here too
                    await wait_status_job(stub, job_id, status_job_finished, "an interrupted job to end")
                # The job is still in its last step whenever the kill comes.
                job_id = await submit(orch, [fan, {"name": "hold", "type": "sleep", "seconds": 600}])
                jobs.append(job_id)
                await wait_status_job(stub, job_id, lambda r: r.steps[0].children.completed >= 30, "progress")
                await asyncio.to_thread(process.kill)
        async with orchestrator_subprocess(tmp_path / "orchestrator", port) as (_, orch):
            for job_id in jobs:
                got = await wait_status_job(stub, job_id, status_job_finished, "every job to end")
                view = await orch.GetJob(orch_pb.GetJobRequest(job_id=job_id))
                assert (got.job.state, got.job.reason) == (s.JOB_STATE_FAILED, s.REASON_ORCHESTRATOR_RESTARTED)
                assert_status_equals_orchestrator(view, got, f"127.0.0.1:{port}")
            events = await read_whole_log(orch)

            async def caught_up() -> bool | None:
                return True if status.writer.source(f"127.0.0.1:{port}").cursor == events[-1].seq else None

            await eventually(caught_up, "the status service to reach the end of the log")
    db = open_sqlite_readonly(status.config.data_dir / DATABASE_FILE)
    try:
        changes = db.execute("SELECT revision, job_id, state_before, state_after, header, steps, child_events "
                             "FROM changes ORDER BY revision").fetchall()
    finally:
        db.close()
    assert [row[0] for row in changes] == list(range(1, len(changes) + 1))
    for job_id in jobs:
        mine = [e for e in events if (e.job.id if e.HasField("job") else
                                      e.step.job_id if e.HasField("step") else e.child.job_id) == job_id]
        recorded_events(mine, [row for row in changes if row[1] == job_id])
