"""Bad definitions are rejected whole, up front: INVALID_ARGUMENT with one
google.rpc.BadRequest field violation per problem, and nothing recorded or run."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import definition_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream_client.definitions import load_definition
from stepstream_client.errors import InvalidArgumentError, Violation, from_rpc_error

from tests.helpers import DEADLINE, job_definition

if TYPE_CHECKING:
    from stepstream.orchestrator.v1.orchestrator_service_pb2_grpc import OrchestratorServiceAsyncStub as Stub
else:
    Stub = orch_grpc.OrchestratorServiceStub


SLEEP: dict[str, Any] = {"type": "sleep", "seconds": 0}
TYPES = "command, fanout, python, sleep"


def step(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, **SLEEP, **fields}


def fanout(**fields: Any) -> dict[str, Any]:
    return {"name": "fan", "type": "fanout", "count": 2, "child": dict(SLEEP), **fields}


async def rejected(stub: Stub, definition: definition_pb2.JobDefinition) -> InvalidArgumentError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidArgumentError)
    return error


async def assert_nothing_recorded(stub: Stub) -> None:
    """No job and no event exists: the next valid job gets seq 1."""
    listed = await stub.ListJobs(orch_pb.ListJobsRequest())
    assert list(listed.jobs) == []
    accepted = await stub.SubmitJob(
        orch_pb.SubmitJobRequest(definition=job_definition([step("ok")], name="valid"))
    )
    assert accepted.seq == 1
    listed = await stub.ListJobs(orch_pb.ListJobsRequest())
    assert [job.id for job in listed.jobs] == [accepted.job.id]


# (definition fields, [(field, the description or a part of it)])
CASES: dict[str, tuple[Mapping[str, Any], list[tuple[str, str]]]] = {
    "unknown type": (
        {"steps": [{"name": "a", "type": "teleport"}]},
        [("definition.steps[0].type", f"unknown worker type 'teleport' (one of: {TYPES})")],
    ),
    "missing job name": ({"name": "", "steps": [step("a")]}, [("definition.name", "is required")]),
    "blank job name": ({"name": "   ", "steps": [step("a")]}, [("definition.name", "is required")]),
    "missing step name": ({"steps": [dict(SLEEP)]}, [("definition.steps[0].name", "is required")]),
    "bad step name": (
        {"steps": [step("has space")]},
        [("definition.steps[0].name", "'has space' must be 1-100 letters")],
    ),
    "missing type": (
        {"steps": [{"name": "a"}]},
        [("definition.steps[0].type", f"is required (one of: {TYPES})")],
    ),
    "missing command": (
        {"steps": [{"name": "a", "type": "command"}]},
        [("definition.steps[0].params.command", "is required")],
    ),
    "empty command": (
        {"steps": [{"name": "a", "type": "command", "command": []}]},
        [("definition.steps[0].params.command", "must not be empty")],
    ),
    "command not a list": (
        {"steps": [{"name": "a", "type": "command", "command": "echo hi"}]},
        [("definition.steps[0].params.command", "must be a list of strings, got 'echo hi'")],
    ),
    "no steps": ({"steps": []}, [("definition.steps", "at least one step is required")]),
    "duplicate step names": (
        {"steps": [step("a"), step("b"), step("a")]},
        [("definition.steps[2].name", "duplicate step name 'a' (also steps[0])")],
    ),
    "two-step cycle": (
        {"steps": [step("a", depends_on=["b"]), step("b", depends_on=["a"])]},
        [("definition.steps[0].depends_on", "dependency cycle: a -> b -> a")],
    ),
    "three-step cycle": (
        {"steps": [step("a", depends_on=[]), step("b", depends_on=["d"]), step("c"), step("d", depends_on=["c"])]},
        [("definition.steps[1].depends_on", "dependency cycle: b -> d -> c -> b")],
    ),
    "unknown dependency": (
        {"steps": [step("a"), step("b", depends_on=["a", "ghost"])]},
        [("definition.steps[1].depends_on.steps[1]", "unknown step 'ghost'")],
    ),
    "self dependency": (
        {"steps": [step("a", depends_on=["a"])]},
        [("definition.steps[0].depends_on.steps[0]", "step 'a' cannot depend on itself")],
    ),
    "dependency listed twice": (
        {"steps": [step("a"), step("b", depends_on=["a", "a"])]},
        [("definition.steps[1].depends_on.steps[1]", "'a' is listed twice")],
    ),
    "bad step timeout": (
        {"steps": [step("a", timeout="10x")]},
        [("definition.steps[0].timeout", "invalid duration '10x'")],
    ),
    "negative retry backoff": (
        {"steps": [step("a", retry_backoff="-5s")]},
        [("definition.steps[0].retry_backoff", "invalid duration '-5s'")],
    ),
    "negative plain-number timeout": (
        {"steps": [step("a", timeout="-5")]},
        [("definition.steps[0].timeout", "negative duration '-5'")],
    ),
    "zero timeout": (
        {"steps": [step("a", timeout="0s")]},
        [("definition.steps[0].timeout", "must be greater than zero, got '0s'")],
    ),
    "not-a-number timeout": (
        {"steps": [step("a", timeout="nan")]},
        [("definition.steps[0].timeout", "'nan'")],
    ),
    "infinite job timeout": ({"timeout": "inf", "steps": [step("a")]}, [("definition.timeout", "'inf'")]),
    "bad job timeout": ({"timeout": "1 hour", "steps": [step("a")]}, [("definition.timeout", "invalid duration")]),
    "negative retries": (
        {"steps": [step("a", retries=-1)]},
        [("definition.steps[0].retries", "must be between 0 and 100, got -1")],
    ),
    "too many retries": (
        {"steps": [step("a", retries=101)]},
        [("definition.steps[0].retries", "must be between 0 and 100, got 101")],
    ),
    "negative count": (
        {"steps": [fanout(count=-1)]},
        [("definition.steps[0].params.count", "must be at least 0")],
    ),
    "fractional count": (
        {"steps": [fanout(count=1.5)]},
        [("definition.steps[0].params.count", "must be a whole number")],
    ),
    "both items and count": (
        {"steps": [fanout(items=["a"])]},
        [("definition.steps[0].params.items", "set exactly one of `items` or `count`")],
    ),
    "neither items nor count": (
        {"steps": [{"name": "fan", "type": "fanout", "child": dict(SLEEP)}]},
        [("definition.steps[0].params.items", "set exactly one of `items` or `count`")],
    ),
    "fan-out without child": (
        {"steps": [{"name": "fan", "type": "fanout", "count": 1}]},
        [("definition.steps[0].params.child", "is required")],
    ),
    "zero concurrency": (
        {"steps": [fanout(concurrency=0)]},
        [("definition.steps[0].params.concurrency", "must be at least 1")],
    ),
    "negative tolerance": (
        {"steps": [fanout(max_child_failures=-1)]},
        [("definition.steps[0].params.max_child_failures", "must be at least 0")],
    ),
    "unknown worker field": (
        {"steps": [{"name": "a", "type": "command", "command": ["true"], "shell": True}]},
        [("definition.steps[0].params.shell", "unknown field (expected: command, cwd, env)")],
    ),
    "unknown sleep field": (
        {"steps": [step("a", minutes=1)]},
        [("definition.steps[0].params.minutes", "unknown field (expected: seconds)")],
    ),
    "fan-out child of type fanout": (
        {"steps": [fanout(child={"type": "fanout", "count": 1, "child": dict(SLEEP)})]},
        [("definition.steps[0].params.child.type", "a fan-out child cannot itself be a fan-out")],
    ),
    "fan-out child of unknown type": (
        {"steps": [fanout(child={"type": "nope"})]},
        [("definition.steps[0].params.child.type", "unknown worker type 'nope'")],
    ),
    "fan-out child with a bad field": (
        {"steps": [fanout(child={"type": "command", "command": ["true"], "timeout": "soon", "bogus": 1})]},
        [
            ("definition.steps[0].params.child.timeout", "invalid duration 'soon'"),
            ("definition.steps[0].params.child.bogus", "unknown field"),
        ],
    ),
    "fan-out child with negative retries": (
        {"steps": [fanout(child={**SLEEP, "retries": -2})]},
        [("definition.steps[0].params.child.retries", "must be between 0 and 100")],
    ),
    "fan-out step with retries": (
        {"steps": [fanout(retries=2)]},
        [("definition.steps[0].retries", "a fan-out step is not retried; set `child.retries` instead")],
    ),
    "python module not importable": (
        {"steps": [{"name": "py", "type": "python", "function": "no_such_module_xyz:run"}]},
        [("definition.steps[0].params.function", "cannot import 'no_such_module_xyz'")],
    ),
    "python attribute missing": (
        {"steps": [{"name": "py", "type": "python", "function": "tests.helpers.workers:missing"}]},
        [("definition.steps[0].params.function", "'tests.helpers.workers' has no attribute 'missing'")],
    ),
    "python attribute not callable": (
        {"steps": [{"name": "py", "type": "python", "function": "tests.helpers.workers:NOT_CALLABLE"}]},
        [("definition.steps[0].params.function", "is not callable")],
    ),
    "python reference without module": (
        {"steps": [{"name": "py", "type": "python", "function": "not_registered"}]},
        [("definition.steps[0].params.function", "is neither 'module:function' nor registered")],
    ),
    "python function missing": (
        {"steps": [{"name": "py", "type": "python"}]},
        [("definition.steps[0].params.function", "is required")],
    ),
}


def matches(violations: list[Violation], expected: list[tuple[str, str]]) -> bool:
    if sorted(v.field for v in violations) != sorted(field for field, _ in expected):
        return False
    return all(
        any(v.field == field and part in v.description for v in violations) for field, part in expected
    )


@pytest.mark.parametrize("case", list(CASES))
async def test_invalid_definition_is_rejected(orchestrator_stub: Stub, case: str) -> None:
    fields, expected = CASES[case]
    definition = job_definition(**{"name": "bad-job", **fields})
    error = await rejected(orchestrator_stub, definition)
    assert matches(error.violations, expected), [(v.field, v.description) for v in error.violations]
    assert "invalid job definition (1 problem" in error.message or len(expected) > 1
    await assert_nothing_recorded(orchestrator_stub)


async def test_several_problems_give_several_violations_and_nothing_runs(
    orchestrator_stub: Stub, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    definition = job_definition(
        [
            {"name": "fine", "type": "command", "command": ["touch", str(marker)], "depends_on": []},
            {"name": "fine", "type": "sleep", "seconds": 0},
            {"name": "b", "type": "command", "timeout": "10x", "retries": -1, "depends_on": ["ghost"]},
            {"name": "c", "type": "fanout", "count": 1, "items": ["x"], "retries": 1,
             "child": {"type": "fanout", "count": 1, "child": dict(SLEEP)}},
            {"name": "d", "type": "python", "function": "no_such_module_xyz:f", "extra": 1},
            {"name": "e", "type": "wat"},
            {"name": "f", "type": "sleep", "seconds": 0, "depends_on": ["g"]},
            {"name": "g", "type": "sleep", "seconds": 0, "depends_on": ["f"]},
        ],
        name="",
        timeout="-5s",
    )
    error = await rejected(orchestrator_stub, definition)
    assert sorted(v.field for v in error.violations) == sorted([
        "definition.name",
        "definition.timeout",
        "definition.steps[1].name",
        "definition.steps[2].retries",
        "definition.steps[2].timeout",
        "definition.steps[2].depends_on.steps[0]",
        "definition.steps[2].params.command",
        "definition.steps[3].params.items",
        "definition.steps[3].params.child.type",
        "definition.steps[3].retries",
        "definition.steps[4].params.function",
        "definition.steps[4].params.extra",
        "definition.steps[5].type",
        "definition.steps[6].depends_on",
    ])
    assert error.message.startswith("invalid job definition (14 problems)")
    # Rejected whole: the valid first step never ran.
    await asyncio.sleep(0.1)
    assert not marker.exists()
    await assert_nothing_recorded(orchestrator_stub)


async def test_a_rejected_submit_writes_no_event(orchestrator_stub: Stub) -> None:
    for fields, _ in CASES.values():
        await rejected(orchestrator_stub, job_definition(**{"name": "bad-job", **fields}))
    # Idempotency keys of rejected submits are not taken either.
    with pytest.raises(grpc.aio.AioRpcError):
        await orchestrator_stub.SubmitJob(
            orch_pb.SubmitJobRequest(definition=job_definition([{"name": "a"}]), request_id="key")
        )
    call = orchestrator_stub.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=0))
    try:
        async with asyncio.timeout(DEADLINE):
            first = await call.read()
    finally:
        call.cancel()
    assert isinstance(first, orch_pb.StreamStepEventsResponse)
    assert first.WhichOneof("payload") == "heartbeat"
    assert first.heartbeat.latest_seq == 0
    listed = await orchestrator_stub.ListJobs(orch_pb.ListJobsRequest())
    assert list(listed.jobs) == []
    accepted = await orchestrator_stub.SubmitJob(
        orch_pb.SubmitJobRequest(definition=job_definition([step("a")]), request_id="key")
    )
    assert accepted.seq == 1
    assert accepted.job.state == s.JOB_STATE_PENDING


async def test_definition_file_with_problems(orchestrator_stub: Stub, tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        'name = "from-a-file"\n'
        'timeout = "10m"\n'
        "[[steps]]\n"
        'name = "fetch"\n'
        'type = "command"\n'
        'command = ["echo", "hi"]\n'
        'timeout = "forever"\n'
        "[[steps]]\n"
        'name = "fan"\n'
        'type = "fanout"\n'
        "count = -3\n"
        'child = { type = "sleep", seconds = 0 }\n'
    )
    error = await rejected(orchestrator_stub, load_definition(path))
    assert sorted((v.field, v.description) for v in error.violations) == [
        ("definition.steps[0].timeout", "invalid duration 'forever' (use e.g. 500ms, 30s, 10m, 1h30m)"),
        ("definition.steps[1].params.count", "must be at least 0, got -3.0"),
    ]
    await assert_nothing_recorded(orchestrator_stub)
