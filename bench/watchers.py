"""Watchers: what 100 and 1,000 concurrent WatchJob clients cost ingest, and how far they fall behind.

The workload is a pre-written orchestrator event log (the orchestrator's own
Recorder and Journal, as in bench/workload.py) of fan-out jobs: job 0 is the
busy one (about a third of all events), the others share the rest, and their
children's transitions are interleaved so that every job keeps changing from
the first event to the last. Its first part holds only each job's creation
and start (job and step pending, then running): that is what watchers attach
to, since WatchJob on a job the status service does not know is NOT_FOUND.

Each scenario, with fresh services as separate subprocesses:
1. the orchestrator serves a copy of the log cut after the first part (its
   job tables already say the jobs finished, so it recovers nothing and adds
   no event) on a fixed loopback port; a fresh status service follows it and
   applies the first part;
2. the watchers attach (WatchJob without after_revision: current state,
   marker, then every change), in WATCHER_PROCESSES client processes
   (bench/watch_client.py, one grpc.aio channel per watcher, all of a
   process's watchers on one event loop);
3. that orchestrator stops and one serving the whole log starts on the same
   port: the status service reconnects and resumes after its cursor, so the
   rest of the log (almost all of it) arrives as fast as the status service
   takes it, exactly like its catch-up after an orchestrator restart;
4. ingest throughput = the events after the first part / the time from the
   last moment the status service's committed cursor (sources.cursor, read
   read-only from its SQLite file every 5 ms, as bench/ingest.py does) was
   seen still at the end of the first part until it is seen at the last seq
   (the reconnection itself is not counted);
5. then every watcher must receive its job's last revision (at most
   CATCH_UP_TIMEOUT s).

Lag: every 50 ms each client process records the revision every watcher
holds, and the harness records the status service's latest committed
revision (MAX(revision) of its change log). A watcher's lag at a moment is the
number of its own job's committed revisions it has not received yet (counted
from the change log after the run); slowest_watcher_lag_revisions is the
largest over all watchers and moments, lag_seconds the largest age of the
oldest committed revision a watcher had not received. catch-up is the time
from the moment ingest finished (cursor at the last seq) until the last
watcher held its job's final revision (0 if they all had it already).

Scenarios: 0 watchers; 100 and 1,000 split across the jobs (watcher i on job
i mod JOBS); 100 and 1,000 all on the busy job 0; 0 watchers again at the end
(to show run-to-run noise). Ratios are to the mean of the 0-watcher runs.
--quick writes a tiny log (10 jobs, ~2,000 events) and skips "100 on the
busy job" and the repeat, so their keys are absent then.

JSON keys: events, jobs, busy_job_events, watcher_processes,
events_per_second_0_watchers, events_per_second_0_watchers_repeat,
events_per_second_100_split, events_per_second_1000_split,
events_per_second_100_one_job, events_per_second_1000_one_job,
ratio_100_split, ratio_1000_split, ratio_100_one_job, ratio_1000_one_job,
lag_revisions_SCENARIO, lag_seconds_SCENARIO, catchup_seconds_SCENARIO,
client_cpu_percent_SCENARIO, status_cpu_percent_SCENARIO, attach_seconds_SCENARIO,
incomplete_watchers_SCENARIO (SCENARIO in 100_split, 1000_split, 100_one_job,
1000_one_job), slowest_watcher_lag_revisions, slowest_watcher_lag_seconds,
slowest_watcher_catchup_seconds (the largest of the scenarios).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s

from bench.common import (
    WatchClient,
    cpu_seconds,
    free_port,
    orchestrator,
    status,
    verdict,
    watch_clients,
)
from bench.processes import Service
from bench.report import Report, fmt_rate
from bench.workload import BENCH_DEFINITION, recording
from orchestrator_svc.app import DATABASE_FILE as ORCHESTRATOR_DB
from orchestrator_svc.storage.base import NewJob
from status_svc.app import DATABASE_FILE as STATUS_DB

WATCHER_PROCESSES = 4
CATCH_UP_TIMEOUT = 120.0
POLL = 0.005
SAMPLE_INTERVAL = 0.05
TARGET_RATIO = 0.8


@dataclass(frozen=True)
class Workload:
    jobs: int
    busy_children: int  # job 0
    children: int  # each other job

    @property
    def events(self) -> int:
        return sum(3 * c + 7 for c in [self.busy_children] + [self.children] * (self.jobs - 1))


async def write_log(data_dir: Path, workload: Workload) -> tuple[int, int, list[str]]:
    """Write the log; returns (last seq of the first part, last seq, job ids)."""
    job_ids = [f"watch-{n:04d}" for n in range(workload.jobs)]
    jobs = [records_pb2.Job(id=job_id, name="bench-watchers") for job_id in job_ids]
    steps = [records_pb2.Step(job_id=job_id, name="crawl", index=0, type="fanout", max_attempts=1)
             for job_id in job_ids]
    async with recording(data_dir) as (recorder, journal):
        for job, step in zip(jobs, steps, strict=True):
            recorder.create_job(job, [step], NewJob(job.id, "", BENCH_DEFINITION))
            recorder.job(job, s.JOB_STATE_RUNNING)
            recorder.step(step, s.STEP_STATE_RUNNING, attempt=1)
        await journal.durable(journal.appended_seq)
        first_part = journal.appended_seq
        kids: list[list[records_pb2.Child]] = []
        for n, (job, step) in enumerate(zip(jobs, steps, strict=True)):
            count = workload.busy_children if n == 0 else workload.children
            kids.append([records_pb2.Child(job_id=job.id, step_name="crawl", index=i, item=str(i))
                         for i in range(count)])
            recorder.create_children(kids[-1])
            recorder.step(step, s.STEP_STATE_WAITING)
        # Interleaved: in each round every job moves its share of children, so all of them stay busy to the end.
        rounds = max(len(group) for group in kids[1:]) if workload.jobs > 1 else len(kids[0])
        position = [0] * workload.jobs
        for round_number in range(rounds):
            for n, group in enumerate(kids):
                share = math.ceil(len(group) * (round_number + 1) / rounds) - position[n]
                for child in group[position[n]:position[n] + share]:
                    recorder.child(child, s.STEP_STATE_RUNNING, attempt=1)
                    recorder.child(child, s.STEP_STATE_COMPLETED, message="ok")
                position[n] += share
            if round_number % 10 == 9:
                await journal.durable(journal.appended_seq)
        for job, step in zip(jobs, steps, strict=True):
            recorder.step(step, s.STEP_STATE_COMPLETED)
            recorder.job(job, s.JOB_STATE_COMPLETED)
    return first_part, journal.committed_seq, job_ids


def cut_copy(source: Path, target: Path, last_seq: int) -> None:
    """A copy of the orchestrator data dir whose event log ends at `last_seq` (tables as in the source)."""
    target.mkdir(parents=True)
    with sqlite3.connect(source / ORCHESTRATOR_DB) as src, sqlite3.connect(target / ORCHESTRATOR_DB) as dst:
        src.backup(dst)
        dst.execute("DELETE FROM events WHERE seq > ?", (last_seq,))


class StatusPoller:
    """Reads the status service's committed cursor and latest revision from its SQLite file, read-only."""

    def __init__(self, status_dir: Path) -> None:
        self.status_dir = status_dir
        self.path = status_dir / STATUS_DB
        self.db: sqlite3.Connection | None = None

    async def read(self) -> tuple[int, int]:
        if self.db is None:
            if not self.path.exists():
                return 0, 0
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            cursor = self.db.execute("SELECT MAX(cursor) FROM sources").fetchone()[0]
            revision = self.db.execute("SELECT MAX(revision) FROM changes").fetchone()[0]
        except sqlite3.OperationalError:
            return 0, 0
        return int(cursor or 0), int(revision or 0)

    async def changes(self) -> dict[str, list[int]]:
        return _changes(self.status_dir)

    async def close(self) -> None:
        if self.db is not None:
            self.db.close()


