"""Nothing a client sends can wedge, crash or fool a service.

Bytes that are no request message, Struct params nested too deep or holding
NaN, Infinity or absurd numbers, a 1 MB job id, a definition with hundreds of
problems: each comes back as a clean, small gRPC error (INVALID_ARGUMENT,
NOT_FOUND, ...) that every client can read (the Python client, grpcurl), never
UNKNOWN/INTERNAL, and never a trailer so large that clients see "Stream removed".
Also: fan-out placeholders are substituted once, and reflection (v1 and
v1alpha) serves the .proto comments.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import definition_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc
from stepstream_client import Client, InvalidArgumentError
from stepstream_client.errors import from_rpc_error

from orchestrator_svc.app import Orchestrator
from orchestrator_svc.domain.spec import MAX_PARAMS_DEPTH
from status_svc.app import StatusService
from stepstream_common import errors as server_errors
from stepstream_common import rpc, wire
from tests.contract.test_contract import load_generator, tool
from tests.helpers import DEADLINE, REPO, channel, wait_job_state

if TYPE_CHECKING:
    from stepstream.orchestrator.v1.orchestrator_service_pb2_grpc import OrchestratorServiceAsyncStub as Stub
    from stepstream.status.v1.status_service_pb2_grpc import StatusServiceAsyncStub as StatusStub
else:
    Stub = orch_grpc.OrchestratorServiceStub
    StatusStub = status_grpc.StatusServiceStub

# gRPC clients drop trailers above their soft limit (8 KB by default) with a
# rising chance, and always above 16 KB.
METADATA_SOFT_LIMIT = 8 * 1024
# What any error message may be, and any one field violation (see stepstream_common.rpc).
SHORT = rpc.MAX_MESSAGE_BYTES
TYPES = "command, fanout, python, sleep"


async def call_raw(ch: grpc.aio.Channel, method: str, server_streaming: bool, client_streaming: bool,
                   data: bytes) -> grpc.aio.AioRpcError:
    """Send `data` as the request, unencoded, and return the error the call ends with."""
    try:
        async with asyncio.timeout(DEADLINE):
            if client_streaming:
                bidi: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = ch.stream_stream(method)
                async for _ in bidi(iter([data])):
                    pass
            elif server_streaming:
                stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = ch.unary_stream(method)
                async for _ in stream(data):
                    pass
            else:
                unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(method)
                await unary(data)
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError(f"{method} accepted {data!r}")


def violations_of(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """The (field, description) pairs of the google.rpc.BadRequest in the trailer."""
    return [(v.field, v.description) for v in from_rpc_error(error).violations]


def trailer_size(error: grpc.aio.AioRpcError) -> int:
    """The trailer's size as gRPC counts it against its limits (name + value + 32 per entry)."""
    return sum(len(key) + len(value) + 32 for key, value in error.trailing_metadata() or ())


async def rejected(stub: Stub, definition: definition_pb2.JobDefinition) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value


def one_step(step_type: str, params: Mapping[str, Any], **fields: Any) -> definition_pb2.JobDefinition:
    """A definition built straight as protobuf (the SDK checks some of this client-side)."""
    struct = struct_pb2.Struct()
    struct.update(params)
    step = definition_pb2.StepDefinition(name="a", type=step_type, params=struct, **fields)
    return definition_pb2.JobDefinition(name="hostile", steps=[step])


async def nothing_recorded(stub: Stub) -> None:
    listed = await stub.ListJobs(orch_pb.ListJobsRequest())
    assert list(listed.jobs) == []


# --- 1. Bytes that are no request message ------------------------------------------------------------

# Bytes no message type parses (a field of the wrong wire type would be kept as unknown).
GARBAGE = {"bad tag": b"\xff\xff\xff", "truncated field": b"\x0a\x05ab"}


