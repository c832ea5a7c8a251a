"""Step output captured from real commands (and python steps and a plugin
worker) by a real orchestrator, read back through its OutputStore: complete,
in order, byte-exact, masked, bounded, per attempt."""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.states import TERMINAL_JOB_STATES
from stepstream_client.errors import InvalidArgumentError, from_rpc_error

from orchestrator_svc.app import Orchestrator, start
from orchestrator_svc.output import STEP_LOGGER, AttemptOutput, OutputKey, OutputLine, OutputStore, OutputStream
from orchestrator_svc.output.records import RECORD_OVERHEAD
from orchestrator_svc.workers import FieldViolation, Params, WorkContext, Worker, WorkerCatalog
from orchestrator_svc.workers import OutputStream as PluginStream
from orchestrator_svc.workers.registry import WorkerRegistry
from tests.conftest import orchestrator_config
from tests.helpers import channel, eventually, job_definition, wait_job_state

if TYPE_CHECKING:
    from stepstream.orchestrator.v1.orchestrator_service_pb2_grpc import OrchestratorServiceAsyncStub as Stub
else:
    Stub = orch_grpc.OrchestratorServiceStub

OUT, ERR, NOTICE = OutputStream.STDOUT, OutputStream.STDERR, OutputStream.NOTICE
ENDED = set(TERMINAL_JOB_STATES)


@asynccontextmanager
async def orchestrator(
    tmp_path: Path, workers: WorkerRegistry | None = None, **settings: Any
) -> AsyncIterator[tuple[Orchestrator, Stub]]:
    running = await start(orchestrator_config(tmp_path / "orchestrator", **settings), workers)
    try:
        async with channel(running.address) as ch:
            yield running, Stub(ch)
    finally:
        await running.stop()


async def run_job(stub: Stub, steps: Sequence[Mapping[str, Any]]) -> orch_pb.GetJobResponse:
    submitted = await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(list(steps))))
    return await wait_job_state(stub, submitted.job.id, ENDED)


async def read_all(store: OutputStore, key: OutputKey, page: int = 5000) -> list[OutputLine]:
    lines: list[OutputLine] = []
    while batch := await store.read(key, len(lines), page):
        lines.extend(batch)
    return lines


def sh(name: str, script: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": "command", "command": ["sh", "-c", script], **fields}


def joined(lines: list[OutputLine]) -> bytes:
    """The lines' data as printed (a continued record joins the next of its stream)."""
    return b"".join(line.data + (b"" if line.continued else b"\n") for line in lines)


async def test_100k_lines_fast_are_all_kept_in_order_with_both_streams(tmp_path: Path) -> None:
    script = "seq 0 99999; echo to-stderr >&2; echo last"
    async with orchestrator(tmp_path) as (service, stub):
        view = await run_job(stub, [sh("many", script)])
        key = OutputKey(view.job.id, "many", None, 1)
        lines = await read_all(service.output, key)
        (described,) = service.output.attempts(view.job.id)
    assert [line.number for line in lines] == list(range(100_002))
    out = [line.data for line in lines if line.stream == OUT]
    assert out == [str(i).encode() for i in range(100_000)] + [b"last"]
    assert [line.data for line in lines if line.stream == ERR] == [b"to-stderr"]
    assert not any(line.continued for line in lines)
    assert all(a.time <= b.time for a, b in itertools.pairwise(lines))
    assert (described.lines, described.dropped_bytes, described.finished) == (100_002, 0, True)
    assert described.final_state == s.STEP_STATE_COMPLETED
    assert described.bytes == sum(len(line.data) for line in lines)
    # The step's message is still its last output line.
    assert view.steps[0].step.message == "exit 0: last"


async def test_bytes_kept_as_printed_and_secrets_masked(tmp_path: Path) -> None:
    secret_file = tmp_path / "api-key"
    secret_file.write_text("file-secret-42\n")
    script = (
        r"printf 'bad \377\376 utf8\n'; printf '\033[31mred\033[0m\n' >&2; printf 'nul\000byte\r\n';"
        r'echo "token=$TOKEN key=$KEY"; printf "no newline at the end"'
    )
    step = sh("bytes", script, env={"TOKEN": {"secret": "hunter2"}, "KEY": {"secret_file": str(secret_file)}})
    async with orchestrator(tmp_path) as (service, stub):
        view = await run_job(stub, [step])
        lines = await read_all(service.output, OutputKey(view.job.id, "bytes", None, 1))
    # (Each stream in its order; how two pipes interleave is test_streams_interleave_in_arrival_order's.)
    assert [line.data for line in lines if line.stream == OUT] == [
        b"bad \xff\xfe utf8", b"nul\x00byte\r", b"token=<secret> key=<secret>", b"no newline at the end",
    ]
    assert [line.data for line in lines if line.stream == ERR] == [b"\x1b[31mred\x1b[0m"]
    assert view.steps[0].step.message == "exit 0: no newline at the end"


async def test_streams_interleave_in_arrival_order(tmp_path: Path) -> None:
    def shut(gate: Path) -> str:
        return f"while [ ! -e {gate} ]; do sleep 0.01; done"

    gates = [tmp_path / "gate-1", tmp_path / "gate-2"]
    script = f"echo one; {shut(gates[0])}; echo two >&2; {shut(gates[1])}; echo three"
    async with orchestrator(tmp_path) as (service, stub):
        submitted = await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition([sh("turns", script)])))
        key = OutputKey(submitted.job.id, "turns", None, 1)
        store = service.output
        await eventually(lambda: asyncio.sleep(0, store.attempts(submitted.job.id) or None), "the attempt to start")
        for last_seen, gate in enumerate(gates, -1):
            while not await store.read(key, last_seen + 1, 1):
                await store.wait(key, last_seen, 60)
            gate.touch()
        await wait_job_state(stub, submitted.job.id, ENDED)
        lines = await read_all(store, key)
    assert [(line.stream, line.data) for line in lines] == [(OUT, b"one"), (ERR, b"two"), (OUT, b"three")]