class Poller(Protocol):
    """What the harness reads of the status store: (committed cursor, latest revision), every job's revisions."""

    async def read(self) -> tuple[int, int]: ...

    async def changes(self) -> dict[str, list[int]]: ...

    async def close(self) -> None: ...


@dataclass
class StatusSide:
    """The status side of a scenario: the service that ingests, how its store is read,
    the other replicas (started once it has applied the first part: it holds the
    lease), and the one the watchers attach to (None: the ingesting one)."""

    ingesting: Service
    poller: Poller
    others: list[Service] = field(default_factory=list)
    serving: Service | None = None

    async def start(self, first_part: int) -> str:
        """Start the ingesting service, wait until it has applied the first part, then
        the others; the address the watchers attach to."""
        self.ingesting.start()
        async with asyncio.timeout(60):
            while (await self.poller.read())[0] < first_part:
                await asyncio.sleep(0.01)
        for service in self.others:
            service.start()
        return (self.serving or self.ingesting).address

    async def stop(self) -> None:
        for service in [*reversed(self.others), self.ingesting]:
            service.stop()
        await self.poller.close()


# The status side of a scenario, made in its folder, for the orchestrator at this address.
Side = Callable[[Path, str], Awaitable[StatusSide]]


async def one_service(base: Path, orchestrator_address: str) -> StatusSide:
    """The status service as it runs by default: one process on its SQLite file, ingesting and serving."""
    return StatusSide(status(base / "status", orchestrator_address), StatusPoller(base / "status"))


