"""The status service against the real orchestrator, path by path.

For every way a step can end, once the job is terminal the status service's
GetJob must say exactly what the orchestrator's GetJob says (job, steps, child
counts), and nothing about it may be stale. Then the read API: ListChildren
pages and filters, ListJobs filters and pages, unknown ids are NOT_FOUND and bad
requests are INVALID_ARGUMENT with field violations.
"""

from __future__ import annotations

import asyncio
import base64
import shlex
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc
from stepstream_client.errors import from_rpc_error

from status_svc.app import StatusService
from tests.helpers import (
    DEADLINE,
    eventually,
    job_definition,
    read_whole_log,
    status_job_finished,
    wait_job_state,
    wait_status_job,
)

if TYPE_CHECKING:
    OrchStub = orch_grpc.OrchestratorServiceAsyncStub
    StatusStub = status_grpc.StatusServiceAsyncStub
Steps = list[Mapping[str, Any]]

TERMINAL_JOB = {s.JOB_STATE_COMPLETED, s.JOB_STATE_FAILED, s.JOB_STATE_CANCELLED}
STEP_COUNT_FIELDS = {
    s.STEP_STATE_PENDING: "pending", s.STEP_STATE_RUNNING: "running", s.STEP_STATE_WAITING: "waiting",
    s.STEP_STATE_COMPLETED: "completed", s.STEP_STATE_FAILED: "failed", s.STEP_STATE_CANCELLED: "cancelled",
    s.STEP_STATE_SKIPPED: "skipped",
}


def sh(script: str, **fields: Any) -> dict[str, Any]:
    return {"type": "command", "command": ["sh", "-c", script], **fields}


def fanout(name: str, child: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": "fanout", "child": dict(child), **fields}


async def submit(orch: OrchStub, steps: Sequence[Mapping[str, Any]], name: str = "test-job", **fields: Any) -> str:
    definition = job_definition(list(steps), name=name, **fields)
    response = await orch.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))
    return response.job.id


async def settle(
    orch: OrchStub, status: StatusStub, job_id: str
) -> tuple[orch_pb.GetJobResponse, status_pb.GetJobResponse]:
    """The orchestrator's and the status service's answers once the job ended in both."""
    view = await wait_job_state(orch, job_id, TERMINAL_JOB)  # type: ignore[arg-type]
    got = await wait_status_job(status, job_id, status_job_finished, f"job {job_id} to end in the status service")
    return view, got


def assert_same_time(ours: Any, theirs: Any, name: str) -> None:
    assert ours.HasField(name) == theirs.HasField(name), name
    assert getattr(ours, name) == getattr(theirs, name), name


def assert_status_equals_orchestrator(
    view: orch_pb.GetJobResponse, got: status_pb.GetJobResponse, source: str
) -> None:
    job, status = view.job, got.job
    assert (status.id, status.name, status.state, status.reason, status.message) == (
        job.id, job.name, job.state, job.reason, job.message
    )
    for name in ("created_at", "started_at", "finished_at", "cancel_requested_at"):
        assert_same_time(status, job, name)
    assert status.freshness == status_pb.Freshness(source=source), "a finished job is never stale"
    assert 0 < status.revision <= got.revision

    assert [stats.name for stats in got.steps] == [v.step.name for v in view.steps]
    for stats, step_view in zip(got.steps, view.steps, strict=True):
        step = step_view.step
        assert (stats.index, stats.type, stats.state, stats.reason, stats.message, stats.attempt,
                stats.max_attempts) == (
            step.index, step.type, step.state, step.reason, step.message, step.attempt, step.max_attempts
        ), step.name
        for name in ("started_at", "finished_at"):
            assert_same_time(stats, step, name)
        if step.HasField("started_at") and step.HasField("finished_at"):
            assert stats.duration.ToNanoseconds() == max(
                0, step.finished_at.ToNanoseconds() - step.started_at.ToNanoseconds()
            )
        else:
            assert not stats.HasField("duration")
        assert stats.children == step_view.children, step.name
        assert 0 < stats.revision <= got.revision

    recount = Counter(v.step.state for v in view.steps)
    expected = status_pb.StepCounts(total=len(view.steps))
    for state, count in recount.items():
        setattr(expected, STEP_COUNT_FIELDS[state], count)
    assert status.steps == expected


