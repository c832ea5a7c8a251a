"""Failover: how long ingest stops when the status replica holding the lease is killed -9.

Two status replicas (`python -m status_svc --store postgresql://...`, separate
subprocesses, the service's default lease settings; --quick: TTL 2 s, poll
0.2 s) on one fresh PostgreSQL database follow one orchestrator (a
subprocess) that runs one steady fan-out of sleep children, so that events
never stop coming. Two phases, each with its own database and services: a
fan-out of 1,000 children (one at a time, 40 ms each: the mechanism itself),
then one of 100,000 (four at a time, 5 ms each): a new holder loads the
children of the unfinished jobs its first batch touches before it commits, so
the size of what is running is part of the failover (--quick: the first
phase only).

Each of RUNS rounds, after a random pause (0.3 to 1 poll interval) of ingest
going on: the replica the lease row names is killed -9; failover is the time
from the moment the killed process is reaped to the first commit by another
replica (the committed cursor, sources.cursor, read from the database every
POLL seconds, moving past what it was after the kill: a dead process commits
nothing more). The killed replica is then started again, as the standby of
the next round.

Reference, in the same run:
- lease_ttl_seconds / lease_poll_seconds: the configured lease timing: a
  standby looks for a free lease every poll interval, and a holder that stops
  renewing without its connection closing (a hung process, a lost machine) is
  taken over once its TTL has passed; a killed process's connection closes at
  once, so its lease is free at the next poll;
- fresh start: one replica started alone on the database (the other
  stopped) until its first commit: process start, schema check, lease,
  resuming the orchestrator's stream: what a restart-in-place (the
  single-replica deployment) costs instead.

JSON keys: runs, lease_ttl_seconds, lease_poll_seconds, and for each phase
(P empty for 1,000 children, "large_" for 100,000): Pchildren,
failover_Pmedian_seconds, failover_Pmax_seconds, failover_Pmin_seconds,
failover_Pseconds (every run), fresh_start_Pseconds, Pevents_per_second
(events committed per second over the rounds, kills included).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream_client.definitions import definition_from_mapping

from bench.common import orchestrator, started, status, store_connection, store_position
from bench.processes import Service
from bench.report import Report
from status_svc.config import StatusConfig
from status_svc.replication.lease import lease_holder
from tests.helpers.postgres import fresh_database

RUNS = 7
POLL = 0.002
# A bound so that a broken service fails the benchmark instead of hanging it.
WITHIN = 120.0


async def committed_cursor(connection: asyncpg.Connection) -> int:
    return (await store_position(connection))[0]


async def first_commit_after(connection: asyncpg.Connection, cursor: int, since: float) -> float:
    """Seconds from `since` (time.monotonic()) until the committed cursor is past `cursor`."""
    async with asyncio.timeout(WITHIN):
        while await committed_cursor(connection) <= cursor:
            await asyncio.sleep(POLL)
    return time.monotonic() - since


async def holder_of(connection: asyncpg.Connection, replicas: list[Service]) -> Service:
    """The replica the lease row names (HOST:PID:ADDRESS), once one holds it unexpired."""
    async with asyncio.timeout(WITHIN):
        while True:
            held = await lease_holder(connection)
            if held is not None and held[2]:
                named = [replica for replica in replicas if held[0].endswith(f":{replica.address}")]
                if named:
                    return named[0]
            await asyncio.sleep(POLL)


async def fresh_start(replica: Service, connection: asyncpg.Connection) -> float:
    """Start `replica` alone; seconds from its launch to its first commit."""
    cursor = await committed_cursor(connection)
    launched = time.monotonic()
    await asyncio.to_thread(replica.start)
    return await first_commit_after(connection, cursor, launched)


@dataclass(frozen=True)
class Phase:
    """One running job the replicas follow while their holder is killed: a fan-out of `children`
    sleep children, `concurrency` at a time, slow enough to outlast every round."""

    key: str
    children: int
    concurrency: int
    seconds: float


# The same mechanism with a small and a large unfinished job: a new holder loads the children of the
# jobs its first batch touches before it commits (status_svc/storage/sql.py, load_jobs).
PHASES = (Phase("", 1_000, 1, 0.04), Phase("large_", 100_000, 4, 0.005))


@dataclass
class Measured:
    failovers: list[float]
    fresh: float
    events_per_second: float


async def phase(work: Path, job: Phase, runs: int, lease: tuple[str, ...], poll: float) -> Measured:
    """Fresh database, orchestrator and two replicas; `runs` kills of the holder."""
    rng = random.Random(11)
    definition = definition_from_mapping({"name": "bench-failover", "steps": [{
        "name": "steady", "type": "fanout", "count": job.children, "concurrency": job.concurrency,
        "child": {"type": "sleep", "seconds": job.seconds},
    }]})
    failovers: list[float] = []
    orch_service = orchestrator(work / f"{job.key}orchestrator")
    async with fresh_database("stepstream_bench") as database, started(orch_service) as (orch_address,):
        replicas = [status(work / f"{job.key}status-{n}", orch_address, extra=("--store", database.dsn, *lease))
                    for n in range(2)]
        connection = await store_connection(database.dsn)
        try:
            async with grpc.aio.insecure_channel(orch_address) as channel:
                await orch_grpc.OrchestratorServiceStub(channel).SubmitJob(
                    orch_pb.SubmitJobRequest(definition=definition))
            fresh = await fresh_start(replicas[0], connection)
            await asyncio.to_thread(replicas[1].start)
            await asyncio.sleep(poll)  # the first holder has caught up with what ran while it started
            measured_from, first_cursor = time.monotonic(), await committed_cursor(connection)
            for round_number in range(runs):
                await asyncio.sleep(rng.uniform(0.3, 1.0) * poll)
                holder = await holder_of(connection, replicas)
                await asyncio.to_thread(holder.kill)
                killed_at = time.monotonic()
                failovers.append(await first_commit_after(connection, await committed_cursor(connection),
                                                          killed_at))
                if round_number < runs - 1:
                    await asyncio.to_thread(holder.start)
            events_per_second = (await committed_cursor(connection) - first_cursor) / (
                time.monotonic() - measured_from)
        finally:
            await connection.close()
            for replica in replicas:
                replica.stop()
    return Measured(failovers, fresh, events_per_second)


async def run(quick: bool) -> Report:
    runs = 1 if quick else RUNS
    defaults = StatusConfig()
    # --quick only checks that it runs: quicker lease timing than the defaults measured otherwise.
    ttl, poll = (2.0, 0.2) if quick else (defaults.lease_ttl, defaults.poll_interval)
    lease = ("--lease-ttl", str(ttl), "--poll-interval", str(poll))
    report = Report("failover")
    report.figures.update(runs=runs, lease_ttl_seconds=ttl, lease_poll_seconds=poll)
    with tempfile.TemporaryDirectory(prefix="stepstream-bench-") as tmp:
        for job in PHASES[:1] if quick else PHASES:
            measured = await phase(Path(tmp), job, runs, lease, poll)
            failovers = measured.failovers
            median, worst = statistics.median(failovers), max(failovers)
            running = f"a running fan-out of {job.children:,} children"
            report.add(f"failover, median ({job.children:,} children)", f"{median:.3f} s",
                       f"kill -9 of the lease holder to the first commit by the other replica, {runs} runs; "
                       f"{running}")
            report.add(f"failover, max ({job.children:,} children)", f"{worst:.3f} s",
                       f"min {min(failovers):.3f} s; ingest meanwhile {measured.events_per_second:,.0f} events/s")
            report.add(f"baseline: fresh single replica ({job.children:,})", f"{measured.fresh:.3f} s",
                       "from its launch to its first commit")
            k = job.key
            report.figures.update({
                f"{k}children": job.children, f"failover_{k}median_seconds": round(median, 4),
                f"failover_{k}max_seconds": round(worst, 4), f"failover_{k}min_seconds": round(min(failovers), 4),
                f"failover_{k}seconds": [round(f, 4) for f in failovers],
                f"fresh_start_{k}seconds": round(measured.fresh, 4),
                f"{k}events_per_second": round(measured.events_per_second),
            })
    report.add("baseline: lease poll / TTL", f"{poll:g} s / {ttl:g} s",
               "configured: a standby looks for a free lease every poll; a hung holder is taken over after the TTL")
    return report