@dataclass
class Outcome:
    key: str
    label: str
    watchers: int
    one_job: bool
    events_per_second: float = 0.0
    lag_revisions: int = 0
    lag_seconds: float = 0.0
    catchup_seconds: float = 0.0
    incomplete: int = 0
    failed: int = 0
    client_cpu: float = 0.0
    status_cpu: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds since the scenario began


async def scenario(outcome: Outcome, work: Path, full_log: Path, first_part: int, last_seq: int,
                   job_ids: list[str], side: Side = one_service, *, pin: str | None = None) -> None:
    """One scenario (see the module docstring); with `pin`, the watch client processes run on that CPU."""
    base = work / outcome.key
    part_log = base / "orchestrator-part"
    cut_copy(full_log, part_log, first_part)
    port = free_port()
    status_side = await side(base, f"127.0.0.1:{port}")
    pinned = status_side.ingesting.prefix  # the orchestrators run beside the ingesting service
    first = orchestrator(part_log, port, prefix=pinned)
    first.start()
    status_service, poller = status_side.ingesting, status_side.poller
    second = orchestrator(full_log, port, prefix=pinned)
    t0 = time.perf_counter()
    try:
        status_address = await status_side.start(first_part)
        watched = [job_ids[0] if outcome.one_job else job_ids[i % len(job_ids)] for i in range(outcome.watchers)]
        per_process = math.ceil(len(watched) / WATCHER_PROCESSES) if watched else 1
        clients = [
            WatchClient(status_address, watched[start:start + per_process], "lag", sample_interval=SAMPLE_INTERVAL,
                        pin=pin)
            for start in range(0, len(watched), per_process)
        ]
        outcome.timings["status_ready"] = time.perf_counter() - t0
        async with watch_clients(clients):
            outcome.timings["watchers_ready"] = time.perf_counter() - t0
            first.stop()
            if _last_seq(part_log) != first_part:
                raise RuntimeError("the orchestrator serving the first part logged events of its own")
            second.start()
            outcome.timings["swapped"] = time.perf_counter() - t0
            cpu_before = cpu_seconds(status_service)
            series: list[tuple[float, int]] = []  # (time, latest revision)
            async with asyncio.timeout(600):
                cursor = first_part
                while cursor <= first_part:
                    # The start: the last moment the cursor was seen not to have moved yet.
                    began_at = time.perf_counter()
                    await asyncio.sleep(POLL)
                    cursor, revision = await poller.read()
                    series.append((time.time(), revision))
                while cursor < last_seq:
                    await asyncio.sleep(POLL)
                    cursor, revision = await poller.read()
                    series.append((time.time(), revision))
            elapsed = time.perf_counter() - began_at
            done_at = time.time()
            outcome.status_cpu = (cpu_seconds(status_service) - cpu_before) / elapsed
            outcome.events_per_second = (last_seq - first_part) / elapsed
            outcome.timings["ingested"] = time.perf_counter() - t0
            changes = await poller.changes()
            targets = {job_id: revisions[-1] for job_id, revisions in changes.items()}
            reports = [
                await client.finish({"command": "wait", "targets": targets, "timeout": CATCH_UP_TIMEOUT})
                for client in clients
            ]
            outcome.timings["caught_up"] = time.perf_counter() - t0
    finally:
        await status_side.stop()
        second.stop()
        first.stop()
    if not reports:
        return
    # The clients count CPU from "ready" to their report: the swap, the ingest and the catch-up.
    period = outcome.timings["caught_up"] - outcome.timings["watchers_ready"]
    outcome.client_cpu = sum(report["cpu_seconds"] for report in reports) / period
    _lags(outcome, reports, changes, series, targets, done_at)


