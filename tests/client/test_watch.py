"""Client.watch against real services: live views to the end, resume across a
status-service restart with no revision missed or repeated, re-snapshot on
OUT_OF_RANGE, and `live` while the service is gone or silent. (That closing a
watch cancels its RPC is seen only inside the status service: see
tests/e2e/test_client_watch_server_side.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.states import TERMINAL_JOB_STATES
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc
from stepstream_client import Applied, Client, JobsView, JobsWatch, JobView

from tests.client import services
from tests.client.services import DEADLINE, QUICK_ORCHESTRATOR, QUICK_STATUS, Service, eventually, gate_step


class Recorder:
    """Consumes a watch in the background, keeping every view and every applied update."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.views: list[JobView] = []
        self.applied: list[Applied] = []
        self._watch = client.watch(job_id, on_apply=self.applied.append)
        self.task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async with self._watch as views:
            async for view in views:
                self.views.append(view)

    async def until(self, what: str, check: Callable[[JobView], bool]) -> JobView:
        async def probe() -> JobView | None:
            if self.task.done():
                self.task.result()
            return next((view for view in self.views if check(view)), None)

        return await eventually(probe, what)

    async def finish(self) -> list[JobView]:
        async with asyncio.timeout(DEADLINE):
            await self.task
        return self.views

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def client(orchestrator: Service, status: Service) -> AsyncIterator[Client]:
    async with Client(orchestrator.address, status.address) as client:
        yield client


def step_state(view: JobView, name: str) -> str:
    return view.step(name).state


async def server_revisions(status_address: str, job_id: str, after: int) -> list[int]:
    """Every revision the status service has for the job after `after`, read with a raw stub."""
    revisions: list[int] = []
    async with grpc.aio.insecure_channel(status_address) as ch:
        call = status_grpc.StatusServiceStub(ch).WatchJob(status_pb.WatchJobRequest(job_id=job_id,
                                                                                   after_revision=after))
        try:
            async with asyncio.timeout(DEADLINE):
                async for message in call:
                    for update in message.updates.updates:
                        revisions.append(update.revision)
                        if update.HasField("job") and update.job.state in TERMINAL_JOB_STATES:
                            return revisions
        finally:
            call.cancel()
    raise AssertionError("the watch ended before the job did")


