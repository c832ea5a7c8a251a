"""Read your own writes: a status read that names an orchestrator position
(`not_older_than`) waits until it is applied, so a job just submitted is there;
and WatchJob(until_finished) ends once the job's final state is sent."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc
from stepstream_client import Client, LogPosition

from orchestrator_svc.app import Orchestrator
from status_svc.app import start as start_status
from tests.conftest import status_config
from tests.helpers import channel, job_definition, status_job_finished, wait_status_job

QUICK: list[Mapping[str, Any]] = [{"name": "only", "type": "sleep", "seconds": 0}]


async def test_a_read_not_older_than_a_submit_always_finds_the_job(
    orchestrator_stub: orch_grpc.OrchestratorServiceAsyncStub, status_stub: status_grpc.StatusServiceAsyncStub
) -> None:
    async def submit_then_read(index: int) -> status_pb.GetJobResponse:
        submitted = await orchestrator_stub.SubmitJob(
            orch_pb.SubmitJobRequest(definition=job_definition(QUICK, name=f"ryw-{index}"))
        )
        assert submitted.log_id
        position = status_pb.LogPosition(log_id=submitted.log_id, seq=submitted.seq)
        response: status_pb.GetJobResponse = await status_stub.GetJob(
            status_pb.GetJobRequest(job_id=submitted.job.id, not_older_than=position), timeout=30
        )
        assert response.job.id == submitted.job.id
        return response

    answers = await asyncio.gather(*(submit_then_read(i) for i in range(40)))
    assert len({answer.job.id for answer in answers}) == 40
    # The other reads accept it too: the job is in the list and its watch starts at once.
    last = await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(QUICK, name="last")))
    position = status_pb.LogPosition(log_id=last.log_id, seq=last.seq)
    listed = await status_stub.ListJobs(status_pb.ListJobsRequest(
        filter=status_pb.JobFilter(name="last"), not_older_than=position))
    assert [job.id for job in listed.jobs] == [last.job.id]
    watch = status_stub.WatchJob(status_pb.WatchJobRequest(job_id=last.job.id, not_older_than=position,
                                                           until_finished=True))
    messages = [message async for message in watch]
    assert messages[0].updates.updates[0].job.id == last.job.id
    assert await watch.code() == grpc.StatusCode.OK


async def test_a_position_the_service_cannot_reach_is_a_clear_error(
    orchestrator: Orchestrator, orchestrator_stub: orch_grpc.OrchestratorServiceAsyncStub, tmp_path: Path
) -> None:
    status = await start_status(status_config(tmp_path / "status", orchestrator.address, max_wait_applied=0.3))
    try:
        async with channel(status.address) as ch:
            stub = status_grpc.StatusServiceStub(ch)
            submitted = await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(QUICK)))
            await wait_status_job(stub, submitted.job.id, status_job_finished, "the job to end")

            ahead = status_pb.LogPosition(log_id=submitted.log_id, seq=submitted.seq + 1_000_000)
            with_deadline = stub.GetJob(status_pb.GetJobRequest(job_id=submitted.job.id, not_older_than=ahead),
                                        timeout=0.1)
            error = await _error(with_deadline)
            # The call's deadline ends the wait, and says so (not a retryable UNAVAILABLE racing it).
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # No deadline: the service's own bound ends the wait, UNAVAILABLE with why.
            error = await _error(stub.GetJob(status_pb.GetJobRequest(job_id=submitted.job.id, not_older_than=ahead)))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            info = _detail(error, error_details_pb2.ErrorInfo)
            assert info.reason == "NOT_YET_APPLIED" and "applied" in info.metadata

            other_log = status_pb.LogPosition(log_id="not-a-log-we-follow", seq=1)
            error = await _error(stub.GetJob(status_pb.GetJobRequest(job_id=submitted.job.id,
                                                                     not_older_than=other_log)))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            negative = status_pb.LogPosition(log_id=submitted.log_id, seq=-1)
            error = await _error(stub.ListJobs(status_pb.ListJobsRequest(not_older_than=negative)))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            bad_request = _detail(error, error_details_pb2.BadRequest)
            assert [v.field for v in bad_request.field_violations] == ["not_older_than.seq"]
            # Reached positions answer at once; an empty log_id means the only orchestrator followed.
            reached = status_pb.LogPosition(seq=submitted.seq)
            answer = await stub.GetJob(status_pb.GetJobRequest(job_id=submitted.job.id, not_older_than=reached))
            assert answer.job.state == s.JOB_STATE_COMPLETED
    finally:
        await status.stop()


async def test_watch_until_finished_ends_after_the_final_state(
    orchestrator_stub: orch_grpc.OrchestratorServiceAsyncStub, status_stub: status_grpc.StatusServiceAsyncStub
) -> None:
    steps: list[Mapping[str, Any]] = [
        {"name": "first", "type": "sleep", "seconds": 0.2}, {"name": "second", "type": "sleep", "seconds": 0},
    ]
    submitted = await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(steps)))
    position = status_pb.LogPosition(log_id=submitted.log_id, seq=submitted.seq)
    call = status_stub.WatchJob(status_pb.WatchJobRequest(job_id=submitted.job.id, not_older_than=position,
                                                          until_finished=True), timeout=30)
    states = [update.job.state for message in [m async for m in call] if message.HasField("updates")
              for update in message.updates.updates if update.HasField("job")]
    assert await call.code() == grpc.StatusCode.OK
    assert states[-1] == s.JOB_STATE_COMPLETED
    assert s.JOB_STATE_COMPLETED not in states[:-1]

    # A finished job: the initial state and the marker, then the end.
    call = status_stub.WatchJob(status_pb.WatchJobRequest(job_id=submitted.job.id, until_finished=True), timeout=30)
    kinds = [message.WhichOneof("event") async for message in call]
    assert kinds == ["updates", "initial_state_complete"]
    final = await status_stub.GetJob(status_pb.GetJobRequest(job_id=submitted.job.id))
    # Resumed after its final revision: nothing more will come, so it ends at once.
    call = status_stub.WatchJob(status_pb.WatchJobRequest(job_id=submitted.job.id, until_finished=True,
                                                          after_revision=final.revision), timeout=30)
    assert [message async for message in call] == []
    # Without until_finished the watch stays open (heartbeats) past the end.
    call = status_stub.WatchJob(status_pb.WatchJobRequest(job_id=submitted.job.id), timeout=30)
    kinds = []
    async for message in call:
        kinds.append(message.WhichOneof("event"))
        if len(kinds) == 3:
            break
    call.cancel()
    assert kinds == ["updates", "initial_state_complete", "heartbeat"]


async def test_the_sdk_reads_its_own_submits_without_retrying(orchestrator: Orchestrator, tmp_path: Path) -> None:
    status = await start_status(status_config(tmp_path / "status", orchestrator.address))
    try:
        # ingest_grace=0: a NOT_FOUND would be raised, not retried, so only not_older_than can make this pass.
        async with Client(orchestrator.address, status.address, ingest_grace=0) as client:
            for index in range(20):
                submitted = await client.submit({"name": f"sdk-{index}", "steps": QUICK})
                view = await client.get(submitted.id)
                assert view.id == submitted.id
            async with Client(orchestrator.address, status.address, ingest_grace=0) as other:
                submitted = await client.submit({"name": "elsewhere", "steps": QUICK})
                view = await other.get(submitted.id, not_older_than=LogPosition(submitted.log_id, submitted.seq))
                assert view.id == submitted.id
    finally:
        await status.stop()


async def _error(call: object) -> grpc.aio.AioRpcError:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded")


def _detail(error: grpc.aio.AioRpcError, kind: type[error_details_pb2.ErrorInfo] | type[error_details_pb2.BadRequest],
            ) -> error_details_pb2.ErrorInfo | error_details_pb2.BadRequest:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        found = kind()
        if detail.Unpack(found):
            return found
    raise AssertionError(f"no {kind.__name__} in {status}")
