"""Many WatchJob clients in one process, driven by a benchmark harness.

`python -m bench.watch_client` reads one JSON line on stdin:

    {"address": "HOST:PORT", "jobs": [job id per watcher], "mode": "latency" | "lag",
     "watchers_per_channel": 1, "sample_interval": 0.05}

opens one WatchJob per entry of `jobs` (without after_revision: the current
state, then the "initial state complete" marker, then every change) with the
generated stubs on one event loop, and prints `{"ready": ...}` once every
watcher has its initial state. Each watcher applies an update only if its
revision is newer than the one it holds, as the API says a client must. Then
it answers commands, one JSON line each way:

- `{"command": "stop"}`: stop watching and report;
- `{"command": "wait", "targets": {job_id: revision}, "timeout": S}`: first
  wait until every watcher holds at least its job's target revision (or the
  timeout passes), then stop and report.

In "latency" mode every watcher records, for each step whose state changed
from what it held, `[step, kind, transition_time, receive_time]`: kind "r"
with StepStats.started_at (it started running) or "t" with
StepStats.finished_at (it ended); if a step is first seen ended without having
been seen running, both are recorded at that receive time. Transition times
come from the orchestrator's clock (time.time() on this same machine);
receive_time is time.time() when the message was read.

In "lag" mode every watcher reports the last revision it holds, how many
updates it received and when it received the last one, and the process
samples every watcher's revision every `sample_interval` seconds:
`samples: [[time, [revision per watcher]], ...]`.

Every report also carries this process's CPU seconds, so the harness can tell
when the clients themselves were the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import grpc
import psutil
from stepstream.common.v1 import states_pb2 as s
from stepstream.status.v1 import status_service_pb2 as pb
from stepstream.status.v1 import status_service_pb2_grpc as pb_grpc

from stepstream_common.timeutil import seconds

TERMINAL = frozenset({s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED, s.STEP_STATE_CANCELLED, s.STEP_STATE_SKIPPED})
NOT_STARTED = frozenset({s.STEP_STATE_UNSPECIFIED, s.STEP_STATE_PENDING})


class Watcher:
    def __init__(self, job_id: str, record_latency: bool) -> None:
        self.job_id = job_id
        self.record_latency = record_latency
        self.revision = 0
        self.held: dict[str, int] = {}
        self.samples: list[tuple[str, str, float, float]] = []
        self.updates = 0
        self.last_update = 0.0
        self.ready = asyncio.Event()
        self.reached = asyncio.Event()
        self.target: int | None = None
        self.error = ""

    def apply(self, update: pb.JobUpdate, received: float) -> None:
        if update.revision <= self.revision:
            return
        self.revision = update.revision
        self.updates += 1
        self.last_update = received
        if self.record_latency:
            for stats in update.steps:
                before = self.held.get(stats.name, s.STEP_STATE_UNSPECIFIED)
                if stats.state == before:
                    continue
                self.held[stats.name] = stats.state
                if not self.ready.is_set():
                    continue  # the initial state: not a transition seen live
                if stats.state == s.STEP_STATE_RUNNING or (stats.state in TERMINAL and before in NOT_STARTED):
                    started = seconds(stats.started_at)
                    if started is not None:
                        self.samples.append((stats.name, "r", started, received))
                if stats.state in TERMINAL:
                    finished = seconds(stats.finished_at)
                    if finished is not None:
                        self.samples.append((stats.name, "t", finished, received))
        if self.target is not None and self.revision >= self.target:
            self.reached.set()

    async def run(self, stub: pb_grpc.StatusServiceAsyncStub) -> None:
        call = stub.WatchJob(pb.WatchJobRequest(job_id=self.job_id))
        try:
            while True:
                message = await call.read()
                received = time.time()
                if message is grpc.aio.EOF:
                    self.error = self.error or "stream ended"
                    return
                assert isinstance(message, pb.WatchJobResponse)
                kind = message.WhichOneof("event")
                if kind == "updates":
                    for update in message.updates.updates:
                        self.apply(update, received)
                elif kind == "initial_state_complete":
                    self.revision = max(self.revision, message.initial_state_complete.revision)
                    self.ready.set()
        except grpc.aio.AioRpcError as error:
            self.error = f"{error.code().name}: {error.details()}"
        finally:
            call.cancel()
            self.ready.set()

    def set_target(self, revision: int) -> None:
        self.target = revision
        if self.revision >= revision:
            self.reached.set()


async def read_line() -> dict[str, Any]:
    line = await asyncio.to_thread(sys.stdin.readline)
    if not line:
        return {"command": "stop"}
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def main() -> None:
    config = await read_line()
    latency = config.get("mode", "latency") == "latency"
    per_channel = max(1, int(config.get("watchers_per_channel", 1)))
    interval = float(config.get("sample_interval", 0.05))
    watchers = [Watcher(job_id, latency) for job_id in config["jobs"]]
    # Each channel its own connection (grpc otherwise shares one between channels to one address),
    # as separate clients would have: the status service caps the streams of one connection.
    channels = [grpc.aio.insecure_channel(config["address"], options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(0, len(watchers), per_channel)]
    me = psutil.Process()
    tasks = [
        asyncio.create_task(w.run(pb_grpc.StatusServiceStub(channels[i // per_channel])))
        for i, w in enumerate(watchers)
    ]
    samples: list[tuple[float, list[int]]] = []

    async def sample() -> None:
        while True:
            samples.append((time.time(), [w.revision for w in watchers]))
            await asyncio.sleep(interval)

    started = time.perf_counter()
    await asyncio.gather(*(w.ready.wait() for w in watchers))
    errors = [w.error for w in watchers if w.error]
    say({"ready": True, "seconds": time.perf_counter() - started, "errors": errors[:5], "failed": len(errors)})
    cpu_before = sum(me.cpu_times()[:2])
    sampler = asyncio.create_task(sample()) if not latency else None
    command = await read_line()
    timed_out = 0
    if command.get("command") == "wait":
        targets: dict[str, int] = command["targets"]
        for w in watchers:
            w.set_target(targets.get(w.job_id, 0))
        end = time.monotonic() + float(command.get("timeout", 60))
        for w in watchers:
            try:
                await asyncio.wait_for(w.reached.wait(), max(0.0, end - time.monotonic()))
            except TimeoutError:
                timed_out += 1
    cpu = sum(me.cpu_times()[:2]) - cpu_before
    if sampler is not None:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    report: dict[str, Any] = {
        "cpu_seconds": cpu,
        "timed_out": timed_out,
        "failed": sum(1 for w in watchers if w.error and w.error != "stream ended"),
        "errors": sorted({w.error for w in watchers if w.error})[:5],
        "watchers": [
            {"job": w.job_id, "revision": w.revision, "updates": w.updates, "last_update": w.last_update,
             **({"samples": w.samples} if latency else {})}
            for w in watchers
        ],
    }
    if not latency:
        report["samples"] = samples
    say(report)


if __name__ == "__main__":
    asyncio.run(main())
