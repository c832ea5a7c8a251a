"""Any request may vanish at any await (invariant 8), over the wire.

The storm: real services as real processes on loopback ports, a fan-out job
running, and 20 workers calling every RPC of both services at once with random
short deadlines, client-side cancels of unary calls and streams cancelled a few
milliseconds after opening or after a few messages; valid requests and invalid
ones. It is bounded in time and in count. Only the codes a client may expect
are allowed (never UNKNOWN, INTERNAL or UNAVAILABLE). Afterwards both services
are healthy and answer correctly, ingest still runs, the orchestrator's log is
1..N exactly once, every job (the storm's own submissions included) ends,
and a fresh status service that follows the log from seq 0 ends with the same
jobs, step_stats and children, row by row, as the first one and as the
orchestrator.

The seed is printed; rerun one with STEPSTREAM_STORM_SEED=<seed>. (The choices
each worker makes come from the seed; how they interleave with the job does
not, so a rerun reproduces the load, not the exact schedule.)

The smaller test does the same thing without chance: 200 GetJob calls per
service with a 1 ms deadline (in waves of 1..19 concurrent calls, which moves
the await the server-side cancel lands on) and 100 WatchJob streams cancelled
0-10 ms after opening, then ordinary calls that must answer with the right,
current content.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import definition_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.states import TERMINAL_JOB_STATES
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from status_svc.app import DATABASE_FILE
from tests.helpers import (
    DEADLINE,
    ServiceProcess,
    channel,
    eventually,
    job_definition,
    open_sqlite_readonly,
    orchestrator_process,
    read_watch,
    read_whole_log,
    status_job_finished,
    status_process,
    wait_job_state,
    wait_status_job,
    watch_until,
)
from tests.status.test_paths import assert_status_equals_orchestrator

if TYPE_CHECKING:
    OrchStub = orch_grpc.OrchestratorServiceAsyncStub
    StatusStub = status_grpc.StatusServiceAsyncStub

Code = grpc.StatusCode

ACCEPTABLE = frozenset({
    Code.OK, Code.DEADLINE_EXCEEDED, Code.CANCELLED, Code.NOT_FOUND, Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE,
    Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED,
})
# A stream that delivers nothing (not even a heartbeat) for this long is hung:
# counted as a bad outcome, never waited on longer.
HANG = 15.0
GENEROUS = 5.0

# The storm's bounds.
WORKERS = 20
STORM_SECONDS = 6.0
CALLS_PER_WORKER = 400

# The job that runs under the storm.
PY_CHILDREN = 240
SLEEP_CHILDREN = 240
FAIL_EVERY = 37  # flaky_child fails when FAIL_EVERY divides its index (0 included)
UNKNOWN_JOB = "no-such-job-0000"


def fan_out_job() -> definition_pb2.JobDefinition:
    """Two fan-outs side by side between ordinary steps: python children (some
    fail, all tolerated) and sleep children, then a real command."""
    python_child = {
        "type": "python", "function": "tests.helpers:flaky_child",
        "args": {"index": "{index}", "fail_every": str(FAIL_EVERY), "delay": "0.12"},
    }
    return job_definition([
        {"name": "prepare", "type": "sleep", "seconds": 0.05},
        {"name": "crawl", "type": "fanout", "count": PY_CHILDREN, "concurrency": 6,
         "max_child_failures": PY_CHILDREN, "child": python_child},
        {"name": "naps", "type": "fanout", "count": SLEEP_CHILDREN, "concurrency": 4, "depends_on": ["prepare"],
         "child": {"type": "sleep", "seconds": 0.1}},
        {"name": "report", "type": "command", "command": [sys.executable, "-c", "print('report')"],
         "depends_on": ["crawl", "naps"]},
    ], name="storm-fan-out")


FAN_OUT_STEPS = ("crawl", "naps")
QUICK: list[Mapping[str, Any]] = [{"name": "one", "type": "sleep", "seconds": 0}]
SHORT: list[Mapping[str, Any]] = [
    {"name": "nap", "type": "sleep", "seconds": 0.3}, {"name": "then", "type": "sleep", "seconds": 0},
]
BAD_DEFINITION = definition_pb2.JobDefinition(
    name="bad", steps=[definition_pb2.StepDefinition(name="x", type="no-such-worker")]
)


# --- services as processes -------------------------------------------------------------------------------------


@asynccontextmanager
async def running(process: ServiceProcess) -> AsyncIterator[str]:
    try:
        yield await asyncio.to_thread(process.start)
    finally:
        await asyncio.to_thread(process.stop)


def alive(process: ServiceProcess) -> bool:
    return process.process is not None and process.process.poll() is None


async def health_status(address: str, service: str = "") -> int:
    async with channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE)
        return int(response.status)


def cursor_of(status_dir: Path, orchestrator: str) -> int:
    """The seq up to which the status service at `status_dir` has committed (its stored cursor)."""
    try:
        db = open_sqlite_readonly(status_dir / DATABASE_FILE)
    except sqlite3.OperationalError:
        return 0
    try:
        rows = db.execute("SELECT cursor FROM sources WHERE address = ?", (orchestrator,)).fetchall()
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    finally:
        db.close()
    return int(rows[0][0]) if rows else 0


async def wait_cursor(status_dir: Path, orchestrator: str, seq: int, what: str) -> None:
    async def probe() -> bool | None:
        return True if cursor_of(status_dir, orchestrator) >= seq else None

    await eventually(probe, what)


# Columns that legitimately differ between two status services fed the same log:
# revisions are each service's own numbering (and depend on how events were
# batched into transactions). lost_since/lost_detail are freshness bookkeeping,
# but stay in the comparison: both are empty for healthy, finished jobs.
TABLE_KEYS = {
    "jobs": ("job_id",),
    "step_stats": ("job_id", "idx", "name"),
    "children": ("job_id", "step", "idx"),
}
EXCLUDED_COLUMNS = {"revision"}


def table_rows(status_dir: Path, table: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Every row of `table` without the excluded columns, in key order."""
    db = open_sqlite_readonly(status_dir / DATABASE_FILE)
    try:
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        kept = [c for c in columns if c not in EXCLUDED_COLUMNS]
        rows = db.execute(f"SELECT {', '.join(kept)} FROM {table} ORDER BY {', '.join(TABLE_KEYS[table])}").fetchall()
    finally:
        db.close()
    return kept, [tuple(row) for row in rows]