def counts(step: status_pb.StepStats | orch_pb.StepProgress) -> tuple[int, ...]:
    c = step.children
    return (c.total, c.pending, c.running, c.completed, c.failed, c.cancelled)


# --- every path ends the same in both services ----------------------------------------------------------------

PathCase = tuple[Callable[[Path], Steps], dict[str, Any], dict[str, tuple[int, int]], int]


def retry_script(work: Path) -> Steps:
    script = (
        "if [ -f marker ]; then echo done; exit 0; fi; echo try >> tries; "
        "if [ $(wc -l < tries) -ge 2 ]; then touch marker; fi; echo not yet; exit 1"
    )
    return [sh(script, name="flaky", cwd=str(work), retries=3, retry_backoff="10ms")]


PATHS: dict[str, PathCase] = {
    "success": (
        lambda _: [{"name": "one", "type": "sleep", "seconds": 0.01}, sh("echo hi there", name="two")],
        {},
        {"one": (s.STEP_STATE_COMPLETED, 0), "two": (s.STEP_STATE_COMPLETED, 0)},
        s.JOB_STATE_COMPLETED,
    ),
    "command-failure": (
        lambda _: [sh("echo it broke; exit 3", name="bad"), sh("true", name="after")],
        {},
        {"bad": (s.STEP_STATE_FAILED, s.REASON_WORK_FAILED),
         "after": (s.STEP_STATE_SKIPPED, s.REASON_DEPENDENCY_FAILED)},
        s.JOB_STATE_FAILED,
    ),
    "retry-then-success": (retry_script, {}, {"flaky": (s.STEP_STATE_COMPLETED, 0)}, s.JOB_STATE_COMPLETED),
    "step-timeout": (
        lambda _: [sh("exec sleep 30", name="slow", timeout="300ms"), sh("true", name="next")],
        {},
        {"slow": (s.STEP_STATE_FAILED, s.REASON_TIMEOUT), "next": (s.STEP_STATE_SKIPPED, s.REASON_DEPENDENCY_FAILED)},
        s.JOB_STATE_FAILED,
    ),
    "children-under-tolerance": (
        lambda _: [fanout("fan", {"type": "command", "command": ["sh", "-c", "test {item} != c"]},
                          items=["a", "b", "c", "d"], max_child_failures=1)],
        {},
        {"fan": (s.STEP_STATE_COMPLETED, 0)},
        s.JOB_STATE_COMPLETED,
    ),
    "children-over-tolerance": (
        lambda _: [fanout("fan", {"type": "command", "command": ["sh", "-c", "exit 1"]}, count=6, concurrency=1,
                          max_child_failures=1), sh("true", name="after")],
        {},
        {"fan": (s.STEP_STATE_FAILED, s.REASON_CHILD_FAILURES),
         "after": (s.STEP_STATE_SKIPPED, s.REASON_DEPENDENCY_FAILED)},
        s.JOB_STATE_FAILED,
    ),
    "all-children-failed-huge-tolerance": (
        lambda _: [fanout("fan", {"type": "python", "function": "tests.helpers:flaky_child",
                                  "args": {"index": "{index}", "fail_every": "1"}},
                          count=5, max_child_failures=1000)],
        {},
        {"fan": (s.STEP_STATE_FAILED, s.REASON_CHILD_FAILURES)},
        s.JOB_STATE_FAILED,
    ),
    "zero-children": (
        lambda _: [fanout("fan", {"type": "sleep", "seconds": 0}, count=0), sh("true", name="after")],
        {},
        {"fan": (s.STEP_STATE_COMPLETED, s.REASON_NO_CHILDREN), "after": (s.STEP_STATE_COMPLETED, 0)},
        s.JOB_STATE_COMPLETED,
    ),
    "skip-and-always-run": (
        lambda _: [sh("exit 1", name="bad"), sh("true", name="skipped"), sh("true", name="cleanup", always_run=True)],
        {},
        {"bad": (s.STEP_STATE_FAILED, s.REASON_WORK_FAILED),
         "skipped": (s.STEP_STATE_SKIPPED, s.REASON_DEPENDENCY_FAILED),
         "cleanup": (s.STEP_STATE_COMPLETED, 0)},
        s.JOB_STATE_FAILED,
    ),
    "job-timeout": (
        lambda _: [{"name": "quick", "type": "sleep", "seconds": 0}, {"name": "long", "type": "sleep", "seconds": 30},
                   sh("true", name="later"), sh("true", name="last", always_run=True)],
        {"timeout": "700ms"},
        {"quick": (s.STEP_STATE_COMPLETED, 0), "long": (s.STEP_STATE_FAILED, s.REASON_JOB_TIMEOUT),
         "later": (s.STEP_STATE_CANCELLED, s.REASON_JOB_TIMEOUT),
         "last": (s.STEP_STATE_CANCELLED, s.REASON_JOB_TIMEOUT)},
        s.JOB_STATE_FAILED,
    ),
    "job-timeout-during-fanout": (
        lambda _: [fanout("fan", {"type": "sleep", "seconds": 30}, count=4, concurrency=2)],
        {"timeout": "700ms"},
        {"fan": (s.STEP_STATE_FAILED, s.REASON_JOB_TIMEOUT)},
        s.JOB_STATE_FAILED,
    ),
}


