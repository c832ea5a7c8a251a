"""The baseline for watch latency: a bare grpc.aio server broadcasting step transitions.

`python -m bench.bare_watch JOBS INTERVAL` serves StatusService.WatchJob with
a generated-style handler and nothing else: no orchestrator, no storage, no
feed. Jobs are named bare-0 .. bare-{JOBS-1}; each has a ticker that, every
INTERVAL seconds (job i offset by i x INTERVAL / JOBS), takes time.time() as
the transition time and sends every stream watching that job one message
with two JobUpdates: step k completed (finished_at = that time) and step k+1
running (started_at = that time), just as a job of sequential sleep steps
produces them. A watch gets an empty initial state and the "initial state
complete" marker first. The same client (bench/watch_client.py) measures it
the same way as the status service, so the difference is what stepstream
adds to a bare grpc.aio broadcast on this machine.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from stepstream.common.v1 import states_pb2 as s
from stepstream.status.v1 import status_service_pb2 as pb


def stamp(moment: float) -> Timestamp:
    result = Timestamp()
    result.FromNanoseconds(round(moment * 1e9))
    return result


class Broadcaster:
    def __init__(self, jobs: int, interval: float) -> None:
        self.jobs = jobs
        self.interval = interval
        self.queues: dict[str, set[asyncio.Queue[bytes]]] = {f"bare-{i}": set() for i in range(jobs)}
        self.revision = 0

    async def tick(self, index: int) -> None:
        job_id = f"bare-{index}"
        start = time.monotonic() + index * self.interval / self.jobs
        step = 0
        while True:
            await asyncio.sleep(max(0.0, start + (step + 1) * self.interval - time.monotonic()))
            now = time.time()
            self.revision += 2
            done = pb.StepStats(name=f"s{step:03d}", index=step, type="sleep", state=s.STEP_STATE_COMPLETED,
                                attempt=1, max_attempts=1, finished_at=stamp(now), revision=self.revision - 1)
            running = pb.StepStats(name=f"s{step + 1:03d}", index=step + 1, type="sleep",
                                   state=s.STEP_STATE_RUNNING, attempt=1, max_attempts=1, started_at=stamp(now),
                                   revision=self.revision)
            message = pb.WatchJobResponse(updates=pb.JobUpdateBatch(updates=[
                pb.JobUpdate(revision=self.revision - 1, job_id=job_id, steps=[done]),
                pb.JobUpdate(revision=self.revision, job_id=job_id, steps=[running]),
            ])).SerializeToString()
            for queue in self.queues[job_id]:
                queue.put_nowait(message)
            step += 1

    async def watch(self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext[Any, Any]
                    ) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        subscribers = self.queues.setdefault(request.job_id, set())
        subscribers.add(queue)
        try:
            yield pb.WatchJobResponse(updates=pb.JobUpdateBatch(updates=[
                pb.JobUpdate(revision=self.revision, job_id=request.job_id)
            ])).SerializeToString()
            yield pb.WatchJobResponse(
                initial_state_complete=pb.InitialStateComplete(revision=self.revision)
            ).SerializeToString()
            while True:
                yield await queue.get()
        finally:
            subscribers.discard(queue)


async def serve(jobs: int, interval: float) -> None:
    broadcaster = Broadcaster(jobs, interval)
    method = grpc.unary_stream_rpc_method_handler(
        broadcaster.watch, request_deserializer=pb.WatchJobRequest.FromString,
        response_serializer=lambda data: data,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("stepstream.status.v1.StatusService", {"WatchJob": method}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tickers = [asyncio.create_task(broadcaster.tick(i)) for i in range(jobs)]
    print(f"bare watch listening on 127.0.0.1:{port}", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        for ticker in tickers:
            ticker.cancel()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), float(sys.argv[2])))
