"""A service that cannot do its job says so and stops; a follower never applies
what follows a gap, never stays down after a bug; `stepstream up` never runs
half a system.

Real parts throughout: services as subprocesses on loopback ports, their real
SQLite files (made to fail with a trigger added through the sqlite3 module, as
a full disk or a broken file would), a real orchestrator, and, where a
misbehaving orchestrator is the point, a small real gRPC server speaking
OrchestratorService that sends a stream with gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc
from stepstream_client import SyncClient

from orchestrator_svc.app import DATABASE_FILE as ORCHESTRATOR_DB
from orchestrator_svc.app import Orchestrator
from status_svc.app import DATABASE_FILE as STATUS_DB
from status_svc.ingest.follower import OrchestratorFollower
from status_svc.ingest.writer import IngestWriter
from status_svc.storage.base import StoredChange
from status_svc.storage.sqlite import SqliteStatusStore
from stepstream_common.feed import Feed
from stepstream_common.rpc import EXIT_FATAL
from tests.helpers import (
    REPO,
    STEPSTREAM,
    channel,
    eventually,
    gate_step,
    job_definition,
    stored_updates,
    wait_job_state,
    wait_status_job,
)

# Generous bounds, so a broken test fails instead of hanging; never speed checks.
EXIT_BOUND = 30.0
FAILURE = "disk full simulated"
STATUS_SERVICE = "stepstream.status.v1.StatusService"
ORCHESTRATOR_SERVICE = "stepstream.orchestrator.v1.OrchestratorService"


class LoggedService:
    """`python -m MODULE ARGS` as a real subprocess whose stderr is kept in a file."""

    def __init__(self, module: str, args: list[str], stderr: Path) -> None:
        self.module, self.args, self.stderr_path = module, args, stderr
        self.process: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self) -> str:
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args], stdout=subprocess.PIPE, stderr=stderr,
                text=True, cwd=REPO,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert " listening on " in line, (line, self.stderr())
        self.address = line.strip().rsplit(" ", 1)[1]
        return self.address

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(30)
            assert self.process.stdout is not None
            self.process.stdout.close()


def status_service(tmp_path: Path, orchestrator: str, *extra: str) -> LoggedService:
    return LoggedService("status_svc", [
        "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "status"), "--orchestrator", orchestrator,
        "--heartbeat-interval", "0.2", "--stale-after", "1", "--log-level", "warning", *extra,
    ], tmp_path / "status.stderr")


def add_failing_trigger(database: Path, table: str) -> None:
    """From now on every insert into `table` fails, as a write to a full disk would."""
    db = sqlite3.connect(database, timeout=30)
    try:
        db.execute(f"CREATE TRIGGER fail_{table} BEFORE INSERT ON {table} "
                   f"BEGIN SELECT RAISE(ABORT, '{FAILURE}'); END")
        db.commit()
    finally:
        db.close()


def serving_status(address: str, service: str) -> int | None:
    """The health check's answer for `service`; None if the server did not answer."""
    with grpc.insecure_channel(address) as ch:
        try:
            return int(health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2).status)
        except grpc.RpcError:
            return None


def job_state(stub: status_grpc.StatusServiceStub, job_id: str) -> int | None:
    """The job's state in the status service (None while it does not know the job yet)."""
    try:
        return int(stub.GetJob(status_pb.GetJobRequest(job_id=job_id), timeout=5).job.state)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def port_closed(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


def fatal_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if f"exiting with code {EXIT_FATAL}" in line]


@pytest.fixture
def orchestrator_subprocess(tmp_path: Path) -> Iterator[LoggedService]:
    service = LoggedService("orchestrator_svc", [
        "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "orchestrator"), "--heartbeat-interval", "0.2",
        "--kill-grace", "1", "--log-level", "warning",
    ], tmp_path / "orchestrator.stderr")
    service.start()
    yield service
    service.stop()


# --- A. a service whose single writer dies says so, then exits non-zero -------------------------------------


