"""Ingest throughput: orchestrator event log -> StreamStepEvents -> status service, committed.

Measured: sustained events per second, from the first committed batch until the
status service's committed cursor (sources.cursor in its SQLite file) reaches
the last seq of a pre-written orchestrator log (the process's start-up is not
counted; the events before the first commit are not either). Both services run
as separate processes, as deployed. With --telemetry, that is measured for each
variant of bench/telemetry.py (off, metrics, tracing, another commit), in
rounds (the median is reported), on a log whose job records carry a trace
context. Baselines in the same run, on the same events:
- a bare grpc.aio server stream of the same messages at the same batch size
  (bench/bare_stream.py), read by a bare client that only counts them;
- bare aiosqlite: the same rows (one per event) as batched, guarded UPSERTs,
  one executemany and one commit per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiosqlite
import grpc
from stepstream.common.v1 import records_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

from bench.common import cpu_seconds
from bench.processes import Service
from bench.report import Report, fmt_rate, percentile, rate
from bench.telemetry import OFF, Telemetry, Variant
from bench.workload import events_per_job, write_fanout_log
from orchestrator_svc.app import DATABASE_FILE as ORCHESTRATOR_DB
from status_svc.app import DATABASE_FILE as STATUS_DB

BATCH = 500  # events per stream message: the orchestrator's MAX_EVENTS_PER_MESSAGE
TELEMETRY_ROUNDS = 5
CHILDREN_PER_JOB = 100


async def bare_grpc(log_dir: Path, expected: int) -> float:
    server = Service("bench.bare_stream", [str(log_dir), str(BATCH)])
    address = server.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await channel.channel_ready()
            stub = pb_grpc.OrchestratorServiceStub(channel)
            started = time.perf_counter()
            received = 0
            async for message in stub.StreamStepEvents(pb.StreamStepEventsRequest()):
                received += len(message.batch.events)
            elapsed = time.perf_counter() - started
    finally:
        server.stop()
    assert received == expected, (received, expected)
    return rate(received, elapsed)


UPSERT = """
INSERT INTO status (job_id, step, idx, state, seq) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (job_id, step, idx) DO UPDATE SET state = excluded.state, seq = excluded.seq
WHERE excluded.seq > status.seq
"""


# One baseline row per event: (job_id, step, idx, state, seq).
Row = tuple[str, str, int, int, int]


def read_log(log_dir: Path) -> list[records_pb2.StepEvent]:
    """Every event of the orchestrator's log in `log_dir`."""
    with sqlite3.connect(log_dir / ORCHESTRATOR_DB) as source:
        return [records_pb2.StepEvent.FromString(row[0]) for row in source.execute("SELECT data FROM events")]


def event_rows(events: Sequence[records_pb2.StepEvent]) -> list[Row]:
    """The bare baselines' rows: what each event sets, without the service's folding."""
    rows: list[Row] = []
    for event in events:
        kind = event.WhichOneof("record")
        if kind == "job":
            rows.append((event.job.id, "", -1, event.job.state, event.seq))
        elif kind == "step":
            rows.append((event.step.job_id, event.step.name, -1, event.step.state, event.seq))
        else:
            rows.append((event.child.job_id, event.child.step_name, event.child.index, event.child.state, event.seq))
    return rows


async def bare_sqlite(log_dir: Path, work_dir: Path) -> float:
    rows = event_rows(read_log(log_dir))
    async with aiosqlite.connect(work_dir / "bare.sqlite3", isolation_level=None) as db:
        await db.executescript(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
            "CREATE TABLE status (job_id TEXT, step TEXT, idx INTEGER, state INTEGER, seq INTEGER,"
            " PRIMARY KEY (job_id, step, idx)) WITHOUT ROWID;"
        )
        started = time.perf_counter()
        for start in range(0, len(rows), BATCH):
            await db.execute("BEGIN")
            await db.executemany(UPSERT, rows[start:start + BATCH])
            await db.execute("COMMIT")
        elapsed = time.perf_counter() - started
    return rate(len(rows), elapsed)


def committed_cursor(status_dir: Path) -> int:
    path = status_dir / STATUS_DB
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            row = db.execute("SELECT MAX(cursor) FROM sources").fetchone()
    except sqlite3.OperationalError:
        return 0
    return int(row[0] or 0)


async def stepstream_ingest(
    log_dir: Path, status_dir: Path, last_seq: int, variant: Variant = OFF, telemetry: Telemetry | None = None
) -> tuple[float, int, float]:
    """Events per second, revisions made, and CPU microseconds per event (both services, same span of time)."""
    orchestrator = variant.service("orchestrator_svc", ["--listen", "127.0.0.1:0", "--data-dir", str(log_dir)])
    address = orchestrator.start()
    status = variant.service("status_svc", ["--listen", "127.0.0.1:0", "--data-dir", str(status_dir),
                                            "--orchestrator", address])
    try:
        status.start()
        while (first := committed_cursor(status_dir)) == 0:
            await asyncio.sleep(0.002)
        started, cpu_before = time.perf_counter(), cpu_seconds(orchestrator) + cpu_seconds(status)
        scraping = telemetry.scraping(variant, [orchestrator, status]) if telemetry else contextlib.nullcontext()
        async with scraping:
            while committed_cursor(status_dir) < last_seq:
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(orchestrator) + cpu_seconds(status) - cpu_before  # before the last scrape
        with sqlite3.connect(f"file:{status_dir / STATUS_DB}?mode=ro", uri=True) as db:
            revisions = int(db.execute("SELECT MAX(revision) FROM changes").fetchone()[0] or 0)
    finally:
        status.stop()
        orchestrator.stop()
    return rate(last_seq - first, elapsed), revisions, cpu / (last_seq - first) * 1e6