def assert_same_rows(table: str, first: Path, fresh: Path) -> int:
    columns, ours = table_rows(first, table)
    _, theirs = table_rows(fresh, table)
    assert len(ours) == len(theirs), f"{table}: {len(ours)} rows in the first status service, {len(theirs)} in the new"
    for row, other in zip(ours, theirs, strict=True):
        if row != other:
            diff = {c: (a, b) for c, a, b in zip(columns, row, other, strict=True) if a != b}
            raise AssertionError(f"{table} row {row[:3]} differs (first, fresh): {diff}")
    return len(ours)


def without_revisions(response: status_pb.GetJobResponse) -> status_pb.GetJobResponse:
    copy = status_pb.GetJobResponse()
    copy.CopyFrom(response)
    copy.revision = 0
    copy.job.revision = 0
    for stats in copy.steps:
        stats.revision = 0
    return copy


# --- the storm -------------------------------------------------------------------------------------------------


@dataclass
class Known:
    """What the workers have learnt so far, to make valid requests with."""

    job_id: str
    storm_jobs: list[str] = field(default_factory=list)
    latest_seq: int = 0
    latest_revision: int = 0
    job_tokens: list[str] = field(default_factory=list)
    status_job_tokens: list[str] = field(default_factory=list)
    child_tokens: dict[str, list[str]] = field(default_factory=dict)

    def some_job(self, rng: random.Random) -> str:
        roll = rng.random()
        if roll < 0.6 or not self.storm_jobs:
            return self.job_id if roll < 0.9 else UNKNOWN_JOB
        return rng.choice(self.storm_jobs)


@dataclass
class Tally:
    codes: Counter[str] = field(default_factory=Counter)
    by_method: Counter[tuple[str, str]] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)

    def add(self, method: str, outcome: Code | str, detail: str = "") -> None:
        name = outcome.name if isinstance(outcome, Code) else outcome
        self.codes[name] += 1
        self.by_method[(method, name)] += 1
        if (not isinstance(outcome, Code) or outcome not in ACCEPTABLE) and len(self.bad) < 20:
            self.bad.append(f"{method}: {name} {detail}".strip())

    def report(self) -> str:
        lines = ["outcomes: " + ", ".join(f"{name}={count}" for name, count in self.codes.most_common())]
        methods = sorted({method for method, _ in self.by_method})
        for method in methods:
            counts = {code: n for (m, code), n in self.by_method.items() if m == method}
            lines.append(f"  {method}: " + ", ".join(f"{c}={n}" for c, n in sorted(counts.items())))
        return "\n".join(lines)


