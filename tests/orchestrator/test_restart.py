"""The orchestrator as a real process: kill -9 and SIGTERM mid-job, then a
restart on the same data directory. Nothing stays "running" forever, nothing
recorded is lost, and seqs continue after the old ones in the same log."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc

from tests.helpers import (
    DEADLINE,
    ServiceProcess,
    channel,
    eventually,
    job_definition,
    read_events,
    wait_job_state,
)

if TYPE_CHECKING:
    from stepstream.orchestrator.v1.orchestrator_service_pb2_grpc import OrchestratorServiceAsyncStub as Stub
else:
    Stub = orch_grpc.OrchestratorServiceStub

Event = records_pb2.StepEvent
RESTARTED = s.REASON_ORCHESTRATOR_RESTARTED
NEXT: dict[str, Any] = {"name": "next", "type": "sleep", "seconds": 0}


def orchestrator_process(data_dir: Path, kill_grace: float = 1.0) -> ServiceProcess:
    return ServiceProcess(
        "orchestrator_svc",
        ["--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--kill-grace", str(kill_grace),
         "--heartbeat-interval", "0.2", "--log-level", "warning"],
    )


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    """Orchestrator processes to stop at the end, and, should a test fail before
    a restart stops them, the commands they left behind (found through the
    *.pid files the test commands write)."""
    started: list[ServiceProcess] = []
    yield started
    for process in started:
        process.stop()
    for pid_file in tmp_path.rglob("*.pid"):
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


async def process_gone(pid: int) -> bool | None:
    """True once `pid` is gone or a zombie (nothing reaps orphans in some containers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(FileNotFoundError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return True
    return None


def start(processes: list[ServiceProcess], data_dir: Path, kill_grace: float = 1.0) -> ServiceProcess:
    process = orchestrator_process(data_dir, kill_grace)
    processes.append(process)
    process.start()
    return process


async def submit(stub: Stub, steps: list[Mapping[str, Any]], name: str) -> orch_pb.SubmitJobResponse:
    return await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(steps, name=name)))


async def whole_log(stub: Stub) -> tuple[list[Event], str, int]:
    """Every event (from 0 until a heartbeat says there is nothing newer), the
    log_id and the latest seq the heartbeat reported."""
    events: list[Event] = []
    log_ids: set[str] = set()
    call = stub.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=0))
    try:
        async with asyncio.timeout(DEADLINE):
            async for message in call:
                log_ids.add(message.log_id)
                events.extend(message.batch.events)
                if message.HasField("heartbeat") and message.heartbeat.latest_seq == (events[-1].seq if events else 0):
                    assert len(log_ids) == 1
                    return events, log_ids.pop(), message.heartbeat.latest_seq
    finally:
        call.cancel()
    raise AssertionError("stream ended early")


