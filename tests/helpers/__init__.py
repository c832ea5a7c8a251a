"""Shared test helpers: real services (in-process or as subprocesses) and polling.

What a client-only test needs as well (polling, ports, gates, the CLI) lives in
tests/client/services.py, which imports nothing of the servers; it is
re-exported here."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from stepstream.common.v1 import records_pb2
from stepstream.orchestrator.v1 import definition_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream_client.definitions import definition_from_mapping

from tests.client.services import (
    DEADLINE,
    REPO,
    STEPSTREAM,
    CliResult,
    eventually,
    free_port,
    gate_step,
    run_cli,
)

__all__ = ["DEADLINE", "REPO", "STEPSTREAM", "CliResult", "eventually", "free_port", "gate_step", "run_cli"]


def job_definition(
    steps: list[Mapping[str, Any]], name: str = "test-job", **fields: Any
) -> definition_pb2.JobDefinition:
    return definition_from_mapping({"name": name, "steps": steps, **fields})


async def wait_job_state(
    stub: orch_grpc.OrchestratorServiceAsyncStub, job_id: str, states: set[int], deadline: float = DEADLINE
) -> orch_pb.GetJobResponse:
    async def probe() -> orch_pb.GetJobResponse | None:
        response = await stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))
        return response if response.job.state in states else None

    return await eventually(probe, f"job {job_id} to reach {states}", deadline)


async def read_events(
    stub: orch_grpc.OrchestratorServiceAsyncStub,
    after_seq: int,
    until: Callable[[list[records_pb2.StepEvent]], bool],
    deadline: float = DEADLINE,
) -> list[records_pb2.StepEvent]:
    """Stream events after `after_seq` until `until(all so far)` holds."""
    return await _stream_events(stub, after_seq, lambda events, _: until(events), deadline)


async def _stream_events(
    stub: orch_grpc.OrchestratorServiceAsyncStub,
    after_seq: int,
    done: Callable[[list[records_pb2.StepEvent], orch_pb.StreamStepEventsResponse], bool],
    deadline: float,
) -> list[records_pb2.StepEvent]:
    """Stream events after `after_seq` until `done(all so far, the latest message)` holds."""
    events: list[records_pb2.StepEvent] = []
    call = stub.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=after_seq))
    try:
        async with asyncio.timeout(deadline):
            async for message in call:
                events.extend(message.batch.events)
                if done(events, message):
                    return events
    finally:
        call.cancel()
    raise AssertionError("stream ended early")


def job_events(events: list[records_pb2.StepEvent], job_id: str) -> list[records_pb2.StepEvent]:
    def owner(event: records_pb2.StepEvent) -> str:
        kind = event.WhichOneof("record")
        if kind == "job":
            return event.job.id
        return event.step.job_id if kind == "step" else event.child.job_id

    return [event for event in events if owner(event) == job_id]


def entity_key(event: records_pb2.StepEvent) -> tuple[Any, ...]:
    """Which entity (within one job) an event is about: ("job",), ("step", name) or ("child", step, index)."""
    kind = event.WhichOneof("record")
    if kind == "job":
        return ("job",)
    if kind == "step":
        return ("step", event.step.name)
    return ("child", event.child.step_name, event.child.index)


def finished(job_id: str) -> Callable[[list[records_pb2.StepEvent]], bool]:
    """`until` predicate: the job's terminal event has arrived."""

    def check(events: list[records_pb2.StepEvent]) -> bool:
        return any(
            e.WhichOneof("record") == "job" and e.job.id == job_id and e.job.state >= 3 for e in events
        )

    return check