def deadline(rng: random.Random) -> float:
    """0.5 ms .. 20 ms, log-uniform; sometimes generous."""
    if rng.random() < 0.15:
        return GENEROUS
    return math.exp(rng.uniform(math.log(0.0005), math.log(0.02)))


# What a call ended with: its code (or "HANG") and, for a bad one, the details.
Outcome = tuple[Code | str, str]


async def unary(rng: random.Random, call: Any) -> tuple[Outcome, Any]:
    """Finish a unary call, cancelling it from the client side now and then."""
    if rng.random() < 0.15:
        await asyncio.sleep(rng.uniform(0, 0.01))
        call.cancel()
    code: Code = await call.code()
    details = "" if code in ACCEPTABLE else str(await call.details())
    return (code, details), (await call) if code == Code.OK else None


async def stream(rng: random.Random, call: Any, on_message: Callable[[Any], None]) -> Outcome:
    """Cancel a stream 0..30 ms after opening it, or after reading a few messages."""
    try:
        if rng.random() < 0.5:
            await asyncio.sleep(rng.uniform(0, 0.03))
        else:
            async with asyncio.timeout(HANG):
                for _ in range(rng.randint(1, 6)):
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        break
                    on_message(message)
    except grpc.aio.AioRpcError as error:
        return error.code(), "" if error.code() in ACCEPTABLE else str(error.details())
    except TimeoutError:
        call.cancel()
        return "HANG", f"no message for {HANG} s"
    call.cancel()
    code: Code = await call.code()
    return code, "" if code in ACCEPTABLE else str(await call.details())


def stream_timeout(rng: random.Random) -> float | None:
    return deadline(rng) if rng.random() < 0.3 else None