def test_status_whose_ingest_fails_says_not_serving_and_stale_then_exits_non_zero(
    orchestrator_subprocess: LoggedService, tmp_path: Path
) -> None:
    """Its database refuses writes: before exiting, health says NOT_SERVING (overall and for
    StatusService) and GetJob shows the running job stale with the reason; then the process
    exits EXIT_FATAL, its port closed, with one CRITICAL line naming the reason and no traceback."""
    status = status_service(tmp_path, orchestrator_subprocess.address)
    status.start()
    assert status.process is not None
    gate = tmp_path / "gate"
    try:
        with SyncClient(orchestrator_subprocess.address, status.address) as client:
            job = client.submit({"name": "doomed", "steps": [gate_step("gate", gate)]})
        with grpc.insecure_channel(status.address) as ch:
            stub = status_grpc.StatusServiceStub(ch)
            end = time.monotonic() + EXIT_BOUND
            while job_state(stub, job.id) != s.JOB_STATE_RUNNING:
                assert time.monotonic() < end, "the job never showed running"
                time.sleep(0.02)
            add_failing_trigger(tmp_path / "status" / STATUS_DB, "changes")
            gate.touch()  # the step completes: the next commit fails

            health: dict[str, set[int | None]] = {"": set(), STATUS_SERVICE: set()}
            stale: list[status_pb.Freshness] = []
            while status.process.poll() is None and time.monotonic() < end:
                for name, seen in health.items():
                    seen.add(serving_status(status.address, name))
                try:
                    response = stub.GetJob(status_pb.GetJobRequest(job_id=job.id), timeout=2)
                except grpc.RpcError:
                    continue
                if response.job.freshness.stale:
                    stale.append(response.job.freshness)
        code = status.process.wait(EXIT_BOUND)
    finally:
        status.stop()
    assert code == EXIT_FATAL, status.stderr()
    for name, seen in health.items():
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, (name, seen)
    assert stale, "GetJob showed the unfinished job stale before the exit"
    assert FAILURE in stale[-1].detail and "ingest stopped" in stale[-1].detail, stale[-1]
    assert stale[-1].HasField("stale_since")
    assert port_closed(status.address)
    stderr = status.stderr()
    [line] = fatal_lines(stderr)
    assert "CRITICAL" in line and "ingest (the writer) failed" in line and FAILURE in line, line
    assert "Traceback" not in stderr, stderr


def test_orchestrator_whose_event_log_fails_says_not_serving_then_exits_non_zero(
    orchestrator_subprocess: LoggedService, tmp_path: Path
) -> None:
    """The journal cannot append: the submit fails, health turns NOT_SERVING (overall and for
    OrchestratorService), and the process exits EXIT_FATAL with one line saying why."""
    orchestrator = orchestrator_subprocess
    assert orchestrator.process is not None
    add_failing_trigger(tmp_path / "orchestrator" / ORCHESTRATOR_DB, "events")
    with grpc.insecure_channel(orchestrator.address) as ch:
        stub = orch_grpc.OrchestratorServiceStub(ch)
        with pytest.raises(grpc.RpcError):
            stub.SubmitJob(orch_pb.SubmitJobRequest(
                definition=job_definition([{"name": "one", "type": "sleep", "seconds": 0}])), timeout=EXIT_BOUND)
    health: dict[str, set[int | None]] = {"": set(), ORCHESTRATOR_SERVICE: set()}
    end = time.monotonic() + EXIT_BOUND
    while orchestrator.process.poll() is None and time.monotonic() < end:
        for name, seen in health.items():
            seen.add(serving_status(orchestrator.address, name))
    assert orchestrator.process.wait(EXIT_BOUND) == EXIT_FATAL, orchestrator.stderr()
    for name, seen in health.items():
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, (name, seen)
    assert health_pb2.HealthCheckResponse.SERVING not in health[""], "no SERVING after the failure"
    assert port_closed(orchestrator.address)
    [line] = fatal_lines(orchestrator.stderr())
    assert "CRITICAL" in line and "the event log (journal writer) failed" in line and FAILURE in line, line