class ServiceProcess:
    """A service run as a real subprocess (python -m MODULE ARGS)."""

    def __init__(self, module: str, args: list[str], env: Mapping[str, str] | None = None) -> None:
        self.module = module
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self, deadline: float = 30.0) -> str:
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=self.env,
            cwd=REPO,
        )
        assert self.process.stdout is not None
        end = time.monotonic() + deadline
        line = ""
        while time.monotonic() < end:
            line = self.process.stdout.readline()
            self.saw(line)
            if " listening on " in line:
                self.address = line.strip().rsplit(" ", 1)[1]
                return self.address
            if not line and self.process.poll() is not None:
                break
        raise AssertionError(f"{self.module} did not start (last line: {line!r}, rc={self.process.poll()})")

    def saw(self, line: str) -> None:
        """Each stdout line start() reads, up to "listening on": a subclass keeps what it needs."""

    def kill(self) -> None:
        """kill -9: no cleanup of any kind."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self, deadline: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(deadline)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


def private_file(path: Path, text: str) -> Path:
    """`text` in a new file `path` (its folder made if need be), 0600: how a tokens file must be kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(text)
    return path


# --- Status service tests: ports, subprocess services, the SQLite file, watch folding ------------------------


def status_process(data_dir: Path, orchestrator: str, *extra: str) -> ServiceProcess:
    return ServiceProcess("status_svc", [
        "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--orchestrator", orchestrator,
        "--heartbeat-interval", "0.2", "--stale-after", "1", "--log-level", "warning", *extra,
    ])


def orchestrator_process(data_dir: Path, port: int, *extra: str) -> ServiceProcess:
    return ServiceProcess("orchestrator_svc", [
        "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir), "--heartbeat-interval", "0.2",
        "--kill-grace", "1", "--log-level", "warning", *extra,
    ])


async def flaky_child(index: str, fail_every: str = "0", delay: str = "0") -> str:
    """A fan-out child for the python worker ("tests.helpers:flaky_child"): waits
    `delay` seconds, then fails when `fail_every` divides its index."""
    await asyncio.sleep(float(delay))
    every = int(fail_every)
    if every and int(index) % every == 0:
        raise RuntimeError(f"child {index} fails by design")
    return f"child {index} ok"


def open_sqlite_readonly(path: Path) -> Any:
    """A read-only sqlite3 connection to a service's database file (WAL files included)."""
    import sqlite3

    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


async def read_whole_log(
    stub: orch_grpc.OrchestratorServiceAsyncStub, after_seq: int = 0, deadline: float = DEADLINE
) -> list[records_pb2.StepEvent]:
    """Every event after `after_seq`: streams until a heartbeat says nothing newer exists."""

    def caught_up(events: list[records_pb2.StepEvent], message: orch_pb.StreamStepEventsResponse) -> bool:
        last = events[-1].seq if events else after_seq
        return message.HasField("heartbeat") and message.heartbeat.latest_seq == last

    return await _stream_events(stub, after_seq, caught_up, deadline)


class WatchedJob:
    """What a watcher of one job holds, folded from JobUpdates the documented way:
    apply an update only if its revision is newer than the one held; the header
    is replaced when present, steps are replaced by name."""

    def __init__(self) -> None:
        self.revision = 0
        self.job: Any = None
        self.steps: dict[str, Any] = {}
        self.updates: list[Any] = []

    def apply(self, update: Any) -> bool:
        self.updates.append(update)
        if update.revision <= self.revision:
            return False
        self.revision = update.revision
        if update.HasField("job"):
            self.job = update.job
        for stats in update.steps:
            self.steps[stats.name] = stats
        return True

    def at(self, revision: int) -> WatchedJob:
        """The same watcher's view as it was at `revision`."""
        view = WatchedJob()
        for update in self.updates:
            if update.revision <= revision:
                view.apply(update)
        return view

    def ordered_steps(self) -> list[Any]:
        return sorted(self.steps.values(), key=lambda stats: (stats.index, stats.name))


async def wait_status_job(
    stub: Any, job_id: str, until: Callable[[Any], bool], what: str, deadline: float = DEADLINE
) -> Any:
    """The status service's GetJob for `job_id` once `until(response)` holds (NOT_FOUND counts as not yet)."""
    from stepstream.status.v1 import status_service_pb2 as status_pb

    async def probe() -> Any:
        try:
            response = await stub.GetJob(status_pb.GetJobRequest(job_id=job_id))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return response if until(response) else None

    return await eventually(probe, what, deadline)


