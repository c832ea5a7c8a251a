"""Realistic event logs written straight into an orchestrator data dir.

The events come from the orchestrator's own Recorder and Journal, so every one
is a legal transition with a contiguous seq, exactly what a running
orchestrator would have logged; only the waiting for work is skipped.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import definition_pb2

from orchestrator_svc.app import DATABASE_FILE
from orchestrator_svc.engine.journal import Journal, Retention
from orchestrator_svc.engine.recorder import Recorder
from orchestrator_svc.storage.base import NewJob, StoredEvent
from orchestrator_svc.storage.sqlite import SqliteEventStore
from stepstream_common.feed import Feed

# Per job: job x3, step x4 (pending, running, waiting, completed), children x3 each.
EVENTS_PER_JOB_BASE = 7


def events_per_job(children: int) -> int:
    return EVENTS_PER_JOB_BASE + 3 * children


@asynccontextmanager
async def recording(data_dir: Path) -> AsyncIterator[tuple[Recorder, Journal]]:
    """The orchestrator's own Recorder and Journal on `data_dir`, with nothing
    running; everything recorded in the block is committed when it ends."""
    store = SqliteEventStore(data_dir / DATABASE_FILE)
    info = await store.open()
    feed: Feed[StoredEvent] = Feed(max_pending=1)
    journal = Journal(store, feed, latest_seq=info.latest_seq, retention=Retention(every_seconds=1e9))
    task = journal.start()
    try:
        yield Recorder(journal), journal
        await journal.durable(journal.appended_seq)
    finally:
        await journal.close()
        await task
        await store.close()


BENCH_DEFINITION = definition_pb2.JobDefinition(name="bench").SerializeToString()


async def write_fanout_log(data_dir: Path, jobs: int, children: int, *, traced: bool = False) -> int:
    """Log `jobs` completed fan-out jobs of `children` children each; returns the last seq.
    `traced`: each job record carries a trace context, as when its submit was traced."""
    async with recording(data_dir) as (recorder, journal):
        for number in range(jobs):
            record_fanout_job(recorder, f"bench-{number:06d}", children, traced)
            if number % 20 == 19:
                await journal.durable(journal.appended_seq)
    return journal.committed_seq


def record_fanout_job(recorder: Recorder, job_id: str, children: int, traced: bool = False) -> None:
    """One fan-out job, from submission to completion, with every child transition."""
    job = records_pb2.Job(id=job_id, name="bench-fanout")
    if traced:
        job.trace_context["traceparent"] = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    step = records_pb2.Step(job_id=job_id, name="crawl", index=0, type="fanout", max_attempts=1)
    recorder.create_job(job, [step], NewJob(job_id, "", BENCH_DEFINITION))
    recorder.job(job, s.JOB_STATE_RUNNING)
    recorder.step(step, s.STEP_STATE_RUNNING, attempt=1)
    kids = [records_pb2.Child(job_id=job_id, step_name="crawl", index=i, item=str(i)) for i in range(children)]
    recorder.create_children(kids)
    recorder.step(step, s.STEP_STATE_WAITING)
    for child in kids:
        recorder.child(child, s.STEP_STATE_RUNNING, attempt=1)
        recorder.child(child, s.STEP_STATE_COMPLETED, message="ok")
    recorder.step(step, s.STEP_STATE_COMPLETED)
    recorder.job(job, s.JOB_STATE_COMPLETED)

if __name__ == "__main__":
    import sys
    import time

    started = time.perf_counter()
    last = asyncio.run(write_fanout_log(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
    print(f"{last} events in {time.perf_counter() - started:.1f}s")
