"""kill -9 the status service again and again while a busy fan-out runs, restart
it on the same data directory each time, and prove nothing was lost and nothing
applied twice (invariants 3, 4 and 5).

The status service runs as a real subprocess (`python -m status_svc`); the
orchestrator runs in-process. At the end the status service's SQLite file is
opened read-only and compared, row by row, with the orchestrator's whole event
log folded independently (tests/helpers/audit.py).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.states import TERMINAL_JOB_STATES
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from orchestrator_svc.app import Orchestrator
from status_svc.app import DATABASE_FILE
from tests.helpers import (
    ServiceProcess,
    channel,
    read_whole_log,
    status_job_finished,
    status_process,
    wait_job_state,
    wait_status_job,
)
from tests.helpers.audit import assert_rows_match_the_log, crash_workload, sqlite_rows

if TYPE_CHECKING:
    OrchStub = orch_grpc.OrchestratorServiceAsyncStub


async def start(process: ServiceProcess) -> str:
    # Not on the loop: the orchestrator runs on it and must keep going meanwhile.
    return await asyncio.to_thread(process.start)


async def crash_loop(
    orchestrator: Orchestrator, stub: OrchStub, tmp_path: Path, *, count: int, concurrency: int, kills: int,
    seed: int,
) -> None:
    rnd = random.Random(seed)
    data_dir = tmp_path / "status"
    release = tmp_path / "release"
    process = status_process(data_dir, orchestrator.address)
    try:
        await start(process)
        workload = crash_workload(release, count, concurrency)
        submitted = await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=workload))
        job_id = submitted.job.id
        for _ in range(kills):
            # Sometimes in the middle of catching up right after a restart, sometimes later.
            await asyncio.sleep(rnd.choice([0.0, 0.02, 0.05, 0.1, 0.3]) + rnd.uniform(0, 0.05))
            await asyncio.to_thread(process.kill)
            await start(process)
        view = await stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))
        assert view.job.state == s.JOB_STATE_RUNNING, "the job must still run while the status service is killed"
        release.touch()
        await wait_job_state(stub, job_id, set(TERMINAL_JOB_STATES))
        async with channel(process.address) as ch:
            status_stub = status_grpc.StatusServiceStub(ch)
            final = await wait_status_job(status_stub, job_id, status_job_finished, "the job to end in status")
        # One last crash, right after the end: what was committed is what counts.
        await asyncio.to_thread(process.kill)
    finally:
        process.stop()
    assert final.job.state == s.JOB_STATE_COMPLETED

    events = await read_whole_log(stub)
    view = await stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))
    assert_rows_match_the_log(sqlite_rows(data_dir / DATABASE_FILE), orchestrator.address, job_id, events,
                              view)


# --- the tests ----------------------------------------------------------------------------------------------


async def test_kill_9_during_a_busy_fanout_loses_nothing_and_applies_nothing_twice(
    orchestrator: Orchestrator, orchestrator_stub: OrchStub, tmp_path: Path
) -> None:
    await crash_loop(orchestrator, orchestrator_stub, tmp_path, count=400, concurrency=10, kills=4, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3])
async def test_kill_9_soak_with_2000_children(
    orchestrator: Orchestrator, orchestrator_stub: OrchStub, tmp_path: Path, seed: int
) -> None:
    await crash_loop(orchestrator, orchestrator_stub, tmp_path, count=2000, concurrency=50, kills=8, seed=seed)
