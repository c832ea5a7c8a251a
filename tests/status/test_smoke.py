from __future__ import annotations

from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from tests.helpers import eventually, job_definition


async def test_status_follows_a_job_to_the_end(
    orchestrator_stub: orch_grpc.OrchestratorServiceAsyncStub, status_stub: status_grpc.StatusServiceAsyncStub
) -> None:
    definition = job_definition([
        {"name": "fan", "type": "fanout", "count": 5, "child": {"type": "sleep", "seconds": 0}},
    ])
    submitted = await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))

    async def done() -> status_pb.GetJobResponse | None:
        listed = await status_stub.ListJobs(status_pb.ListJobsRequest())
        if not any(job.id == submitted.job.id for job in listed.jobs):
            return None
        response = await status_stub.GetJob(status_pb.GetJobRequest(job_id=submitted.job.id))
        return response if response.job.state == s.JOB_STATE_COMPLETED else None

    response = await eventually(done, "the job to complete in the status service")
    assert response.steps[0].children.total == 5
    assert response.steps[0].children.completed == 5
    assert response.job.steps.completed == 1