class Storm:
    def __init__(self, orch: OrchStub, status: StatusStub, known: Known, tally: Tally) -> None:
        self.orch = orch
        self.status = status
        self.known = known
        self.tally = tally
        self.ops: list[tuple[str, Callable[[random.Random], Awaitable[Outcome]]]] = [
            ("orch.SubmitJob", self.submit_job),
            ("orch.CancelJob", self.cancel_job),
            ("orch.GetJob", self.orch_get_job),
            ("orch.GetJob", self.orch_get_job),
            ("orch.ListJobs", self.orch_list_jobs),
            ("orch.StreamStepEvents", self.stream_step_events),
            ("orch.StreamStepEvents", self.stream_step_events),
            ("orch.StreamSnapshot", self.stream_snapshot),
            ("status.GetJob", self.status_get_job),
            ("status.GetJob", self.status_get_job),
            ("status.ListJobs", self.status_list_jobs),
            ("status.ListChildren", self.list_children),
            ("status.ListChildren", self.list_children),
            ("status.WatchJob", self.watch_job),
            ("status.WatchJob", self.watch_job),
            ("status.WatchJobs", self.watch_jobs),
        ]

    async def worker(self, rng: random.Random, end: float) -> None:
        for _ in range(CALLS_PER_WORKER):
            if time.monotonic() >= end:
                return
            method, op = rng.choice(self.ops)
            self.tally.add(method, *await op(rng))

    # OrchestratorService

    async def submit_job(self, rng: random.Random) -> Outcome:
        if rng.random() < 0.3:
            definition = BAD_DEFINITION
        else:
            definition = job_definition(rng.choice([QUICK, SHORT]), name=f"storm-{rng.randrange(3)}")
        request = orch_pb.SubmitJobRequest(definition=definition)
        outcome, response = await unary(rng, self.orch.SubmitJob(request, timeout=deadline(rng)))
        if response is not None:
            self.known.storm_jobs.append(response.job.id)
        return outcome

    async def cancel_job(self, rng: random.Random) -> Outcome:
        # Never the fan-out job: the storm runs beside it.
        roll = rng.random()
        job_id = rng.choice(self.known.storm_jobs) if self.known.storm_jobs and roll < 0.6 else (
            UNKNOWN_JOB if roll < 0.9 else "")
        outcome, _ = await unary(rng, self.orch.CancelJob(orch_pb.CancelJobRequest(job_id=job_id),
                                                       timeout=deadline(rng)))
        return outcome

    async def orch_get_job(self, rng: random.Random) -> Outcome:
        job_id = self.known.some_job(rng) if rng.random() < 0.95 else ""
        request = orch_pb.GetJobRequest(job_id=job_id)
        outcome, response = await unary(rng, self.orch.GetJob(request, timeout=deadline(rng)))
        if response is not None:
            self.known.latest_seq = max(self.known.latest_seq, response.seq)
        return outcome

    async def orch_list_jobs(self, rng: random.Random) -> Outcome:
        request = orch_pb.ListJobsRequest(page_size=rng.randint(0, 4))
        roll = rng.random()
        if roll < 0.3 and self.known.job_tokens:
            request.page_token = rng.choice(self.known.job_tokens)
        elif roll < 0.4:
            request.page_token = "bm90IGEgdG9rZW4="  # base64, but not one of ours
        elif roll < 0.45:
            request.page_token = "%%%"
        elif roll < 0.5:
            request.states.append(99)  # type: ignore[arg-type]
        elif roll < 0.6:
            request.states.extend([s.JOB_STATE_RUNNING, s.JOB_STATE_COMPLETED])
        outcome, response = await unary(rng, self.orch.ListJobs(request, timeout=deadline(rng)))
        if response is not None and response.next_page_token and len(self.known.job_tokens) < 50:
            self.known.job_tokens.append(response.next_page_token)
        return outcome

    async def stream_step_events(self, rng: random.Random) -> Outcome:
        roll = rng.random()
        after = rng.randint(0, self.known.latest_seq) if roll < 0.8 else (
            self.known.latest_seq + 10_000_000 if roll < 0.9 else -1)
        request = orch_pb.StreamStepEventsRequest(after_seq=after)
        if rng.random() < 0.05:
            request.log_id = "some-other-log"

        def seen(message: orch_pb.StreamStepEventsResponse) -> None:
            if message.batch.events:
                self.known.latest_seq = max(self.known.latest_seq, message.batch.events[-1].seq)
            if message.HasField("heartbeat"):
                self.known.latest_seq = max(self.known.latest_seq, message.heartbeat.latest_seq)

        return await stream(rng, self.orch.StreamStepEvents(request, timeout=stream_timeout(rng)), seen)

    async def stream_snapshot(self, rng: random.Random) -> Outcome:
        call = self.orch.StreamSnapshot(orch_pb.StreamSnapshotRequest(), timeout=stream_timeout(rng))
        return await stream(rng, call, lambda message: None)

    # StatusService

    async def status_get_job(self, rng: random.Random) -> Outcome:
        job_id = self.known.some_job(rng) if rng.random() < 0.95 else ""
        outcome, response = await unary(rng, self.status.GetJob(status_pb.GetJobRequest(job_id=job_id),
                                                             timeout=deadline(rng)))
        if response is not None:
            self.known.latest_revision = max(self.known.latest_revision, response.revision)
        return outcome

    async def status_list_jobs(self, rng: random.Random) -> Outcome:
        request = status_pb.ListJobsRequest(page_size=rng.randint(0, 4))
        roll = rng.random()
        if roll < 0.3 and self.known.status_job_tokens:
            request.page_token = rng.choice(self.known.status_job_tokens)
        elif roll < 0.4:
            request.page_token = "not a token"
        elif roll < 0.45:
            request.filter.states.append(42)  # type: ignore[arg-type]
        elif roll < 0.5:
            request.page_size = -1
        elif roll < 0.6:
            request.filter.name = "storm-fan-out"
        outcome, response = await unary(rng, self.status.ListJobs(request, timeout=deadline(rng)))
        if response is not None:
            self.known.latest_revision = max(self.known.latest_revision, response.revision)
            if response.next_page_token and len(self.known.status_job_tokens) < 50:
                self.known.status_job_tokens.append(response.next_page_token)
        return outcome

    async def list_children(self, rng: random.Random) -> Outcome:
        step = rng.choice([*FAN_OUT_STEPS, "prepare", "no-such-step"])
        roll = rng.random()
        job_id = self.known.job_id if roll < 0.85 else (UNKNOWN_JOB if roll < 0.95 else "")
        request = status_pb.ListChildrenRequest(job_id=job_id, step_name=step, page_size=rng.choice([0, 1, 7, 50]))
        tokens = self.known.child_tokens.setdefault(step, [])
        roll = rng.random()
        if roll < 0.4 and tokens:
            request.page_token = rng.choice(tokens)
        elif roll < 0.5:
            request.page_token = "WyJ4IiwgMV0="  # a list of the wrong length
        elif roll < 0.6:
            request.states.extend(rng.sample([s.STEP_STATE_RUNNING, s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED], 2))
        elif roll < 0.65:
            request.states.append(s.STEP_STATE_WAITING)  # children never wait: INVALID_ARGUMENT
        outcome, response = await unary(rng, self.status.ListChildren(request, timeout=deadline(rng)))
        if response is not None and response.next_page_token and len(tokens) < 50:
            tokens.append(response.next_page_token)
        return outcome

    def note_watch(self, message: status_pb.WatchJobResponse | status_pb.WatchJobsResponse) -> None:
        kind = message.WhichOneof("event")
        if kind == "heartbeat":
            self.known.latest_revision = max(self.known.latest_revision, message.heartbeat.revision)
        elif kind == "initial_state_complete":
            self.known.latest_revision = max(self.known.latest_revision, message.initial_state_complete.revision)

    def after_revision(self, rng: random.Random) -> int | None:
        roll = rng.random()
        if roll < 0.5:
            return None
        if roll < 0.9:
            return rng.randint(0, self.known.latest_revision)
        return self.known.latest_revision + 10_000_000 if roll < 0.95 else -1

    async def watch_job(self, rng: random.Random) -> Outcome:
        request = status_pb.WatchJobRequest(job_id=self.known.some_job(rng))
        after = self.after_revision(rng)
        if after is not None:
            request.after_revision = after
        return await stream(rng, self.status.WatchJob(request, timeout=stream_timeout(rng)), self.note_watch)

    async def watch_jobs(self, rng: random.Random) -> Outcome:
        request = status_pb.WatchJobsRequest()
        roll = rng.random()
        if roll < 0.2:
            request.filter.states.append(s.JOB_STATE_RUNNING)
        elif roll < 0.3:
            request.filter.name = "storm-fan-out"
        elif roll < 0.35:
            request.filter.states.append(77)  # type: ignore[arg-type]
        after = self.after_revision(rng)
        if after is not None:
            request.after_revision = after
        return await stream(rng, self.status.WatchJobs(request, timeout=stream_timeout(rng)), self.note_watch)