def test_a_service_that_cannot_bind_its_port_exits_non_zero_at_once(tmp_path: Path) -> None:
    """It used to print a traceback and then hang, its database thread keeping it alive."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "{}:{}".format(*taken.getsockname())
        process = subprocess.run(
            [sys.executable, "-m", "status_svc", "--listen", address, "--data-dir", str(tmp_path / "status"),
             "--orchestrator", "127.0.0.1:1"],
            capture_output=True, text=True, cwd=REPO, timeout=EXIT_BOUND,
        )
    assert process.returncode == EXIT_FATAL, process
    assert " listening on " not in process.stdout
    [line] = fatal_lines(process.stderr)
    assert "stepstream status failed" in line and "bind" in line, line
    assert "Traceback" not in process.stderr


# --- C. the follower never applies what follows a gap ------------------------------------------------------------

LOG_ID = "fake-log"
JOB_ID = "gapped-job"


def fake_log() -> list[records_pb2.StepEvent]:
    """One job with one step, pending to completed: seqs 1..6, as an orchestrator records it."""
    at = Timestamp(seconds=1_700_000_000)

    def job(state: int) -> records_pb2.Job:
        return records_pb2.Job(id=JOB_ID, name="gapped", state=state, created_at=at)  # type: ignore[arg-type]

    def step(state: int, attempt: int) -> records_pb2.Step:
        return records_pb2.Step(job_id=JOB_ID, name="a", index=0, type="sleep", state=state,  # type: ignore[arg-type]
                                attempt=attempt, max_attempts=1)

    records: list[records_pb2.Job | records_pb2.Step] = [
        job(s.JOB_STATE_PENDING), step(s.STEP_STATE_PENDING, 0), job(s.JOB_STATE_RUNNING),
        step(s.STEP_STATE_RUNNING, 1), step(s.STEP_STATE_COMPLETED, 1), job(s.JOB_STATE_COMPLETED),
    ]
    return [
        records_pb2.StepEvent(seq=seq, time=at, job=record) if isinstance(record, records_pb2.Job)
        else records_pb2.StepEvent(seq=seq, time=at, step=record)
        for seq, record in enumerate(records, start=1)
    ]


class GappyOrchestrator:
    """A real OrchestratorService peer (StreamStepEvents only; the rest UNIMPLEMENTED) that
    sends, on its Nth call, the batches (lists of seqs) of plans[N], then heartbeats:
    whatever was asked."""

    def __init__(self, plans: list[list[list[int]]]) -> None:
        self.plans = plans
        self.log = fake_log()
        self.requests: list[tuple[int, str]] = []

    async def stream_step_events(
        self, request: orch_pb.StreamStepEventsRequest, context: Any
    ) -> AsyncIterator[orch_pb.StreamStepEventsResponse]:
        plan = self.plans[min(len(self.requests), len(self.plans) - 1)]
        self.requests.append((request.after_seq, request.log_id))
        for seqs in plan:
            events = [self.log[seq - 1] for seq in seqs]
            yield orch_pb.StreamStepEventsResponse(log_id=LOG_ID, batch=orch_pb.StepEventBatch(events=events))
        while True:
            yield orch_pb.StreamStepEventsResponse(
                log_id=LOG_ID, heartbeat=orch_pb.EventStreamHeartbeat(latest_seq=len(self.log)))
            await asyncio.sleep(0.2)

    def add_to(self, server: grpc.aio.Server) -> None:
        handler = grpc.unary_stream_rpc_method_handler(
            self.stream_step_events, request_deserializer=orch_pb.StreamStepEventsRequest.FromString,
            response_serializer=orch_pb.StreamStepEventsResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            ORCHESTRATOR_SERVICE, {"StreamStepEvents": handler}),))


@contextlib.asynccontextmanager
async def following(
    peer: GappyOrchestrator, tmp_path: Path
) -> AsyncIterator[tuple[LoggedService, status_grpc.StatusServiceAsyncStub]]:
    """`peer` served on a loopback port, and a status service (a subprocess) following it."""
    server = grpc.aio.server()
    peer.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    status = status_service(tmp_path, f"127.0.0.1:{port}")
    try:
        await asyncio.to_thread(status.start)
        async with channel(status.address) as ch:
            yield status, status_grpc.StatusServiceStub(ch)
    finally:
        status.stop()
        await server.stop(None)


async def test_follower_applies_nothing_after_a_gap_and_resumes_from_its_cursor(tmp_path: Path) -> None:
    """A gap inside a batch (1, 2, 4) and one between batches (3 | 5): each time the status
    service logs an error naming the gap, applies only the contiguous events before it, and
    asks again after its cursor (0, then 2, then 3); so the change log holds every transition,
    in seq order, once. Without the check it would apply 4 before 3 and ask after 4."""
    peer = GappyOrchestrator([[[1, 2, 4]], [[3], [5]], [[4, 5, 6]]])
    async with following(peer, tmp_path) as (status, stub):
        done = await wait_status_job(stub, JOB_ID, lambda response: response.job.state == s.JOB_STATE_COMPLETED,
                                     "the job to be completed in the status service")
    assert peer.requests == [(0, ""), (2, LOG_ID), (3, LOG_ID)]
    assert [step.state for step in done.steps] == [s.STEP_STATE_COMPLETED]
    updates = stored_updates(tmp_path / "status" / STATUS_DB, JOB_ID)
    headers = [u.job.state for u in updates if u.HasField("job")]  # a step change updates its job's counts
    job_states = [state for i, state in enumerate(headers) if i == 0 or headers[i - 1] != state]
    step_states = [stats.state for u in updates for stats in u.steps]
    assert job_states == [s.JOB_STATE_PENDING, s.JOB_STATE_RUNNING, s.JOB_STATE_COMPLETED]
    assert step_states == [s.STEP_STATE_PENDING, s.STEP_STATE_RUNNING, s.STEP_STATE_COMPLETED]
    errors = [line for line in status.stderr().splitlines() if " ERROR " in line and "gap" in line]
    assert len(errors) == 2, status.stderr()
    assert "expected seq 3, got 4" in errors[0] and "expected seq 4, got 5" in errors[1], errors
    assert all("reconnecting from seq" in line for line in errors)


async def test_a_stream_that_breaks_on_every_attempt_keeps_its_jobs_stale(tmp_path: Path) -> None:
    """After 1 and 2, every stream starts with a gap: the follower reconnects (with backoff)
    again and again, and as no attempt is handled whole, the job stays stale, saying why,
    instead of flipping back to fresh each time a message arrives."""
    peer = GappyOrchestrator([[[1, 2], [4]], [[4]]])
    async with following(peer, tmp_path) as (_, stub):

        async def stale() -> status_pb.Freshness | None:
            try:
                response = await stub.GetJob(status_pb.GetJobRequest(job_id=JOB_ID))
            except grpc.aio.AioRpcError:
                return None
            return response.job.freshness if response.job.freshness.stale else None

        freshness = await eventually(stale, "the job to turn stale")
        attempts = len(peer.requests)
        end = time.monotonic() + EXIT_BOUND
        while len(peer.requests) < attempts + 2:  # two more attempts (its backoff grows)
            assert time.monotonic() < end, "it stopped reconnecting"
            assert await stale() is not None, "the job turned fresh again"
            await asyncio.sleep(0.02)
    assert "gap in the event stream" in freshness.detail and "expected seq 3, got 4" in freshness.detail
    assert all(after == 2 for after, _ in peer.requests[1:]), "always from its cursor"


# --- B. a follower that hits a bug restarts, logged, and goes on ---------------------------------------------------


class ClockThatBreaksOnce:
    """time.time, except that its `breaks_at`-th reading raises (a bug inside the follower's loop)."""

    def __init__(self, breaks_at: int) -> None:
        self.readings = 0
        self.breaks_at = breaks_at

    def __call__(self) -> float:
        self.readings += 1
        if self.readings == self.breaks_at:
            raise RuntimeError("the clock broke")
        return time.time()


async def test_follower_restarts_after_an_unexpected_error_and_misses_nothing(
    orchestrator: Orchestrator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The follower's first reading of its clock after connecting raises: the error is
    logged with its traceback, the follower backs off, resumes from its cursor, and every
    event of a job run meanwhile reaches the store. (Chosen over stopping the service:
    see the follower's module docstring.)"""
    store = SqliteStatusStore(tmp_path / "status.sqlite3")
    latest, sources = await store.open()
    feed: Feed[StoredChange] = Feed(max_pending=1000, key_of=lambda change: change.job_id)
    writer = IngestWriter(store, feed, latest_revision=latest, sources=sources)
    writer_task = asyncio.create_task(writer.run())
    # Reading 1 is the constructor's; reading 2 is the first message heard. The staleness
    # watchdog reads it only after stale_after / 4, long after this test.
    follower = OrchestratorFollower(orchestrator.address, writer, stale_after=60.0, clock=ClockThatBreaksOnce(2))
    follower_task = asyncio.create_task(follower.run())
    try:
        async with channel(orchestrator.address) as ch:
            stub = orch_grpc.OrchestratorServiceStub(ch)
            submitted = await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(
                [{"name": "one", "type": "sleep", "seconds": 0}, {"name": "two", "type": "sleep", "seconds": 0}])))
            job_id = submitted.job.id
            ended = await wait_job_state(stub, job_id, {s.JOB_STATE_COMPLETED})

        async def caught_up() -> bool | None:
            return True if writer.source(orchestrator.address).cursor >= ended.seq else None

        await eventually(caught_up, "the follower to catch up")
        snapshot = await eventually(lambda: store.get_job(job_id), "the job in the store")
    finally:
        follower_task.cancel()
        await asyncio.gather(follower_task, return_exceptions=True)
        await writer.stop()
        await writer_task
        await store.close()
    assert follower.crashes == 1
    assert snapshot.job.state == s.JOB_STATE_COMPLETED
    assert [(stats.name, stats.state) for stats in snapshot.steps] == [
        ("one", s.STEP_STATE_COMPLETED), ("two", s.STEP_STATE_COMPLETED)]
    [record] = [r for r in caplog.records if "internal error while following" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "the clock broke" in str(record.exc_info[1])


# --- D. `stepstream up` stops the other service when one dies -----------------------------------------------------


@pytest.mark.parametrize(("victim", "survivor"), [("status_svc", "orchestrator_svc"),
                                                  ("orchestrator_svc", "status_svc")])
def test_up_stops_the_other_service_and_exits_non_zero_when_one_dies(
    tmp_path: Path, victim: str, survivor: str
) -> None:
    """kill -9 one child of `stepstream up`: up prints one line naming it and how it ended,
    stops the other and the web gateway (gone afterwards), and exits 1. It does not restart it (see launcher.py)."""
    names = {"status_svc": "status service", "orchestrator_svc": "orchestrator"}
    # Port 0 for all three (nothing here connects to them): a port free_port() found free may be taken by
    # another process before `up` binds it, and then `up` exits before its banner.
    anywhere = "127.0.0.1:0"
    up = subprocess.Popen(
        [str(STEPSTREAM), "--orchestrator", anywhere, "--status", anywhere,
         "up", "--data-dir", str(tmp_path / "data"), "--web-listen", anywhere],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert up.stdout is not None
        banner = [up.stdout.readline() for _ in range(4)]
        assert "Ctrl-C" in banner[3], (banner, "" if banner[3] else up.communicate(timeout=EXIT_BOUND))
        children = {
            module: child for child in psutil.Process(up.pid).children()
            for module in (victim, survivor, "stepstream_web") if module in child.cmdline()
        }
        assert set(children) == {victim, survivor, "stepstream_web"}
        children[victim].send_signal(signal.SIGKILL)
        _, stderr = up.communicate(timeout=EXIT_BOUND * 2)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert up.returncode == 1
    [line] = [line for line in stderr.splitlines() if line.startswith("stepstream: ")]
    assert line == (f"stepstream: the {names[victim]} (pid {children[victim].pid}) was killed by SIGKILL "
                    f"(exit code -9); stopping the {names[survivor]} and the web gateway"), line
    _, alive = psutil.wait_procs([children[survivor], children["stepstream_web"]], timeout=EXIT_BOUND)
    assert not alive, "the other service and the web gateway are gone"