@pytest.mark.parametrize("garbage", list(GARBAGE))
async def test_every_rpc_answers_undecodable_bytes_with_invalid_argument(
    orchestrator: Orchestrator, status: StatusService, garbage: str
) -> None:
    """Before: grpc.aio answered UNKNOWN ("Unexpected DecodeError") when the
    request deserializer raised, on every method of both services."""
    services = [
        (orchestrator.address, orch_pb.DESCRIPTOR.services_by_name["OrchestratorService"]),
        (status.address, status_service_pb2.DESCRIPTOR.services_by_name["StatusService"]),
        (orchestrator.address, health_pb2.DESCRIPTOR.services_by_name["Health"]),
        (status.address, health_pb2.DESCRIPTOR.services_by_name["Health"]),
        (status.address, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]),
    ]
    methods = [
        (address, f"/{service.full_name}/{method.name}", method.server_streaming, method.client_streaming)
        for address, service in services for method in service.methods
    ]
    methods.append((orchestrator.address, f"/{rpc.V1_REFLECTION_SERVICE}/ServerReflectionInfo", True, True))
    for address, method, server_streaming, client_streaming in methods:
        async with channel(address) as ch:
            error = await call_raw(ch, method, server_streaming, client_streaming, GARBAGE[garbage])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.code(), error.details())
        assert "does not parse as" in (error.details() or "")


async def test_invalid_utf8_in_a_string_field_is_invalid_argument(
    orchestrator: Orchestrator, status: StatusService
) -> None:
    """proto3 strings must be UTF-8: job_id (field 1 of both GetJob requests) that is not."""
    for address, method in ((orchestrator.address, "/stepstream.orchestrator.v1.OrchestratorService/GetJob"),
                            (status.address, "/stepstream.status.v1.StatusService/GetJob")):
        async with channel(address) as ch:
            error = await call_raw(ch, method, False, False, b"\x0a\x02\xff\xfe")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.code(), error.details())


def nested_struct(levels: int) -> bytes:
    """A google.protobuf.Struct `{"a": {"a": ... "x"}}` with `levels` tables,
    encoded by hand: protobuf itself refuses to build one past its depth limit."""
    value = wire.length_delimited(3, b"x")  # Value.string_value
    struct = b""
    for _ in range(levels):
        struct = wire.length_delimited(1, wire.length_delimited(1, b"a") + wire.length_delimited(2, value))
        value = wire.length_delimited(5, struct)  # Value.struct_value
    return struct