# --- what both status services and the orchestrator must agree on ----------------------------------------------


async def all_orchestrator_jobs(orch: OrchStub) -> list[records_pb2.Job]:
    jobs: list[records_pb2.Job] = []
    token = ""
    while True:
        response = await orch.ListJobs(orch_pb.ListJobsRequest(page_size=1000, page_token=token),
                                       timeout=DEADLINE)
        jobs.extend(response.jobs)
        token = response.next_page_token
        if not token:
            return jobs


async def all_children(stub: StatusStub, job_id: str, step: str) -> list[status_pb.ChildStatus]:
    children: list[status_pb.ChildStatus] = []
    token = ""
    while True:
        response = await stub.ListChildren(
            status_pb.ListChildrenRequest(job_id=job_id, step_name=step, page_size=100, page_token=token),
            timeout=DEADLINE,
        )
        children.extend(response.children)
        token = response.next_page_token
        if not token:
            return children


def last_child_records(events: Sequence[records_pb2.StepEvent]) -> dict[tuple[str, str, int], records_pb2.Child]:
    latest: dict[tuple[str, str, int], records_pb2.Child] = {}
    for event in events:
        if event.WhichOneof("record") == "child":
            child = event.child
            latest[(child.job_id, child.step_name, child.index)] = child
    return latest


def child_fields(child: status_pb.ChildStatus | records_pb2.Child) -> tuple[Any, ...]:
    return (child.index, child.item, child.state, child.reason, child.message, child.attempt,
            child.HasField("started_at"), child.started_at, child.HasField("finished_at"), child.finished_at)


def without_child_revision(child: status_pb.ChildStatus) -> status_pb.ChildStatus:
    copy = status_pb.ChildStatus()
    copy.CopyFrom(child)
    copy.revision = 0
    return copy


async def progress(orch: OrchStub, job_id: str) -> str:
    """How far the fan-out job got (for the log; never asserted)."""
    try:
        view = await orch.GetJob(orch_pb.GetJobRequest(job_id=job_id), timeout=DEADLINE)
    except grpc.aio.AioRpcError as error:
        return f"the fan-out job could not be read: {error.code().name} {error.details()}"
    took = ""
    if view.job.HasField("finished_at"):
        seconds = (view.job.finished_at.ToNanoseconds() - view.job.created_at.ToNanoseconds()) / 1e9
        took = f" ({seconds:.1f} s after it was submitted)"
    return f"the fan-out job was {s.JobState.Name(view.job.state)}{took} when the storm ended; children done: " + (
        ", ".join(f"{v.step.name} {v.children.completed + v.children.failed}/{v.children.total}"
                  for v in view.steps if v.step.name in FAN_OUT_STEPS))


