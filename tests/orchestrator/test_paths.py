"""Every state path of a job, step and fan-out child, against a real orchestrator
(loopback gRPC, SQLite in tmp_path, real processes for commands).

Each path asserts the full sequence of records of every entity (state, reason,
attempt), strictly increasing seqs, and that nothing changes after it ended.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream_client.errors import from_rpc_error

from tests.helpers import DEADLINE, eventually, finished, job_definition, job_events, read_events, wait_job_state

if TYPE_CHECKING:
    from stepstream.orchestrator.v1.orchestrator_service_pb2_grpc import OrchestratorServiceAsyncStub as Stub
else:
    Stub = orch_grpc.OrchestratorServiceStub

Event = records_pb2.StepEvent
Key = tuple[Any, ...]
# (state, reason, attempt) for steps and children; (state, reason, cancel requested) for jobs.
Entry = tuple[int, int, int]

# Short names for the expected histories.
PENDING, RUNNING, WAITING = s.STEP_STATE_PENDING, s.STEP_STATE_RUNNING, s.STEP_STATE_WAITING
COMPLETED, FAILED, CANCELLED, SKIPPED = (
    s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED, s.STEP_STATE_CANCELLED, s.STEP_STATE_SKIPPED,
)
J_PENDING, J_RUNNING = s.JOB_STATE_PENDING, s.JOB_STATE_RUNNING
J_COMPLETED, J_FAILED, J_CANCELLED = s.JOB_STATE_COMPLETED, s.JOB_STATE_FAILED, s.JOB_STATE_CANCELLED
OK = s.REASON_UNSPECIFIED
TERMINAL_STEP = {COMPLETED, FAILED, CANCELLED, SKIPPED}
TERMINAL_JOB = {J_COMPLETED, J_FAILED, J_CANCELLED}

JOB: Key = ("job",)


def step_key(name: str) -> Key:
    return ("step", name)


def child_key(step: str, index: int) -> Key:
    return ("child", step, index)


def key_of(event: Event) -> Key:
    kind = event.WhichOneof("record")
    if kind == "job":
        return JOB
    if kind == "step":
        return step_key(event.step.name)
    return child_key(event.child.step_name, event.child.index)


def entry_of(event: Event) -> Entry:
    kind = event.WhichOneof("record")
    if kind == "job":
        return (event.job.state, event.job.reason, int(event.job.HasField("cancel_requested_at")))
    record = event.step if kind == "step" else event.child
    return (record.state, record.reason, record.attempt)


def histories(events: Sequence[Event]) -> dict[Key, list[Entry]]:
    """Every entity's records in seq order."""
    out: dict[Key, list[Entry]] = {}
    for event in events:
        out.setdefault(key_of(event), []).append(entry_of(event))
    return out


def last_of(events: Sequence[Event], key: Key) -> Event:
    return [e for e in events if key_of(e) == key][-1]


def assert_well_formed(events: Sequence[Event]) -> None:
    """One job's events: strictly increasing seqs; nothing changes after it is
    terminal; children end before their step, steps before the job; the job's
    terminal record is the last one."""
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)), f"seqs not strictly increasing: {seqs}"
    ended: dict[Key, int] = {}
    for event in events:
        key = key_of(event)
        assert key not in ended, f"{key} changed after it ended (seq {ended.get(key)}): {event}"
        state = entry_of(event)[0]
        if (key == JOB and state in TERMINAL_JOB) or (key != JOB and state in TERMINAL_STEP):
            ended[key] = event.seq
    assert JOB in ended, "the job never ended"
    assert key_of(events[-1]) == JOB, "the job's terminal record must be its last event"
    for key, seq in ended.items():
        if key[0] == "child":
            assert seq < ended[step_key(key[1])], f"{key} ended after its step"
        if key[0] in ("step", "child"):
            assert seq < ended[JOB], f"{key} ended after the job"


async def submit(
    stub: Stub, steps: Sequence[Mapping[str, Any]], name: str = "test-job", **fields: Any
) -> orch_pb.SubmitJobResponse:
    definition = job_definition(list(steps), name=name, **fields)
    return await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))


async def events_until_finished(stub: Stub, submitted: orch_pb.SubmitJobResponse) -> list[Event]:
    """The job's events, from its first, once its terminal record arrived."""
    job_id = submitted.job.id
    events = await read_events(stub, submitted.seq - 1, finished(job_id))
    mine = job_events(events, job_id)
    assert mine[0].seq == submitted.seq and mine[0].job.state == J_PENDING
    assert_well_formed(mine)
    return mine


async def run_job(stub: Stub, steps: Sequence[Mapping[str, Any]], **fields: Any) -> tuple[str, list[Event]]:
    submitted = await submit(stub, steps, **fields)
    return submitted.job.id, await events_until_finished(stub, submitted)


def sh(script: str, **fields: Any) -> dict[str, Any]:
    return {"type": "command", "command": ["sh", "-c", script], **fields}