@pytest.mark.parametrize("levels", [40, 5000])
async def test_params_nested_past_protobufs_limit_are_invalid_argument(orchestrator: Orchestrator,
                                                                       levels: int) -> None:
    """Beyond ~32 tables a request no longer parses (protobuf's limit of 100
    nested messages): INVALID_ARGUMENT, nothing recorded. Before: UNKNOWN."""
    step = definition_pb2.StepDefinition(name="a", type="sleep").SerializeToString()
    step += wire.length_delimited(8, nested_struct(levels))  # StepDefinition.params
    request = wire.length_delimited(1, wire.length_delimited(1, b"deep") + wire.length_delimited(3, step))
    async with channel(orchestrator.address) as ch:
        error = await call_raw(ch, "/stepstream.orchestrator.v1.OrchestratorService/SubmitJob", False, False, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "stepstream.orchestrator.v1.SubmitJobRequest" in (error.details() or "")
        await nothing_recorded(orch_grpc.OrchestratorServiceStub(ch))


async def test_params_nested_past_our_bound_name_the_field(orchestrator_stub: Stub) -> None:
    """Deep but still parseable params are refused at MAX_PARAMS_DEPTH, with the field named."""

    def nested(tables: int) -> dict[str, Any]:
        value: dict[str, Any] = {"x": 1}
        for _ in range(tables - 1):
            value = {"a": value}
        return value

    function = "tests.helpers.workers:sync_returns_number"
    error = await rejected(orchestrator_stub, one_step("python", {"function": function,
                                                                   "args": nested(MAX_PARAMS_DEPTH)}))
    assert violations_of(error) == [
        ("definition.steps[0].params.args" + ".a" * (MAX_PARAMS_DEPTH - 1),
         f"nested too deeply: at most {MAX_PARAMS_DEPTH} levels of tables and lists"),
    ]
    lists: Any = [1]
    for _ in range(MAX_PARAMS_DEPTH):
        lists = [lists]
    error = await rejected(orchestrator_stub, one_step("sleep", {"seconds": lists}))
    assert [field for field, _ in violations_of(error)] == [
        "definition.steps[0].params.seconds" + "[0]" * (MAX_PARAMS_DEPTH - 1)
    ]
    # One level less is no nesting problem (only the worker's own complaints remain).
    error = await rejected(orchestrator_stub, one_step("sleep", {"seconds": 0, "extra": nested(MAX_PARAMS_DEPTH - 1)}))
    assert violations_of(error) == [("definition.steps[0].params.extra", "unknown field (expected: seconds)")]
    await nothing_recorded(orchestrator_stub)


# --- 6. NaN, Infinity and absurd numbers ---------------------------------------------------------------

NAN, INF = math.nan, math.inf
CHILD = {"type": "sleep", "seconds": 0}
# (worker type, params, step fields, the field at fault, a part of its description)
NUMBERS: dict[str, tuple[str, dict[str, Any], dict[str, Any], str, str]] = {
    "NaN seconds": ("sleep", {"seconds": NAN}, {}, "params.seconds", "must be a finite number, got nan"),
    "Infinity seconds": ("sleep", {"seconds": INF}, {}, "params.seconds", "must be a finite number, got inf"),
    "-Infinity seconds": ("sleep", {"seconds": -INF}, {}, "params.seconds", "must be a finite number, got -inf"),
    "1e300 seconds": ("sleep", {"seconds": 1e300}, {}, "params.seconds", "must be between -2^53 and 2^53"),
    "NaN count": ("fanout", {"count": NAN, "child": CHILD}, {}, "params.count", "finite"),
    "1e300 concurrency": ("fanout", {"count": 1, "concurrency": 1e300, "child": CHILD}, {},
                          "params.concurrency", "must be between -2^53 and 2^53"),
    "1e9 concurrency": ("fanout", {"count": 1, "concurrency": 1e9, "child": CHILD}, {},
                        "params.concurrency", "must be at most 1000 children at once, got 1000000000"),
    "1e300 max_child_failures": ("fanout", {"count": 1, "max_child_failures": -1e300, "child": CHILD}, {},
                                 "params.max_child_failures", "must be between -2^53 and 2^53"),
    "1e12 max_child_failures": ("fanout", {"count": 1, "max_child_failures": 1e12, "child": CHILD}, {},
                                "params.max_child_failures", "must be at most 100000"),
    "NaN child retries": ("fanout", {"count": 1, "child": {**CHILD, "retries": NAN}}, {},
                          "params.child.retries", "finite"),
    "Infinity in items": ("fanout", {"items": ["a", INF], "child": CHILD}, {}, "params.items[1]", "finite"),
    "NaN deep in python args": ("python", {"function": "tests.helpers.workers:sync_returns_number",
                                           "args": {"x": [{"y": NAN}]}}, {}, "params.args.x[0].y", "finite"),
    "1e300s step timeout": ("sleep", {"seconds": 0}, {"timeout": "1e300"}, "timeout",
                            "must be at most 315576000000s (10,000 years), got '1e300'"),
    "absurd retry backoff": ("sleep", {"seconds": 0}, {"retry_backoff": "99999999999999999999d"}, "retry_backoff",
                             "must be at most 315576000000s"),
}


@pytest.mark.parametrize("case", list(NUMBERS))
async def test_non_finite_and_absurd_numbers_are_invalid_argument_naming_the_field(
    orchestrator_stub: Stub, case: str
) -> None:
    """Before: NaN/Infinity crashed validation (UNKNOWN "Fail to serialize NaN");
    1e300 concurrency, seconds or timeouts were accepted."""
    step_type, params, fields, field, description = NUMBERS[case]
    error = await rejected(orchestrator_stub, one_step(step_type, params, **fields))
    found = violations_of(error)
    assert [f for f, _ in found] == [f"definition.steps[0].{field}"], found
    assert description in found[0][1], found
    await nothing_recorded(orchestrator_stub)


async def test_absurd_job_timeout_is_invalid_argument(orchestrator_stub: Stub) -> None:
    definition = one_step("sleep", {"seconds": 0})
    definition.timeout = "1e300"  # a plain number of seconds
    error = await rejected(orchestrator_stub, definition)
    assert violations_of(error) == [
        ("definition.timeout", "must be at most 315576000000s (10,000 years), got '1e300'")
    ]


# --- 2. Long client input is never echoed whole ---------------------------------------------------------

def assert_short(error: grpc.aio.AioRpcError, code: grpc.StatusCode) -> None:
    assert error.code() == code, (error.code(), (error.details() or "")[:200])
    assert len((error.details() or "").encode()) <= SHORT
    assert trailer_size(error) < 2048


@pytest.mark.parametrize("size", [10_000, 1_000_000])
async def test_huge_ids_come_back_as_short_errors(
    orchestrator: Orchestrator, status: StatusService, size: int
) -> None:
    """Before: NOT_FOUND quoted the whole id, so the trailer passed gRPC's
    metadata limit and clients saw RESOURCE_EXHAUSTED "Stream removed"."""
    huge = "x" * size
    async with channel(orchestrator.address) as och, channel(status.address) as sch:
        orch, stat = orch_grpc.OrchestratorServiceStub(och), status_grpc.StatusServiceStub(sch)
        calls: dict[str, Any] = {
            "orchestrator GetJob": orch.GetJob(orch_pb.GetJobRequest(job_id=huge)),
            "orchestrator CancelJob": orch.CancelJob(orch_pb.CancelJobRequest(job_id=huge)),
            "status GetJob": stat.GetJob(status_service_pb2.GetJobRequest(job_id=huge)),
            "status ListChildren job": stat.ListChildren(
                status_service_pb2.ListChildrenRequest(job_id=huge, step_name=huge)),
        }
        for what, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert_short(caught.value, grpc.StatusCode.NOT_FOUND)
            assert "… (" in (caught.value.details() or ""), what
        streams: list[tuple[Any, grpc.StatusCode]] = [
            (stat.WatchJob(status_service_pb2.WatchJobRequest(job_id=huge)), grpc.StatusCode.NOT_FOUND),
            (stat.WatchJob(status_service_pb2.WatchJobRequest(job_id=huge, after_revision=0)),
             grpc.StatusCode.NOT_FOUND),
            (orch.StreamStepEvents(orch_pb.StreamStepEventsRequest(log_id=huge)), grpc.StatusCode.OUT_OF_RANGE),
        ]
        for stream, code in streams:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async with asyncio.timeout(DEADLINE):
                    await stream.read()
            assert_short(caught.value, code)


async def test_huge_strings_in_a_definition_are_quoted_short(orchestrator_stub: Stub) -> None:
    huge = "é" * 400_000
    definition = definition_pb2.JobDefinition(name="huge", steps=[
        definition_pb2.StepDefinition(name=huge, type="sleep"),
        definition_pb2.StepDefinition(name="b", type=huge, timeout=huge,
                                      depends_on=definition_pb2.StepDependencies(steps=[huge])),
    ])
    error = await rejected(orchestrator_stub, definition)
    assert_short(error, grpc.StatusCode.INVALID_ARGUMENT)
    found = violations_of(error)
    assert {field for field, _ in found} == {
        "definition.steps[0].name", "definition.steps[0].params.seconds", "definition.steps[1].type",
        "definition.steps[1].timeout", "definition.steps[1].depends_on.steps[0]",
    }
    assert all(len(description.encode()) <= rpc.MAX_DESCRIPTION_BYTES for _, description in found)
    assert any("(400000 characters)" in description for _, description in found)


# --- 3. Hundreds of problems: the first 50, then "and M more" --------------------------------------------

def bad_steps(count: int) -> definition_pb2.JobDefinition:
    return definition_pb2.JobDefinition(
        name="many-problems",
        steps=[definition_pb2.StepDefinition(name=f"s{i}", type="nope") for i in range(count)],
    )


async def test_hundreds_of_problems_list_the_first_50_and_count_the_rest(
    orchestrator: Orchestrator, status: StatusService
) -> None:
    """Before: ~150 problems made a trailer past the client's limit ("Stream removed")."""
    async with Client(orchestrator.address, status.address) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            await client.submit(bad_steps(500))
    error = caught.value
    assert error.message == "invalid job definition (501 problems)"
    assert len(error.violations) == rpc.MAX_VIOLATIONS + 1 == 51
    assert (error.violations[0].field, error.violations[0].description) == ("definition.steps", "at most 200 steps")
    assert [v.field for v in error.violations[1:50]] == [f"definition.steps[{i}].type" for i in range(49)]
    assert error.violations[1].description == f"unknown worker type 'nope' (one of: {TYPES})"
    last = error.violations[-1]
    assert last.field == "definition"
    assert last.description.startswith("and 451 more problems, not listed")


async def test_worst_case_violations_still_fit_the_trailer(orchestrator_stub: Stub) -> None:
    """Many violations, each quoting long non-ASCII text: the byte budget, not
    the count of 50, ends the list, and the trailer stays under the soft limit."""
    steps = [
        definition_pb2.StepDefinition(name="é" * 1000 + str(i), type="😀" * 1000, timeout="ü" * 1000)
        for i in range(300)
    ]
    error = await rejected(orchestrator_stub, definition_pb2.JobDefinition(name="ä" * 10_000, steps=steps))
    found = violations_of(error)
    assert 10 < len(found) <= rpc.MAX_VIOLATIONS + 1
    assert re.fullmatch(r"and \d+ more problems, not listed.*", found[-1][1])
    assert trailer_size(error) < METADATA_SOFT_LIMIT - 1024


def test_to_status_bounds_any_error_below_the_soft_limit() -> None:
    """The bound holds for any error, not just the ones validation makes today."""
    violation = server_errors.FieldViolation("f" + "é" * 10_000, "😀" * 10_000)
    worst = server_errors.InvalidArgumentError("é" * 100_000, [violation] * 1000)
    status = rpc.to_status(worst)
    message = status.details.encode()
    on_the_wire = sum(1 if 0x20 <= byte < 0x7F and byte != ord("%") else 3 for byte in message)
    size = len("grpc-message") + on_the_wire + 32 + sum(
        len(key) + len(value) + 32 for key, value in status.trailing_metadata
    )
    assert size < METADATA_SOFT_LIMIT - 1024
    sent = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    bad_request = error_details_pb2.BadRequest()
    assert sent.details[0].Unpack(bad_request)
    assert bad_request.field_violations[-1].field == "f" + "é" * 98 + "…"  # the shared root, bounded
    assert rpc.to_status(server_errors.NotFoundError("no job " + "x" * 10**6)).details.endswith("…")


# --- an unexpected exception ---------------------------------------------------------------------------

class _BrokenHealth:
    """A servicer with a bug whose exception text quotes a huge client input."""

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        raise ValueError("boom " + request.service)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> AsyncIterator[Any]:
        raise ValueError("boom " + request.service)
        yield  # pragma: no cover

    async def List(self, request: Any, context: Any) -> Any:
        raise ValueError("boom")


async def test_a_servicer_bug_is_internal_with_a_short_message() -> None:
    """Before: UNKNOWN with the exception's whole text ("Stream removed" for a long one)."""
    server = grpc.aio.server()
    rpc.add_servicer(server, health_pb2.DESCRIPTOR.services_by_name["Health"], _BrokenHealth())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Check(health_pb2.HealthCheckRequest(service="x" * 100_000))
            assert_short(caught.value, grpc.StatusCode.INTERNAL)
            assert caught.value.details() == "internal error in grpc.health.v1.Health.Check (logged by the service)"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Watch(health_pb2.HealthCheckRequest(service="x" * 100_000)).read()
            assert_short(caught.value, grpc.StatusCode.INTERNAL)
    finally:
        await server.stop(None)


# --- grpcurl as a foreign client --------------------------------------------------------------------------

async def grpcurl(address: str, *args: str, stdin: Any = None) -> tuple[int, str, str]:
    """`grpcurl -plaintext [-d @] ADDRESS ARGS...`, the request JSON (if any) on stdin."""
    command = [tool("grpcurl"), "-plaintext", *(["-d", "@"] if stdin is not None else []), address, *args]
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(DEADLINE):
        out, err = await process.communicate(json.dumps(stdin).encode() if stdin is not None else b"")
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_grpcurl_reads_the_bounded_errors(orchestrator: Orchestrator, status: StatusService) -> None:
    code, _, err = await grpcurl(
        orchestrator.address, "stepstream.orchestrator.v1.OrchestratorService/SubmitJob",
        stdin={"definition": {"name": "bad", "steps": [{"name": f"s{i}", "type": "nope"} for i in range(500)]}},
    )
    assert code != 0 and "Code: InvalidArgument" in err, err[:2000]
    assert "Message: invalid job definition (501 problems)" in err
    # grpcurl resolves google.rpc.BadRequest through reflection and prints the violations.
    assert '"@type":"type.googleapis.com/google.rpc.BadRequest"' in err
    assert err.count('"field":"definition.steps[') == 49
    assert '{"field":"definition","description":"and 451 more problems, not listed' in err

    for address, method in ((orchestrator.address, "stepstream.orchestrator.v1.OrchestratorService/GetJob"),
                            (status.address, "stepstream.status.v1.StatusService/GetJob")):
        code, _, err = await grpcurl(address, method, stdin={"jobId": "y" * 1_000_000})
        assert code != 0 and "Code: NotFound" in err, err[:2000]
        assert "(1000000 characters)" in err and len(err) < 1000


# --- 4. Fan-out placeholders: one pass over the template --------------------------------------------------

async def test_fanout_substitutes_placeholders_once(orchestrator_stub: Stub, tmp_path: Path) -> None:
    """Before: `{index}` was replaced after `{item}`, so an item holding the text
    "{index}" was rewritten ("{index}" ran as "0")."""
    items = ["{index}", "{item}", "a{index}b{item}c", "plain"]
    child = {"type": "command", "cwd": str(tmp_path),
             "command": ["sh", "-c", 'printf %s "$1" > "out-$2"', "sh", "{item}|{index}", "{index}"]}
    definition = one_step("fanout", {"items": items, "child": child})
    submitted = await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))
    view = await wait_job_state(orchestrator_stub, submitted.job.id, {s.JOB_STATE_COMPLETED, s.JOB_STATE_FAILED})
    assert view.job.state == s.JOB_STATE_COMPLETED, view.job.message
    written = {path.name: path.read_text() for path in tmp_path.glob("out-*")}
    assert written == {f"out-{index}": f"{item}|{index}" for index, item in enumerate(items)}