async def test_a_10_mb_line_is_kept_in_bounded_chunks(tmp_path: Path) -> None:
    size = 10_000_000
    script = f"head -c {size} /dev/zero | tr '\\0' a; echo; echo after"
    async with orchestrator(tmp_path, output_chunk_bytes=65536) as (service, stub):
        view = await run_job(stub, [sh("long", script)])
        key = OutputKey(view.job.id, "long", None, 1)
        lines = await read_all(service.output, key, page=64)
    *chunks, after = lines
    assert all(line.continued for line in chunks[:-1]) and not chunks[-1].continued
    assert max(len(line.data) for line in chunks) == 65536
    assert sum(len(line.data) for line in chunks) == size and {line.data[:1] for line in chunks} == {b"a"}
    assert (after.data, after.continued) == (b"after", False)


def within_limit(lines: list[OutputLine], described: AttemptOutput, expected: list[bytes], limit: int) -> None:
    """`lines` are the first of `expected`, then the notice of what was dropped; kept and dropped make the whole."""
    *kept, notice = lines
    assert [line.data for line in kept] == expected[: len(kept)]
    assert described.bytes == sum(len(line.data) for line in lines)
    assert described.dropped_bytes > 0
    assert described.bytes - len(notice.data) + described.dropped_bytes == sum(map(len, expected))
    assert (notice.stream, notice.data) == (
        NOTICE, f"\u2026 {described.dropped_bytes:,} bytes dropped (limit {limit:,} bytes per attempt) \u2026".encode()
    )


async def test_past_the_limit_lines_are_dropped_counted_and_noticed_while_the_pipe_drains(tmp_path: Path) -> None:
    limit = 100 * (100 + RECORD_OVERHEAD)  # the first 100 lines, however the reads cut them into records
    # 4 MB through a 13 kB limit: the command is never blocked, and its last line is still the message.
    script = "i=0; while [ $i -lt 100 ]; do printf '%099d\\n' $i; i=$((i+1)); done; yes | head -c 4000000; echo done"
    async with orchestrator(tmp_path, output_limit=limit) as (service, stub):
        view = await run_job(stub, [sh("loud", script)])
        lines = await read_all(service.output, OutputKey(view.job.id, "loud", None, 1))
        (described,) = service.output.attempts(view.job.id)
    expected = [b"%099d" % i for i in range(100)] + [b"y"] * 2_000_000 + [b"done"]
    within_limit(lines, described, expected, limit)
    assert len(lines) > 100
    assert view.steps[0].step.state == s.STEP_STATE_COMPLETED
    assert view.steps[0].step.message == "exit 0: done"