@pytest.mark.parametrize("path", list(PATHS))
async def test_terminal_job_in_status_equals_the_orchestrator(
    path: str, orchestrator_stub: OrchStub, status_stub: StatusStub, status: StatusService, tmp_path: Path
) -> None:
    make_steps, fields, expected_steps, expected_job = PATHS[path]
    job_id = await submit(orchestrator_stub, make_steps(tmp_path), **fields)
    view, got = await settle(orchestrator_stub, status_stub, job_id)
    assert_status_equals_orchestrator(view, got, status.followers[0].address)
    # And it is the outcome this path must have (so the comparison is not of two wrong answers).
    assert got.job.state == expected_job
    assert {stats.name: (stats.state, stats.reason) for stats in got.steps} == expected_steps


async def test_retry_attempts_and_child_outcomes_are_exact(
    orchestrator_stub: OrchStub, status_stub: StatusStub, status: StatusService, tmp_path: Path
) -> None:
    job_id = await submit(orchestrator_stub, [
        *retry_script(tmp_path),
        fanout("fan", {"type": "python", "function": "tests.helpers:flaky_child",
                       "args": {"index": "{index}", "fail_every": "3"}}, count=7, max_child_failures=5),
    ])
    view, got = await settle(orchestrator_stub, status_stub, job_id)
    assert_status_equals_orchestrator(view, got, status.followers[0].address)
    flaky, fan = got.steps
    assert (flaky.attempt, flaky.max_attempts, flaky.message) == (3, 4, "exit 0: done")
    # Children 0, 3, 6 fail; the rest complete; the step tolerates it.
    assert counts(fan) == (7, 0, 0, 4, 3, 0)
    assert fan.state == s.STEP_STATE_COMPLETED
    assert fan.message == "4 of 7 children completed, 3 failed (tolerated)"


async def test_cancel_mid_command(
    orchestrator_stub: OrchStub, status_stub: StatusStub, status: StatusService, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    job_id = await submit(orchestrator_stub, [
        sh(f"touch {shlex.quote(str(started))}; exec sleep 30", name="work"),
        sh("true", name="after"),
        sh("true", name="cleanup", always_run=True),
    ])
    await eventually(lambda: _exists(started), "the command to start")
    await orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=job_id))
    view, got = await settle(orchestrator_stub, status_stub, job_id)
    assert_status_equals_orchestrator(view, got, status.followers[0].address)
    assert (got.job.state, got.job.reason) == (s.JOB_STATE_CANCELLED, s.REASON_CANCELLED_BY_REQUEST)
    assert got.job.HasField("cancel_requested_at")
    assert [(st.name, st.state, st.attempt) for st in got.steps] == [
        ("work", s.STEP_STATE_CANCELLED, 1), ("after", s.STEP_STATE_CANCELLED, 0),
        ("cleanup", s.STEP_STATE_CANCELLED, 0),
    ]
    assert got.job.steps == status_pb.StepCounts(total=3, cancelled=3)


