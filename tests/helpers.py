"""Shared test helpers: real services (in-process or as subprocesses) and polling."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
from stepstream.v1 import definition_pb2, records_pb2
from stepstream.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.v1 import orchestrator_service_pb2_grpc as orch_grpc

from stepstream_client.definitions import definition_from_mapping

T = TypeVar("T")

# Generous upper bounds so a broken test fails instead of hanging; never speed checks.
DEADLINE = 60.0
REPO = Path(__file__).resolve().parent.parent


def job_definition(steps: list[Mapping[str, Any]], name: str = "test-job", **fields: Any) -> definition_pb2.JobDefinition:
    return definition_from_mapping({"name": name, "steps": steps, **fields})


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, deadline: float = DEADLINE) -> T:
    """Poll `probe` until it returns something other than None."""
    end = time.monotonic() + deadline
    while True:
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_job_state(
    stub: orch_grpc.OrchestratorServiceStub, job_id: str, states: set[int], deadline: float = DEADLINE
) -> orch_pb.OrchestratorServiceGetJobResponse:
    async def probe() -> orch_pb.OrchestratorServiceGetJobResponse | None:
        response = await stub.GetJob(orch_pb.OrchestratorServiceGetJobRequest(job_id=job_id))
        return response if response.job.state in states else None

    return await eventually(probe, f"job {job_id} to reach {states}", deadline)


async def read_events(
    stub: orch_grpc.OrchestratorServiceStub,
    after_seq: int,
    until: Callable[[list[records_pb2.StepEvent]], bool],
    deadline: float = DEADLINE,
) -> list[records_pb2.StepEvent]:
    """Stream events after `after_seq` until `until(all so far)` holds."""
    events: list[records_pb2.StepEvent] = []
    call = stub.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=after_seq))
    try:
        async with asyncio.timeout(deadline):
            async for message in call:
                events.extend(message.batch.events)
                if until(events):
                    return events
    finally:
        call.cancel()
    raise AssertionError("stream ended early")


def job_events(events: list[records_pb2.StepEvent], job_id: str) -> list[records_pb2.StepEvent]:
    def owner(event: records_pb2.StepEvent) -> str:
        kind = event.WhichOneof("record")
        record = getattr(event, kind)
        return str(record.id if kind == "job" else record.job_id)

    return [event for event in events if owner(event) == job_id]


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
            if " listening on " in line:
                self.address = line.strip().rsplit(" ", 1)[1]
                return self.address
            if not line and self.process.poll() is not None:
                break
        raise AssertionError(f"{self.module} did not start (last line: {line!r}, rc={self.process.poll()})")

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
