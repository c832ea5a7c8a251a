"""Fan-outs at scale, against both services as real subprocesses.

- The orchestrator's work in flight is capped across jobs (--max-concurrent-work):
  steps and fan-out children over the cap wait PENDING, are never refused, and
  all complete; one cancelled while waiting for a slot ends CANCELLED without
  having run.
- A large fan-out still records every child PENDING before its step is WAITING
  (the status service counts a fan-out's children from those records), yet
  lets the orchestrator's loop serve other jobs while it creates and runs them,
  even when its children never suspend.

How much memory a fan-out costs and how long the loop may stall are measured
by `python -m bench fanout --children 100000`, not asserted here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from tests.helpers import (
    channel,
    entity_key,
    eventually,
    job_definition,
    job_events,
    read_whole_log,
    service_processes,
    status_job_finished,
    wait_status_job,
)

CAP = 4
PENDING, RUNNING, COMPLETED, CANCELLED = (
    s.STEP_STATE_PENDING, s.STEP_STATE_RUNNING, s.STEP_STATE_COMPLETED, s.STEP_STATE_CANCELLED,
)


@asynccontextmanager
async def services(
    tmp_path: Path, *orchestrator_flags: str
) -> AsyncIterator[tuple[orch_grpc.OrchestratorServiceAsyncStub, status_grpc.StatusServiceAsyncStub]]:
    """Both services as subprocesses (the orchestrator with `orchestrator_flags`), and a stub for each."""
    orchestrator, status = service_processes(tmp_path, *orchestrator_flags)
    try:
        async with channel(orchestrator.address) as orch_channel, channel(status.address) as status_channel:
            yield orch_grpc.OrchestratorServiceStub(orch_channel), status_grpc.StatusServiceStub(status_channel)
    finally:
        status.stop()
        orchestrator.stop()


def probe(gate: Path, name: str) -> dict[str, Any]:
    """A python unit that marks itself running in `gate` until `gate/open` exists (tests.helpers.workers)."""
    return {"type": "python", "function": "tests.helpers.workers:gated_marker",
            "args": {"directory": str(gate), "name": name}}


def fanout(name: str, child: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": "fanout", "depends_on": [], "child": dict(child), **fields}


async def submit(stub: orch_grpc.OrchestratorServiceAsyncStub, steps: list[Mapping[str, Any]], name: str) -> str:
    response = await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(steps, name=name)))
    return str(response.job.id)


async def views(stub: status_grpc.StatusServiceAsyncStub, job_ids: list[str]) -> list[status_pb.GetJobResponse]:
    return [await wait_status_job(stub, job_id, lambda _: True, f"job {job_id} in the status service")
            for job_id in job_ids]


def running_units(view: status_pb.GetJobResponse) -> int:
    """Units holding a work slot in a status view: running children, and running steps that are not fan-outs."""
    return sum(step.children.running + (step.type != "fanout" and step.state == RUNNING) for step in view.steps)


def most_running_at_once(events: list[records_pb2.StepEvent]) -> int:
    """Replaying the log in seq order: the most units (children, and steps that
    are not fan-outs) RUNNING at one time, over every job."""
    running: set[tuple[Any, ...]] = set()
    most = 0
    for event in sorted(events, key=lambda e: e.seq):
        kind = event.WhichOneof("record")
        if kind == "job" or (kind == "step" and event.step.type == "fanout"):
            continue
        record = event.step if kind == "step" else event.child
        key = (record.job_id, *entity_key(event))
        if record.state == RUNNING:
            running.add(key)
        else:
            running.discard(key)
        most = max(most, len(running))
    return most


def histories(events: list[records_pb2.StepEvent]) -> dict[tuple[Any, ...], list[int]]:
    found: dict[tuple[Any, ...], list[int]] = {}
    for event in events:
        kind = event.WhichOneof("record")
        if kind != "job":
            found.setdefault(entity_key(event), []).append((event.step if kind == "step" else event.child).state)
    return found


async def test_work_over_the_cap_waits_pending_across_jobs_and_all_of_it_completes(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    async with services(tmp_path, "--max-concurrent-work", str(CAP)) as (orchestrator, status):
        # 3 + 3 children at a time and a step beside them: 7 units want to run, 4 may.
        first = await submit(orchestrator, [fanout("fan", probe(gate, "a-{index}"), count=6, concurrency=3)], "first")
        second = await submit(orchestrator, [
            {"name": "solo", **probe(gate, "b-solo")},
            fanout("fan", probe(gate, "b-{index}"), count=6, concurrency=3),
        ], "second")

        async def at_the_cap() -> list[status_pb.GetJobResponse] | None:
            seen = await views(status, [first, second])
            return seen if sum(map(running_units, seen)) == CAP else None

        seen = await eventually(at_the_cap, f"{CAP} units running")
        assert all(view.job.state == s.JOB_STATE_RUNNING for view in seen)  # none refused
        waiting = sum(step.children.pending + (step.type != "fanout" and step.state == PENDING)
                      for view in seen for step in view.steps)
        assert waiting == 13 - CAP
        assert [step.children.total for view in seen for step in view.steps if step.type == "fanout"] == [6, 6]

        (gate / "open").touch()
        for job_id in (first, second):
            final = await wait_status_job(status, job_id, status_job_finished, f"job {job_id} to finish")
            assert final.job.state == s.JOB_STATE_COMPLETED, final.job
        events = await read_whole_log(orchestrator)

    assert most_running_at_once(events) == CAP
    seen_running = {path.name: int(path.read_text()) for path in gate.glob("seen-*")}
    assert len(seen_running) == 13
    assert max(seen_running.values()) == CAP
    for job_id in (first, second):
        for key, states in histories(job_events(events, job_id)).items():
            if key != ("step", "fan"):
                assert states == [PENDING, RUNNING, COMPLETED], key


async def test_work_waiting_for_a_slot_is_cancelled_without_having_run(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    async with services(tmp_path, "--max-concurrent-work", str(CAP)) as (orchestrator, status):
        busy = await submit(orchestrator, [fanout("fan", probe(gate, "a-{index}"), count=CAP, concurrency=CAP)], "busy")
        await wait_status_job(status, busy, lambda view: running_units(view) == CAP, "the cap to be taken")
        waiting = await submit(orchestrator, [
            {"name": "solo", **probe(gate, "b-solo")},
            fanout("fan", probe(gate, "b-{index}"), count=3, concurrency=3),
        ], "waiting")
        await wait_status_job(status, waiting, lambda view: view.steps[1].state == s.STEP_STATE_WAITING,
                              "the second fan-out to wait for its children")
        await orchestrator.CancelJob(orch_pb.CancelJobRequest(job_id=waiting))
        cancelled = await wait_status_job(status, waiting, status_job_finished, "the cancelled job to end")
        assert cancelled.job.state == s.JOB_STATE_CANCELLED
        (gate / "open").touch()
        done = await wait_status_job(status, busy, status_job_finished, "the first job to finish")
        assert done.job.state == s.JOB_STATE_COMPLETED
        events = await read_whole_log(orchestrator)

    found = histories(job_events(events, waiting))
    assert found.pop(("step", "fan")) == [PENDING, RUNNING, s.STEP_STATE_WAITING, CANCELLED]
    never_ran: list[tuple[Any, ...]] = [("step", "solo"), *(("child", "fan", index) for index in range(3))]
    assert found == {key: [PENDING, CANCELLED] for key in never_ran}
    assert not list(gate.glob("seen-b-*"))
    assert most_running_at_once(events) == CAP


async def test_a_large_fanout_records_its_children_first_and_lets_other_jobs_run(tmp_path: Path) -> None:
    """20,000 children whose work never suspends: every child is recorded PENDING
    before the step is WAITING, yet a job submitted after it runs to its end
    while the fan-out is still going (before, the fan-out held the loop from
    its first child to its last)."""
    children = 20_000
    async with services(tmp_path) as (orchestrator, status):
        quick = {"type": "python", "function": "tests.helpers.workers:returns_at_once"}
        large = await submit(orchestrator, [fanout("fan", quick, count=children, concurrency=100)], "large")
        small = await submit(orchestrator, [{"name": "one", **quick}], "small")
        finals = [await wait_status_job(status, job_id, status_job_finished, f"job {job_id} to finish", 120)
                  for job_id in (large, small)]
        events = await read_whole_log(orchestrator, deadline=120)

    assert [final.job.state for final in finals] == [s.JOB_STATE_COMPLETED] * 2
    counts = finals[0].steps[0].children
    assert (counts.total, counts.completed, counts.pending, counts.running) == (children, children, 0, 0)
    mine = job_events(events, large)
    waiting = next(e.seq for e in mine if e.HasField("step") and e.step.state == s.STEP_STATE_WAITING)
    before = [e for e in mine if e.HasField("child") and e.seq < waiting]
    assert len(before) == children and all(e.child.state == PENDING for e in before)
    assert sorted(e.child.index for e in before) == list(range(children))
    fan_ended = next(e.seq for e in mine if e.HasField("step") and e.step.state == COMPLETED)
    small_ended = next(e.seq for e in job_events(events, small)
                       if e.HasField("job") and e.job.state == s.JOB_STATE_COMPLETED)
    assert small_ended < fan_ended
