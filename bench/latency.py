"""Latency from a transition in the orchestrator to a WatchJob client receiving it.

Four scenarios, each with a fresh orchestrator and status service (separate
subprocesses, fresh data directories):

- idle, 1 watcher / idle, 100 watchers: one job of sequential `sleep 0.2`
  steps (a step ends and the next starts every 0.2 s, nothing else runs); all
  watchers watch that one job.
- load, 1 watcher / load, 100 watchers: 50 jobs of sequential `sleep 0.1`
  steps (each job is staggered by a first step of i x 2 ms, so about 1,000
  step transitions per second in all, spread in time); the one watcher watches
  job 0, the 100 watchers are spread over the 50 jobs, two per job, so every
  transition of the load is measured twice.

How it is measured: the watchers run in a separate client process
(bench/watch_client.py, one process for up to 100 watchers, one grpc.aio
channel per watcher). Each one takes the job's current state, then for each
step whose state changes from what it held records receive_time -
transition_time, where transition_time is the step's own StepStats.started_at
(it started running) or finished_at (it ended): the orchestrator's clock at the
moment it decided the transition, the same machine clock as the client's
time.time(). The measurement window opens once every watcher holds its initial
state and the status service has applied every event the orchestrator had
logged at that moment (its committed cursor, read from its SQLite file, so the
start-up burst of job creations is behind it), and lasts `window` seconds; only transitions whose time falls in the
window count. After the window the clients keep reading for `drain` seconds;
`missed` counts transitions in the window (from a final GetJob of each job)
that a watcher of that job never received, and a missed transition is not in
the percentiles. achieved_transitions_per_second counts every step
transition (started or ended) of every job whose time falls in the window,
from the final GetJob snapshots; revisions_per_second is the status service's
revision growth over the window.

To show where the time goes, the harness also reads the orchestrator's
StreamStepEvents during the window and records receive_time - event time for
the same step transitions ("of which: orchestrator -> its stream"): the first
hop, before the status service.

With --telemetry, the idle 1-watcher and load 100-watcher scenarios run once
more for each variant of bench/telemetry.py (off, metrics on and scraped,
tracing on, another commit's code), one after the other in the same run; the
table gives each one's p50 / p99 next to telemetry off's.

Baselines, in the same run:
- bare unary, in the same window of the same scenario: round trips of a
  grpc.health.v1 Check on a bare grpc.aio server (bench/bare_unary.py), one
  call every 10 ms from this harness process, so it sees the same CPU
  competition;
- bare broadcast, right after each scenario, with the same watcher layout and
  the same client process: a bare grpc.aio WatchJob server
  (bench/bare_watch.py) that emits the same transitions (idle: one job, a
  step ends and the next starts every 0.2 s; load: 50 jobs every 0.1 s,
  staggered) with no orchestrator, storage or feed: what the transport and
  the client alone cost on this machine.

JSON keys (milliseconds unless named otherwise), for SCENARIO in idle_1_watcher,
idle_100_watchers, load_1_watcher, load_100_watchers:
  SCENARIO_p50_ms, SCENARIO_p95_ms, SCENARIO_p99_ms, SCENARIO_max_ms,
  SCENARIO_samples, SCENARIO_missed, SCENARIO_transitions_per_second,
  SCENARIO_revisions_per_second, SCENARIO_baseline_unary_p50_ms,
  SCENARIO_baseline_unary_p99_ms, SCENARIO_orchestrator_stream_p50_ms,
  SCENARIO_orchestrator_stream_p99_ms, SCENARIO_bare_watch_p50_ms,
  SCENARIO_bare_watch_p99_ms, SCENARIO_bare_watch_max_ms, SCENARIO_orchestrator_cpu_percent,
  SCENARIO_status_cpu_percent, SCENARIO_client_cpu_percent;
and achieved_transitions_per_second (load, 100 watchers),
baseline_unary_p50_ms / baseline_unary_p99_ms (idle, 1 watcher),
baseline_unary_load_p50_ms / baseline_unary_load_p99_ms (load, 100 watchers),
window_seconds, load_jobs, watcher_processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc
from stepstream_client.definitions import definition_from_mapping

from bench.common import (
    WatchClient,
    bare_unary,
    cpu_seconds,
    orchestrator,
    pct_ms,
    started,
    status,
    unary_round_trips,
    verdict,
    watch_clients,
)
from bench.ingest import committed_cursor
from bench.processes import Service
from bench.report import Report, percentile
from bench.telemetry import OFF, Telemetry, Variant
from stepstream_common.timeutil import seconds

IDLE_STEP = 0.2
LOAD_STEP = 0.1
LOAD_JOBS = 50
MAX_STEPS = 200  # the orchestrator's limit per job
WATCHERS_PER_PROCESS = 100
BASELINE_PACE = 0.01
TARGET_IDLE_P50_MS = 5
TARGET_LOAD_P99_MS = 50
HOP_STATES = frozenset({s.STEP_STATE_RUNNING, s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED,
                        s.STEP_STATE_CANCELLED, s.STEP_STATE_SKIPPED})


@dataclass
class Outcome:
    key: str
    label: str
    watchers: int
    latencies: list[float] = field(default_factory=list)
    missed: int = 0
    transitions_per_second: float = 0.0
    revisions_per_second: float = 0.0
    baseline: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    hop: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    processes: int = 0
    failed_watchers: int = 0


def job_steps(load_index: int | None, steps: int) -> list[dict[str, Any]]:
    if load_index is None:
        return [{"name": f"s{k:03d}", "type": "sleep", "seconds": IDLE_STEP} for k in range(steps)]
    offset = {"name": "offset", "type": "sleep", "seconds": round(load_index * LOAD_STEP / LOAD_JOBS, 4)}
    return [offset] + [{"name": f"s{k:03d}", "type": "sleep", "seconds": LOAD_STEP} for k in range(steps - 1)]


def transitions(snapshot: status_pb.GetJobResponse, start: float, end: float) -> set[tuple[str, str]]:
    """(step, "r" | "t") of every step that started or ended within [start, end)."""
    found: set[tuple[str, str]] = set()
    for stats in snapshot.steps:
        for kind, stamp in (("r", stats.started_at), ("t", stats.finished_at)):
            moment = seconds(stamp)
            if moment is not None and start <= moment < end:
                found.add((stats.name, kind))
    return found


async def wait_known(stub: status_grpc.StatusServiceAsyncStub, job_ids: Sequence[str]) -> None:
    """Until the status service has ingested every job (WatchJob on an unknown job is NOT_FOUND)."""
    async with asyncio.timeout(60):
        for job_id in job_ids:
            while True:
                try:
                    await stub.GetJob(status_pb.GetJobRequest(job_id=job_id))
                    break
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    await asyncio.sleep(0.01)


async def scenario(
    outcome: Outcome, work: Path, bare_address: str, *, load: bool, window: float, drain: float,
    variant: Variant = OFF, telemetry: Telemetry | None = None,
) -> None:
    # Enough steps to outlast the set-up, the window and the drain (at most the orchestrator's limit).
    steps = min(MAX_STEPS, math.ceil((window + drain + 8) / (LOAD_STEP if load else IDLE_STEP)))
    orch_service = variant.wrap(orchestrator(work / f"{outcome.key}-{variant.name}-orchestrator"))
    orch_address = orch_service.start()
    status_dir = work / f"{outcome.key}-{variant.name}-status"
    status_service = variant.wrap(status(status_dir, orch_address))
    try:
        status_address = status_service.start()
        async with grpc.aio.insecure_channel(orch_address) as orch_channel, \
                grpc.aio.insecure_channel(status_address) as status_channel:
            orch_stub = orch_grpc.OrchestratorServiceStub(orch_channel)
            status_stub = status_grpc.StatusServiceStub(status_channel)
            if load:
                definitions = [
                    definition_from_mapping({"name": f"load-{i}", "steps": job_steps(i, steps)})
                    for i in range(LOAD_JOBS)
                ]
            else:
                definitions = [definition_from_mapping({"name": "idle", "steps": job_steps(None, steps)})]
            responses = await asyncio.gather(*(
                orch_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition)) for definition in definitions
            ))
            job_ids = [response.job.id for response in responses]
            await wait_known(status_stub, job_ids)
            watched = [job_ids[i % len(job_ids)] for i in range(outcome.watchers)]
            clients = [
                WatchClient(status_address, watched[start:start + WATCHERS_PER_PROCESS], "latency")
                for start in range(0, len(watched), WATCHERS_PER_PROCESS)
            ]
            outcome.processes = len(clients)
            async with watch_clients(clients):
                # Steady state first: the status service has applied everything the orchestrator had
                # logged a moment ago (the start-up burst of job creations is behind it).
                latest = (await orch_stub.GetJob(orch_pb.GetJobRequest(job_id=job_ids[0]))).seq
                async with asyncio.timeout(60):
                    while committed_cursor(status_dir) < latest:
                        await asyncio.sleep(0.01)
                window_start = time.time()
                window_end = window_start + window
                hop = asyncio.create_task(
                    orchestrator_hop(orch_stub, latest, window_start, window_end, window_end + drain)
                )
                cpu_before = {"orchestrator": cpu_seconds(orch_service), "status": cpu_seconds(status_service)}
                revision_before = (await status_stub.GetJob(status_pb.GetJobRequest(job_id=job_ids[0]))).revision
                scraping = (telemetry.scraping(variant, [orch_service, status_service]) if telemetry
                            else contextlib.nullcontext())
                async with scraping:
                    outcome.baseline = await unary_round_trips(
                        bare_address, 0, pause=BASELINE_PACE, until=time.monotonic() + window
                    )
                revision_after = (await status_stub.GetJob(status_pb.GetJobRequest(job_id=job_ids[0]))).revision
                elapsed = time.time() - window_start
                outcome.cpu = {
                    "orchestrator": (cpu_seconds(orch_service) - cpu_before["orchestrator"]) / elapsed,
                    "status": (cpu_seconds(status_service) - cpu_before["status"]) / elapsed,
                }
                await asyncio.sleep(drain)
                reports = [await client.finish({"command": "stop"}) for client in clients]
                outcome.hop = await hop
            snapshots = {
                job_id: await status_stub.GetJob(status_pb.GetJobRequest(job_id=job_id)) for job_id in job_ids
            }
    finally:
        status_service.stop()
        orch_service.stop()
    expected = {job_id: transitions(snapshot, window_start, window_end) for job_id, snapshot in snapshots.items()}
    outcome.transitions_per_second = sum(len(found) for found in expected.values()) / window
    outcome.revisions_per_second = (revision_after - revision_before) / elapsed
    # The clients report CPU seconds from "ready" to "stop": window + drain (+ a little).
    outcome.cpu["client"] = sum(report["cpu_seconds"] for report in reports) / (elapsed + drain)
    outcome.latencies, received = in_window(reports, window_start, window_end)
    outcome.failed_watchers = sum(int(report["failed"]) for report in reports)
    outcome.missed = sum(len(expected[job_id] - received[i]) for i, job_id in enumerate(watched))


def in_window(reports: Sequence[dict[str, Any]], start: float, end: float
              ) -> tuple[list[float], dict[int, set[tuple[str, str]]]]:
    """Latencies of the transitions in [start, end), and what each watcher (by position) received."""
    latencies: list[float] = []
    received: dict[int, set[tuple[str, str]]] = {}
    position = 0
    for report in reports:
        for watcher in report["watchers"]:
            got_here = received.setdefault(position, set())
            for step, kind, moment, got in watcher["samples"]:
                if start <= moment < end:
                    got_here.add((step, kind))
                    latencies.append(got - moment)
            position += 1
    return latencies, received


async def bare_scenario(outcome: Outcome, *, load: bool, window: float, drain: float) -> None:
    """The same watcher layout and client against bench/bare_watch.py."""
    jobs, interval = (LOAD_JOBS, LOAD_STEP) if load else (1, IDLE_STEP)
    server = Service("bench.bare_watch", [str(jobs), str(interval)])
    async with started(server) as (address,):
        watched = [f"bare-{i % jobs}" for i in range(outcome.watchers)]
        clients = [
            WatchClient(address, watched[start:start + WATCHERS_PER_PROCESS], "latency")
            for start in range(0, len(watched), WATCHERS_PER_PROCESS)
        ]
        async with watch_clients(clients):
            window_start = time.time()
            await asyncio.sleep(window + drain)
            reports = [await client.finish({"command": "stop"}) for client in clients]
    outcome.bare, _ = in_window(reports, window_start, window_start + window)


async def orchestrator_hop(stub: orch_grpc.OrchestratorServiceAsyncStub, after_seq: int, start: float,
                           end: float, until: float) -> list[float]:
    """receive_time - event time of the step transitions in [start, end) read straight from the
    orchestrator's StreamStepEvents (from `after_seq`), until time.time() passes `until`."""
    latencies: list[float] = []
    call = stub.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=after_seq))
    try:
        while time.time() < until:
            try:
                async with asyncio.timeout(max(0.01, until - time.time())):
                    message = await call.read()
            except TimeoutError:
                break
            received = time.time()
            if message is grpc.aio.EOF:
                break
            assert isinstance(message, orch_pb.StreamStepEventsResponse)
            for event in message.batch.events:
                if event.WhichOneof("record") != "step" or event.step.state not in HOP_STATES:
                    continue
                moment = seconds(event.time)
                if moment is not None and start <= moment < end:
                    latencies.append(received - moment)
    finally:
        call.cancel()
    return latencies


