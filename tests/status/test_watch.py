"""Watches: one revision joins snapshot and stream (invariant 4), lossless
resume (5), heartbeats (6) and slow watchers (7).

Every expectation is checked against the `changes` table of the status
service's own SQLite file: the durable revision log a watch must reproduce,
update for update, with no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc
from stepstream_client.errors import from_rpc_error

from orchestrator_svc.app import Orchestrator
from status_svc.app import DATABASE_FILE, StatusService
from status_svc.app import start as start_status
from tests.conftest import status_config
from tests.helpers import (
    DEADLINE,
    WatchedJob,
    ends_job,
    eventually,
    folded_child_events,
    open_sqlite_readonly,
    read_watch,
    status_job_finished,
    stored_updates,
    wait_status_job,
    watch_until,
)
from tests.status.test_paths import submit

if TYPE_CHECKING:
    OrchStub = orch_grpc.OrchestratorServiceAsyncStub
    StatusStub = status_grpc.StatusServiceAsyncStub


def gate(path: Path) -> dict[str, Any]:
    """A command step that runs until `path` exists."""
    return {"name": "gate", "type": "command",
            "command": ["sh", "-c", f"while [ ! -f {shlex.quote(str(path))} ]; do sleep 0.02; done"]}


def fan(count: int, concurrency: int = 10, delay: float = 0.0, fail_every: int = 0) -> dict[str, Any]:
    return {"name": "fan", "type": "fanout", "count": count, "concurrency": concurrency,
            "max_child_failures": count,
            "child": {"type": "python", "function": "tests.helpers:flaky_child",
                      "args": {"index": "{index}", "fail_every": str(fail_every), "delay": str(delay)}}}


async def gated_job(orch: OrchStub, status: StatusStub, release: Path, *steps: dict[str, Any],
                    name: str = "test-job") -> str:
    """A job held in its first step (running) until `release` exists, known to the status service."""
    job_id = await submit(orch, [gate(release), *steps], name=name)
    await wait_status_job(status, job_id, lambda r: r.steps[0].state == s.STEP_STATE_RUNNING, "the gate to run")
    return job_id


def db_path(status: StatusService) -> Path:
    return status.config.data_dir / DATABASE_FILE


async def open_watch(status: StatusStub, job_id: str) -> tuple[Any, status_pb.JobUpdate]:
    """WatchJob from the current state: returns the call and the initial update, after its marker."""
    call = status.WatchJob(status_pb.WatchJobRequest(job_id=job_id))
    first = await read_watch(call)
    assert first.WhichOneof("event") == "updates"
    assert len(first.updates.updates) == 1
    initial = first.updates.updates[0]
    marker = await read_watch(call)
    assert marker.WhichOneof("event") == "initial_state_complete"
    assert marker.initial_state_complete.revision == initial.revision
    return call, initial


@pytest.fixture
async def small_queue_status(tmp_path: Path, orchestrator: Orchestrator) -> AsyncIterator[StatusService]:
    """A status service whose watchers overflow after 5 queued changes."""
    running = await start_status(status_config(tmp_path / "status-small-queue", orchestrator.address,
                                               watcher_queue=5))
    yield running
    await running.stop()


@pytest.fixture
async def short_log_status(tmp_path: Path, orchestrator: Orchestrator) -> AsyncIterator[StatusService]:
    """A status service that keeps only the 5 newest revisions of its change log."""
    running = await start_status(status_config(tmp_path / "status-short-log", orchestrator.address,
                                               retain_changes=5, prune_interval=0.2))
    yield running
    await running.stop()


@asynccontextmanager
async def stub_for(service: StatusService, options: list[tuple[str, Any]] | None = None) -> AsyncIterator[StatusStub]:
    async with grpc.aio.insecure_channel(service.address, options=options) as ch:
        yield status_grpc.StatusServiceStub(ch)


def all_ended(*job_ids: str) -> Callable[[status_pb.JobUpdate], bool]:
    """`watch_until` predicate: every one of these jobs has sent its terminal header."""
    pending = set(job_ids)

    def check(update: status_pb.JobUpdate) -> bool:
        if ends_job(update):
            pending.discard(update.job_id)
        return not pending

    return check


# --- state, marker, then every change ---------------------------------------------------------------------------


async def test_watch_sends_state_then_marker_then_every_change_in_order(
    orchestrator_stub: OrchStub, status_stub: StatusStub, status: StatusService, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    job_id = await gated_job(orchestrator_stub, status_stub, release, fan(30, concurrency=4, fail_every=7))
    call, initial = await open_watch(status_stub, job_id)
    snapshot = await status_stub.GetJob(status_pb.GetJobRequest(job_id=job_id))
    # Nothing moves while the gate holds: the initial state is exactly the snapshot.
    assert (initial.revision, initial.job, list(initial.steps)) == (snapshot.revision, snapshot.job,
                                                                    list(snapshot.steps))
    assert [st.state for st in initial.steps] == [s.STEP_STATE_RUNNING, s.STEP_STATE_PENDING]

    release.touch()
    updates, heartbeats = await watch_until(call, ends_job)
    call.cancel()
    final = await status_stub.GetJob(status_pb.GetJobRequest(job_id=job_id))
    assert final.job.state == s.JOB_STATE_COMPLETED
    # Exactly the job's changes after the marker, in revision order, each once, as stored.
    assert updates == stored_updates(db_path(status), job_id, after=initial.revision)
    revisions = [u.revision for u in updates]
    assert revisions == sorted(set(revisions)) and revisions[0] > initial.revision
    assert revisions[-1] == final.job.revision
    # The gate's end, the fan-out's running, waiting and end, and the job's end each have a revision;
    # the 30 children x 3 transitions are folded, per step and transaction, into the others.
    folded = folded_child_events(db_path(status), job_id, after=initial.revision)
    assert len(folded) == len(updates)
    assert folded.count(0) == 1 + 3 + 1
    assert sum(folded) == 30 * 3
    assert all(h.revision >= initial.revision for h in heartbeats)

    # Folding the stream onto the initial state gives the final snapshot.
    watched = WatchedJob()
    for update in [initial, *updates]:
        assert watched.apply(update)
    assert watched.job == final.job and watched.ordered_steps() == list(final.steps)

    # A second watcher resumed from 0 replays the whole history of the job, the same way.
    replay = status_stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id, after_revision=0))
    everything, _ = await watch_until(replay, ends_job)
    replay.cancel()
    assert everything == stored_updates(db_path(status), job_id)
    assert everything[-len(updates):] == updates
    from_zero = WatchedJob()
    for update in everything:
        assert from_zero.apply(update)
    assert from_zero.job == final.job and from_zero.ordered_steps() == list(final.steps)


async def test_snapshot_at_revision_equals_the_stream_folded_to_it(
    orchestrator_stub: OrchStub, status_stub: StatusStub, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    job_id = await gated_job(orchestrator_stub, status_stub, release, fan(300, concurrency=10, delay=0.01,
                                                                           fail_every=9))
    call, initial = await open_watch(status_stub, job_id)
    watched = WatchedJob()
    watched.apply(initial)

    async def follow() -> None:
        updates, _ = await watch_until(call, ends_job)
        for update in updates:
            assert watched.apply(update), f"revision {update.revision} is not newer than {watched.revision}"

    follower = asyncio.create_task(follow())
    release.touch()
    snapshots: list[status_pb.GetJobResponse] = []
    while not follower.done():
        snapshots.append(await status_stub.GetJob(status_pb.GetJobRequest(job_id=job_id)))
        await asyncio.sleep(0.01)
    await follower
    call.cancel()
    snapshots.append(await status_stub.GetJob(status_pb.GetJobRequest(job_id=job_id)))
    mid_run = [snap for snap in snapshots if snap.job.state == s.JOB_STATE_RUNNING and snap.steps[1].children.total]
    assert len(mid_run) >= 2, "no snapshot was taken while the fan-out ran"
    for snap in snapshots:
        seen = watched.at(snap.revision)
        assert seen.job == snap.job, f"header differs at revision {snap.revision}"
        assert seen.ordered_steps() == list(snap.steps), f"steps differ at revision {snap.revision}"
    assert snapshots[-1].job.state == s.JOB_STATE_COMPLETED


async def test_a_watcher_that_disconnects_and_resumes_sees_every_change_once(
    orchestrator_stub: OrchStub, status_stub: StatusStub, status: StatusService, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    job_id = await gated_job(orchestrator_stub, status_stub, release, fan(200, concurrency=5, delay=0.005))
    call, initial = await open_watch(status_stub, job_id)
    release.touch()
    first: list[status_pb.JobUpdate] = []
    while len(first) < 10:
        message = await read_watch(call)
        first.extend(message.updates.updates)
    call.cancel()
    assert not any(ends_job(u) for u in first), "the job ended before the disconnect"
    resume_at = first[-1].revision
    again = status_stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id, after_revision=resume_at))
    rest, _ = await watch_until(again, ends_job)
    again.cancel()
    both = [*first, *rest]
    assert [u.revision for u in both] == sorted({u.revision for u in both})
    assert both == stored_updates(db_path(status), job_id, after=initial.revision)
    folded = folded_child_events(db_path(status), job_id, after=initial.revision)
    assert len(folded) == len(both)
    assert (folded.count(0), sum(folded)) == (1 + 3 + 1, 200 * 3)


async def test_a_stalled_watcher_never_slows_ingest_and_loses_nothing(
    orchestrator_stub: OrchStub, small_queue_status: StatusService, tmp_path: Path
) -> None:
    """The documented rule (stepstream_common/feed.py): a watcher more than
    `watcher_queue` changes behind is switched to reading the change log; it is
    not cut off and the writer never waits for it.

    Step transitions are never folded together, so a long chain of steps gives
    the stalled watcher hundreds of changes (over 64 KiB): more than gRPC buffers
    for it, so its queue must overflow. A fan-out adds child revisions too."""
    release = tmp_path / "release"
    count = 1500
    chain = [{"name": f"link-{i:03d}", "type": "sleep", "seconds": 0} for i in range(150)]
    # A small flow-control window: the server's writes block soon after the watcher stops reading.
    small_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    async with stub_for(small_queue_status, small_window) as stub:
        job_id = await gated_job(orchestrator_stub, stub, release, fan(count, concurrency=20), *chain)
        call, initial = await open_watch(stub, job_id)
        # From here on nobody reads the watch.
        release.touch()
        done = await wait_status_job(stub, job_id, status_job_finished, "the job to end while the watcher stalls")
        assert done.job.state == s.JOB_STATE_COMPLETED
        assert done.steps[1].children.completed == count
        assert small_queue_status.feed.overflow_count >= 1, "the watcher never fell behind: the test proves nothing"
        assert small_queue_status.feed.subscriber_count == 1, "the stalled watcher was cut off"

        updates, _ = await watch_until(call, ends_job)
        call.cancel()
    revisions = [u.revision for u in updates]
    assert revisions == sorted(set(revisions))
    assert updates == stored_updates(db_path(small_queue_status), job_id, after=initial.revision)
    folded = folded_child_events(db_path(small_queue_status), job_id, after=initial.revision)
    assert len(folded) == len(updates)
    # The gate's end, the fan-out's running, waiting and end, two transitions per link, the job's end.
    assert (folded.count(0), sum(folded)) == (1 + 3 + 2 * len(chain) + 1, count * 3)
    assert revisions[-1] == done.job.revision


# --- retention, unknown jobs -------------------------------------------------------------------------------------


async def test_a_cursor_older_than_retention_is_out_of_range_and_the_client_resnapshots(
    orchestrator_stub: OrchStub, short_log_status: StatusService
) -> None:
    async with stub_for(short_log_status) as stub:
        await _out_of_range_then_resnapshot(orchestrator_stub, stub, short_log_status)


async def _out_of_range_then_resnapshot(
    orchestrator_stub: OrchStub, quick_stub: StatusStub, quick_status: StatusService
) -> None:
    # Step transitions each take a revision (child ones may share one): enough to prune.
    sleeps = [{"name": f"pause-{i}", "type": "sleep", "seconds": 0} for i in range(5)]
    job_id = await submit(orchestrator_stub, [fan(10), *sleeps])
    final = await wait_status_job(quick_stub, job_id, status_job_finished, "the job to end")
    latest = final.revision
    assert latest > 10

    def oldest_kept() -> int:
        db = open_sqlite_readonly(db_path(quick_status))
        try:
            return int(db.execute("SELECT MIN(revision) FROM changes").fetchone()[0])
        finally:
            db.close()

    async def pruned() -> int | None:
        oldest = oldest_kept()
        return oldest if oldest == latest - 4 else None

    oldest = await eventually(pruned, "the change log to be pruned to 5 revisions")
    for call in (
        quick_stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id, after_revision=1)),
        quick_stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id, after_revision=oldest - 2)),
        quick_stub.WatchJobs(status_pb.WatchJobsRequest(after_revision=0)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_watch(call)
        error = caught.value
        assert error.code() == grpc.StatusCode.OUT_OF_RANGE
        typed = from_rpc_error(error)
        assert typed.reason == "CURSOR_TOO_OLD"
        assert (int(typed.metadata["oldest"]), int(typed.metadata["latest"])) == (oldest, latest)
    ahead = quick_stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id, after_revision=latest + 100))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_watch(ahead)
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert from_rpc_error(caught.value).reason == "CURSOR_UNKNOWN"

    # The way back: a new snapshot (a watch without a revision) is the current state...
    call, initial = await open_watch(quick_stub, job_id)
    call.cancel()
    assert (initial.revision, initial.job, list(initial.steps)) == (final.revision, final.job, list(final.steps))
    # ... and the oldest retained cursor still resumes, with exactly what is kept.
    edge = quick_stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id, after_revision=oldest - 1))
    kept, _ = await watch_until(edge, ends_job)
    edge.cancel()
    assert kept == stored_updates(db_path(quick_status), job_id, after=oldest - 1)
    assert [u.revision for u in kept] == list(range(oldest, latest + 1))


# --- heartbeats -----------------------------------------------------------------------------------------------


async def test_heartbeats_carry_the_current_revision_when_idle(
    orchestrator_stub: OrchStub, status_stub: StatusStub, status: StatusService
) -> None:
    first = await submit(orchestrator_stub, [{"name": "one", "type": "sleep", "seconds": 0}])
    done = await wait_status_job(status_stub, first, status_job_finished, "the first job to end")
    call, initial = await open_watch(status_stub, first)
    assert initial.revision == done.revision
    message = await read_watch(call)
    assert message.WhichOneof("event") == "heartbeat"
    assert message.heartbeat.revision == done.revision
    assert message.heartbeat.interval.ToNanoseconds() == 200_000_000
    assert message.heartbeat.HasField("time")

    # Another job moves the service's revision; this watch gets no update, only
    # heartbeats that catch up with the new revision.
    second = await submit(orchestrator_stub, [{"name": "one", "type": "sleep", "seconds": 0}])
    later = await wait_status_job(status_stub, second, status_job_finished, "the second job to end")
    assert later.revision > done.revision

    async def caught_up() -> int | None:
        message = await read_watch(call)
        assert message.WhichOneof("event") == "heartbeat", f"unexpected {message}"
        return message.heartbeat.revision if message.heartbeat.revision == later.revision else None

    await eventually(caught_up, "a heartbeat at the new revision")
    call.cancel()
    # A heartbeat's revision is a safe place to resume: nothing of this job comes after it.
    resumed = status_stub.WatchJob(status_pb.WatchJobRequest(job_id=first, after_revision=later.revision))
    message = await read_watch(resumed)
    resumed.cancel()
    assert message.WhichOneof("event") == "heartbeat" and message.heartbeat.revision == later.revision


# --- WatchJobs ------------------------------------------------------------------------------------------------


async def test_watch_jobs_with_a_state_filter_sends_the_change_that_takes_a_job_out(
    orchestrator_stub: OrchStub, status_stub: StatusStub, status: StatusService, tmp_path: Path
) -> None:
    finished = await submit(orchestrator_stub, [{"name": "one", "type": "sleep", "seconds": 0}], name="done")
    await wait_status_job(status_stub, finished, status_job_finished, "the first job to end")
    release = tmp_path / "release"
    held = await gated_job(orchestrator_stub, status_stub, release, fan(5), name="held")

    running_only = status_stub.WatchJobs(status_pb.WatchJobsRequest(
        filter=status_pb.JobFilter(states=[s.JOB_STATE_RUNNING])))
    by_name = status_stub.WatchJobs(status_pb.WatchJobsRequest(filter=status_pb.JobFilter(name="held")))
    everything = status_stub.WatchJobs(status_pb.WatchJobsRequest())
    markers: list[int] = []
    for call, expected_ids in ((running_only, [held]), (by_name, [held]), (everything, [held, finished])):
        first = await read_watch(call)
        assert [u.job_id for u in first.updates.updates] == expected_ids
        assert all(u.HasField("job") and not u.steps for u in first.updates.updates)
        marker = await read_watch(call)
        assert marker.WhichOneof("event") == "initial_state_complete"
        assert all(u.revision == marker.initial_state_complete.revision for u in first.updates.updates)
        markers.append(marker.initial_state_complete.revision)

    release.touch()
    later = await submit(orchestrator_stub, [{"name": "one", "type": "sleep", "seconds": 0}], name="later")
    got_running, _ = await watch_until(running_only, all_ended(held, later))
    got_named, _ = await watch_until(by_name, all_ended(held))
    got_all, _ = await watch_until(everything, all_ended(held, later))
    for call in (running_only, by_name, everything):
        call.cancel()

    db = open_sqlite_readonly(db_path(status))
    try:
        rows = db.execute("SELECT revision, job_id, name, state_before, state_after FROM changes "
                          "WHERE header IS NOT NULL ORDER BY revision").fetchall()
    finally:
        db.close()

    def expected(after: int, upto: int, keep: Callable[[str, int, int], bool]) -> list[tuple[int, str]]:
        return [(rev, job_id) for rev, job_id, name, before, now in rows if after < rev <= upto
                and keep(name, before, now)]

    def received(updates: list[status_pb.JobUpdate]) -> list[tuple[int, str]]:
        return [(u.revision, u.job_id) for u in updates]

    running = s.JOB_STATE_RUNNING
    # Entering RUNNING, changes while RUNNING, and the change that leaves it; nothing else.
    assert received(got_running) == expected(markers[0], got_running[-1].revision,
                                             lambda _n, before, now: running in (before, now))
    assert [u.job.state for u in got_running if u.job_id == held][-1] == s.JOB_STATE_COMPLETED
    later_states = [u.job.state for u in got_running if u.job_id == later]
    assert later_states[0] == running and later_states[-1] == s.JOB_STATE_COMPLETED
    assert s.JOB_STATE_PENDING not in later_states
    assert received(got_named) == expected(markers[1], got_named[-1].revision, lambda name, _b, _a: name == "held")
    assert {u.job_id for u in got_named} == {held}
    assert received(got_all) == expected(markers[2], got_all[-1].revision, lambda *_: True)
    assert all(not u.steps for u in got_running + got_named + got_all), "WatchJobs carries headers only"
    assert next(u.job.state for u in got_all if u.job_id == later) == s.JOB_STATE_PENDING
    assert finished not in {u.job_id for u in got_all}


# --- graceful shutdown --------------------------------------------------------------------------------------------


async def test_graceful_shutdown_ends_watches_cleanly(
    orchestrator_stub: OrchStub, status_stub: StatusStub, status: StatusService, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    job_id = await gated_job(orchestrator_stub, status_stub, release)
    one, _ = await open_watch(status_stub, job_id)
    many = status_stub.WatchJobs(status_pb.WatchJobsRequest())
    assert (await read_watch(many)).WhichOneof("event") == "updates"
    assert (await read_watch(many)).WhichOneof("event") == "initial_state_complete"
    try:
        await status.stop()
    finally:
        release.touch()
    for call in (one, many):
        async with asyncio.timeout(DEADLINE):
            while (await call.read()) is not grpc.aio.EOF:
                pass
        assert await call.code() == grpc.StatusCode.OK


@pytest.mark.slow
async def test_many_stalled_watchers_soak(
    orchestrator_stub: OrchStub, small_queue_status: StatusService, tmp_path: Path
) -> None:
    """Several watchers of one job and one of every job, none reading, while 5000
    children and a chain of 190 steps run: ingest finishes, nobody is cut off,
    each gets everything once."""
    release = tmp_path / "release"
    count = 5000
    chain = [{"name": f"link-{i:03d}", "type": "sleep", "seconds": 0} for i in range(190)]
    small_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    async with stub_for(small_queue_status, small_window) as stub:
        job_id = await gated_job(orchestrator_stub, stub, release, fan(count, concurrency=100, fail_every=11),
                                 *chain)
        watches = [await open_watch(stub, job_id) for _ in range(3)]
        every = stub.WatchJobs(status_pb.WatchJobsRequest())
        assert (await read_watch(every)).WhichOneof("event") == "updates"
        every_marker = (await read_watch(every)).initial_state_complete.revision
        release.touch()
        done = await wait_status_job(stub, job_id, status_job_finished, "the job to end while nobody reads")
        assert done.steps[1].children.total == count
        assert small_queue_status.feed.overflow_count >= 4
        assert small_queue_status.feed.subscriber_count == 4
        for call, initial in watches:
            updates, _ = await watch_until(call, ends_job)
            call.cancel()
            assert updates == stored_updates(db_path(small_queue_status), job_id, after=initial.revision)
        headers, _ = await watch_until(every, ends_job)
        every.cancel()
    assert [u.revision for u in headers] == [u.revision for u in stored_updates(
        db_path(small_queue_status), job_id, after=every_marker) if u.HasField("job")]