def sh(name: str, script: str, cwd: Path, **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": "command", "command": ["sh", "-c", script], "cwd": str(cwd), **fields}


def record_of(event: Event) -> Any:
    kind = event.WhichOneof("record")
    assert kind is not None
    return getattr(event, kind)


async def test_kill_9_then_restart_fails_what_was_in_flight(tmp_path: Path, processes: list[ServiceProcess]) -> None:
    data_dir = tmp_path / "data"
    first = start(processes, data_dir)
    async with channel(first.address) as ch:
        stub = Stub(ch)
        done = await submit(stub, [{"name": "quick", "type": "sleep", "seconds": 0}], "finished-before")
        await wait_job_state(stub, done.job.id, {s.JOB_STATE_COMPLETED})
        running = await submit(
            stub,
            [sh("long", "echo $$ > long.pid; exec sleep 600", tmp_path), NEXT],
            "in-flight",
        )
        fan = await submit(
            stub,
            [{"name": "fan", "type": "fanout", "count": 4, "concurrency": 2,
              "child": {"type": "command", "command": ["sh", "-c", "echo $$ > child-{index}.pid; exec sleep 600"],
                        "cwd": str(tmp_path)}}],
            "fan-in-flight",
        )

        async def steady() -> orch_pb.GetJobResponse | None:
            a = await stub.GetJob(orch_pb.GetJobRequest(job_id=running.job.id))
            b = await stub.GetJob(orch_pb.GetJobRequest(job_id=fan.job.id))
            ready = a.steps[0].step.state == s.STEP_STATE_RUNNING and b.steps[0].children.running == 2
            return b if ready else None

        view = await eventually(steady, "the long step and two children to run")
        before, log_id, crash_seq = await whole_log(stub)
        assert crash_seq == view.seq == before[-1].seq
    first.kill()

    second = start(processes, data_dir)
    async with channel(second.address) as ch:
        stub = Stub(ch)
        after, same_log_id, latest = await whole_log(stub)
        # The old log is intact and the same log, and the recovery records follow it.
        assert same_log_id == log_id
        assert after[: len(before)] == before
        # The commands the killed orchestrator left running were stopped on start.
        for pid_file in [tmp_path / "long.pid", *tmp_path.glob("child-*.pid")]:
            pid = int(pid_file.read_text())
            await eventually(functools.partial(process_gone, pid), f"{pid_file.name} stopped")
        new = after[len(before):]
        assert [e.seq for e in new] == list(range(crash_seq + 1, latest + 1))
        assert all(record_of(e).reason == RESTARTED for e in new)

        def summary(job_id: str) -> list[tuple[str, int]]:
            out = []
            for event in new:
                kind = str(event.WhichOneof("record"))
                record = record_of(event)
                owner = record.id if kind == "job" else record.job_id
                if owner == job_id:
                    label = {"job": "job", "step": f"step {getattr(record, 'name', '')}",
                             "child": f"child {getattr(record, 'index', '')}"}[kind]
                    out.append((label, record.state))
            return out

        assert summary(running.job.id) == [
            ("step long", s.STEP_STATE_FAILED), ("step next", s.STEP_STATE_CANCELLED), ("job", s.JOB_STATE_FAILED),
        ]
        fan_summary = summary(fan.job.id)
        assert sorted(fan_summary[:4]) == [
            ("child 0", s.STEP_STATE_FAILED), ("child 1", s.STEP_STATE_FAILED),
            ("child 2", s.STEP_STATE_CANCELLED), ("child 3", s.STEP_STATE_CANCELLED),
        ]
        assert fan_summary[4:] == [("step fan", s.STEP_STATE_FAILED), ("job", s.JOB_STATE_FAILED)]
        assert summary(done.job.id) == []

        job = (await stub.GetJob(orch_pb.GetJobRequest(job_id=running.job.id))).job
        assert (job.state, job.reason) == (s.JOB_STATE_FAILED, RESTARTED)
        assert job.message == "the orchestrator restarted while this was in flight"
        fan_view = await stub.GetJob(orch_pb.GetJobRequest(job_id=fan.job.id))
        counts = fan_view.steps[0].children
        assert (counts.total, counts.running, counts.pending, counts.failed, counts.cancelled) == (4, 0, 0, 2, 2)
        finished = await stub.GetJob(orch_pb.GetJobRequest(job_id=done.job.id))
        assert finished.job.state == s.JOB_STATE_COMPLETED

        # New work continues the same numbering; the python worker imports the
        # test functions in the real process too.
        more = await submit(
            stub,
            [{"name": "py", "type": "python", "function": "tests.helpers.workers:sync_write",
              "args": {"path": str(tmp_path / "written"), "text": "from the subprocess"}}],
            "after-restart",
        )
        assert more.seq == latest + 1
        await wait_job_state(stub, more.job.id, {s.JOB_STATE_COMPLETED})
        assert (tmp_path / "written").read_text() == "from the subprocess"
    second.terminate()

    # A second restart finds nothing left in flight: it records nothing.
    third = start(processes, data_dir)
    async with channel(third.address) as ch:
        stub = Stub(ch)
        final, final_log_id, final_latest = await whole_log(stub)
        assert final_log_id == log_id
        assert final[: len(after)] == after
        assert final_latest == final[-1].seq and final[-1].job.id == more.job.id


async def test_cancel_requested_before_the_crash_ends_cancelled(
    tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    data_dir = tmp_path / "data"
    # A long kill grace and a command that ignores SIGTERM: the cancellation is
    # recorded but cannot finish before the kill.
    first = start(processes, data_dir, kill_grace=60)
    async with channel(first.address) as ch:
        stub = Stub(ch)
        submitted = await submit(
            stub,
            [sh("stubborn", "trap '' TERM; echo $$ > stubborn.pid; exec sleep 600", tmp_path),
             {"name": "next", "type": "sleep", "seconds": 0}],
            "cancel-then-crash",
        )
        await wait_job_state(stub, submitted.job.id, {s.JOB_STATE_RUNNING})

        async def pid_written() -> bool | None:
            return True if (tmp_path / "stubborn.pid").exists() else None

        await eventually(pid_written, "the command to start")
        cancel = await stub.CancelJob(orch_pb.CancelJobRequest(job_id=submitted.job.id))
        assert cancel.job.HasField("cancel_requested_at")
        view = await stub.GetJob(orch_pb.GetJobRequest(job_id=submitted.job.id))
        assert view.job.state == s.JOB_STATE_RUNNING
        crash_seq = view.seq
    first.kill()

    second = start(processes, data_dir)
    async with channel(second.address) as ch:
        stub = Stub(ch)
        events = await read_events(stub, crash_seq, lambda evs: any(e.HasField("job") for e in evs))
        C = s.REASON_CANCELLED_BY_REQUEST
        assert [(e.seq, e.WhichOneof("record"), record_of(e).state, record_of(e).reason) for e in events] == [
            (crash_seq + 1, "step", s.STEP_STATE_CANCELLED, C),
            (crash_seq + 2, "step", s.STEP_STATE_CANCELLED, C),
            (crash_seq + 3, "job", s.JOB_STATE_CANCELLED, C),
        ]
        assert [e.step.name for e in events[:2]] == ["stubborn", "next"]
        assert events[-1].job.cancel_requested_at == cancel.job.cancel_requested_at
        again = await stub.CancelJob(orch_pb.CancelJobRequest(job_id=submitted.job.id))
        assert again.job.state == s.JOB_STATE_CANCELLED


async def test_sigterm_fails_in_flight_jobs_then_exits_0(tmp_path: Path, processes: list[ServiceProcess]) -> None:
    data_dir = tmp_path / "data"
    first = start(processes, data_dir)
    async with channel(first.address) as ch:
        stub = Stub(ch)
        submitted = await submit(
            stub,
            [sh("long", "echo $$ > long.pid; exec sleep 600", tmp_path), NEXT],
            "shut-down-under-it",
        )
        await wait_job_state(stub, submitted.job.id, {s.JOB_STATE_RUNNING})

        async def long_pid() -> int | None:
            path = tmp_path / "long.pid"
            text = path.read_text() if path.exists() else ""
            return int(text) if text.endswith("\n") else None

        pid = await eventually(long_pid, "the command to start")
        before, log_id, seq_before = await whole_log(stub)
    assert first.terminate() == 0

    # The command was stopped, not left behind.
    await eventually(lambda: process_gone(pid), "the command to be stopped")

    second = start(processes, data_dir)
    async with channel(second.address) as ch:
        stub = Stub(ch)
        after, same_log_id, latest = await whole_log(stub)
        assert same_log_id == log_id
        assert after[: len(before)] == before
        shutdown = after[len(before):]
        # Recorded by the shutting-down process; the restart found nothing to end.
        assert [(e.WhichOneof("record"), record_of(e).state) for e in shutdown] == [
            ("step", s.STEP_STATE_FAILED), ("step", s.STEP_STATE_CANCELLED), ("job", s.JOB_STATE_FAILED),
        ]
        assert [e.seq for e in shutdown] == list(range(seq_before + 1, latest + 1))
        message = "the orchestrator shut down while this was in flight"
        assert all(record_of(e).reason == RESTARTED and record_of(e).message == message for e in shutdown)
        view = await stub.GetJob(orch_pb.GetJobRequest(job_id=submitted.job.id))
        assert (view.job.state, view.job.reason, view.job.message) == (s.JOB_STATE_FAILED, RESTARTED, message)


async def test_sigterm_while_idle_exits_0_and_stops_serving(
    tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    first = start(processes, tmp_path / "data")
    assert first.terminate() == 0
    async with channel(first.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await Stub(ch).ListJobs(orch_pb.ListJobsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