async def all_jobs_ended(orch: OrchStub) -> list[records_pb2.Job]:
    """Every job of the orchestrator, once all have ended; an AssertionError naming the others if not in time."""
    end = time.monotonic() + DEADLINE
    while True:
        jobs = await all_orchestrator_jobs(orch)
        unfinished = [job for job in jobs if job.state not in TERMINAL_JOB_STATES]
        if not unfinished:
            return jobs
        if time.monotonic() > end:
            views = [await orch.GetJob(orch_pb.GetJobRequest(job_id=job.id), timeout=DEADLINE)
                     for job in unfinished[:5]]
            described = "; ".join(
                f"{v.job.id} {v.job.name} {s.JobState.Name(v.job.state)} created {v.job.created_at.ToJsonString()} "
                "steps " + ", ".join(f"{st.step.name}={s.StepState.Name(st.step.state)}" for st in v.steps)
                for v in views)
            raise AssertionError(f"{len(unfinished)} of {len(jobs)} jobs never ended in the orchestrator: {described}")
        await asyncio.sleep(0.1)


# --- the tests -------------------------------------------------------------------------------------------------


@pytest.mark.timeout(170)
async def test_storm_of_every_rpc_with_short_deadlines_and_cancels_leaves_both_services_intact(
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("STEPSTREAM_STORM_SEED", random.SystemRandom().randrange(2**32)))
    print(f"storm seed {seed} (rerun with STEPSTREAM_STORM_SEED={seed})")
    orchestrator = orchestrator_process(tmp_path / "orchestrator", 0)
    first_dir, fresh_dir = tmp_path / "status", tmp_path / "status-fresh"
    async with running(orchestrator) as orch_address:
        status = status_process(first_dir, orch_address)
        async with running(status) as status_address, channel(orch_address) as och, channel(status_address) as sch:
            orch: OrchStub = orch_grpc.OrchestratorServiceStub(och)
            stub: StatusStub = status_grpc.StatusServiceStub(sch)

            submitted = await orch.SubmitJob(orch_pb.SubmitJobRequest(definition=fan_out_job()), timeout=DEADLINE)
            job_id = submitted.job.id
            known = Known(job_id=job_id, latest_seq=submitted.seq)
            tally = Tally()
            storm = Storm(orch, stub, known, tally)
            started = time.monotonic()
            end = started + STORM_SECONDS
            async with asyncio.timeout(STORM_SECONDS + 4 * HANG):
                await asyncio.gather(*(storm.worker(random.Random(seed * 1000 + i), end) for i in range(WORKERS)))
            storm_took = time.monotonic() - started
            print(f"storm: {sum(tally.codes.values())} calls by {WORKERS} workers in {storm_took:.1f} s; "
                  f"{len(known.storm_jobs)} jobs submitted by it")
            print(tally.report())
            print(await progress(orch, job_id))
            processes = f"orchestrator process alive: {alive(orchestrator)}, status process alive: {alive(status)}"
            print(processes)
            assert not tally.bad, f"unexpected outcomes (seed {seed}; {processes}): {tally.bad}"
            assert alive(orchestrator) and alive(status), processes

            # Both services are healthy and answer ordinary calls correctly.
            for address, name in ((orch_address, "stepstream.orchestrator.v1.OrchestratorService"),
                                  (status_address, "stepstream.status.v1.StatusService")):
                for service in ("", name):
                    assert await health_status(address, service) == health_pb2.HealthCheckResponse.SERVING
            view = await wait_job_state(orch, job_id, set(TERMINAL_JOB_STATES))
            assert view.job.state == s.JOB_STATE_COMPLETED, view.job
            failures = len(range(0, PY_CHILDREN, FAIL_EVERY))
            counts = {v.step.name: v.children for v in view.steps}
            assert counts["crawl"] == records_pb2.ChildCounts(
                total=PY_CHILDREN, completed=PY_CHILDREN - failures, failed=failures)
            assert counts["naps"] == records_pb2.ChildCounts(total=SLEEP_CHILDREN, completed=SLEEP_CHILDREN)
            got = await wait_status_job(stub, job_id, status_job_finished, "the fan-out job to end in the status "
                                        "service")
            assert_status_equals_orchestrator(view, got, orch_address)

            # Ingest is not wedged: a job submitted now is followed to its end.
            after = await orch.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(QUICK, name="after")),
                                         timeout=DEADLINE)
            followed = await wait_status_job(stub, after.job.id, status_job_finished, "a job submitted after the "
                                             "storm to end in the status service")
            assert followed.job.state == s.JOB_STATE_COMPLETED

            # Every job ends, the storm's own included: a SubmitJob cut off after its job was
            # recorded must not strand that job PENDING. Then the log is complete and still.
            jobs = await all_jobs_ended(orch)

            # The log, read from the start: seqs 1..N, each exactly once.
            events = await read_whole_log(orch)
            seqs = [event.seq for event in events]
            latest = seqs[-1]
            assert seqs == list(range(1, latest + 1)), "the log has a gap or a duplicate"
            probe = await orch.GetJob(orch_pb.GetJobRequest(job_id=job_id), timeout=DEADLINE)
            assert probe.seq == latest
            await wait_cursor(first_dir, orch_address, latest, "the first status service to apply the whole log")

            # A fresh status service follows the same orchestrator from seq 0.
            async with running(status_process(fresh_dir, orch_address)) as fresh_address, \
                    channel(fresh_address) as fch:
                fresh: StatusStub = status_grpc.StatusServiceStub(fch)
                await wait_cursor(fresh_dir, orch_address, latest, "the fresh status service to apply the whole log")
                assert cursor_of(fresh_dir, orch_address) == latest == cursor_of(first_dir, orch_address)
                # Every event applied exactly once: each job or step event is one change
                # of its own, and the child events are all counted in the folded changes.
                child_events = sum(1 for event in events if event.WhichOneof("record") == "child")
                db = open_sqlite_readonly(fresh_dir / DATABASE_FILE)
                try:
                    own, folded = db.execute(
                        "SELECT SUM(child_events = 0), SUM(child_events) FROM changes").fetchone()
                finally:
                    db.close()
                assert (own, folded) == (len(events) - child_events, child_events)

                # Row by row: the fresh service, the first one and the orchestrator agree. Left out
                # of the comparison, because they legitimately differ: revisions (every status
                # service numbers its own changes, and batching decides how many there are). Kept:
                # freshness (for finished jobs it is just the source address, never stale), times,
                # messages, reasons, attempts, child counts, and each row's seq.
                latest_child = last_child_records(events)
                assert {job.id for job in jobs} >= {job_id, after.job.id}
                for job in jobs:
                    view = await orch.GetJob(orch_pb.GetJobRequest(job_id=job.id),
                                             timeout=DEADLINE)
                    ours = await stub.GetJob(status_pb.GetJobRequest(job_id=job.id), timeout=DEADLINE)
                    theirs = await fresh.GetJob(status_pb.GetJobRequest(job_id=job.id), timeout=DEADLINE)
                    assert_status_equals_orchestrator(view, ours, orch_address)
                    assert_status_equals_orchestrator(view, theirs, orch_address)
                    assert without_revisions(ours) == without_revisions(theirs), job.id
                    for step_view in view.steps:
                        if not step_view.children.total:
                            continue
                        name = step_view.step.name
                        first_children = await all_children(stub, job.id, name)
                        fresh_children = await all_children(fresh, job.id, name)
                        assert [without_child_revision(c) for c in first_children] == [
                            without_child_revision(c) for c in fresh_children], (job.id, name)
                        expected = [child_fields(latest_child[(job.id, name, index)])
                                    for index in range(step_view.children.total)]
                        assert [child_fields(c) for c in fresh_children] == expected, (job.id, name)
                tables = {table: assert_same_rows(table, first_dir, fresh_dir) for table in TABLE_KEYS}
                print(f"log 1..{latest}; {len(jobs)} jobs; rows equal without revisions: {tables}")
                assert await health_status(fresh_address) == health_pb2.HealthCheckResponse.SERVING


