"""StreamOutput and ListOutput against a real orchestrator whose steps are real
subprocesses printing: follow to the end, resume after a disconnect with
nothing missed or repeated, tail/from_line/stream filter, paging, every bad
request's code and details, a client that never reads, retention under a
reader, cancellation at every await, and grpcurl."""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc

from orchestrator_svc.api.servicer import ApiLimits, OrchestratorServicer
from orchestrator_svc.app import Orchestrator
from stepstream_common.rpc import add_servicer, start_server
from tests.contract.test_contract import grpcurl, json_messages
from tests.e2e.test_cancellation import _Context, every_await
from tests.e2e.test_limits import (
    SMALL_WINDOW,
    assert_exhausted,
    detail,
    orchestrator_with,
    own_channel,
    read_all,
)
from tests.helpers import channel, eventually, job_definition, read_watch, wait_job_state

if TYPE_CHECKING:
    from stepstream.orchestrator.v1.orchestrator_service_pb2_grpc import OrchestratorServiceAsyncStub as Stub

STDOUT, STDERR, NOTICE = pb.OUTPUT_STREAM_STDOUT, pb.OUTPUT_STREAM_STDERR, pb.OUTPUT_STREAM_NOTICE

# Prints a batch of 50 lines per argument tag, each even line on stdout and odd on
# stderr; between batches it waits for the gate file named by the next argument.
PHASES = """
import os, sys, time
args = sys.argv[1:]
for i, tag in enumerate(args[::2]):
    for n in range(50):
        print(f"{tag}{n}", file=sys.stderr if n % 2 else sys.stdout, flush=True)
    if 2 * i + 1 < len(args):
        while not os.path.exists(args[2 * i + 1]):
            time.sleep(0.02)
"""