def process_gone(pid: int) -> bool:
    """True once `pid` no longer runs. A zombie counts as gone: it has exited and
    only waits to be reaped, which PID 1 in a container may never do."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def wait_for_file(path: Path) -> None:
    async def probe() -> bool | None:
        return True if path.exists() else None

    await eventually(probe, f"{path} to exist")


async def read_pid(path: Path) -> int:
    """The pid in `path` once a whole line was written to it."""

    async def probe() -> int | None:
        text = path.read_text() if path.exists() else ""
        return int(text) if text.endswith("\n") else None

    return await eventually(probe, f"a pid in {path}")


async def wait_gone(pid: int) -> None:
    async def probe() -> bool | None:
        return True if process_gone(pid) else None

    await eventually(probe, f"process {pid} to be gone")


async def read_all(stub: Stub) -> list[Event]:
    """Every event in the log: streams from the start until a heartbeat says
    there is nothing newer than what arrived."""
    events: list[Event] = []
    call = stub.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=0))
    try:
        async with asyncio.timeout(DEADLINE):
            async for message in call:
                events.extend(message.batch.events)
                if message.HasField("heartbeat") and message.heartbeat.latest_seq == (events[-1].seq if events else 0):
                    return events
    finally:
        call.cancel()
    raise AssertionError("stream ended early")


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# --- success and failure -------------------------------------------------------------------------


async def test_success(orchestrator_stub: Stub) -> None:
    job_id, events = await run_job(
        orchestrator_stub,
        [{"name": "one", "type": "sleep", "seconds": 0.01}, sh("echo hi there", name="two")],
    )
    assert histories(events) == {
        JOB: [(J_PENDING, OK, 0), (J_RUNNING, OK, 0), (J_COMPLETED, OK, 0)],
        step_key("one"): [(PENDING, OK, 0), (RUNNING, OK, 1), (COMPLETED, OK, 1)],
        step_key("two"): [(PENDING, OK, 0), (RUNNING, OK, 1), (COMPLETED, OK, 1)],
    }
    # Both steps are created before anything starts; "two" starts only after "one" ended.
    assert [key_of(e) for e in events[:4]] == [JOB, step_key("one"), step_key("two"), JOB]
    assert last_of(events, step_key("one")).seq < [e for e in events if key_of(e) == step_key("two")][1].seq
    assert last_of(events, step_key("two")).step.message == "exit 0: hi there"
    two = last_of(events, step_key("two")).step
    assert two.max_attempts == 1 and two.index == 1 and two.type == "command"
    assert two.HasField("started_at") and two.HasField("finished_at")
    job = events[-1].job
    assert job.id == job_id and job.message == "2 steps completed"
    assert job.HasField("started_at") and job.HasField("finished_at") and not job.HasField("cancel_requested_at")


async def test_command_failure(orchestrator_stub: Stub) -> None:
    _, events = await run_job(
        orchestrator_stub, [sh("echo it broke; exit 3", name="bad"), sh("true", name="after")]
    )
    assert histories(events) == {
        JOB: [(J_PENDING, OK, 0), (J_RUNNING, OK, 0), (J_FAILED, s.REASON_STEP_FAILED, 0)],
        step_key("bad"): [(PENDING, OK, 0), (RUNNING, OK, 1), (FAILED, s.REASON_WORK_FAILED, 1)],
        step_key("after"): [(PENDING, OK, 0), (SKIPPED, s.REASON_DEPENDENCY_FAILED, 0)],
    }
    assert last_of(events, step_key("bad")).step.message == "exit 3: it broke"
    assert "bad (failed)" in last_of(events, step_key("after")).step.message
    assert events[-1].job.message == "failed steps: bad"


async def test_command_that_cannot_start(orchestrator_stub: Stub) -> None:
    _, events = await run_job(
        orchestrator_stub, [{"name": "missing", "type": "command", "command": ["/no/such/program"]}]
    )
    step = last_of(events, step_key("missing")).step
    assert (step.state, step.reason) == (FAILED, s.REASON_WORK_FAILED)
    assert "could not start '/no/such/program'" in step.message
    assert events[-1].job.state == J_FAILED


async def test_retry_then_success(orchestrator_stub: Stub, tmp_path: Path) -> None:
    # Fails on attempts 1 and 2 (the second one creates the marker), succeeds on 3.
    script = (
        "if [ -f marker ]; then echo done; exit 0; fi; echo try >> tries; "
        "if [ $(wc -l < tries) -ge 2 ]; then touch marker; fi; echo not yet; exit 1"
    )
    _, events = await run_job(
        orchestrator_stub, [sh(script, name="flaky", cwd=str(tmp_path), retries=3, retry_backoff="10ms")]
    )
    R = s.REASON_RETRYING
    assert histories(events)[step_key("flaky")] == [
        (PENDING, OK, 0),
        (RUNNING, OK, 1),
        (RUNNING, R, 1),  # attempt 1 failed, backing off
        (RUNNING, R, 2),  # attempt 2 starts
        (RUNNING, R, 2),
        (RUNNING, R, 3),
        (COMPLETED, OK, 3),
    ]
    steps = [e.step for e in events if key_of(e) == step_key("flaky")]
    assert all(step.max_attempts == 4 for step in steps)
    assert steps[2].message == "attempt 1 failed: exit 1: not yet; retrying in 0.01s"
    assert steps[3].message == "attempt 2 of 4; previous: exit 1: not yet"
    assert steps[4].message == "attempt 2 failed: exit 1: not yet; retrying in 0.02s"
    assert steps[-1].message == "exit 0: done"
    # started_at is the first attempt's start and never moves.
    assert len({(st.started_at.seconds, st.started_at.nanos) for st in steps[1:]}) == 1
    assert (tmp_path / "tries").read_text().splitlines() == ["try", "try"]
    assert events[-1].job.state == J_COMPLETED


async def test_retries_exhausted(orchestrator_stub: Stub) -> None:
    _, events = await run_job(orchestrator_stub, [sh("exit 7", name="never", retries=1, retry_backoff="10ms")])
    R = s.REASON_RETRYING
    assert histories(events)[step_key("never")] == [
        (PENDING, OK, 0), (RUNNING, OK, 1), (RUNNING, R, 1), (RUNNING, R, 2), (FAILED, s.REASON_WORK_FAILED, 2),
    ]
    assert last_of(events, step_key("never")).step.message == "exit 7"
    assert events[-1].job.reason == s.REASON_STEP_FAILED


async def test_per_attempt_timeout_stops_the_process_tree(orchestrator_stub: Stub, tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = f"sleep 60 & echo $! > {shlex.quote(str(pid_file))}; wait"
    _, events = await run_job(orchestrator_stub, [sh(script, name="slow", timeout="1s"), sh("true", name="next")])
    assert histories(events) == {
        JOB: [(J_PENDING, OK, 0), (J_RUNNING, OK, 0), (J_FAILED, s.REASON_STEP_FAILED, 0)],
        step_key("slow"): [(PENDING, OK, 0), (RUNNING, OK, 1), (FAILED, s.REASON_TIMEOUT, 1)],
        step_key("next"): [(PENDING, OK, 0), (SKIPPED, s.REASON_DEPENDENCY_FAILED, 0)],
    }
    assert last_of(events, step_key("slow")).step.message == "attempt 1 timed out after 1s"
    text = pid_file.read_text() if pid_file.exists() else ""
    assert text.endswith("\n"), "the command did not get to start its grandchild before the timeout"
    await wait_gone(int(text))


async def test_timeout_then_retry_succeeds(orchestrator_stub: Stub, tmp_path: Path) -> None:
    script = "if [ -f marker ]; then exit 0; fi; touch marker; sleep 60"
    _, events = await run_job(
        orchestrator_stub,
        [sh(script, name="hangs-once", cwd=str(tmp_path), timeout="500ms", retries=1, retry_backoff="10ms")],
    )
    R = s.REASON_RETRYING
    assert histories(events)[step_key("hangs-once")] == [
        (PENDING, OK, 0), (RUNNING, OK, 1), (RUNNING, R, 1), (RUNNING, R, 2), (COMPLETED, OK, 2),
    ]
    records = [e.step for e in events if key_of(e) == step_key("hangs-once")]
    assert records[2].message == "attempt 1 failed: attempt 1 timed out after 0.5s; retrying in 0.01s"


async def test_job_timeout(orchestrator_stub: Stub, tmp_path: Path) -> None:
    started = tmp_path / "started"
    _, events = await run_job(
        orchestrator_stub,
        [
            {"name": "quick", "type": "sleep", "seconds": 0},
            sh(f"touch {shlex.quote(str(started))}; exec sleep 60", name="long"),
            sh("true", name="later"),
            sh("true", name="last", always_run=True),
        ],
        timeout="1s",
    )
    J = s.REASON_JOB_TIMEOUT
    assert histories(events) == {
        JOB: [(J_PENDING, OK, 0), (J_RUNNING, OK, 0), (J_FAILED, J, 0)],
        step_key("quick"): [(PENDING, OK, 0), (RUNNING, OK, 1), (COMPLETED, OK, 1)],
        step_key("long"): [(PENDING, OK, 0), (RUNNING, OK, 1), (FAILED, J, 1)],
        step_key("later"): [(PENDING, OK, 0), (CANCELLED, J, 0)],
        step_key("last"): [(PENDING, OK, 0), (CANCELLED, J, 0)],
    }
    assert started.exists()
    assert events[-1].job.message == "job timed out after 1s"
    assert last_of(events, step_key("long")).step.message == "job timed out after 1s"


async def test_job_timeout_during_fanout(orchestrator_stub: Stub) -> None:
    _, events = await run_job(
        orchestrator_stub,
        [{"name": "fan", "type": "fanout", "count": 4, "concurrency": 2,
          "child": {"type": "command", "command": ["sleep", "60"]}}],
        timeout="1s",
    )
    J = s.REASON_JOB_TIMEOUT
    h = histories(events)
    assert h[JOB][-1] == (J_FAILED, J, 0)
    assert h[step_key("fan")] == [(PENDING, OK, 0), (RUNNING, OK, 1), (WAITING, OK, 1), (FAILED, J, 1)]
    for index in (0, 1):
        assert h[child_key("fan", index)] == [(PENDING, OK, 0), (RUNNING, OK, 1), (FAILED, J, 1)]
    for index in (2, 3):
        assert h[child_key("fan", index)] == [(PENDING, OK, 0), (CANCELLED, J, 0)]


# --- cancel --------------------------------------------------------------------------------------


async def test_cancel_mid_command(orchestrator_stub: Stub, tmp_path: Path) -> None:
    started, termed, after = tmp_path / "started", tmp_path / "termed", tmp_path / "after-ran"
    script = (
        f"trap 'echo TERM > {shlex.quote(str(termed))}; exit 143' TERM; "
        f"touch {shlex.quote(str(started))}; sleep 60 & wait"
    )
    submitted = await submit(
        orchestrator_stub,
        [
            sh(script, name="work"),
            sh(f"touch {shlex.quote(str(after))}", name="after"),
            sh(f"touch {shlex.quote(str(after))}", name="cleanup", always_run=True),
        ],
    )
    await wait_for_file(started)
    response = await orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=submitted.job.id))
    assert response.job.id == submitted.job.id
    assert response.job.HasField("cancel_requested_at")
    assert response.job.state == J_RUNNING  # recorded first, stopped afterwards
    assert response.job.message == "cancellation requested"

    events = await events_until_finished(orchestrator_stub, submitted)
    C = s.REASON_CANCELLED_BY_REQUEST
    assert histories(events) == {
        JOB: [(J_PENDING, OK, 0), (J_RUNNING, OK, 0), (J_RUNNING, OK, 1), (J_CANCELLED, C, 1)],
        step_key("work"): [(PENDING, OK, 0), (RUNNING, OK, 1), (CANCELLED, C, 1)],
        step_key("after"): [(PENDING, OK, 0), (CANCELLED, C, 0)],
        step_key("cleanup"): [(PENDING, OK, 0), (CANCELLED, C, 0)],
    }
    await wait_for_file(termed)
    assert termed.read_text() == "TERM\n"
    assert not after.exists()
    cancel_event = next(e for e in events if e.HasField("job") and e.job.HasField("cancel_requested_at"))
    assert cancel_event.job.cancel_requested_at == response.job.cancel_requested_at
    assert events[-1].job.cancel_requested_at == response.job.cancel_requested_at
    assert events[-1].job.message == "cancelled by request"
    view = await orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id=submitted.job.id))
    assert view.job.state == J_CANCELLED
    assert [(v.step.name, v.step.state) for v in view.steps] == [
        ("work", CANCELLED), ("after", CANCELLED), ("cleanup", CANCELLED),
    ]


async def test_cancel_command_that_ignores_sigterm_is_killed(orchestrator_stub: Stub, tmp_path: Path) -> None:
    # The shell ignores SIGTERM; its python child records the SIGTERM and keeps
    # running: only SIGKILL, after the kill grace, can end either of them.
    child = (
        "import os, pathlib, signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: pathlib.Path('termed').touch())\n"
        "pathlib.Path('child.pid').write_text(f'{os.getpid()}\\n')\n"
        "while True:\n"
        "    time.sleep(0.02)\n"
        "    if pathlib.Path('termed').exists(): pathlib.Path('survived').touch()\n"
    )
    script = f"trap '' TERM; echo $$ > shell.pid; {shlex.quote(sys.executable)} -c {shlex.quote(child)}; echo end"
    submitted = await submit(orchestrator_stub, [sh(script, name="stubborn", cwd=str(tmp_path))])
    child_pid = await read_pid(tmp_path / "child.pid")
    shell_pid = await read_pid(tmp_path / "shell.pid")
    cancel = await orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=submitted.job.id))
    assert cancel.job.HasField("cancel_requested_at")

    events = await events_until_finished(orchestrator_stub, submitted)
    C = s.REASON_CANCELLED_BY_REQUEST
    assert histories(events)[step_key("stubborn")] == [(PENDING, OK, 0), (RUNNING, OK, 1), (CANCELLED, C, 1)]
    assert events[-1].job.state == J_CANCELLED
    # SIGTERM arrived and did not stop it; yet both processes are gone: SIGKILL.
    assert (tmp_path / "termed").exists()
    assert (tmp_path / "survived").exists()
    await wait_gone(child_pid)
    await wait_gone(shell_pid)
    # The stop waited for the kill grace (1s in the fixture) before killing: a lower bound, not a speed check.
    requested = cancel.job.cancel_requested_at.ToNanoseconds()
    assert events[-1].job.finished_at.ToNanoseconds() - requested >= 0.9e9


async def test_cancel_mid_fanout(orchestrator_stub: Stub, tmp_path: Path) -> None:
    child = {"type": "command", "command": ["sh", "-c", "touch started-{index}; exec sleep 60"], "cwd": str(tmp_path)}
    submitted = await submit(
        orchestrator_stub,
        [{"name": "fan", "type": "fanout", "count": 6, "concurrency": 2, "child": child}, sh("true", name="after")],
    )
    await wait_for_file(tmp_path / "started-0")
    await wait_for_file(tmp_path / "started-1")

    async def both_running() -> orch_pb.GetJobResponse | None:
        view = await orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id=submitted.job.id))
        return view if view.steps[0].children.running == 2 else None

    view = await eventually(both_running, "two children running")
    counts = view.steps[0].children
    assert (counts.total, counts.pending, counts.running, counts.completed, counts.failed, counts.cancelled) == (
        6, 4, 2, 0, 0, 0
    )
    assert view.steps[0].step.state == WAITING
    assert view.steps[1].children == records_pb2.ChildCounts()

    cancel = await orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=submitted.job.id))
    events = await events_until_finished(orchestrator_stub, submitted)
    C = s.REASON_CANCELLED_BY_REQUEST
    h = histories(events)
    assert h[step_key("fan")] == [(PENDING, OK, 0), (RUNNING, OK, 1), (WAITING, OK, 1), (CANCELLED, C, 1)]
    assert h[step_key("after")] == [(PENDING, OK, 0), (CANCELLED, C, 0)]
    for index in (0, 1):
        assert h[child_key("fan", index)] == [(PENDING, OK, 0), (RUNNING, OK, 1), (CANCELLED, C, 1)]
    for index in (2, 3, 4, 5):
        assert h[child_key("fan", index)] == [(PENDING, OK, 0), (CANCELLED, C, 0)]
    assert h[JOB][-1] == (J_CANCELLED, C, 1)
    cancel_seq = next(e.seq for e in events if e.HasField("job") and e.job.HasField("cancel_requested_at"))
    assert cancel.job.cancel_requested_at == events[-1].job.cancel_requested_at
    assert not [e for e in events if e.seq > cancel_seq and entry_of(e)[0] == RUNNING and not e.HasField("job")]
    assert sorted(p.name for p in tmp_path.glob("started-*")) == ["started-0", "started-1"]
    final = await orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id=submitted.job.id))
    counts = final.steps[0].children
    assert (counts.total, counts.pending, counts.running, counts.cancelled) == (6, 0, 0, 6)


async def test_cancel_while_children_churn_starts_nothing_after_the_cancel(
    orchestrator_stub: Stub,
) -> None:
    """Many short children finishing all the time: once the cancellation is
    recorded, no child (and no step) may start, even one whose slot freed in the
    same instant."""
    submitted = await submit(
        orchestrator_stub,
        [{"name": "fan", "type": "fanout", "count": 5000, "concurrency": 8,
          "child": {"type": "sleep", "seconds": 0.001}}],
    )

    async def some_completed() -> bool | None:
        view = await orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id=submitted.job.id))
        return True if view.steps[0].children.completed >= 20 else None

    await eventually(some_completed, "children to complete")
    await orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=submitted.job.id))
    events = await events_until_finished(orchestrator_stub, submitted)
    cancel_seq = next(e.seq for e in events if e.HasField("job") and e.job.HasField("cancel_requested_at"))
    started_late = [e.child.index for e in events if e.seq > cancel_seq and e.HasField("child")
                    and e.child.state == RUNNING]
    assert started_late == []
    assert events[-1].job.state == J_CANCELLED
    children = [v for k, v in histories(events).items() if k[0] == "child"]
    assert len(children) == 5000
    assert all(h[-1][0] in (COMPLETED, CANCELLED) for h in children)


async def test_cancel_twice_is_harmless(orchestrator_stub: Stub) -> None:
    submitted = await submit(orchestrator_stub, [sh("exec sleep 60", name="long")])
    await wait_job_state(orchestrator_stub, submitted.job.id, {J_RUNNING})
    first, second = await asyncio.gather(
        orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=submitted.job.id)),
        orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=submitted.job.id)),
    )
    assert first.job.cancel_requested_at == second.job.cancel_requested_at
    events = await events_until_finished(orchestrator_stub, submitted)
    third = await orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=submitted.job.id))
    assert third.job.state == J_CANCELLED
    assert third.job.cancel_requested_at == first.job.cancel_requested_at
    C = s.REASON_CANCELLED_BY_REQUEST
    assert histories(events)[JOB] == [(J_PENDING, OK, 0), (J_RUNNING, OK, 0), (J_RUNNING, OK, 1), (J_CANCELLED, C, 1)]
    # Nothing was recorded after the job ended: the later cancel wrote nothing.
    everything = await read_all(orchestrator_stub)
    assert everything[-1].seq == events[-1].seq
    cancel_records = [e for e in everything if e.HasField("job") and e.job.HasField("cancel_requested_at")
                      and e.job.state == J_RUNNING]
    assert len(cancel_records) == 1


async def test_cancel_finished_jobs(orchestrator_stub: Stub) -> None:
    _, events = await run_job(orchestrator_stub, [{"name": "one", "type": "sleep", "seconds": 0}])
    completed_id = events[-1].job.id
    error = await rpc_error(orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=completed_id)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "completed" in (error.details() or "")

    failed_id, _ = await run_job(orchestrator_stub, [sh("exit 1", name="bad")])
    error = await rpc_error(orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=failed_id)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION

    submitted = await submit(orchestrator_stub, [sh("exec sleep 60", name="long")])
    await orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=submitted.job.id))
    cancelled = await events_until_finished(orchestrator_stub, submitted)
    again = await orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=submitted.job.id))
    assert again.job == cancelled[-1].job
    # Nothing was recorded by any of the refused or repeated cancels.
    view = await orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id=submitted.job.id))
    assert view.seq == cancelled[-1].seq


async def test_cancel_a_pending_job_before_it_starts(orchestrator_stub: Stub) -> None:
    # Submit and cancel in one go: whichever point the run reached, the job ends
    # CANCELLED and its steps never run.
    for _ in range(5):
        submitted = await submit(orchestrator_stub, [sh("exec sleep 60", name="a"), sh("true", name="b")])
        await orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=submitted.job.id))
        events = await events_until_finished(orchestrator_stub, submitted)
        h = histories(events)
        assert h[JOB][-1] == (J_CANCELLED, s.REASON_CANCELLED_BY_REQUEST, 1)
        assert h[step_key("b")] == [(PENDING, OK, 0), (CANCELLED, s.REASON_CANCELLED_BY_REQUEST, 0)]
        assert h[step_key("a")][-1][:2] == (CANCELLED, s.REASON_CANCELLED_BY_REQUEST)


# --- fan-out -------------------------------------------------------------------------------------


def fanout(name: str, child: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": "fanout", "child": dict(child), **fields}


async def test_fanout_under_tolerance(orchestrator_stub: Stub) -> None:
    child = {"type": "command", "command": ["sh", "-c", "test {item} != c"]}
    job_id, events = await run_job(
        orchestrator_stub, [fanout("fan", child, items=["a", "b", "c", "d"], max_child_failures=1)]
    )
    h = histories(events)
    assert h[step_key("fan")] == [(PENDING, OK, 0), (RUNNING, OK, 1), (WAITING, OK, 1), (COMPLETED, OK, 1)]
    for index in (0, 1, 3):
        assert h[child_key("fan", index)] == [(PENDING, OK, 0), (RUNNING, OK, 1), (COMPLETED, OK, 1)]
    assert h[child_key("fan", 2)] == [(PENDING, OK, 0), (RUNNING, OK, 1), (FAILED, s.REASON_WORK_FAILED, 1)]
    assert h[JOB][-1] == (J_COMPLETED, OK, 0)
    assert last_of(events, step_key("fan")).step.message == "3 of 4 children completed, 1 failed (tolerated)"
    assert [last_of(events, child_key("fan", i)).child.item for i in range(4)] == ["a", "b", "c", "d"]
    # The step waits while its children run: WAITING comes after every child
    # is created and before any child starts.
    waiting_seq = next(e.seq for e in events if key_of(e) == step_key("fan") and e.step.state == WAITING)
    assert all(e.seq < waiting_seq for e in events if e.HasField("child") and e.child.state == PENDING)
    assert all(e.seq > waiting_seq for e in events if e.HasField("child") and e.child.state != PENDING)
    view = await orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))
    counts = view.steps[0].children
    assert (counts.total, counts.pending, counts.running, counts.completed, counts.failed, counts.cancelled) == (
        4, 0, 0, 3, 1, 0
    )


async def test_fanout_over_tolerance_sequential(orchestrator_stub: Stub) -> None:
    child = {"type": "command", "command": ["sh", "-c", "exit 1"]}
    _, events = await run_job(
        orchestrator_stub,
        [fanout("fan", child, count=6, concurrency=1, max_child_failures=1), sh("true", name="after")],
    )
    h = histories(events)
    W, F = s.REASON_WORK_FAILED, s.REASON_FANOUT_FAILED
    for index in (0, 1):
        assert h[child_key("fan", index)] == [(PENDING, OK, 0), (RUNNING, OK, 1), (FAILED, W, 1)]
    for index in (2, 3, 4, 5):
        assert h[child_key("fan", index)] == [(PENDING, OK, 0), (CANCELLED, F, 0)]
    assert h[step_key("fan")][-1] == (FAILED, s.REASON_CHILD_FAILURES, 1)
    assert h[step_key("after")] == [(PENDING, OK, 0), (SKIPPED, s.REASON_DEPENDENCY_FAILED, 0)]
    assert h[JOB][-1] == (J_FAILED, s.REASON_STEP_FAILED, 0)
    assert last_of(events, step_key("fan")).step.message == (
        "0 of 6 children completed, 2 failed, 4 cancelled (more than the 1 tolerated)"
    )


async def test_fanout_over_tolerance_stops_running_children(orchestrator_stub: Stub, tmp_path: Path) -> None:
    # Children 0 and 1 fail at once; 2 runs "forever" and must be stopped.
    child = {
        "type": "command",
        "command": ["sh", "-c", "case {item} in fail*) exit 1;; esac; echo $$ > {item}.pid; exec sleep 60"],
        "cwd": str(tmp_path),
    }
    _, events = await run_job(
        orchestrator_stub,
        [fanout("fan", child, items=["fail0", "fail1", "slow", "x", "y"], concurrency=3, max_child_failures=1)],
    )
    h = histories(events)
    W, F = s.REASON_WORK_FAILED, s.REASON_FANOUT_FAILED
    for index in (0, 1):
        assert h[child_key("fan", index)] == [(PENDING, OK, 0), (RUNNING, OK, 1), (FAILED, W, 1)]
    assert h[child_key("fan", 2)] == [(PENDING, OK, 0), (RUNNING, OK, 1), (CANCELLED, F, 1)]
    for index in (3, 4):  # may have started in the slot child 0 freed; never completed
        assert h[child_key("fan", index)][-1][:2] == (CANCELLED, F)
    assert h[step_key("fan")][-1] == (FAILED, s.REASON_CHILD_FAILURES, 1)
    assert h[JOB][-1] == (J_FAILED, s.REASON_STEP_FAILED, 0)
    # The job has ended, so every pid file is final (empty if its shell was
    # stopped between creating the file and writing to it).
    pid_files = [p.read_text() for p in tmp_path.glob("*.pid")]
    for text in pid_files:
        if text.strip():
            await wait_gone(int(text))


async def test_fanout_over_tolerance_starts_no_child_after_the_decisive_failure(orchestrator_stub: Stub) -> None:
    """Once more children failed than tolerated, the step's failure is certain:
    no further child may start, even one whose slot freed at that instant."""
    child = {"type": "python", "function": "tests.helpers.workers:fail_odd", "args": {"index": "{index}"}}
    steps = [fanout("fan", child, count=400, concurrency=8, max_child_failures=5)]
    # Several at once: more chances for a slot to free in the same instant.
    runs = await asyncio.gather(*(run_job(orchestrator_stub, steps) for _ in range(4)))
    for _, events in runs:
        failures = [e.seq for e in events if e.HasField("child") and e.child.state == FAILED]
        assert len(failures) >= 6
        decisive = failures[5]
        late = [e.child.index for e in events
                if e.HasField("child") and e.seq > decisive and e.child.state == RUNNING]
        assert late == []
        h = histories(events)
        assert h[step_key("fan")][-1] == (FAILED, s.REASON_CHILD_FAILURES, 1)
        never_started = [k for k, v in h.items() if k[0] == "child" and len(v) == 2]
        assert never_started
        assert all(h[k][-1][:2] == (CANCELLED, s.REASON_FANOUT_FAILED) for k in never_started)


async def test_fanout_all_children_failing_is_failed_whatever_the_tolerance(orchestrator_stub: Stub) -> None:
    child = {"type": "command", "command": ["sh", "-c", "exit 2"]}
    _, events = await run_job(orchestrator_stub, [fanout("fan", child, count=3, max_child_failures=100_000)])
    h = histories(events)
    for index in range(3):
        assert h[child_key("fan", index)][-1] == (FAILED, s.REASON_WORK_FAILED, 1)
    assert h[step_key("fan")][-1] == (FAILED, s.REASON_CHILD_FAILURES, 1)
    assert last_of(events, step_key("fan")).step.message == "0 of 3 children completed, 3 failed: none completed"
    assert h[JOB][-1] == (J_FAILED, s.REASON_STEP_FAILED, 0)


async def test_fanout_with_no_children(orchestrator_stub: Stub) -> None:
    no_children: list[dict[str, Any]] = [{"count": 0}, {"items": []}]
    for fields in no_children:
        job_id, events = await run_job(
            orchestrator_stub, [fanout("fan", {"type": "sleep", "seconds": 0}, **fields), sh("true", name="after")]
        )
        h = histories(events)
        assert h[step_key("fan")] == [
            (PENDING, OK, 0), (RUNNING, OK, 1), (WAITING, OK, 1), (COMPLETED, s.REASON_NO_CHILDREN, 1),
        ]
        assert h[step_key("after")][-1] == (COMPLETED, OK, 1)
        assert h[JOB][-1] == (J_COMPLETED, OK, 0)
        assert not [k for k in h if k[0] == "child"]
        view = await orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))
        assert view.steps[0].children.total == 0


async def test_fanout_item_and_index_substitution(orchestrator_stub: Stub, tmp_path: Path) -> None:
    child = {
        "type": "command",
        "command": ["sh", "-c", "echo \"{item} at {index} $GREETING\" > out-{index}.txt"],
        "env": {"GREETING": "hi-{item}"},
        "cwd": str(tmp_path),
    }
    _, events = await run_job(orchestrator_stub, [fanout("fan", child, items=["x", "y z", 3, 2.5], concurrency=2)])
    assert events[-1].job.state == J_COMPLETED
    assert [(tmp_path / f"out-{i}.txt").read_text() for i in range(4)] == [
        "x at 0 hi-x\n", "y z at 1 hi-y z\n", "3 at 2 hi-3\n", "2.5 at 3 hi-2.5\n",
    ]
    assert [(last_of(events, child_key("fan", i)).child.index, last_of(events, child_key("fan", i)).child.item)
            for i in range(4)] == [(0, "x"), (1, "y z"), (2, "3"), (3, "2.5")]


async def test_fanout_child_retries_and_timeouts(orchestrator_stub: Stub, tmp_path: Path) -> None:
    child = {
        "type": "command",
        "command": ["sh", "-c", "if [ -f m-{index} ]; then exit 0; fi; touch m-{index}; exit 1"],
        "cwd": str(tmp_path),
        "retries": 1,
        "retry_backoff": "10ms",
    }
    _, events = await run_job(orchestrator_stub, [fanout("fan", child, count=2)])
    R = s.REASON_RETRYING
    h = histories(events)
    for index in (0, 1):
        assert h[child_key("fan", index)] == [
            (PENDING, OK, 0), (RUNNING, OK, 1), (RUNNING, R, 1), (RUNNING, R, 2), (COMPLETED, OK, 2),
        ]
    assert h[JOB][-1] == (J_COMPLETED, OK, 0)

    _, events = await run_job(
        orchestrator_stub,
        [fanout("fan", {"type": "command", "command": ["sleep", "60"], "timeout": "300ms"}, count=2,
                max_child_failures=5)],
    )
    h = histories(events)
    for index in (0, 1):
        assert h[child_key("fan", index)] == [(PENDING, OK, 0), (RUNNING, OK, 1), (FAILED, s.REASON_TIMEOUT, 1)]
    assert h[step_key("fan")][-1] == (FAILED, s.REASON_CHILD_FAILURES, 1)


# --- dependencies ----------------------------------------------------------------------------------


async def test_skip_and_always_run(orchestrator_stub: Stub, tmp_path: Path) -> None:
    ran = tmp_path / "cleanup-ran"
    _, events = await run_job(
        orchestrator_stub,
        [
            sh("exit 1", name="build"),
            sh("true", name="test"),                                   # depends on build
            sh("true", name="deploy", depends_on=["test"]),            # depends on a skipped step
            sh(f"touch {shlex.quote(str(ran))}", name="cleanup", depends_on=["build"], always_run=True),
            sh("true", name="independent", depends_on=[]),
        ],
    )
    D = s.REASON_DEPENDENCY_FAILED
    assert histories(events) == {
        JOB: [(J_PENDING, OK, 0), (J_RUNNING, OK, 0), (J_FAILED, s.REASON_STEP_FAILED, 0)],
        step_key("build"): [(PENDING, OK, 0), (RUNNING, OK, 1), (FAILED, s.REASON_WORK_FAILED, 1)],
        step_key("test"): [(PENDING, OK, 0), (SKIPPED, D, 0)],
        step_key("deploy"): [(PENDING, OK, 0), (SKIPPED, D, 0)],
        step_key("cleanup"): [(PENDING, OK, 0), (RUNNING, OK, 1), (COMPLETED, OK, 1)],
        step_key("independent"): [(PENDING, OK, 0), (RUNNING, OK, 1), (COMPLETED, OK, 1)],
    }
    assert ran.exists()
    assert last_of(events, step_key("deploy")).step.message == "dependencies did not complete: test (skipped)"
    assert events[-1].job.message == "failed steps: build"
    # cleanup started only once build had failed.
    build_failed = last_of(events, step_key("build")).seq
    assert [e for e in events if key_of(e) == step_key("cleanup")][1].seq > build_failed


async def test_always_run_after_success_and_dependency_order(orchestrator_stub: Stub) -> None:
    _, events = await run_job(
        orchestrator_stub,
        [
            sh("true", name="a", depends_on=[]),
            sh("true", name="b", depends_on=["c"]),  # declared before the step it waits for
            sh("true", name="c", depends_on=["a"]),
            sh("true", name="z", depends_on=["a", "b"], always_run=True),
        ],
    )
    assert events[-1].job.state == J_COMPLETED
    start = {k[1]: e.seq for e in events if (k := key_of(e))[0] == "step" and e.step.state == RUNNING}
    end = {k[1]: e.seq for e in events if (k := key_of(e))[0] == "step" and e.step.state == COMPLETED}
    assert end["a"] < start["c"] and end["c"] < start["b"] and end["b"] < start["z"]


async def test_independent_steps_run_concurrently(orchestrator_stub: Stub, tmp_path: Path) -> None:
    # Each waits until the other has started: both can only complete if they overlap.
    def meet(me: str, other: str) -> dict[str, Any]:
        script = f"touch {me}; while [ ! -f {other} ]; do sleep 0.01; done"
        return sh(script, name=me, depends_on=[], cwd=str(tmp_path), timeout="30s")

    _, events = await run_job(
        orchestrator_stub,
        [meet("left", "right"), meet("right", "left"), sh("true", name="join", depends_on=["left", "right"])],
    )
    h = histories(events)
    assert h[step_key("left")][-1] == (COMPLETED, OK, 1)
    assert h[step_key("right")][-1] == (COMPLETED, OK, 1)
    assert h[step_key("join")] == [(PENDING, OK, 0), (RUNNING, OK, 1), (COMPLETED, OK, 1)]
    started = [e.seq for e in events if e.HasField("step") and e.step.state == RUNNING]
    ended = [e.seq for e in events if e.HasField("step") and e.step.name != "join" and e.step.state == COMPLETED]
    assert max(started[:2]) < min(ended)


# --- python worker ---------------------------------------------------------------------------------


def python_step(step: str, function: str, args: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    definition: dict[str, Any] = {
        "name": step, "type": "python", "function": f"tests.helpers.workers:{function}", **fields,
    }
    if args is not None:
        definition["args"] = dict(args)
    return definition


async def test_python_worker(orchestrator_stub: Stub, tmp_path: Path) -> None:
    _, events = await run_job(
        orchestrator_stub,
        [
            python_step("async", "async_greet", {"name": "world", "path": str(tmp_path / "greeting")}),
            python_step("sync", "sync_write", {"path": str(tmp_path / "written"), "text": "some text"}),
            python_step("number", "sync_returns_number"),
        ],
    )
    h = histories(events)
    for name in ("async", "sync", "number"):
        assert h[step_key(name)] == [(PENDING, OK, 0), (RUNNING, OK, 1), (COMPLETED, OK, 1)]
    assert last_of(events, step_key("async")).step.message == "hello world"
    assert last_of(events, step_key("sync")).step.message == "wrote 9 characters"
    assert last_of(events, step_key("number")).step.message == "returned"
    assert (tmp_path / "greeting").read_text() == "hello world"
    assert (tmp_path / "written").read_text() == "some text"
    assert events[-1].job.state == J_COMPLETED


async def test_python_worker_exceptions(orchestrator_stub: Stub) -> None:
    _, events = await run_job(
        orchestrator_stub,
        [
            python_step("sync", "raises_value_error", {"detail": "42"}, depends_on=[]),
            python_step("async", "async_raises", {"detail": "7"}, depends_on=[]),
            python_step("bad-args", "sync_write", {"nonsense": "1"}, depends_on=[]),
        ],
    )
    W = s.REASON_WORK_FAILED
    h = histories(events)
    for name in ("sync", "async", "bad-args"):
        assert h[step_key(name)] == [(PENDING, OK, 0), (RUNNING, OK, 1), (FAILED, W, 1)]
    assert last_of(events, step_key("sync")).step.message == "ValueError: boom: 42"
    assert last_of(events, step_key("async")).step.message == "RuntimeError: async boom: 7"
    assert last_of(events, step_key("bad-args")).step.message.startswith("TypeError: ")
    assert h[JOB][-1] == (J_FAILED, s.REASON_STEP_FAILED, 0)


async def test_python_worker_in_fanout(orchestrator_stub: Stub, tmp_path: Path) -> None:
    child = {"type": "python", "function": "tests.helpers.workers:sync_write",
             "args": {"path": str(tmp_path / "f-{index}"), "text": "{item}"}}
    _, events = await run_job(orchestrator_stub, [fanout("fan", child, items=["p", "q"])])
    assert events[-1].job.state == J_COMPLETED
    assert [(tmp_path / f"f-{i}").read_text() for i in range(2)] == ["p", "q"]


# --- reading jobs ---------------------------------------------------------------------------------


async def test_get_job(orchestrator_stub: Stub) -> None:
    definition = job_definition(
        [
            {"name": "fan", "type": "fanout", "items": ["a", "b", "c"], "max_child_failures": 1,
             "child": {"type": "command", "command": ["sh", "-c", "test {item} != b"]}},
            {"name": "rest", "type": "sleep", "seconds": 0},
        ],
        name="viewed",
    )
    submitted = await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))
    events = await events_until_finished(orchestrator_stub, submitted)
    view = await orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id=submitted.job.id))
    assert view.job == events[-1].job
    assert view.definition == definition
    assert view.seq >= events[-1].seq
    assert [v.step for v in view.steps] == [last_of(events, step_key(name)).step for name in ("fan", "rest")]
    fan = view.steps[0].children
    assert (fan.total, fan.pending, fan.running, fan.completed, fan.failed, fan.cancelled) == (3, 0, 0, 2, 1, 0)
    assert view.steps[1].children == records_pb2.ChildCounts()


async def test_list_jobs_filters_and_pages(orchestrator_stub: Stub) -> None:
    ok: list[Mapping[str, Any]] = [{"name": "s", "type": "sleep", "seconds": 0}]
    bad: list[Mapping[str, Any]] = [sh("exit 1", name="s")]
    created: list[tuple[str, str, int]] = []
    for name, steps in (("alpha", ok), ("alpha", bad), ("beta", ok), ("alpha", ok), ("beta", bad), ("alpha", ok)):
        job_id, events = await run_job(orchestrator_stub, steps, name=name)
        created.append((job_id, name, events[-1].job.state))
    running = await submit(orchestrator_stub, [sh("exec sleep 60", name="s")], name="alpha")
    await wait_job_state(orchestrator_stub, running.job.id, {J_RUNNING})
    created.append((running.job.id, "alpha", J_RUNNING))
    newest_first = list(reversed(created))

    async def listed(**request: Any) -> list[str]:
        response = await orchestrator_stub.ListJobs(orch_pb.ListJobsRequest(**request))
        assert response.next_page_token == ""
        return [job.id for job in response.jobs]

    assert await listed() == [c[0] for c in newest_first]
    assert await listed(name="alpha") == [c[0] for c in newest_first if c[1] == "alpha"]
    assert await listed(states=[J_COMPLETED]) == [c[0] for c in newest_first if c[2] == J_COMPLETED]
    assert await listed(states=[J_FAILED, J_RUNNING]) == [c[0] for c in newest_first if c[2] in (J_FAILED, J_RUNNING)]
    assert await listed(states=[J_COMPLETED], name="beta") == [
        c[0] for c in newest_first if c[2] == J_COMPLETED and c[1] == "beta"
    ]
    assert await listed(name="gamma") == []
    assert await listed(states=[J_CANCELLED]) == []

    pages: list[list[str]] = []
    token = ""
    while True:
        response = await orchestrator_stub.ListJobs(
            orch_pb.ListJobsRequest(page_size=3, page_token=token)
        )
        pages.append([job.id for job in response.jobs])
        token = response.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [job_id for page in pages for job_id in page] == [c[0] for c in newest_first]

    # Paging composes with a filter.
    first = await orchestrator_stub.ListJobs(orch_pb.ListJobsRequest(name="alpha", page_size=2))
    second = await orchestrator_stub.ListJobs(
        orch_pb.ListJobsRequest(name="alpha", page_size=2, page_token=first.next_page_token)
    )
    third = await orchestrator_stub.ListJobs(
        orch_pb.ListJobsRequest(name="alpha", page_size=2, page_token=second.next_page_token)
    )
    assert [j.id for j in [*first.jobs, *second.jobs, *third.jobs]] == [c[0] for c in newest_first if c[1] == "alpha"]
    assert third.next_page_token == ""

    for bad_request in (
        orch_pb.ListJobsRequest(page_token="not-a-token"),
        orch_pb.ListJobsRequest(page_size=-1),
        orch_pb.ListJobsRequest(states=[s.JobState.ValueType(99)]),
    ):
        error = await rpc_error(orchestrator_stub.ListJobs(bad_request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert from_rpc_error(error).violations


async def test_unknown_and_missing_job_ids(orchestrator_stub: Stub) -> None:
    for call in (
        orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id="no-such-job")),
        orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id="no-such-job")),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-job" in (error.details() or "")
    for call in (
        orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id="")),
        orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id="")),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [(v.field, v.description) for v in from_rpc_error(error).violations] == [("job_id", "is required")]


async def test_idempotent_submit(orchestrator_stub: Stub) -> None:
    definition = job_definition([sh("exec sleep 60", name="long")], name="once")
    request = orch_pb.SubmitJobRequest(definition=definition, request_id="req-1")
    first = await orchestrator_stub.SubmitJob(request)
    again = await orchestrator_stub.SubmitJob(request)
    assert again.job.id == first.job.id
    assert again.seq == first.seq, "the answer names the job's first event, as the first one did"
    other = job_definition([sh("exec sleep 1", name="other")], name="once")
    reused = await rpc_error(orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=other,
                                                                                  request_id="req-1")))
    assert reused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert first.job.id in (reused.details() or "")
    concurrent = await asyncio.gather(
        *(orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition, request_id="req-2"))
          for _ in range(5))
    )
    assert len({r.job.id for r in concurrent}) == 1
    assert concurrent[0].job.id != first.job.id
    listed = await orchestrator_stub.ListJobs(orch_pb.ListJobsRequest())
    assert sorted(j.id for j in listed.jobs) == sorted({first.job.id, concurrent[0].job.id})
    # Exactly one job record was created per request id (one PENDING job event each).
    events = await read_all(orchestrator_stub)
    created = [e.job.id for e in events if e.HasField("job") and e.job.state == J_PENDING]
    assert sorted(created) == sorted({first.job.id, concurrent[0].job.id})
    for job_id in (first.job.id, concurrent[0].job.id):
        await orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=job_id))
    # After the job ended the key still finds it.
    await wait_job_state(orchestrator_stub, first.job.id, {J_CANCELLED})
    late = await orchestrator_stub.SubmitJob(request)
    assert late.job.id == first.job.id and late.job.state == J_CANCELLED

    too_long = orch_pb.SubmitJobRequest(definition=definition, request_id="x" * 201)
    error = await rpc_error(orchestrator_stub.SubmitJob(too_long))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in from_rpc_error(error).violations] == ["request_id"]


async def test_concurrent_reads(orchestrator_stub: Stub) -> None:
    """Many clients reading at once (GetJob, CancelJob of finished jobs, ListJobs,
    streams replaying from storage) each get their own correct answer."""
    job_id, events = await run_job(orchestrator_stub, [{"name": "one", "type": "sleep", "seconds": 0}])
    gets = [orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id=job_id)) for _ in range(20)]
    missing = [orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id=f"nope-{i}"))
               for i in range(10)]
    lists = [orchestrator_stub.ListJobs(orch_pb.ListJobsRequest()) for _ in range(10)]
    cancels = [orchestrator_stub.CancelJob(orch_pb.CancelJobRequest(job_id=job_id)) for _ in range(10)]
    streams = [read_events(orchestrator_stub, 0, finished(job_id)) for _ in range(10)]
    results = await asyncio.gather(*gets, *missing, *lists, *cancels, *streams, return_exceptions=True)
    views = results[:20]
    assert all(isinstance(v, orch_pb.GetJobResponse) and v.job == events[-1].job for v in views)
    for error in results[20:30]:
        assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.NOT_FOUND, error
    for listed in results[30:40]:
        assert isinstance(listed, orch_pb.ListJobsResponse)
        assert [j.id for j in listed.jobs] == [job_id]
    for error in results[40:50]:
        assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
    for streamed in results[50:]:
        assert isinstance(streamed, list) and job_events(streamed, job_id) == events