async def test_cancel_mid_fanout(
    orchestrator_stub: OrchStub, status_stub: StatusStub, status: StatusService, tmp_path: Path
) -> None:
    child = {"type": "command", "command": ["sh", "-c", "touch started-{index}; exec sleep 30"], "cwd": str(tmp_path)}
    job_id = await submit(orchestrator_stub, [fanout("fan", child, count=6, concurrency=2), sh("true", name="after")])

    def two_running(response: status_pb.GetJobResponse) -> bool:
        return counts(response.steps[0]) == (6, 4, 2, 0, 0, 0)

    running = await wait_status_job(status_stub, job_id, two_running, "two children running in the status service")
    assert running.steps[0].state == s.STEP_STATE_WAITING
    assert running.job.state == s.JOB_STATE_RUNNING
    await orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=job_id))
    view, got = await settle(orchestrator_stub, status_stub, job_id)
    assert_status_equals_orchestrator(view, got, status.followers[0].address)
    assert counts(got.steps[0]) == (6, 0, 0, 0, 0, 6)
    assert [(st.state, st.reason) for st in got.steps] == [(s.STEP_STATE_CANCELLED, s.REASON_CANCELLED_BY_REQUEST)] * 2
    children = await status_stub.ListChildren(status_pb.ListChildrenRequest(job_id=job_id, step_name="fan"))
    assert [(c.index, c.state, c.attempt) for c in children.children] == [
        (0, s.STEP_STATE_CANCELLED, 1), (1, s.STEP_STATE_CANCELLED, 1),
        *[(i, s.STEP_STATE_CANCELLED, 0) for i in range(2, 6)],
    ]


async def _exists(path: Path) -> bool | None:
    return True if path.exists() else None


# --- ListChildren ---------------------------------------------------------------------------------------------


Item = TypeVar("Item")


async def every_page(fetch: Callable[[str], Awaitable[tuple[Sequence[Item], str]]]) -> tuple[list[Item], list[int]]:
    """Follow page tokens to the end: every item, and the size of each page."""
    items: list[Item] = []
    sizes: list[int] = []
    token = ""
    while True:
        page, token = await fetch(token)
        items.extend(page)
        sizes.append(len(page))
        if not token:
            return items, sizes
        assert len(sizes) < 100, "paging does not end"


async def list_all_children(status: StatusStub, job_id: str, step: str, page_size: int,
                            states: list[int] | None = None) -> tuple[list[status_pb.ChildStatus], list[int]]:
    async def fetch(token: str) -> tuple[Sequence[status_pb.ChildStatus], str]:
        page = await status.ListChildren(status_pb.ListChildrenRequest(
            job_id=job_id, step_name=step, states=states or [], page_size=page_size, page_token=token,  # type: ignore[arg-type]
        ))
        return page.children, page.next_page_token

    return await every_page(fetch)


async def test_list_children_pages_and_filters(
    orchestrator_stub: OrchStub, status_stub: StatusStub, status: StatusService
) -> None:
    job_id = await submit(orchestrator_stub, [
        {"name": "prep", "type": "sleep", "seconds": 0},
        fanout("fan", {"type": "python", "function": "tests.helpers:flaky_child",
                       "args": {"index": "{index}", "fail_every": "4"}},
               items=[f"item-{i}" for i in range(25)], concurrency=5, max_child_failures=100),
    ])
    view, got = await settle(orchestrator_stub, status_stub, job_id)
    assert_status_equals_orchestrator(view, got, status.followers[0].address)
    failing = list(range(0, 25, 4))
    assert counts(got.steps[1]) == (25, 0, 0, 25 - len(failing), len(failing), 0)

    # Every child equals the orchestrator's last record of it.
    last: dict[int, records_pb2.Child] = {}
    for event in await read_whole_log(orchestrator_stub):
        if event.HasField("child") and event.child.job_id == job_id:
            last[event.child.index] = event.child
    children, sizes = await list_all_children(status_stub, job_id, "fan", page_size=10)
    assert sizes == [10, 10, 5]
    assert [c.index for c in children] == list(range(25))
    for child in children:
        record = last[child.index]
        assert (child.item, child.state, child.reason, child.message, child.attempt) == (
            record.item, record.state, record.reason, record.message, record.attempt
        )
        assert child.started_at == record.started_at and child.finished_at == record.finished_at
        assert child.duration.ToNanoseconds() == record.finished_at.ToNanoseconds() - record.started_at.ToNanoseconds()
        assert 0 < child.revision <= got.revision
    assert [c.item for c in children] == [f"item-{i}" for i in range(25)]

    failed, sizes = await list_all_children(status_stub, job_id, "fan", 3, [s.STEP_STATE_FAILED])
    assert [c.index for c in failed] == failing
    assert sizes == [3, 3, 1]
    assert all(c.reason == s.REASON_WORK_FAILED and "fails by design" in c.message for c in failed)
    completed, _ = await list_all_children(status_stub, job_id, "fan", 100, [s.STEP_STATE_COMPLETED])
    assert [c.index for c in completed] == [i for i in range(25) if i not in failing]
    both, sizes = await list_all_children(status_stub, job_id, "fan", 7, [s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED])
    assert [c.index for c in both] == list(range(25)) and sizes == [7, 7, 7, 4]
    none, _ = await list_all_children(status_stub, job_id, "fan", 10, [s.STEP_STATE_PENDING, s.STEP_STATE_RUNNING])
    assert none == []
    # A step that is not a fan-out has no children (it exists: not NOT_FOUND).
    prep, _ = await list_all_children(status_stub, job_id, "prep", 10)
    assert prep == []
    # The default page size covers all 25 on one page.
    page = await status_stub.ListChildren(status_pb.ListChildrenRequest(job_id=job_id, step_name="fan"))
    assert len(page.children) == 25 and page.next_page_token == "" and page.revision == got.revision