def printing(name: str, script: str, *args: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": "command", "command": [sys.executable, "-c", script, *args], **fields}


def count_to(lines: int, name: str = "count") -> dict[str, Any]:
    return printing(name, "import sys\nfor n in range(int(sys.argv[1])): print(f'line {n}')", str(lines))


async def submit(stub: Stub, *steps: dict[str, Any]) -> str:
    response = await stub.SubmitJob(pb.SubmitJobRequest(definition=job_definition(list(steps))))
    return response.job.id


async def finished(stub: Stub, *steps: dict[str, Any]) -> str:
    job_id = await submit(stub, *steps)
    await wait_job_state(stub, job_id, {s.JOB_STATE_COMPLETED, s.JOB_STATE_FAILED})
    return job_id


async def messages(call: Any) -> list[pb.StreamOutputResponse]:
    """Every message of a stream to its end (with read(): a stream read from before can be read on)."""
    received: list[pb.StreamOutputResponse] = []
    _, error = await read_all(call, received.append)
    if error is not None:
        raise error
    return received


def lines_of(responses: list[pb.StreamOutputResponse]) -> list[pb.OutputLine]:
    return [line for response in responses if response.HasField("chunk") for line in response.chunk.lines]


def request(job_id: str, step: str = "count", **fields: Any) -> pb.StreamOutputRequest:
    return pb.StreamOutputRequest(job_id=job_id, step=step, **fields)


async def test_a_follower_that_disconnects_resumes_by_line_missing_and_repeating_nothing(
    orchestrator_stub: Stub, tmp_path: Path
) -> None:
    """The step prints, waits, prints while its follower is away, waits, prints
    again; the follower resumes from the line after the last it received."""
    gates = [tmp_path / "one", tmp_path / "two"]
    job_id = await submit(orchestrator_stub, printing("talk", PHASES, "a", str(gates[0]), "b", str(gates[1]), "c"))
    try:
        first = orchestrator_stub.StreamOutput(request(job_id, "talk", follow=True))
        received: list[pb.OutputLine] = []
        start = await read_watch(first)
        assert start.start.attempt == 1 and start.start.first_retained_line == 0
        while len(received) < 50:  # batch a, then the stream idles: a heartbeat
            response = await read_watch(first)
            received += response.chunk.lines
        assert (await read_watch(first)).HasField("heartbeat")
        first.cancel()  # the follower goes away

        gates[0].touch()  # batch b is printed while nobody follows

        async def printed(count: int) -> bool | None:
            listed = await orchestrator_stub.ListOutput(pb.ListOutputRequest(job_id=job_id, step="talk"))
            return listed.output[0].lines == count or None

        await eventually(lambda: printed(100), "batch b to be kept")
        again = orchestrator_stub.StreamOutput(request(
            job_id, "talk", follow=True, attempt=start.start.attempt, from_line=received[-1].number + 1,
        ))
        resumed = await read_watch(again)
        assert resumed.start.lines == 100
        while len(received) < 100:
            received += (await read_watch(again)).chunk.lines
        gates[1].touch()  # batch c is printed live
        rest = await messages(again)
    finally:
        for gate in gates:
            gate.touch()
    received += lines_of(rest)
    assert rest[-1].end == pb.OutputEnd(finished=True, state=s.STEP_STATE_COMPLETED, lines=150)
    assert [line.number for line in received] == list(range(150))
    assert sorted(line.data for line in received) == sorted(f"{t}{n}".encode() for t in "abc" for n in range(50))
    assert all(line.stream == (STDERR if int(line.data[1:]) % 2 else STDOUT) for line in received)
    assert all(line.time.seconds > 0 for line in received)
    # What was followed is what a later read of the whole attempt returns, in the same order.
    whole = lines_of(await messages(orchestrator_stub.StreamOutput(request(job_id, "talk"))))
    assert [(line.number, line.data) for line in whole] == [(line.number, line.data) for line in received]


async def test_tail_from_line_and_stream_filter(orchestrator_stub: Stub) -> None:
    job_id = await finished(orchestrator_stub, printing("talk", PHASES, "a"))
    tail = await messages(orchestrator_stub.StreamOutput(request(job_id, "talk", tail=3)))
    assert tail[0].start == pb.OutputStart(attempt=1, lines=50)
    assert [line.number for line in lines_of(tail)] == [47, 48, 49]
    assert tail[-1].end == pb.OutputEnd(finished=True, state=s.STEP_STATE_COMPLETED, lines=50)

    middle = lines_of(await messages(orchestrator_stub.StreamOutput(request(job_id, "talk", from_line=45))))
    assert [line.number for line in middle] == [45, 46, 47, 48, 49]
    at_end = await messages(orchestrator_stub.StreamOutput(request(job_id, "talk", from_line=50, follow=True)))
    assert [response.WhichOneof("payload") for response in at_end] == ["start", "end"]

    errors = lines_of(await messages(orchestrator_stub.StreamOutput(request(job_id, "talk", streams=[STDERR]))))
    assert sorted(line.data for line in errors) == sorted(f"a{n}".encode() for n in range(1, 50, 2))
    assert {line.stream for line in errors} == {STDERR}


async def test_a_long_line_comes_in_bounded_messages_and_the_dropped_bytes_are_told(tmp_path: Path) -> None:
    """A 3 MB line (limit 2 MB): kept in 64 KiB records, sent in messages of at
    most 1 MiB, the cut told by a NOTICE line and in OutputEnd / ListOutput."""
    script = "import sys\nsys.stdout.write('x' * 3_000_000 + '\\n')\nprint('after')"
    async with orchestrator_with(tmp_path, output_limit=2_000_000) as orchestrator, \
            channel(orchestrator.address) as ch:
        stub = orch_grpc.OrchestratorServiceStub(ch)
        job_id = await finished(stub, printing("long", script))
        responses = await messages(stub.StreamOutput(request(job_id, "long")))
        listed = await stub.ListOutput(pb.ListOutputRequest(job_id=job_id))
    assert all(response.ByteSize() <= 1_100_000 for response in responses)
    lines = lines_of(responses)
    kept = [line for line in lines if line.stream == STDOUT]
    assert all(line.continued for line in kept) and all(len(line.data) <= 64 * 1024 for line in kept)
    assert lines[-1].stream == NOTICE and b"dropped" in lines[-1].data
    end = responses[-1].end
    assert end.dropped_bytes > 1_000_000 and end.lines == len(lines)
    assert listed.output[0].dropped_bytes == end.dropped_bytes and listed.output[0].lines == end.lines


def violation(error: grpc.aio.AioRpcError) -> list[str]:
    return [v.field for v in detail(error, error_details_pb2.BadRequest).field_violations]


async def failed(call: Any) -> grpc.aio.AioRpcError:
    """The error a unary call or a whole stream ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await (messages(call) if isinstance(call, grpc.aio.UnaryStreamCall) else call)
    return caught.value


async def test_every_bad_request_gets_its_code_and_details(orchestrator_stub: Stub) -> None:
    job_id = await finished(orchestrator_stub, count_to(5), {
        "name": "fan", "type": "fanout", "count": 2, "child": {"type": "command", "command": ["echo", "hi"]},
    })
    stream = orchestrator_stub.StreamOutput
    invalid = {
        "job_id": pb.StreamOutputRequest(step="count"),
        "step": pb.StreamOutputRequest(job_id=job_id),
        "from_line": request(job_id, from_line=-1),
        "tail": request(job_id, tail=0),
        "attempt": request(job_id, attempt=-2),
        "child": request(job_id, child=-1),
        "streams[1]": request(job_id, streams=[STDOUT, 9]),
    }
    for field, bad in invalid.items():
        error = await failed(stream(bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and violation(error) == [field], (field, error)

    not_found = {
        "no job 'nope'": pb.StreamOutputRequest(job_id="nope", step="count"),
        "has no step 'other'": request(job_id, "other"),
        "step 'count' has no child 0": request(job_id, child=0),
        "step 'fan' has no child 2": request(job_id, "fan", child=2),
        "step 'count' has no attempt 2": request(job_id, attempt=2),
        "step 'fan' is a fan-out: it prints nothing itself": request(job_id, "fan"),
    }
    for words, bad in not_found.items():
        error = await failed(stream(bad))
        assert error.code() == grpc.StatusCode.NOT_FOUND and words in (error.details() or ""), (words, error)

    ahead = await failed(stream(request(job_id, from_line=6)))
    assert ahead.code() == grpc.StatusCode.OUT_OF_RANGE
    info = detail(ahead, error_details_pb2.ErrorInfo)
    assert (info.reason, info.metadata["oldest"], info.metadata["latest"]) == ("LINE_AHEAD", "0", "5")

    child = lines_of(await messages(stream(request(job_id, "fan", child=1))))
    assert [line.data for line in child] == [b"hi"]

    listing = orchestrator_stub.ListOutput
    error = await failed(listing(pb.ListOutputRequest(job_id=job_id, child=1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and violation(error) == ["step"]
    first = await listing(pb.ListOutputRequest(job_id=job_id, page_size=1))
    error = await failed(listing(pb.ListOutputRequest(job_id=job_id, step="fan", page_token=first.next_page_token)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and violation(error) == ["page_token"]
    error = await failed(listing(pb.ListOutputRequest(job_id="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_list_output_pages_through_steps_children_and_attempts(orchestrator_stub: Stub) -> None:
    job_id = await finished(orchestrator_stub, count_to(2, "first"), {
        "name": "fan", "type": "fanout", "count": 3,
        "child": {"type": "command", "command": [sys.executable, "-c", "print('child')"]},
    }, printing("flaky", "import sys\nprint('try')\nsys.exit(1)", retries=1, retry_backoff="10ms"))
    listed: list[pb.OutputSummary] = []
    token = ""
    pages = 0
    while True:
        page = await orchestrator_stub.ListOutput(pb.ListOutputRequest(job_id=job_id, page_size=2, page_token=token))
        listed += page.output
        pages += 1
        token = page.next_page_token
        if not token:
            break
    summary = [(o.step, o.child if o.HasField("child") else None, o.attempt, o.lines) for o in listed]
    assert summary == [("first", None, 1, 2), ("fan", 0, 1, 1), ("fan", 1, 1, 1), ("fan", 2, 1, 1),
                       ("flaky", None, 1, 1), ("flaky", None, 2, 1)]
    assert pages == 3
    assert [o.state for o in listed if o.step == "flaky"] == [s.STEP_STATE_FAILED, s.STEP_STATE_FAILED]
    first_try = await messages(orchestrator_stub.StreamOutput(request(job_id, "flaky", attempt=1)))
    assert first_try[0].start.attempt == 1 and first_try[-1].end.state == s.STEP_STATE_FAILED
    assert first_try[-1].end.retried, "a failed attempt with one left says a retry follows"
    latest = await messages(orchestrator_stub.StreamOutput(request(job_id, "flaky")))
    assert latest[0].start.attempt == 2
    assert latest[-1].end.state == s.STEP_STATE_FAILED and not latest[-1].end.retried, "the last attempt"


@contextlib.asynccontextmanager
async def served(orchestrator: Orchestrator, stall_timeout: float) -> AsyncIterator[tuple[OrchestratorServicer, str]]:
    """The orchestrator's engine and stores behind a servicer of the test's own, on a
    server of its own: the test sees what the servicer holds."""
    servicer = OrchestratorServicer(
        orchestrator.engine, orchestrator.store, orchestrator.feed, orchestrator.store.log_id, 0.2,
        output=orchestrator.output, limits=ApiLimits(stream_stall_timeout=stall_timeout),
    )
    service = pb.DESCRIPTOR.services_by_name["OrchestratorService"]
    server = await start_server("127.0.0.1:0", lambda grpc_server: [add_servicer(grpc_server, service, servicer)],
                                max_request_bytes=1 << 20)
    try:
        yield servicer, server.address
    finally:
        await server.stop(0)


async def test_a_client_that_never_reads_is_cut_loose_while_others_are_served(orchestrator: Orchestrator) -> None:
    """A client reading nothing holds at most a message on its way for
    --stream-stall-timeout: then its stream lets go of its read, and the
    client, reading again, gets what was on its way and RESOURCE_EXHAUSTED
    STREAM_STALLED. Another client reads the whole output meanwhile."""
    async with channel(orchestrator.address) as ch:
        job_id = await finished(orch_grpc.OrchestratorServiceStub(ch), count_to(30_000))
    async with served(orchestrator, 0.5) as (servicer, address), channel(address) as ch, \
            own_channel(address, *SMALL_WINDOW) as slow:
        stalled = orch_grpc.OrchestratorServiceStub(slow).StreamOutput(request(job_id))
        await stalled.read()
        stub = orch_grpc.OrchestratorServiceStub(ch)
        whole = lines_of(await messages(stub.StreamOutput(request(job_id))))
        assert [line.number for line in whole] == list(range(30_000))

        async def let_go() -> bool | None:
            return servicer.output.open_streams == 0 or None

        await eventually(let_go, "the stalled stream to let go of its read")
        seen: list[int] = []
        _, ended = await read_all(stalled, lambda response: seen.extend(line.number for line in response.chunk.lines))
    assert ended is not None
    assert_exhausted(ended, "STREAM_STALLED", "--stream-stall-timeout", "0.5")
    assert 0 < len(seen) < 29_000 and seen == list(range(len(seen)))


async def test_output_removed_under_a_reader_is_out_of_range_never_a_skip(orchestrator: Orchestrator) -> None:
    async with channel(orchestrator.address) as ch:
        stub = orch_grpc.OrchestratorServiceStub(ch)
        job_id = await finished(stub, count_to(30_000))
        async with own_channel(orchestrator.address, *SMALL_WINDOW) as slow:
            reader = orch_grpc.OrchestratorServiceStub(slow).StreamOutput(request(job_id))
            await reader.read()
            assert await orchestrator.output.prune(now=time.time() + 10 * 365 * 86400) == 1
            seen: list[int] = []
            _, ended = await read_all(reader, lambda answer: seen.extend(line.number for line in answer.chunk.lines))
        assert ended is not None and ended.code() == grpc.StatusCode.OUT_OF_RANGE, ended
        info = detail(ended, error_details_pb2.ErrorInfo)
        assert info.reason == "OUTPUT_GONE" and f"before line {len(seen)} was sent" in (ended.details() or "")
        assert seen == list(range(len(seen)))
        error = await failed(stub.StreamOutput(request(job_id)))
        assert error.code() == grpc.StatusCode.NOT_FOUND and "has no output" in (error.details() or "")


async def test_stream_output_survives_cancellation_at_every_await(orchestrator: Orchestrator) -> None:
    async with channel(orchestrator.address) as ch:
        job_id = await finished(orch_grpc.OrchestratorServiceStub(ch), count_to(1200))
    servicer = OrchestratorServicer(orchestrator.engine, orchestrator.store, orchestrator.feed,
                                    orchestrator.store.log_id, 0.05, output=orchestrator.output)
    context: Any = _Context()

    async def whole_output() -> list[tuple[int, bytes]]:
        stream = servicer.StreamOutput(request(job_id, follow=True), context)
        async with contextlib.aclosing(cast("AsyncGenerator[pb.StreamOutputResponse, None]", stream)):
            responses = [message async for message in stream]
        return [(line.number, line.data) for line in lines_of(responses)]

    def nothing_held() -> None:
        assert servicer.output.open_streams == 0

    awaits = await every_await(whole_output, orchestrator.store, clean=nothing_held)
    assert awaits >= 3
    assert await whole_output() == [(n, f"line {n}".encode()) for n in range(1200)]


async def test_grpcurl_lists_and_streams_output(orchestrator: Orchestrator, orchestrator_stub: Stub) -> None:
    job_id = await finished(orchestrator_stub, printing("talk", "print('hi')\nprint('\\x1b[31mred\\x1b[0m')"))
    service = "stepstream.orchestrator.v1.OrchestratorService"
    code, out, err = await grpcurl(orchestrator.address, f"{service}/ListOutput", data={"job_id": job_id})
    assert code == 0, err
    assert json.loads(out)["output"] == [{"step": "talk", "attempt": 1, "lines": "2", "bytes": "14",
                                          "finished": True, "state": "STEP_STATE_COMPLETED"}]
    code, out, err = await grpcurl(orchestrator.address, f"{service}/StreamOutput",
                                   data={"job_id": job_id, "step": "talk", "follow": True})
    assert code == 0, err
    sent = json_messages(out)
    assert sent[0] == {"start": {"attempt": 1, "lines": "2"}}
    lines = sent[1]["chunk"]["lines"]
    assert [base64.b64decode(line["data"]) for line in lines] == [b"hi", b"\x1b[31mred\x1b[0m"]
    assert sent[-1] == {"end": {"finished": True, "state": "STEP_STATE_COMPLETED", "lines": "2"}}
    code, out, err = await grpcurl(orchestrator.address, f"{service}/StreamOutput",
                                   data={"job_id": job_id, "step": "talk", "from_line": -1})
    assert code != 0 and "Code: InvalidArgument" in err and "from_line" in err