# --- the same without chance ------------------------------------------------------------------------------------


async def get_codes(calls: Sequence[Awaitable[Any]]) -> Counter[str]:
    codes: Counter[str] = Counter()
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(outcome, grpc.aio.AioRpcError):
            codes[outcome.code().name] += 1
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            codes["OK"] += 1
    return codes


async def test_expired_deadlines_and_cancelled_watches_leave_reads_correct(tmp_path: Path) -> None:
    orchestrator = orchestrator_process(tmp_path / "orchestrator", 0)
    async with running(orchestrator) as orch_address:
        status = status_process(tmp_path / "status", orch_address)
        async with running(status) as status_address, channel(orch_address) as och, channel(status_address) as sch:
            orch: OrchStub = orch_grpc.OrchestratorServiceStub(och)
            stub: StatusStub = status_grpc.StatusServiceStub(sch)
            fan = {"name": "fan", "type": "fanout", "count": 20, "concurrency": 4,
                   "child": {"type": "sleep", "seconds": 0}}
            submitted = await orch.SubmitJob(
                orch_pb.SubmitJobRequest(definition=job_definition([*QUICK, fan], name="reference")),
                timeout=DEADLINE)
            job_id = submitted.job.id
            orch_view = await wait_job_state(orch, job_id, set(TERMINAL_JOB_STATES))
            status_view = await wait_status_job(stub, job_id, status_job_finished, "the job to end")
            assert_status_equals_orchestrator(orch_view, status_view, orch_address)

            # 200 GetJob calls on each service whose deadline (1 ms) passes, in waves of 1, 2, ... 19
            # concurrent calls, then 10: the server cancels each handler a little after its deadline,
            # at whatever await it is on then, and the wave size decides which await that is.
            orch_codes: Counter[str] = Counter()
            status_codes: Counter[str] = Counter()
            for wave in [*range(1, 20), 10]:
                orch_codes += await get_codes([
                    orch.GetJob(orch_pb.GetJobRequest(job_id=job_id), timeout=0.001)
                    for _ in range(wave)])
                status_codes += await get_codes([
                    stub.GetJob(status_pb.GetJobRequest(job_id=job_id), timeout=0.001) for _ in range(wave)])
            codes = f"orchestrator {dict(orch_codes)}, status {dict(status_codes)}"
            print(f"GetJob with a 1 ms deadline: {codes}")
            assert sum(orch_codes.values()) == sum(status_codes.values()) == 200
            assert set(orch_codes) | set(status_codes) <= {"OK", "DEADLINE_EXCEEDED"}, codes

            # Then ordinary calls answer, with the right content, not a frozen view.
            again = await orch.GetJob(orch_pb.GetJobRequest(job_id=job_id), timeout=DEADLINE)
            assert again == orch_view
            assert await stub.GetJob(status_pb.GetJobRequest(job_id=job_id), timeout=DEADLINE) == status_view
            later = await orch.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(QUICK, name="later")),
                                         timeout=DEADLINE)
            later_view = await wait_job_state(orch, later.job.id, set(TERMINAL_JOB_STATES))
            assert later_view.seq > orch_view.seq
            later_status = await wait_status_job(stub, later.job.id, status_job_finished, "a later job to end")
            assert_status_equals_orchestrator(later_view, later_status, orch_address)

            # 100 WatchJob streams cancelled 0..10 ms after opening, 10 at a time; every other one
            # replays the job's change log (after_revision=0) instead of starting from its state.
            async def cancelled_watch(i: int) -> Code:
                request = status_pb.WatchJobRequest(job_id=job_id)
                if i % 2:
                    request.after_revision = 0
                call = stub.WatchJob(request)
                await asyncio.sleep((i % 11) / 1000)
                call.cancel()
                code: Code = await call.code()
                return code

            watch_codes: Counter[str] = Counter()
            for start in range(0, 100, 10):
                watch_codes.update(code.name for code in await asyncio.gather(
                    *(cancelled_watch(i) for i in range(start, start + 10))))
            print(f"WatchJob cancelled 0-10 ms after opening: {dict(watch_codes)}")
            assert set(watch_codes) <= {"CANCELLED", "OK"}, watch_codes

            # A watch after them delivers the current state, then the marker...
            current = await stub.GetJob(status_pb.GetJobRequest(job_id=job_id), timeout=DEADLINE)
            watch = stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id))
            try:
                first = await read_watch(watch)
                assert first.WhichOneof("event") == "updates"
                assert [u.revision for u in first.updates.updates] == [current.revision]
                initial = first.updates.updates[0]
                assert (initial.job, list(initial.steps)) == (current.job, list(current.steps))
                marker = await read_watch(watch)
                assert marker.WhichOneof("event") == "initial_state_complete"
                assert marker.initial_state_complete.revision == current.revision
            finally:
                watch.cancel()
            # ... and a watch of every job still sees new changes live.
            everything = stub.WatchJobs(status_pb.WatchJobsRequest())
            try:
                while (await read_watch(everything)).WhichOneof("event") != "initial_state_complete":
                    pass
                last = await orch.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(QUICK, name="last")),
                                            timeout=DEADLINE)
                updates, _ = await watch_until(
                    everything, lambda u: u.job_id == last.job.id and u.job.state in TERMINAL_JOB_STATES)
                assert updates[-1].job.state == s.JOB_STATE_COMPLETED
            finally:
                everything.cancel()