def status_job_finished(response: Any) -> bool:
    from stepstream.states import TERMINAL_JOB_STATES

    return response.job.state in TERMINAL_JOB_STATES


# --- both services as subprocesses ---------------------------------------------

def service_processes(tmp_path: Path, *orchestrator_flags: str) -> tuple[ServiceProcess, ServiceProcess]:
    """Both services as started subprocesses on free ports, the orchestrator with
    `orchestrator_flags` (stop() them when done)."""
    orchestrator = orchestrator_process(tmp_path / "orchestrator", 0, *orchestrator_flags)
    orchestrator.start()
    status = status_process(tmp_path / "status", orchestrator.address)
    try:
        status.start()
    except BaseException:
        orchestrator.stop()
        raise
    return orchestrator, status


# --- Status service tests: the change log and watch streams -----------------------------------------------------


def stored_updates(db_path: Path, job_id: str, after: int = 0) -> list[Any]:
    """The `changes` rows of one job after `after`, read from the status service's
    SQLite file, as the JobUpdates a watcher of that job must receive."""
    db = open_sqlite_readonly(db_path)
    try:
        rows = db.execute(
            "SELECT revision, header, steps FROM changes WHERE job_id = ? AND revision > ? ORDER BY revision",
            (job_id, after),
        ).fetchall()
    finally:
        db.close()
    return [update_of(revision, job_id, header, steps) for revision, header, steps in rows]


def update_of(revision: int, job_id: str, header: bytes | None, steps: bytes | None) -> Any:
    """The JobUpdate a watcher of `job_id` must receive for one stored `changes` row."""
    from stepstream.status.v1 import status_service_pb2 as status_pb

    update = status_pb.JobUpdate.FromString(steps or b"")
    update.revision, update.job_id = revision, job_id
    if header is not None:
        update.job.ParseFromString(header)
    return update


def folded_child_events(db_path: Path, job_id: str, after: int = 0) -> list[int]:
    """How many child events each of the job's `changes` rows after `after` folds
    (0 for a job or step transition), in revision order."""
    db = open_sqlite_readonly(db_path)
    try:
        rows = db.execute(
            "SELECT child_events FROM changes WHERE job_id = ? AND revision > ? ORDER BY revision", (job_id, after)
        ).fetchall()
    finally:
        db.close()
    return [row[0] for row in rows]


async def read_watch(call: Any, deadline: float = DEADLINE) -> Any:
    """The next message of a watch (an AssertionError instead of a hang)."""
    try:
        async with asyncio.timeout(deadline):
            message = await call.read()
    except TimeoutError:
        raise AssertionError("no watch message in time") from None
    assert message is not grpc.aio.EOF, "the watch ended"
    return message


async def watch_until(
    call: Any, done: Callable[[Any], bool], deadline: float = DEADLINE
) -> tuple[list[Any], list[Any]]:
    """Read a watch until `done(update)` holds for an update; returns (updates, heartbeats)."""
    updates: list[Any] = []
    heartbeats: list[Any] = []
    end = time.monotonic() + deadline
    while True:
        message = await read_watch(call, max(0.1, end - time.monotonic()))
        kind = message.WhichOneof("event")
        assert kind != "initial_state_complete", "a second InitialStateComplete"
        if kind == "heartbeat":
            heartbeats.append(message.heartbeat)
            continue
        finished_now = False
        for update in message.updates.updates:
            updates.append(update)
            finished_now = done(update) or finished_now
        if finished_now:
            return updates, heartbeats


def ends_job(update: Any) -> bool:
    """`watch_until` predicate: the update carries a terminal job header."""
    from stepstream.states import TERMINAL_JOB_STATES

    return bool(update.HasField("job") and update.job.state in TERMINAL_JOB_STATES)