def _last_seq(data_dir: Path) -> int:
    with sqlite3.connect(f"file:{data_dir / ORCHESTRATOR_DB}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT MAX(seq) FROM events").fetchone()[0] or 0)


def _changes(status_dir: Path) -> dict[str, list[int]]:
    """Every job's committed revisions, in order."""
    by_job: dict[str, list[int]] = {}
    with sqlite3.connect(f"file:{status_dir / STATUS_DB}?mode=ro", uri=True) as db:
        for revision, job_id in db.execute("SELECT revision, job_id FROM changes ORDER BY revision"):
            by_job.setdefault(job_id, []).append(int(revision))
    return by_job


def _lags(outcome: Outcome, reports: list[dict[str, Any]], changes: dict[str, list[int]],
          series: list[tuple[float, int]], targets: dict[str, int], done_at: float) -> None:
    times = [moment for moment, _ in series]
    latest = [revision for _, revision in series]
    catchup = 0.0
    for report in reports:
        outcome.failed += int(report["failed"])
        jobs = [watcher["job"] for watcher in report["watchers"]]
        for watcher in report["watchers"]:
            if watcher["revision"] < targets.get(watcher["job"], 0):
                outcome.incomplete += 1
            else:
                catchup = max(catchup, watcher["last_update"] - done_at)
        for moment, held in report["samples"]:
            at = bisect.bisect_right(times, moment) - 1
            if at < 0:
                continue
            committed = latest[at]
            for job_id, revision in zip(jobs, held, strict=True):
                revisions = changes.get(job_id, [])
                first_missing = bisect.bisect_right(revisions, revision)
                behind = bisect.bisect_right(revisions, committed) - first_missing
                if behind <= 0:
                    continue
                outcome.lag_revisions = max(outcome.lag_revisions, behind)
                committed_at = bisect.bisect_left(latest, revisions[first_missing])
                if committed_at < len(times):
                    outcome.lag_seconds = max(outcome.lag_seconds, moment - times[committed_at])
    outcome.catchup_seconds = catchup