def latency_text(values: list[float]) -> str:
    if not values:
        return "no samples"
    return " / ".join(f"{percentile(values, q) * 1000:.1f}" for q in (0.5, 0.95, 0.99, 1.0)) + " ms"


async def run(quick: bool, telemetry: bool = False, baseline_ref: str = "main") -> Report:
    window = 0.6 if quick else 12.0
    idle_window = 0.6 if quick else 10.0
    drain = 0.3 if quick else 1.0
    bare_window = 0.3 if quick else 5.0
    outcomes = [
        Outcome("idle_1_watcher", "idle, 1 watcher", 1),
        Outcome("idle_100_watchers", "idle, 100 watchers (all on the job)", 100),
        Outcome("load_1_watcher", "load, 1 watcher (job 0)", 1),
        Outcome("load_100_watchers", f"load, 100 watchers ({100 // LOAD_JOBS} per job)", 100),
    ]
    variants: list[tuple[Variant, list[Outcome]]] = []
    with tempfile.TemporaryDirectory(prefix="stepstream-bench-") as tmp:
        async with started(bare_unary()) as (bare_address,):
            for outcome in outcomes:
                loaded = outcome.key.startswith("load")
                await scenario(outcome, Path(tmp), bare_address, load=loaded,
                               window=window if loaded else idle_window, drain=drain)
                await bare_scenario(outcome, load=loaded, window=bare_window, drain=drain)
            if telemetry:
                variants = await telemetry_variants(Path(tmp), bare_address, baseline_ref, window, idle_window, drain)

    report = Report("latency")
    report.add("transition -> watcher", "p50 / p95 / p99 / max", "samples, missed")
    for outcome in outcomes:
        report.add(outcome.label, latency_text(outcome.latencies),
                   f"n={len(outcome.latencies):,}, missed {outcome.missed}")
        report.add("  of which: orchestrator -> its stream", latency_text(outcome.hop),
                   f"n={len(outcome.hop):,}, a StreamStepEvents reader in the harness")
        report.add("  baseline: bare grpc.aio broadcast", latency_text(outcome.bare),
                   f"n={len(outcome.bare):,}, same watchers and client")
        report.add("  baseline: bare unary round trip", f"{percentile(outcome.baseline, 0.5) * 1000:.2f} / "
                   f"{percentile(outcome.baseline, 0.99) * 1000:.2f} ms", "p50 / p99, same window, from the harness")
    for outcome in outcomes:
        report.add(f"  {outcome.label}: rates", f"{outcome.transitions_per_second:,.0f} transitions/s",
                   f"{outcome.revisions_per_second:,.0f} revisions/s; CPU orchestrator "
                   f"{outcome.cpu['orchestrator']:.0%}, status {outcome.cpu['status']:.0%}, "
                   f"watch client(s) {outcome.cpu['client']:.0%}")
    by_key = {outcome.key: outcome for outcome in outcomes}
    for key in ("idle_1_watcher", "idle_100_watchers"):
        outcome = by_key[key]
        p50 = percentile(outcome.latencies, 0.5) * 1000
        report.add(f"target: p50 < {TARGET_IDLE_P50_MS} ms, {outcome.label.split(' (')[0]}", f"{p50:.1f} ms",
                   f"{verdict(p50 < TARGET_IDLE_P50_MS)} (bare broadcast "
                   f"{percentile(outcome.bare, 0.5) * 1000:.1f} ms)")
    load = by_key["load_100_watchers"]
    load_p99 = percentile(load.latencies, 0.99) * 1000
    report.add(f"target: p99 < {TARGET_LOAD_P99_MS} ms, ~1,000/s, 100 watchers", f"{load_p99:.1f} ms",
               f"{verdict(load_p99 < TARGET_LOAD_P99_MS)} at {load.transitions_per_second:,.0f} transitions/s "
               f"achieved (orchestrator hop alone: p99 {percentile(load.hop, 0.99) * 1000:.1f} ms)")
    failed = sum(outcome.failed_watchers for outcome in outcomes)
    report.notes.append(
        f"window {idle_window:g} s idle / {window:g} s load, then {drain:g} s drain; watchers in "
        f"{max(o.processes for o in outcomes)} separate client process(es), one channel each; services, "
        f"client process and this harness share {os.cpu_count()} cores (CPU % is of one core)"
    )
    if failed:
        report.notes.append(f"{failed} watcher stream(s) failed")

    figures: dict[str, Any] = {}
    for outcome in outcomes:
        k = outcome.key
        figures.update({
            f"{k}_p50_ms": pct_ms(outcome.latencies, 0.5),
            f"{k}_p95_ms": pct_ms(outcome.latencies, 0.95),
            f"{k}_p99_ms": pct_ms(outcome.latencies, 0.99),
            f"{k}_max_ms": pct_ms(outcome.latencies, 1.0),
            f"{k}_samples": len(outcome.latencies),
            f"{k}_missed": outcome.missed,
            f"{k}_transitions_per_second": round(outcome.transitions_per_second, 1),
            f"{k}_revisions_per_second": round(outcome.revisions_per_second, 1),
            f"{k}_baseline_unary_p50_ms": pct_ms(outcome.baseline, 0.5),
            f"{k}_baseline_unary_p99_ms": pct_ms(outcome.baseline, 0.99),
            f"{k}_orchestrator_stream_p50_ms": pct_ms(outcome.hop, 0.5),
            f"{k}_orchestrator_stream_p99_ms": pct_ms(outcome.hop, 0.99),
            f"{k}_bare_watch_p50_ms": pct_ms(outcome.bare, 0.5),
            f"{k}_bare_watch_p99_ms": pct_ms(outcome.bare, 0.99),
            f"{k}_bare_watch_max_ms": pct_ms(outcome.bare, 1.0),
            f"{k}_orchestrator_cpu_percent": round(outcome.cpu["orchestrator"] * 100, 1),
            f"{k}_status_cpu_percent": round(outcome.cpu["status"] * 100, 1),
            f"{k}_client_cpu_percent": round(outcome.cpu["client"] * 100, 1),
        })
    idle = by_key["idle_1_watcher"]
    figures.update(
        achieved_transitions_per_second=round(load.transitions_per_second, 1),
        baseline_unary_p50_ms=pct_ms(idle.baseline, 0.5),
        baseline_unary_p99_ms=pct_ms(idle.baseline, 0.99),
        baseline_unary_load_p50_ms=pct_ms(load.baseline, 0.5),
        baseline_unary_load_p99_ms=pct_ms(load.baseline, 0.99),
        window_seconds=window,
        idle_window_seconds=idle_window,
        load_jobs=LOAD_JOBS,
        watcher_processes=max(outcome.processes for outcome in outcomes),
        failed_watchers=failed,
    )
    report.figures.update(figures)
    if telemetry:
        report_telemetry(report, variants)
    return report