# --- ListJobs -------------------------------------------------------------------------------------------------


async def list_all_jobs(status: StatusStub, page_size: int, states: list[int] | None = None,
                        name: str = "") -> tuple[list[str], list[int]]:
    async def fetch(token: str) -> tuple[Sequence[str], str]:
        page = await status.ListJobs(status_pb.ListJobsRequest(
            filter=status_pb.JobFilter(states=states or [], name=name),  # type: ignore[arg-type]
            page_size=page_size, page_token=token,
        ))
        return [job.id for job in page.jobs], page.next_page_token

    return await every_page(fetch)


async def test_list_jobs_filters_by_state_and_name_and_pages(
    orchestrator_stub: OrchStub, status_stub: StatusStub, tmp_path: Path
) -> None:
    gate = tmp_path / "release"
    alpha = [await submit(orchestrator_stub, [{"name": "one", "type": "sleep", "seconds": 0}], name="alpha")
             for _ in range(3)]
    beta = [await submit(orchestrator_stub, [sh("exit 1", name="bad")], name="beta") for _ in range(2)]
    blocked = await submit(orchestrator_stub, [sh(f"while [ ! -f {shlex.quote(str(gate))} ]; do sleep 0.05; done",
                                                  name="wait")], name="alpha")
    for job_id in alpha + beta:
        await wait_status_job(status_stub, job_id, status_job_finished, f"{job_id} to end")
    await wait_status_job(status_stub, blocked, lambda r: r.steps[0].state == s.STEP_STATE_RUNNING, "blocked to run")
    try:
        # Newest first, exactly like the orchestrator orders them (created_at, then id, descending).
        created: dict[str, tuple[int, str]] = {}
        for job_id in [*alpha, *beta, blocked]:
            view = await orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))
            created[job_id] = (view.job.created_at.ToNanoseconds(), job_id)
        newest_first = sorted(created, key=lambda j: created[j], reverse=True)
        everything = await status_stub.ListJobs(status_pb.ListJobsRequest())
        assert [job.id for job in everything.jobs] == newest_first
        assert everything.next_page_token == ""
        assert everything.revision == (await status_stub.GetJob(status_pb.GetJobRequest(job_id=blocked))).revision
        states = {job.id: job.state for job in everything.jobs}
        assert states == {**dict.fromkeys(alpha, s.JOB_STATE_COMPLETED), **dict.fromkeys(beta, s.JOB_STATE_FAILED),
                          blocked: s.JOB_STATE_RUNNING}

        def expect(keep: Callable[[str], bool]) -> list[str]:
            return [job_id for job_id in newest_first if keep(job_id)]

        assert await list_all_jobs(status_stub, 2) == (newest_first, [2, 2, 2])
        assert await list_all_jobs(status_stub, 4) == (newest_first, [4, 2])
        assert (await list_all_jobs(status_stub, 100, [s.JOB_STATE_COMPLETED]))[0] == expect(lambda j: j in alpha)
        assert (await list_all_jobs(status_stub, 100, name="beta"))[0] == expect(lambda j: j in beta)
        assert await list_all_jobs(status_stub, 2, name="alpha") == (expect(lambda j: j in [*alpha, blocked]), [2, 2])
        assert (await list_all_jobs(status_stub, 100, [s.JOB_STATE_RUNNING], "alpha"))[0] == [blocked]
        assert (await list_all_jobs(status_stub, 1, [s.JOB_STATE_FAILED, s.JOB_STATE_RUNNING]))[0] == expect(
            lambda j: j in [*beta, blocked]
        )
        assert (await list_all_jobs(status_stub, 100, [s.JOB_STATE_RUNNING], "beta"))[0] == []
        assert (await list_all_jobs(status_stub, 100, name="gamma"))[0] == []
    finally:
        gate.touch()
    done = await wait_status_job(status_stub, blocked, status_job_finished, "blocked to end")
    assert done.job.state == s.JOB_STATE_COMPLETED
    assert (await list_all_jobs(status_stub, 100, [s.JOB_STATE_RUNNING]))[0] == []