async def run(quick: bool) -> Report:
    workload = Workload(jobs=10, busy_children=300, children=40) if quick else \
        Workload(jobs=100, busy_children=10_000, children=233)
    outcomes = [
        Outcome("0_watchers", "0 watchers", 0, False),
        Outcome("100_split", "100 watchers, split across the jobs", 100, False),
        Outcome("1000_split", "1,000 watchers, split across the jobs", 1000, False),
        Outcome("100_one_job", "100 watchers, all on the busy job", 100, True),
        Outcome("1000_one_job", "1,000 watchers, all on the busy job", 1000, True),
        Outcome("0_watchers_repeat", "0 watchers (again)", 0, False),
    ]
    if quick:  # only to check that it runs: the smallest set that exercises every path
        outcomes = [o for o in outcomes if o.key not in ("100_one_job", "0_watchers_repeat")]
    with tempfile.TemporaryDirectory(prefix="stepstream-bench-") as tmp:
        work = Path(tmp)
        full_log = work / "orchestrator-full"
        first_part, last_seq, job_ids = await write_log(full_log, workload)
        assert last_seq == workload.events, (last_seq, workload.events)
        for outcome in outcomes:
            await scenario(outcome, work, full_log, first_part, last_seq, job_ids)

    by_key = {outcome.key: outcome for outcome in outcomes}
    no_watchers = [o.events_per_second for o in outcomes if o.watchers == 0]
    baseline = sum(no_watchers) / len(no_watchers)
    busy_events = 3 * workload.busy_children + 7
    report = Report("watchers")
    report.add("events", f"{last_seq:,}", f"{workload.jobs} fan-out jobs; busy job 0: {busy_events:,} events; "
               f"{last_seq - first_part:,} after the watchers attach")
    for outcome in outcomes:
        if outcome.watchers == 0:
            report.add(f"{outcome.label}", fmt_rate(outcome.events_per_second, "events"),
                       "baseline: ingest with no watcher")
            continue
        ratio = outcome.events_per_second / baseline
        report.add(outcome.label, fmt_rate(outcome.events_per_second, "events"),
                   f"{ratio:.0%} of no watchers" + (
                       f"; target >= {TARGET_RATIO:.0%}: {verdict(ratio >= TARGET_RATIO)}"
                       if outcome.watchers == 1000 else ""))
        report.add("  slowest watcher", f"{outcome.lag_revisions:,} revisions behind",
                   f"at most {outcome.lag_seconds:.2f} s behind; all caught up {outcome.catchup_seconds:.2f} s "
                   f"after ingest finished; {outcome.incomplete} incomplete, {outcome.failed} failed")
        report.add("  CPU while ingesting", f"status {outcome.status_cpu:.0%}",
                   f"watch client processes {outcome.client_cpu:.0%} in all; the watchers attached in "
                   f"{outcome.timings['watchers_ready'] - outcome.timings['status_ready']:.1f} s")
    report.notes.append(
        f"watchers run in {WATCHER_PROCESSES} client processes (one grpc.aio channel per watcher), which "
        f"compete with both services and this harness for the same cores (CPU % is of one core)"
    )
    figures: dict[str, Any] = {
        "events": last_seq,
        "jobs": workload.jobs,
        "busy_job_events": busy_events,
        "watcher_processes": WATCHER_PROCESSES,
        "events_per_second_0_watchers": round(by_key["0_watchers"].events_per_second),
    }
    if "0_watchers_repeat" in by_key:
        figures["events_per_second_0_watchers_repeat"] = round(by_key["0_watchers_repeat"].events_per_second)
    watched = [outcome for outcome in outcomes if outcome.watchers]
    for outcome in watched:
        k = outcome.key
        figures.update({
            f"events_per_second_{k}": round(outcome.events_per_second),
            f"ratio_{k}": round(outcome.events_per_second / baseline, 3),
            f"lag_revisions_{k}": outcome.lag_revisions,
            f"lag_seconds_{k}": round(outcome.lag_seconds, 3),
            f"catchup_seconds_{k}": round(outcome.catchup_seconds, 3),
            f"status_cpu_percent_{k}": round(outcome.status_cpu * 100, 1),
            f"client_cpu_percent_{k}": round(outcome.client_cpu * 100, 1),
            f"attach_seconds_{k}": round(outcome.timings["watchers_ready"] - outcome.timings["status_ready"], 3),
            f"incomplete_watchers_{k}": outcome.incomplete,
        })
    figures.update(
        slowest_watcher_lag_revisions=max(outcome.lag_revisions for outcome in watched),
        slowest_watcher_lag_seconds=round(max(outcome.lag_seconds for outcome in watched), 3),
        slowest_watcher_catchup_seconds=round(max(outcome.catchup_seconds for outcome in watched), 3),
    )
    report.figures.update(figures)
    return report
