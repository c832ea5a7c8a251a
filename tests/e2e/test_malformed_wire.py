"""What arrives on the port need not be gRPC: neither service crashes or wedges.

Both services run as real subprocesses. Random bytes over raw TCP, an HTTP/2
preface and then silence, hundreds of half-open connections held while others
are served, HTTP/2 frames no client should send, and hostile page tokens and
cursors: afterwards each service is SERVING, answers a normal call correctly,
and stops gracefully (exit code 0: it never crashed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from tests.client import services
from tests.client.services import QUICK_ORCHESTRATOR, QUICK_STATUS, Service
from tests.helpers import DEADLINE, channel, job_definition, read_watch, wait_job_state, wait_status_job

if TYPE_CHECKING:
    OrchStub = orch_grpc.OrchestratorServiceAsyncStub
    StatusStub = status_grpc.StatusServiceAsyncStub
else:
    OrchStub = orch_grpc.OrchestratorServiceStub
    StatusStub = status_grpc.StatusServiceStub

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Codes a hostile request may get; never UNKNOWN, INTERNAL, or none (a hang).
CLEAN = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
})


@dataclass
class Services:
    orchestrator: Service
    status: Service

    @property
    def addresses(self) -> tuple[str, str]:
        return self.orchestrator.address, self.status.address


@pytest.fixture
async def both(tmp_path: Path) -> AsyncIterator[Services]:
    orchestrator = services.orchestrator(tmp_path / "orchestrator", *QUICK_ORCHESTRATOR)
    status = services.status(tmp_path / "status", await orchestrator.start(), *QUICK_STATUS)
    await status.start()
    running = Services(orchestrator, status)
    try:
        yield running
        # Never crashed: each stops gracefully, exit code 0.
        assert await status.terminate() == 0
        assert await orchestrator.terminate() == 0
    finally:
        await status.kill()
        await orchestrator.kill()


async def still_serving(running: Services) -> None:
    """Both SERVING, and a job submitted now runs and reaches the status service."""
    for address in running.addresses:
        async with channel(address) as ch:
            answer = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    async with channel(running.orchestrator.address) as och, channel(running.status.address) as sch:
        orch = OrchStub(och)
        job = await orch.SubmitJob(orch_pb.SubmitJobRequest(
            definition=job_definition([{"name": "a", "type": "sleep", "seconds": 0}])))
        await wait_job_state(orch, job.job.id, {s.JOB_STATE_COMPLETED})
        await wait_status_job(StatusStub(sch), job.job.id, lambda found: found.job.state == s.JOB_STATE_COMPLETED,
                              "the job to be seen completed")


@contextlib.asynccontextmanager
async def raw(address: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# How long a connection may stay silent before send_and_drain stops reading it. Nothing is asserted on
# what comes back: a crash or a wedge shows in still_serving and in the exit code on the graceful stop.
QUIET = 0.3


async def send_and_drain(address: str, data: bytes) -> bytes:
    """Send `data` on a connection of its own, then read whatever comes back until the server closes
    or goes quiet (a GOAWAY, nothing) for QUIET seconds, 1 s at most: never a hang."""
    async with raw(address) as (reader, writer):
        with contextlib.suppress(OSError):
            writer.write(data)
            await writer.drain()
        received = b""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(1.0):
                while chunk := await asyncio.wait_for(reader.read(65536), QUIET):
                    received += chunk
        return received


def frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    """An HTTP/2 frame (RFC 9113 §4.1); `length` may lie about the payload."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_HEADERS, END_STREAM = 0x4, 0x1
HELLO = PREFACE + frame(SETTINGS, 0, 0, b"")

# Frames no client should send, each after a valid preface and SETTINGS.
HOSTILE_FRAMES: dict[str, bytes] = {
    "headers of random HPACK": frame(HEADERS, END_HEADERS | END_STREAM, 1, random.Random(1).randbytes(200)),
    "headers of an index past the table": frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x0f"),
    "a frame claiming 16 MB": frame(DATA, 0, 1, b"x" * 100, length=0xFFFFFF),
    "data on stream 0": frame(DATA, 0, 0, b"data"),
    "data on a stream never opened": frame(DATA, END_STREAM, 7, b"\x00\x00\x00\x00\x05hello"),
    "a zero window update": frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)),
    "a window past 2^31": frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0x7FFFFFFF)) * 2,
    "settings of a bad size": frame(SETTINGS, 0, 0, b"\x00\x04\x00"),
    "settings out of range": frame(SETTINGS, 0, 0, struct.pack(">HI", 0x5, 1) + struct.pack(">HI", 0x4, 2**31)),
    "a ping flood": frame(PING, 0, 0, b"12345678") * 2000,
    "continuation without headers": frame(CONTINUATION, END_HEADERS, 1, b"\x82"),
    "reset of an idle stream": frame(RST_STREAM, 0, 3, struct.pack(">I", 8)),
    "goaway then more": frame(GOAWAY, 0, 0, struct.pack(">II", 0, 2)) + frame(HEADERS, END_HEADERS, 1, b"\x82"),
    "headers never ended": frame(HEADERS, 0, 1, b"\x83\x86") + frame(CONTINUATION, 0, 1, b"\x84") * 5000,
}


async def test_random_bytes_on_the_port(both: Services) -> None:
    generator = random.Random(20240601)
    for address in both.addresses:
        for size in (1, 23, 24, 1000, 65536, 1 << 20):
            await send_and_drain(address, generator.randbytes(size))
        # The preface with garbage where the SETTINGS frame belongs.
        await send_and_drain(address, PREFACE + generator.randbytes(4096))
    await still_serving(both)


