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

Scenarios, each with B running: 0 watchers; 1,000 watchers split across the
jobs on B; the same 1,000 on A (the same-run baseline: one process ingesting
and serving, as without replicas). ROUNDS rounds of the three, one after the
other, because this machine is shared and its load moves within minutes:
each share is a rate over the 0-watcher rate of the same round; the figures
are the medians over the rounds, with every round's listed. --quick runs one
round of the watchers on the second replica only (20 of them), so the other
keys and the shares are absent then.

JSON keys: events, jobs, rounds, events_per_second_SCENARIO (median) and
events_per_second_SCENARIO_runs for SCENARIO in 0_watchers, 1000_on_second,
1000_on_ingesting; share_S (median) and share_S_runs, lag_revisions_S,
lag_seconds_S, catchup_seconds_S (the largest of the rounds),
incomplete_watchers_S (summed), status_cpu_percent_S (the ingesting
replica's, median) for S in 1000_on_second, 1000_on_ingesting.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import pinned, status, store_connection, store_position
from bench.report import Report, fmt_rate
from bench.watchers import Outcome, Side, StatusSide, Workload, scenario, write_log
from tests.helpers.postgres import fresh_database

INGESTING_CPU, SERVING_CPU = "0", "1"
ROUNDS = 3


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
        return StatusSide(ingesting, poller, others=[second], serving=second if watchers_on_second else None)

    return side


# (key, label, with watchers, watchers on the second replica)
SCENARIOS = (
    ("0_watchers", "0 watchers", False, False),
    ("1000_on_second", "watchers on the second replica", True, True),
    ("1000_on_ingesting", "watchers on the ingesting replica", True, False),
)


async def run(quick: bool) -> Report:
    workload = Workload(jobs=10, busy_children=300, children=40) if quick else \
        Workload(jobs=100, busy_children=10_000, children=233)
    watchers = 20 if quick else 1000
    rounds = 1 if quick else ROUNDS
    # Round after round of the three scenarios, so that each share compares runs minutes apart at most.
    runs: dict[str, list[Outcome]] = {key: [] for key, *_ in SCENARIOS}
    with tempfile.TemporaryDirectory(prefix="stepstream-bench-") as tmp:
        work = Path(tmp)
        full_log = work / "orchestrator-full"
        first_part, last_seq, job_ids = await write_log(full_log, workload)
        for number in range(rounds):
            for key, label, watched, on_second in SCENARIOS:
                if quick and key != "1000_on_second":  # only to check that it runs: the rest is watchers.py's path
                    continue
                outcome = Outcome(f"{key}_{number}", f"{watchers:,} {label}" if watched else label,
                                  watchers if watched else 0, False)
                await scenario(outcome, work, full_log, first_part, last_seq, job_ids, replicas(on_second),
                               pin=SERVING_CPU)
                runs[key].append(outcome)

    report = Report("replica_watchers")
    report.add("events", f"{last_seq:,}", f"{workload.jobs} fan-out jobs; {last_seq - first_part:,} after the "
               "watchers attach; status on PostgreSQL, replica A ingesting on CPU 0, B on CPU 1")
    figures: dict[str, Any] = {"events": last_seq, "jobs": workload.jobs, "rounds": rounds}
    for key, outcomes in runs.items():
        if not outcomes:
            continue
        rates = [outcome.events_per_second for outcome in outcomes]
        figures[f"events_per_second_{key}"] = round(statistics.median(rates))
        figures[f"events_per_second_{key}_runs"] = [round(rate) for rate in rates]
        label = outcomes[0].label
        if key == "0_watchers":
            report.add(label, fmt_rate(statistics.median(rates), "events"),
                       f"baseline, median of {len(rates)}: {', '.join(f'{rate:,.0f}' for rate in rates)}")
            continue
        comment = f"median of {len(rates)}"
        if runs["0_watchers"]:
            shares = [outcome.events_per_second / baseline.events_per_second
                      for outcome, baseline in zip(outcomes, runs["0_watchers"], strict=True)]
            figures[f"share_{key}"] = round(statistics.median(shares), 3)
            figures[f"share_{key}_runs"] = [round(share, 3) for share in shares]
            comment = (f"{statistics.median(shares):.0%} of no watchers in its round (median; rounds: "
                       f"{', '.join(f'{share:.0%}' for share in shares)})")
        report.add(label, fmt_rate(statistics.median(rates), "events"), comment)
        worst = max(outcomes, key=lambda outcome: outcome.lag_seconds)
        report.add("  slowest watcher", f"{max(o.lag_revisions for o in outcomes):,} revisions behind",
                   f"at most {worst.lag_seconds:.2f} s behind; all caught up "
                   f"{max(o.catchup_seconds for o in outcomes):.2f} s after ingest finished; "
                   f"{sum(o.incomplete for o in outcomes)} incomplete, {sum(o.failed for o in outcomes)} failed")
        report.add("  CPU while ingesting", f"replica A {statistics.median(o.status_cpu for o in outcomes):.0%}",
                   f"watch client processes {statistics.median(o.client_cpu for o in outcomes):.0%} in all (medians)")
        figures.update({
            f"lag_revisions_{key}": max(o.lag_revisions for o in outcomes),
            f"lag_seconds_{key}": round(worst.lag_seconds, 3),
            f"catchup_seconds_{key}": round(max(o.catchup_seconds for o in outcomes), 3),
            f"incomplete_watchers_{key}": sum(o.incomplete for o in outcomes),
            f"status_cpu_percent_{key}": round(statistics.median(o.status_cpu for o in outcomes) * 100, 1),
        })
    report.notes.append("the ingesting replica's rate is the committed cursor's pace in PostgreSQL; "
                        "CPU % is of one core")
    report.figures.update(figures)
    return report
