"""Watchers on a second replica: what 1,000 WatchJob clients cost ingest when a
status replica other than the ingesting one serves them.

The workload, the scenario steps and every figure are those of
bench/watchers.py (see its docstring: the pre-written log, the orchestrator
swap, ingest throughput from the committed cursor, lag and catch-up), with
the status service on PostgreSQL (a fresh database per scenario) as two
replicas, each pinned to one CPU with `taskset -c`, so that on a 2-core
machine the ingesting replica's core is its own:

- replica A ingests: it starts first and takes the lease; it and the
  orchestrator run on CPU 0;
- replica B applies nothing: its watches are fed from the database
  (notifications and the change log); it and the watch client processes run
  on CPU 1. PostgreSQL's own processes are not pinned (the server is shared).

Scenarios: 0 watchers (B idle); 1,000 watchers split across the jobs on B;
the same 1,000 on A (the same-run baseline: one process ingesting and
serving, as without replicas); 0 watchers again at the end (the run's noise).
Shares are of the mean of the 0-watcher runs. --quick runs only the watchers
on the second replica (20 of them), so the other keys and the shares are
absent then.

JSON keys: events, jobs, events_per_second_0_watchers,
events_per_second_0_watchers_repeat, events_per_second_1000_on_second,
events_per_second_1000_on_ingesting, share_1000_on_second,
share_1000_on_ingesting, lag_revisions_SCENARIO, lag_seconds_SCENARIO,
catchup_seconds_SCENARIO, incomplete_watchers_SCENARIO,
status_cpu_percent_SCENARIO (the ingesting replica's) for SCENARIO in
1000_on_second, 1000_on_ingesting.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import pinned, status, store_connection, store_position
from bench.report import Report, fmt_rate
from bench.watchers import Outcome, Side, StatusSide, Workload, scenario, write_log
from tests.helpers.postgres import fresh_database

INGESTING_CPU, SERVING_CPU = "0", "1"


class PostgresPoller:
    """Reads the committed cursor and revisions from the scenario's own database
    (made by open(), dropped by close())."""

    def __init__(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._connection: asyncpg.Connection | None = None
        self.dsn = ""

    async def open(self) -> str:
        self.dsn = (await self._stack.enter_async_context(fresh_database("stepstream_bench"))).dsn
        return self.dsn

    async def read(self) -> tuple[int, int]:
        if self._connection is None:
            self._connection = await store_connection(self.dsn)
        return await store_position(self._connection)

    async def changes(self) -> dict[str, list[int]]:
        by_job: dict[str, list[int]] = {}
        assert self._connection is not None
        for revision, job_id in await self._connection.fetch("SELECT revision, job_id FROM changes ORDER BY revision"):
            by_job.setdefault(job_id, []).append(int(revision))
        return by_job

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        await self._stack.aclose()


def replicas(watchers_on_second: bool) -> Side:
    """Replicas A (ingesting, CPU 0) and B (CPU 1) on a fresh database; the watchers on B or on A."""

    async def side(base: Path, orchestrator_address: str) -> StatusSide:
        poller = PostgresPoller()
        dsn = await poller.open()
        ingesting, second = (
            status(base / name, orchestrator_address, extra=("--store", dsn), prefix=pinned(cpu))
            for name, cpu in (("status-a", INGESTING_CPU), ("status-b", SERVING_CPU))
        )
        return StatusSide(ingesting, second if watchers_on_second else ingesting, poller, [second])

    return side


async def run(quick: bool) -> Report:
    workload = Workload(jobs=10, busy_children=300, children=40) if quick else \
        Workload(jobs=100, busy_children=10_000, children=233)
    watchers = 20 if quick else 1000
    outcomes = [
        (Outcome("0_watchers", "0 watchers", 0, False), replicas(False)),
        (Outcome("1000_on_second", f"{watchers:,} watchers on the second replica", watchers, False), replicas(True)),
        (Outcome("1000_on_ingesting", f"{watchers:,} watchers on the ingesting replica", watchers, False),
         replicas(False)),
        (Outcome("0_watchers_repeat", "0 watchers (again)", 0, False), replicas(False)),
    ]
    if quick:  # only to check that it runs: the watchers on the ingesting replica are bench/watchers.py's path
        outcomes = outcomes[1:2]
    with tempfile.TemporaryDirectory(prefix="stepstream-bench-") as tmp:
        work = Path(tmp)
        full_log = work / "orchestrator-full"
        first_part, last_seq, job_ids = await write_log(full_log, workload)
        for outcome, side in outcomes:
            await scenario(outcome, work, full_log, first_part, last_seq, job_ids, side, pin=SERVING_CPU)

    no_watchers = [outcome.events_per_second for outcome, _ in outcomes if outcome.watchers == 0]
    baseline = sum(no_watchers) / len(no_watchers) if no_watchers else None
    report = Report("replica_watchers")
    report.add("events", f"{last_seq:,}", f"{workload.jobs} fan-out jobs; {last_seq - first_part:,} after the "
               "watchers attach; status on PostgreSQL, replica A ingesting on CPU 0, B on CPU 1")
    figures: dict[str, Any] = {"events": last_seq, "jobs": workload.jobs}
    for outcome, _ in outcomes:
        figures[f"events_per_second_{outcome.key}"] = round(outcome.events_per_second)
        if outcome.watchers == 0:
            report.add(outcome.label, fmt_rate(outcome.events_per_second, "events"), "baseline: no watcher")
            continue
        k = outcome.key
        if baseline is not None:
            figures[f"share_{k}"] = round(outcome.events_per_second / baseline, 3)
        report.add(outcome.label, fmt_rate(outcome.events_per_second, "events"),
                   f"{figures[f'share_{k}']:.0%} of no watchers" if baseline is not None else "(no baseline: --quick)")
        report.add("  slowest watcher", f"{outcome.lag_revisions:,} revisions behind",
                   f"at most {outcome.lag_seconds:.2f} s behind; all caught up {outcome.catchup_seconds:.2f} s "
                   f"after ingest finished; {outcome.incomplete} incomplete, {outcome.failed} failed")
        report.add("  CPU while ingesting", f"replica A {outcome.status_cpu:.0%}",
                   f"watch client processes {outcome.client_cpu:.0%} in all")
        figures.update({
            f"lag_revisions_{k}": outcome.lag_revisions,
            f"lag_seconds_{k}": round(outcome.lag_seconds, 3),
            f"catchup_seconds_{k}": round(outcome.catchup_seconds, 3),
            f"incomplete_watchers_{k}": outcome.incomplete,
            f"status_cpu_percent_{k}": round(outcome.status_cpu * 100, 1),
        })
    report.notes.append("the ingesting replica's rate is the committed cursor's pace in PostgreSQL; "
                        "CPU % is of one core")
    report.figures.update(figures)
    return report