async def run(quick: bool, telemetry: bool = False, baseline_ref: str = "main") -> Report:
    jobs = 34 if quick else 500  # ~10k or ~150k events
    report = Report("ingest")
    with tempfile.TemporaryDirectory(prefix="stepstream-bench-") as tmp:
        work = Path(tmp)
        log_dir = work / "orchestrator"
        last_seq = await write_fanout_log(log_dir, jobs, CHILDREN_PER_JOB, traced=telemetry)
        assert last_seq == jobs * events_per_job(CHILDREN_PER_JOB)
        if telemetry:
            ours, revisions = await telemetry_variants(report, log_dir, work, last_seq, quick, baseline_ref)
        else:
            ours, revisions, _ = await stepstream_ingest(log_dir, work / "status", last_seq)
        grpc_rate = await bare_grpc(log_dir, last_seq)
        sqlite_rate = await bare_sqlite(log_dir, work)
    report.add("events", f"{last_seq:,}", f"{jobs} fan-out jobs x {CHILDREN_PER_JOB} children")
    report.add("stepstream ingest", fmt_rate(ours, "events"),
               f"log -> stream -> fold -> commit; {revisions:,} revisions")
    report.add("baseline: bare gRPC stream", fmt_rate(grpc_rate, "events"), f"same messages, {BATCH} per message")
    report.add("baseline: bare aiosqlite upserts", fmt_rate(sqlite_rate, "rows"), f"{BATCH} per transaction")
    report.add("ratio to bare gRPC", f"{ours / grpc_rate:.0%}", "target >= 30%")
    report.add("ratio to bare aiosqlite", f"{ours / sqlite_rate:.0%}", "")
    report.figures.update(
        events=last_seq,
        events_per_second=round(ours),
        baseline_grpc_events_per_second=round(grpc_rate),
        baseline_sqlite_rows_per_second=round(sqlite_rate),
        ratio_to_grpc=round(ours / grpc_rate, 3),
        revisions=revisions,
        batch=BATCH,
    )
    return report


async def telemetry_variants(
    report: Report, log_dir: Path, work: Path, last_seq: int, quick: bool, baseline_ref: str
) -> tuple[float, int]:
    """Ingest rates and CPU per event of every telemetry variant, in interleaved rounds; returns
    telemetry off's median rate. On a shared machine the rates swing with the neighbours' load;
    the CPU the two services spend per event much less so: it is the cost figure."""
    rounds = 1 if quick else TELEMETRY_ROUNDS
    async with Telemetry(baseline_ref) as telemetry:
        rates: dict[str, list[float]] = {variant.name: [] for variant in telemetry.variants}
        cpu: dict[str, list[float]] = {variant.name: [] for variant in telemetry.variants}
        revisions = 0
        for round_number in range(rounds):
            for variant in telemetry.variants:
                status_dir = work / f"status-{variant.name}-{round_number}"
                measured, revisions, micros = await stepstream_ingest(log_dir, status_dir, last_seq, variant,
                                                                      telemetry)
                rates[variant.name].append(measured)
                cpu[variant.name].append(micros)
        medians = {name: percentile(values, 0.5) for name, values in rates.items()}
        cpu_medians = {name: percentile(values, 0.5) for name, values in cpu.items()}
        off, off_cpu = medians[OFF.name], cpu_medians[OFF.name]
        report.add("telemetry", "median events/s", f"of {rounds} interleaved round(s); vs telemetry off")
        for variant in telemetry.variants:
            runs = ", ".join(f"{value:,.0f}" for value in rates[variant.name])
            report.add(f"  {variant.label}", fmt_rate(medians[variant.name], "events"),
                       f"{medians[variant.name] / off - 1:+.1%} ({runs})")
            report.figures[f"telemetry_{variant.name}_events_per_second"] = round(medians[variant.name])
        report.add("telemetry: CPU per event", "median µs", "both services' user+system CPU; vs telemetry off")
        for variant in telemetry.variants:
            runs = ", ".join(f"{value:.1f}" for value in cpu[variant.name])
            report.add(f"  {variant.label}", f"{cpu_medians[variant.name]:.1f} µs",
                       f"{cpu_medians[variant.name] / off_cpu - 1:+.1%} ({runs})")
            report.figures[f"telemetry_{variant.name}_cpu_us_per_event"] = round(cpu_medians[variant.name], 2)
        report.figures.update(
            metrics_cost=round(1 - medians["metrics"] / off, 3), tracing_cost=round(1 - medians["tracing"] / off, 3),
            off_vs_main=round(off / medians["main"] - 1, 3), telemetry_rounds=rounds,
            metrics_cpu_cost=round(cpu_medians["metrics"] / off_cpu - 1, 3),
            tracing_cpu_cost=round(cpu_medians["tracing"] / off_cpu - 1, 3),
            off_cpu_vs_main=round(off_cpu / cpu_medians["main"] - 1, 3),
            spans_exported=telemetry.spans_received, metrics_scrapes=telemetry.scrapes,
        )
        report.notes.append(f"tracing: {telemetry.spans_received:,} spans reached the OTLP sink; metrics: "
                            f"{telemetry.scrapes} scrapes")
    return off, revisions