@pytest.mark.parametrize("hostile", list(HOSTILE_FRAMES))
async def test_hostile_http2_frames(both: Services, hostile: str) -> None:
    for address in both.addresses:
        await send_and_drain(address, HELLO + HOSTILE_FRAMES[hostile])
    await still_serving(both)


async def test_half_open_connections_held_while_others_are_served(both: Services) -> None:
    """Hundreds of connections that stop partway (nothing at all, part of the
    preface, the preface alone, the preface and SETTINGS) are held open while
    normal calls and streams are served; then they drop at once."""
    openings = [b"", PREFACE[:10], PREFACE, HELLO, HELLO + frame(HEADERS, 0, 1, b"\x83")]
    async with contextlib.AsyncExitStack() as held:
        for address in both.addresses:
            for number in range(150):
                _, writer = await held.enter_async_context(raw(address))
                writer.write(openings[number % len(openings)])
                await writer.drain()
        await still_serving(both)
        async with channel(both.status.address) as ch:
            watch = StatusStub(ch).WatchJobs(status_pb.WatchJobsRequest())
            assert (await read_watch(watch)).WhichOneof("event") == "updates"
            watch.cancel()
    await still_serving(both)


# --- hostile page tokens and cursors -------------------------------------------------------------------------------

def forged_tokens() -> list[str]:
    """Page tokens no store issued: random text, base64 of random bytes and of our own
    format with a made-up signature, huge, and not even ASCII."""
    generator = random.Random(7)
    body = json.dumps(["0123456789abcdef", [1e300, "\x00"]]).encode()
    return [
        "x", "=", "!!!!", "é" * 100, "A" * 1023, "A" * 100_000,
        base64.urlsafe_b64encode(generator.randbytes(64)).decode(),
        base64.urlsafe_b64encode(body + generator.randbytes(16)).decode(),
        base64.urlsafe_b64encode(b"[]" + bytes(16)).decode(),
    ]


async def answer(call: Any) -> tuple[grpc.StatusCode, str]:
    """How a call answers (a stream: its first message, or how it ends); a hang fails the test."""
    try:
        async with asyncio.timeout(DEADLINE):
            if isinstance(call, grpc.aio.UnaryStreamCall):
                await call.read()
                call.cancel()
            else:
                await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def test_hostile_page_tokens_and_cursors(both: Services) -> None:
    huge = 2**63 - 1
    async with channel(both.orchestrator.address) as och, channel(both.status.address) as sch:
        orch, stat = OrchStub(och), StatusStub(sch)
        job = await orch.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition([
            {"name": "fan", "type": "fanout", "count": 3, "child": {"type": "sleep", "seconds": 0}}])))
        await wait_status_job(stat, job.job.id, lambda found: found.job.state == s.JOB_STATE_COMPLETED, "the job")
        calls: list[tuple[str, Callable[[], Any]]] = []
        for token in forged_tokens():
            calls += [
                ("orchestrator ListJobs", partial(orch.ListJobs, orch_pb.ListJobsRequest(page_token=token))),
                ("status ListJobs", partial(stat.ListJobs, status_pb.ListJobsRequest(page_token=token))),
                ("status ListChildren", partial(stat.ListChildren, status_pb.ListChildrenRequest(
                    job_id=job.job.id, step_name="fan", page_token=token))),
            ]
        # A real token, used with another query: refused, not a wrong page.
        first = await stat.ListChildren(status_pb.ListChildrenRequest(job_id=job.job.id, step_name="fan", page_size=1))
        calls += [
            ("a token of another query", lambda: stat.ListJobs(status_pb.ListJobsRequest(
                page_token=first.next_page_token))),
            ("a huge page size", lambda: orch.ListJobs(orch_pb.ListJobsRequest(page_size=2**31 - 1))),
            ("a negative page size", lambda: stat.ListJobs(status_pb.ListJobsRequest(page_size=-1))),
            ("after_seq past the log", lambda: orch.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=huge))),
            ("after_seq negative", lambda: orch.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=-huge))),
            ("a log_id of nothing", lambda: orch.StreamStepEvents(orch_pb.StreamStepEventsRequest(log_id="é" * 500))),
            ("after_revision past the log", lambda: stat.WatchJob(status_pb.WatchJobRequest(
                job_id=job.job.id, after_revision=huge))),
            ("after_revision negative", lambda: stat.WatchJobs(status_pb.WatchJobsRequest(after_revision=-1))),
            ("WatchJobs after_revision past the log", lambda: stat.WatchJobs(status_pb.WatchJobsRequest(
                after_revision=huge))),
            ("not_older_than a position never reached", lambda: stat.GetJob(status_pb.GetJobRequest(
                job_id=job.job.id, not_older_than=status_pb.LogPosition(log_id="nope", seq=huge)),
                timeout=1.0)),
            ("not_older_than negative", lambda: stat.ListJobs(status_pb.ListJobsRequest(
                not_older_than=status_pb.LogPosition(seq=-5)))),
        ]
        for what, make in calls:
            code, details = await answer(make())
            assert code in CLEAN | {grpc.StatusCode.OK}, (what, code, details)
            assert code != grpc.StatusCode.OK or what == "a huge page size", (what, "was accepted")
    await still_serving(both)