TELEMETRY_SCENARIOS = ("idle_1_watcher", "load_100_watchers")


async def telemetry_variants(
    work: Path, bare_address: str, baseline_ref: str, window: float, idle_window: float, drain: float
) -> list[tuple[Variant, list[Outcome]]]:
    """TELEMETRY_SCENARIOS once per telemetry variant (bench/telemetry.py)."""
    measured: list[tuple[Variant, list[Outcome]]] = []
    async with Telemetry(baseline_ref) as telemetry:
        for variant in telemetry.variants:
            outcomes = [Outcome("idle_1_watcher", "idle, 1 watcher", 1),
                        Outcome("load_100_watchers", "load, 100 watchers", 100)]
            for outcome in outcomes:
                loaded = outcome.key.startswith("load")
                await scenario(outcome, work, bare_address, load=loaded, window=window if loaded else idle_window,
                               drain=drain, variant=variant, telemetry=telemetry)
            measured.append((variant, outcomes))
    return measured


def report_telemetry(report: Report, variants: list[tuple[Variant, list[Outcome]]]) -> None:
    report.add("telemetry: transition -> watcher", "p50 / p99", "idle 1 watcher; load 100 watchers")
    for variant, outcomes in variants:
        for outcome in outcomes:
            p50, p99 = pct_ms(outcome.latencies, 0.5), pct_ms(outcome.latencies, 0.99)
            report.add(f"  {variant.label}, {outcome.label}", f"{p50:.1f} / {p99:.1f} ms",
                       f"n={len(outcome.latencies):,}, missed {outcome.missed}; bare unary p50 "
                       f"{pct_ms(outcome.baseline, 0.5):.2f} ms")
            report.figures[f"telemetry_{variant.name}_{outcome.key}_p50_ms"] = p50
            report.figures[f"telemetry_{variant.name}_{outcome.key}_p99_ms"] = p99
