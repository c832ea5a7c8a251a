from __future__ import annotations

from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc

from tests.helpers import finished, job_definition, job_events, read_events


async def test_a_job_runs_to_completion(orchestrator_stub: orch_grpc.OrchestratorServiceAsyncStub) -> None:
    definition = job_definition([{"name": "one", "type": "sleep", "seconds": 0.01}])
    submitted = await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))
    events = await read_events(orchestrator_stub, 0, finished(submitted.job.id))
    mine = job_events(events, submitted.job.id)
    assert [e.seq for e in mine] == sorted(e.seq for e in mine)
    assert mine[-1].job.state == s.JOB_STATE_COMPLETED