# --- 5. Reflection v1 and v1alpha, with the .proto comments ------------------------------------------------

def leading_comment(proto: str, declaration: str) -> list[str]:
    """The `//` lines right above `declaration` in protos/`proto`."""
    lines = (REPO / "protos" / proto).read_text().splitlines()
    position = next(i for i, line in enumerate(lines) if line.startswith(declaration))
    comment: list[str] = []
    while position > 0 and lines[position - 1].startswith("//"):
        position -= 1
        comment.insert(0, lines[position])
    assert comment, f"{declaration} has no comment in {proto}"
    return comment


@pytest.mark.parametrize("which", ["orchestrator", "status"])
async def test_grpcurl_lists_and_describes_with_comments_through_reflection(
    orchestrator: Orchestrator, status: StatusService, which: str
) -> None:
    """grpcurl 1.8 (the newest on PyPI) lists and describes through v1alpha; the
    v1 service is listed, described and answers a call (grpcurl speaking v1 on
    the wire). `describe` prints the comments of our .proto files."""
    address, package, service, proto, (message_proto, message) = {
        "orchestrator": (orchestrator.address, "stepstream.orchestrator.v1", "OrchestratorService",
                         "stepstream/orchestrator/v1/orchestrator_service.proto",
                         ("stepstream/orchestrator/v1/definition.proto", "JobDefinition")),
        "status": (status.address, "stepstream.status.v1", "StatusService", "stepstream/status/v1/status_service.proto",
                   ("stepstream/status/v1/status_service.proto", "JobStatus")),
    }[which]
    code, out, err = await grpcurl(address, "list")
    assert code == 0, err
    assert {f"{package}.{service}", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= set(out.split())

    code, out, err = await grpcurl(address, "describe", f"{package}.{service}")
    assert code == 0, err
    for line in leading_comment(proto, f"service {service} "):
        assert line in out, out
    code, out, err = await grpcurl(address, "describe", f"{package}.{message}")
    assert code == 0, err
    for line in leading_comment(message_proto, f"message {message} "):
        assert line in out, out

    code, out, err = await grpcurl(address, "describe", "grpc.reflection.v1.ServerReflection")
    assert code == 0, err
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in out

    method = "grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
    code, out, err = await grpcurl(address, method, stdin={"list_services": ""})
    assert code == 0, err
    listed = {entry["name"] for entry in json.loads(out)["list_services_response"]["service"]}
    assert {f"{package}.{service}", "grpc.reflection.v1.ServerReflection"} <= listed
    code, out, err = await grpcurl(address, method, stdin={"file_containing_symbol": f"{package}.{service}"})
    assert code == 0, err
    files = [descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(data))
             for data in json.loads(out)["file_descriptor_response"]["file_descriptor_proto"]]
    served = next(file for file in files if file.name == proto)
    assert served.source_code_info.location


def test_committed_descriptor_set_matches_the_protos(tmp_path: Path) -> None:
    """The descriptor set reflection serves comments from is regenerated with the code."""
    generator = load_generator()
    generator.generate(tmp_path)
    fresh = generator.descriptor_set(tmp_path).read_bytes()
    committed = generator.descriptor_set(REPO / "protos").read_bytes()
    assert fresh == committed, "out of date (run python scripts/gen_protos.py)"