async def test_output_over_the_services_rate_is_slowed_never_lost(tmp_path: Path) -> None:
    # 340 kB from two commands at once through a 150 kB/s budget: they wait for it, and lose nothing.
    steps = [sh(f"fast{n}", "seq 0 29999", depends_on=[]) for n in (1, 2)]
    async with orchestrator(tmp_path, output_rate=150_000) as (service, stub):
        view = await run_job(stub, steps)
        outputs = [await read_all(service.output, out.key) for out in service.output.attempts(view.job.id)]
    assert view.job.state == s.JOB_STATE_COMPLETED
    assert [[line.data for line in lines] for lines in outputs] == [[str(i).encode() for i in range(30_000)]] * 2


async def test_a_step_sets_its_own_limit_for_each_attempt_and_child(tmp_path: Path) -> None:
    nine = "i=0; while [ $i -lt 100 ]; do printf '%09d\\n' $i; i=$((i+1)); done"
    limit = 300
    fan = {"name": "fan", "type": "fanout", "count": 2, "output_limit": limit,
           "child": {"type": "command", "command": ["sh", "-c", nine]}}
    async with orchestrator(tmp_path, max_output_limit=limit) as (service, stub):
        view = await run_job(stub, [sh("own", nine, output_limit=limit), fan, sh("default", nine)])
        store = service.output
        outputs = {(out.key.step, out.key.child): (await read_all(store, out.key), out)
                   for out in store.attempts(view.job.id)}
        for too_much in (-1, limit + 1):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SubmitJob(orch_pb.SubmitJobRequest(
                    definition=job_definition([sh("greedy", "true", output_limit=too_much)])
                ))
            error = from_rpc_error(caught.value)
            assert isinstance(error, InvalidArgumentError)
            assert [violation.field for violation in error.violations] == ["definition.steps[0].output_limit"]
    expected = [b"%09d" % i for i in range(100)]
    assert set(outputs) == {("own", None), ("fan", 0), ("fan", 1), ("default", None)}
    for (step, _), (lines, described) in outputs.items():
        if step == "default":
            assert [line.data for line in lines] == expected and described.dropped_bytes == 0
        else:
            within_limit(lines, described, expected, limit)