# --- errors ---------------------------------------------------------------------------------------------------


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def drain(call: Any) -> None:
    async with asyncio.timeout(DEADLINE):
        async for _ in call:
            pass


async def stream_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await drain(call)
    return caught.value


async def invalid_fields(error_call: Any, streaming: bool = False) -> list[str]:
    """The field violations of an INVALID_ARGUMENT answer (decoded from google.rpc.BadRequest)."""
    error = await (stream_error(error_call) if streaming else rpc_error(error_call))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    typed = from_rpc_error(error)
    assert typed.violations, "INVALID_ARGUMENT without BadRequest details"
    assert all(v.description for v in typed.violations)
    return [v.field for v in typed.violations]


async def test_unknown_ids_are_not_found(
    orchestrator_stub: OrchStub, status_stub: StatusStub
) -> None:
    job_id = await submit(orchestrator_stub, [{"name": "one", "type": "sleep", "seconds": 0}])
    await wait_status_job(status_stub, job_id, status_job_finished, "the job to end")
    for call in (
        status_stub.GetJob(status_pb.GetJobRequest(job_id="no-such-job")),
        status_stub.ListChildren(status_pb.ListChildrenRequest(job_id="no-such-job", step_name="one")),
        status_stub.ListChildren(status_pb.ListChildrenRequest(job_id=job_id, step_name="no-such-step")),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
        assert "no-such" in (error.details() or "")
    for request in (status_pb.WatchJobRequest(job_id="no-such-job"),
                    status_pb.WatchJobRequest(job_id="no-such-job", after_revision=0)):
        error = await stream_error(status_stub.WatchJob(request))
        assert error.code() == grpc.StatusCode.NOT_FOUND, error


async def test_bad_requests_are_invalid_argument_with_field_violations(
    orchestrator_stub: OrchStub, status_stub: StatusStub
) -> None:
    job_id = await submit(orchestrator_stub, [fanout("fan", {"type": "sleep", "seconds": 0}, count=3)])
    await wait_status_job(status_stub, job_id, status_job_finished, "the job to end")
    # Real tokens, each used where it was not issued: another list, another filter;
    # and edited copies (truncated, one character changed, a forged key) of a real one.
    second = await submit(orchestrator_stub, [{"name": "second", "type": "sleep", "seconds": 0}])
    await wait_status_job(status_stub, second, status_job_finished, "the second job to end")
    jobs_token = (await status_stub.ListJobs(status_pb.ListJobsRequest(page_size=1))).next_page_token
    children_token = (await status_stub.ListChildren(status_pb.ListChildrenRequest(
        job_id=job_id, step_name="fan", page_size=1))).next_page_token
    assert jobs_token and children_token
    raw = base64.urlsafe_b64decode(children_token)
    forged = base64.urlsafe_b64encode(raw.replace(b"[0]", b"[1]")).decode()
    flipped = children_token[:5] + ("A" if children_token[5] != "A" else "B") + children_token[6:]
    for token in (children_token[:-4], flipped, forged, "x" * 5000):
        assert await invalid_fields(status_stub.ListChildren(status_pb.ListChildrenRequest(
            job_id=job_id, step_name="fan", page_token=token))) == ["page_token"], token
    assert await invalid_fields(status_stub.ListChildren(status_pb.ListChildrenRequest(
        job_id=job_id, step_name="fan", page_token=children_token,
        states=[s.STEP_STATE_COMPLETED]))) == ["page_token"]
    assert await invalid_fields(status_stub.ListJobs(status_pb.ListJobsRequest(
        page_token=jobs_token, filter=status_pb.JobFilter(name="other")))) == ["page_token"]

    assert await invalid_fields(status_stub.GetJob(status_pb.GetJobRequest())) == ["job_id"]
    assert await invalid_fields(status_stub.ListChildren(status_pb.ListChildrenRequest())) == ["job_id", "step_name"]
    assert await invalid_fields(status_stub.ListChildren(status_pb.ListChildrenRequest(
        job_id=job_id, step_name="fan", states=[s.STEP_STATE_WAITING, s.STEP_STATE_COMPLETED, 42]))) == [  # type: ignore[list-item]
        "states[0]", "states[2]"]
    assert await invalid_fields(status_stub.ListChildren(status_pb.ListChildrenRequest(
        job_id=job_id, step_name="fan", page_size=-1))) == ["page_size"]
    for token in ("garbage", "%%%", jobs_token):
        assert await invalid_fields(status_stub.ListChildren(status_pb.ListChildrenRequest(
            job_id=job_id, step_name="fan", page_token=token))) == ["page_token"], token
    assert await invalid_fields(status_stub.ListJobs(status_pb.ListJobsRequest(
        filter=status_pb.JobFilter(states=[s.JOB_STATE_UNSPECIFIED, s.JOB_STATE_RUNNING, 9])))) == [  # type: ignore[list-item]
        "filter.states[0]", "filter.states[2]"]
    assert await invalid_fields(status_stub.ListJobs(status_pb.ListJobsRequest(page_size=-5))) == ["page_size"]
    for token in ("garbage", children_token):
        assert await invalid_fields(status_stub.ListJobs(status_pb.ListJobsRequest(page_token=token))) == [
            "page_token"], token
    assert await invalid_fields(status_stub.WatchJob(status_pb.WatchJobRequest()), streaming=True) == ["job_id"]
    assert await invalid_fields(status_stub.WatchJob(status_pb.WatchJobRequest(
        job_id=job_id, after_revision=-1)), streaming=True) == ["after_revision"]
    assert await invalid_fields(status_stub.WatchJobs(status_pb.WatchJobsRequest(
        filter=status_pb.JobFilter(states=[7]), after_revision=-2)), streaming=True) == [  # type: ignore[list-item]
        "filter.states[0]", "after_revision"]
    # The valid forms of the same requests work.
    page = await status_stub.ListChildren(status_pb.ListChildrenRequest(
        job_id=job_id, step_name="fan", page_size=2, page_token=children_token))
    assert raw.startswith(b"[") and forged != children_token
    assert [c.index for c in page.children] == [1, 2] and page.next_page_token == ""


# --- concurrent readers ----------------------------------------------------------------------------------------


async def test_concurrent_reads_all_succeed_and_agree(
    orchestrator_stub: OrchStub, status_stub: StatusStub
) -> None:
    """Many clients at once (snapshots, lists, pages, watches replaying the change
    log) must each get a whole, consistent answer: the store's reads must not
    interleave on one connection."""
    job_id = await submit(orchestrator_stub, [fanout("fan", {"type": "sleep", "seconds": 0}, count=40, concurrency=8)])
    final = await wait_status_job(status_stub, job_id, status_job_finished, "the job to end")

    async def reader() -> tuple[Any, ...]:
        got = await status_stub.GetJob(status_pb.GetJobRequest(job_id=job_id))
        listed = await status_stub.ListJobs(status_pb.ListJobsRequest())
        children, _ = await list_all_children(status_stub, job_id, "fan", 7)
        revisions: list[int] = []
        call = status_stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id, after_revision=0))
        try:
            async with asyncio.timeout(DEADLINE):
                async for message in call:
                    if message.HasField("heartbeat"):
                        break
                    revisions.extend(update.revision for update in message.updates.updates)
        finally:
            call.cancel()
        return got, list(listed.jobs), [c.SerializeToString() for c in children], revisions

    results = await asyncio.gather(*[reader() for _ in range(30)], return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], failures[:3]
    first = results[0]
    assert isinstance(first, tuple)
    assert first[0] == final
    assert len(first[2]) == 40
    assert first[3] == sorted(set(first[3])) and first[3][-1] == final.revision
    assert all(result == first for result in results)