async def test_watch_yields_live_views_until_the_job_ends(client: Client, status: Service, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = await client.submit({"name": "watched", "steps": [
        gate_step("first", gate),
        {"name": "spread", "type": "fanout", "count": 20, "concurrency": 4, "child": {"type": "sleep", "seconds": 0}},
        {"name": "last", "type": "sleep", "seconds": 0, "always_run": True},
    ]})
    applied: list[Applied] = []
    views: list[JobView] = []
    async for view in client.watch(job.id, on_apply=applied.append):
        views.append(view)
        if step_state(view, "first") == "running":
            gate.touch()  # the rest of the job happens while the watch follows it
    revisions = [view.revision for view in views]
    assert revisions == sorted(set(revisions)), "each view is newer than the one before"
    assert [a.revision for a in applied] == sorted({a.revision for a in applied})
    assert applied[0].snapshot and not any(a.snapshot for a in applied[1:])
    assert all(view.live for view in views)
    assert [view.terminal for view in views] == [False] * (len(views) - 1) + [True]
    final = views[-1]
    assert final.state == "completed"
    assert [step.name for step in final.steps] == ["first", "spread", "last"]
    assert final.step("spread").children.completed == 20
    assert final == await client.get(job.id)
    assert await server_revisions(status.address, job.id, applied[0].revision) == [a.revision for a in applied[1:]]


async def test_watch_resumes_across_a_status_service_restart(orchestrator: Service, tmp_path: Path) -> None:
    """kill -9 the status service mid-job, let the job run on, restart it on the same
    address and data: the watch resumes from its revision, nothing missed or repeated."""
    service = services.status(tmp_path / "status", orchestrator.address, *QUICK_STATUS)
    address = await service.start()
    gate = tmp_path / "gate"
    try:
        async with Client(orchestrator.address, address) as client:
            job = await client.submit({"name": "restart", "steps": [
                {"name": "before", "type": "fanout", "count": 10, "child": {"type": "sleep", "seconds": 0}},
                gate_step("gate", gate),
                {"name": "after", "type": "fanout", "count": 30, "concurrency": 5,
                 "child": {"type": "sleep", "seconds": 0}},
            ]})
            recorder = Recorder(client, job.id)
            await recorder.until("the gate to run", lambda v: step_state(v, "gate") == "running")
            await service.kill()
            await recorder.until("the watch to notice", lambda v: not v.live)

            gate.touch()  # the job runs to its end while nobody records it
            await eventually(lambda: _orchestrator_finished(client, job.id), "the job to finish")
            assert await service.start() == address
            views = await recorder.finish()

            final = views[-1]
            assert final.state == "completed" and final.live
            assert final.step("after").children.completed == 30
            assert final == await client.get(job.id)
            revisions = [view.revision for view in views]
            assert revisions == sorted(revisions), "no view goes back"
            applied = [a.revision for a in recorder.applied]
            assert applied == sorted(set(applied)), "no revision applied twice or out of order"
            assert [a.snapshot for a in recorder.applied].count(True) == 1
            assert await server_revisions(address, job.id, applied[0]) == applied[1:], "no revision missed"
    finally:
        await service.kill()


async def _orchestrator_finished(client: Client, job_id: str) -> bool | None:
    """Whether the orchestrator (not the status service, which is down) has ended the job."""
    async with grpc.aio.insecure_channel(client.orchestrator_address) as ch:
        response = await orch_grpc.OrchestratorServiceStub(ch).GetJob(
            orch_pb.GetJobRequest(job_id=job_id)
        )
    return True if response.job.state in TERMINAL_JOB_STATES else None


async def test_out_of_range_takes_a_new_snapshot(orchestrator: Service, tmp_path: Path) -> None:
    """A watch resumed from a view whose revision the service no longer retains starts over
    from a snapshot instead of continuing silently from "now"."""
    status = services.status(tmp_path / "status", orchestrator.address, *QUICK_STATUS,
                             "--retain-changes", "3", "--prune-interval", "0.05")
    await status.start()
    gate = tmp_path / "gate"
    try:
        async with Client(orchestrator.address, status.address) as client:
            job = await client.submit({"name": "pruned", "steps": [
                gate_step("gate", gate),
                {"name": "spread", "type": "fanout", "count": 10, "child": {"type": "sleep", "seconds": 0}},
            ]})
            async with client.watch(job.id) as views:
                early = await anext(views)
            gate.touch()
            await eventually(lambda: _pruned_past(status.address, job.id, early.revision),
                             "the change log to be pruned")

            applied: list[Applied] = []
            resumed = [view async for view in client.watch(job.id, since=early, on_apply=applied.append)]
            assert [a.snapshot for a in applied] == [True], "one snapshot, taken after OUT_OF_RANGE"
            assert applied[0].revision > early.revision
            assert resumed[-1].state == "completed"
            assert resumed[-1] == await client.get(job.id)
    finally:
        await status.kill()


async def _pruned_past(status_address: str, job_id: str, revision: int) -> bool | None:
    """Whether the service no longer retains what came after `revision`: a raw watch
    resumed there is refused with OUT_OF_RANGE (otherwise its first message arrives)."""
    async with grpc.aio.insecure_channel(status_address) as ch:
        call = status_grpc.StatusServiceStub(ch).WatchJob(status_pb.WatchJobRequest(job_id=job_id,
                                                                                   after_revision=revision))
        try:
            async with asyncio.timeout(DEADLINE):
                await call.read()
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.OUT_OF_RANGE:
                return True
            raise
        finally:
            call.cancel()
    return None


async def test_live_goes_false_when_the_status_service_goes_away(
    orchestrator: Service, status: Service, tmp_path: Path
) -> None:
    """The status fixture is stopped here (SIGTERM, a graceful stop); killing it at teardown is a no-op."""
    async with Client(orchestrator.address, status.address) as client:
        job = await client.submit({"name": "orphan", "steps": [gate_step("gate", tmp_path / "never")]})
        recorder = Recorder(client, job.id)
        await recorder.until("the gate to run", lambda v: step_state(v, "gate") == "running")
        assert await status.terminate() == 0
        gone = await recorder.until("live to drop", lambda v: not v.live)
        assert gone.step("gate").state == "running", "the last known state is kept"
        assert gone.last_heard is not None
        await recorder.stop()
        await client.cancel(job.id)


async def test_a_watch_resumed_from_a_view_says_so_when_it_cannot_reconnect(
    orchestrator: Service, status: Service, tmp_path: Path
) -> None:
    """A view handed in (since=) is shown as live by its holder (the web gateway draws it): a watch
    whose very first call fails yields it again with live=False rather than staying silent."""
    async with Client(orchestrator.address, status.address) as client:
        job = await client.submit({"name": "held", "steps": [gate_step("gate", tmp_path / "never")]})
        held = dataclasses.replace(await client.get(job.id), last_heard=datetime.now(UTC))
        await status.kill()
        async with client.watch(job.id, since=held) as views, asyncio.timeout(DEADLINE):
            first = await anext(views)
        assert not first.live
        assert first == held
        assert first.last_heard == held.last_heard, "stale since the holder last heard"
        await client.cancel(job.id)


async def test_watch_started_before_the_job_is_ingested_waits_for_it(orchestrator: Service, tmp_path: Path) -> None:
    """Submit while no status service runs, then start one and watch at once: NOT_FOUND
    until it has ingested the job is ingestion lag, not an unknown job."""
    async with Client(orchestrator.address, "127.0.0.1:1") as submitter:
        job = await submitter.submit({"name": "early", "steps": [{"name": "one", "type": "sleep", "seconds": 0}]})
    status = services.status(tmp_path / "status", orchestrator.address, *QUICK_STATUS)
    await status.start()
    try:
        async with Client(orchestrator.address, status.address) as client:
            views = [view async for view in client.watch(job.id)]
        assert views[-1].state == "completed"
    finally:
        await status.kill()


async def test_silence_makes_a_view_not_live_until_the_service_answers_again(
    orchestrator: Service, tmp_path: Path
) -> None:
    """SIGSTOP keeps the connection open but silent: after stale_after_heartbeats
    intervals without a message the view is not live; after SIGCONT the watch
    carries on to the end without losing anything."""
    service = services.status(tmp_path / "status", orchestrator.address, *QUICK_STATUS)
    await service.start()
    gate = tmp_path / "gate"
    try:
        async with Client(orchestrator.address, service.address, stale_after_heartbeats=3) as client:
            job = await client.submit({"name": "silent", "steps": [
                gate_step("gate", gate),
                {"name": "spread", "type": "fanout", "count": 10, "child": {"type": "sleep", "seconds": 0}},
            ]})
            views: list[JobView] = []
            async with client.watch(job.id) as watch:
                async for view in watch:
                    views.append(view)
                    if view.step("gate").state == "running":
                        break
                # Nothing changes now; the watch reads heartbeats while the next view is awaited.
                following = asyncio.create_task(anext(watch))
                await eventually(lambda: _known(watch.heartbeat_interval), "a heartbeat to arrive")
                service.pause()
                try:
                    views.append(await following)
                    assert not views[-1].live
                    gate.touch()
                finally:
                    service.resume()
                views.extend([view async for view in watch])
            assert views[-1].state == "completed" and views[-1].live
            assert views[-1] == await client.get(job.id)
            revisions = [view.revision for view in views]
            assert revisions == sorted(revisions)
    finally:
        await service.kill()


async def _known(value: float | None) -> float | None:
    return value


async def test_a_job_whose_orchestrator_is_gone_shows_the_servers_stale_flag(tmp_path: Path) -> None:
    orchestrator = services.orchestrator(tmp_path / "orchestrator", *QUICK_ORCHESTRATOR)
    await orchestrator.start()
    status = services.status(tmp_path / "status", orchestrator.address, *QUICK_STATUS)
    await status.start()
    try:
        async with Client(orchestrator.address, status.address) as client:
            job = await client.submit({"name": "abandoned", "steps": [gate_step("gate", tmp_path / "never")]})
            async with client.watch(job.id) as views:
                async for view in views:
                    if view.step("gate").state == "running":
                        break
                await orchestrator.kill()
                async for view in views:
                    if view.stale:
                        break
            assert view.live and view.state == "running"
            assert view.stale_since is not None and view.stale_detail
            assert view.source == orchestrator.address
            assert (await client.get(job.id)).stale
    finally:
        await status.kill()
        await orchestrator.kill()


async def test_watch_jobs_shows_new_jobs_and_their_changes_and_drops_those_leaving_the_filter(
    orchestrator: Service, status: Service, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    async with Client(orchestrator.address, status.address) as client:
        earlier = await client.submit({"name": "earlier", "steps": [{"name": "one", "type": "sleep", "seconds": 0}]})
        await eventually(lambda: _ended(client, earlier.id), "the earlier job to end")
        async with client.watch_jobs() as every, client.watch_jobs(states=["running"]) as running, \
                asyncio.timeout(DEADLINE):
            first = await anext(every)
            assert [job.id for job in first.jobs] == [earlier.id] and first.live
            assert (await anext(running)).jobs == ()
            job = await client.submit({"name": "later", "steps": [gate_step("gate", gate)]})

            async def until(views: JobsWatch, holds: Callable[[JobsView], bool]) -> JobsView:
                async for view in views:
                    if holds(view):
                        return view
                raise AssertionError("the watch ended")

            both = await until(every, lambda v: [j.id for j in v.jobs] == [job.id, earlier.id]
                               and v.jobs[0].state == "running")
            assert [j.state for j in both.jobs] == ["running", "completed"], "newest first"
            await until(running, lambda v: [j.id for j in v.jobs] == [job.id])
            gate.touch()
            await until(every, lambda v: v.jobs[0].state == "completed")
            assert (await until(running, lambda v: not v.jobs)).revision >= both.revision


async def _ended(client: Client, job_id: str) -> bool | None:
    return True if (await client.get(job_id)).terminal else None