async def test_each_attempt_has_its_own_output(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    script = (
        f'n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; '
        'echo "attempt $n"; echo "oops $n" >&2; [ $n -ge 3 ]'
    )
    async with orchestrator(tmp_path) as (service, stub):
        view = await run_job(stub, [sh("flaky", script, retries=2, retry_backoff="10ms")])
        store = service.output
        attempts = store.attempts(view.job.id, "flaky")
        contents = [[line.data for line in await read_all(store, out.key)] for out in attempts]
        latest = store.latest_attempt(view.job.id, "flaky", None)
    assert [(out.key.attempt, out.final_state) for out in attempts] == [
        (1, s.STEP_STATE_FAILED), (2, s.STEP_STATE_FAILED), (3, s.STEP_STATE_COMPLETED),
    ]
    assert contents == [[f"attempt {n}".encode(), f"oops {n}".encode()] for n in (1, 2, 3)]
    assert latest == attempts[-1]


def sync_printer(marker: str, count: str) -> str:
    for number in range(int(count)):
        print(f"{marker} {number}")
    logging.getLogger(f"{STEP_LOGGER}.tests").warning("%s logged", marker)
    print(f"{marker} error", file=sys.stderr)
    return "printed"


async def async_printer(marker: str, count: str) -> str:
    for number in range(int(count)):
        print(f"{marker} {number}")
        await asyncio.sleep(0)
    logging.getLogger(STEP_LOGGER).info("%s logged", marker)
    return "printed"


async def test_python_steps_running_at_once_each_capture_their_own_prints_and_logs(tmp_path: Path) -> None:
    steps: list[dict[str, Any]] = [
        {"name": f"{kind}{n}", "type": "python", "depends_on": [],
         "function": f"tests.orchestrator.test_output_capture:{kind}_printer",
         "args": {"marker": f"{kind}{n}", "count": "300"}}
        for kind in ("sync", "async") for n in (1, 2)
    ]
    async with orchestrator(tmp_path) as (service, stub):
        view = await run_job(stub, steps)
        store = service.output
        outputs = {out.key.step: await read_all(store, out.key) for out in store.attempts(view.job.id)}
    assert view.job.state == s.JOB_STATE_COMPLETED
    for kind, n in (("sync", 1), ("sync", 2), ("async", 1), ("async", 2)):
        marker = f"{kind}{n}"
        lines = [(line.stream, line.data.decode()) for line in outputs[marker]]
        printed = [(OUT, f"{marker} {number}") for number in range(300)]
        if kind == "sync":
            assert lines == [*printed, (ERR, f"WARNING {STEP_LOGGER}.tests: {marker} logged"), (ERR, f"{marker} error")]
        else:
            assert lines == [*printed, (ERR, f"INFO {STEP_LOGGER}: {marker} logged")]


class TalkingWorker(Worker):
    """A plugin worker writing lines through its WorkContext."""

    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> list[FieldViolation]:
        return []

    async def run(self, params: Params, context: WorkContext) -> str:
        await context.output.write(PluginStream.STDOUT, b"hello from a plugin\n")
        await context.output.write(PluginStream.STDERR, f"attempt {context.attempt}\n".encode())
        print("and a print")
        await context.output.drain()
        return "talked"


async def test_a_plugin_worker_writes_through_its_context(tmp_path: Path) -> None:
    async with orchestrator(tmp_path, WorkerRegistry({"talk": TalkingWorker()})) as (service, stub):
        view = await run_job(stub, [{"name": "talk", "type": "talk"}])
        lines = await read_all(service.output, OutputKey(view.job.id, "talk", None, 1))
    assert [(line.stream, line.data) for line in lines] == [
        (OUT, b"hello from a plugin"), (ERR, b"attempt 1"), (OUT, b"and a print"),
    ]


async def test_fanout_children_each_have_their_output(tmp_path: Path) -> None:
    fan = {"name": "fan", "type": "fanout", "items": ["a", "b", "c"], "concurrency": 3,
           "child": {"type": "command", "command": ["sh", "-c", 'echo "item $STEPSTREAM_ITEM"']}}
    async with orchestrator(tmp_path) as (service, stub):
        view = await run_job(stub, [fan])
        store = service.output
        children = store.attempts(view.job.id, "fan")
        texts = [[line.data for line in await read_all(store, out.key)] for out in children]
    assert [out.key.child for out in children] == [0, 1, 2]
    assert texts == [[b"item a"], [b"item b"], [b"item c"]]


async def test_cancel_mid_output_leaves_a_readable_finished_attempt(tmp_path: Path) -> None:
    async with orchestrator(tmp_path, output_limit=10_000) as (service, stub):
        submitted = await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition([sh("forever", "yes")])))
        key = OutputKey(submitted.job.id, "forever", None, 1)
        store = service.output

        async def dropping() -> bool | None:
            found = store.attempts(submitted.job.id)
            return True if found and found[0].dropped_bytes else None

        await eventually(dropping, "the output to pass its limit")
        await stub.CancelJob(orch_pb.CancelJobRequest(job_id=submitted.job.id))
        await wait_job_state(stub, submitted.job.id, ENDED)
        (described,) = store.attempts(submitted.job.id)
        lines = await read_all(store, key)
    assert described.finished and described.final_state == s.STEP_STATE_CANCELLED
    assert described.dropped_bytes > 0
    assert {line.data for line in lines[:-1]} <= {b"y"}
    assert lines[-1].stream == NOTICE and len(lines) == described.lines


async def test_a_graceful_stop_finishes_the_attempts_it_stops(tmp_path: Path) -> None:
    service = await start(orchestrator_config(tmp_path / "orchestrator"))
    try:
        async with channel(service.address) as ch:
            stub = Stub(ch)
            submitted = await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition([sh("talk", "yes")])))
            key = OutputKey(submitted.job.id, "talk", None, 1)
            await eventually(lambda: asyncio.sleep(0, service.output.attempts(key.job_id) or None), "the attempt")
            await service.output.wait(key, 100, 60)
    finally:
        await service.stop()
    reopened = OutputStore(service.output.settings)
    await reopened.open()
    try:
        (described,) = reopened.attempts(key.job_id)
        last = (await reopened.read(key, described.lines - 1, 1))[0]
    finally:
        await reopened.close()
    # Closed by the stopping service (not found unfinished by the next one): its own end, no "output ends here".
    assert (described.finished, described.final_state) == (True, s.STEP_STATE_CANCELLED)
    assert (last.stream, last.data) == (OUT, b"y")
