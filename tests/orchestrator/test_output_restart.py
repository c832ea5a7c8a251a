"""Step output survives the orchestrator: kill -9 of the real process while a
command prints, then a restart on the same data directory: everything written
before the kill reads back, contiguous, and the interrupted attempt reads as
finished (FAILED, as recovery ends its step) with a notice saying where it ends."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc

from orchestrator_svc.app import OUTPUT_DIR
from orchestrator_svc.output import OutputKey, OutputSettings, OutputStore, OutputStream
from orchestrator_svc.output.records import HEADER, INDEX_ENTRY
from orchestrator_svc.output.store import INTERRUPTED_NOTICE
from tests.helpers import ServiceProcess, channel, eventually, job_definition, wait_job_state
from tests.orchestrator.test_output_capture import ENDED, read_all, sh
from tests.orchestrator.test_restart import processes, start

if TYPE_CHECKING:
    from stepstream.orchestrator.v1.orchestrator_service_pb2_grpc import OrchestratorServiceAsyncStub as Stub
else:
    Stub = orch_grpc.OrchestratorServiceStub

__all__ = ["processes"]  # the fixture


async def test_kill_9_mid_output_then_restart_keeps_what_was_written(
    tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    data_dir = tmp_path / "data"
    first = start(processes, data_dir)
    async with channel(first.address) as ch:
        stub = Stub(ch)
        script = "i=0; while true; do echo line $i; i=$((i+1)); done"
        submitted = await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition([sh("talk", script)])))
        job_id = submitted.job.id
        index = data_dir / OUTPUT_DIR / job_id / "talk.-.1.idx"

        async def step_running() -> bool | None:
            view = await stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))
            return True if view.steps[0].step.state == s.STEP_STATE_RUNNING else None

        # Its start is in the event log (so recovery ends it FAILED, not CANCELLED as never started).
        await eventually(step_running, "the step to be running")

        async def written() -> int | None:
            """Lines written at least (the first line of the last record indexed)."""
            entries = index.read_bytes() if index.exists() else b""
            lines = INDEX_ENTRY.unpack_from(entries, len(entries) - INDEX_ENTRY.size)[0] if entries else 0
            return lines if lines >= 5000 else None

        before = await eventually(written, "5,000 lines written")
    first.kill()
    # As if the kill had cut a write short: a record's header with half its data, and its index entry.
    data = index.with_suffix(".out")
    torn_at = data.stat().st_size
    with data.open("ab") as file:
        file.write(HEADER.pack(OutputStream.STDOUT, time.time(), 100, 1) + b"half")
    with index.open("ab") as file:
        file.write(INDEX_ENTRY.pack(10**9, torn_at))

    second = start(processes, data_dir)
    async with channel(second.address) as ch:
        stub = Stub(ch)
        view = await wait_job_state(stub, job_id, ENDED)
        assert view.steps[0].step.state == s.STEP_STATE_FAILED
    assert second.terminate() == 0

    store = OutputStore(OutputSettings(data_dir / OUTPUT_DIR))
    await store.open()
    try:
        (described,) = store.attempts(job_id)
        lines = await read_all(store, OutputKey(job_id, "talk", None, 1))
    finally:
        await store.close()
    *printed, notice = lines
    assert len(printed) >= before
    assert [line.data for line in printed] == [f"line {i}".encode() for i in range(len(printed))]
    assert (notice.stream, notice.data) == (OutputStream.NOTICE, INTERRUPTED_NOTICE)
    assert (described.lines, described.finished, described.final_state) == (len(lines), True, s.STEP_STATE_FAILED)
