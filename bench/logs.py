"""Step output: capture rate, serve rate, and what it costs the status stream.

Two scenarios, each with a fresh orchestrator and status service (separate
subprocesses, fresh data directories), the same status load in both:
LOAD_JOBS jobs of sequential `sleep 0.1` steps (bench/latency.py's load, so
a few hundred step transitions a second) with WATCHERS WatchJob watchers in
a client process (bench/watch_client.py), measured as bench/latency.py does:
receive time - the transition's own time, for the transitions made while
the printing job below runs (from its submission to its end).

- with output: a job fans out CHILDREN command children
  (CONCURRENCY at a time), each printing LINES lines of ~50 bytes (awk).
  Its output goes through the orchestrator's capture into its store.
- without output (the baseline): the same job with every child's output
  sent to /dev/null by the child itself, so the same processes run and only
  the capture is missing.

Figures:
- lines/s captured: CHILDREN x LINES / the output job's wall time (submit to
  completed, read from the orchestrator's GetJob), next to the same job's
  wall time without capture;
- bytes/s served to a follower: after the job, one client reads every
  child's output through StreamOutput, back to back; baseline: the same
  reader against a bare grpc.aio server streaming as many lines of the same
  shape from memory (bench/bare_output.py);
- transition -> watcher p50/p99 with the output job running vs without it;
- peak RSS of both services in each scenario.

JSON keys: lines, bytes, lines_per_second_captured, capture_seconds,
baseline_seconds_without_capture, bytes_per_second_served,
lines_per_second_served, baseline_bare_bytes_per_second,
baseline_bare_lines_per_second, latency_with_output_p50_ms,
latency_with_output_p99_ms, latency_without_output_p50_ms,
latency_without_output_p99_ms, samples_with_output, samples_without_output,
missed_with_output, missed_without_output, orchestrator_peak_rss_mb_with_output,
status_peak_rss_mb_with_output, orchestrator_peak_rss_mb_without_output,
status_peak_rss_mb_without_output, children, lines_per_child.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc
from stepstream_client.definitions import definition_from_mapping

from bench.common import WatchClient, mb, orchestrator, pct_ms, rss_sampled, status, watch_clients
from bench.common import started as started_services
from bench.ingest import committed_cursor
from bench.latency import in_window, job_steps, latency_text, transitions, wait_known
from bench.processes import Service
from bench.report import Report, fmt_rate, rate

CHILDREN = 100
LINES = 10_000
CONCURRENCY = 10
LOAD_JOBS = 10
LOAD_STEPS = 150
WATCHERS = 20
TERMINAL = frozenset({s.JOB_STATE_COMPLETED, s.JOB_STATE_FAILED, s.JOB_STATE_CANCELLED})
# ~50 bytes a line, `lines` of them, from one awk process (no interpreter start-up per child).
AWK = ('BEGIN { for (i = 0; i < {lines}; i++) '
       'printf "child %s line %06d the quick brown fox jumps over\\n", ENVIRON["STEPSTREAM_INDEX"], i }')


@dataclass
class Outcome:
    key: str
    capture: bool
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    missed: int = 0
    rss: dict[str, int] = field(default_factory=dict)
    served: tuple[int, int, float] = (0, 0, 0.0)  # lines, bytes, seconds
    bare: tuple[int, int, float] = (0, 0, 0.0)  # the same, from bench/bare_output.py


def output_job(children: int, lines: int, capture: bool) -> orch_pb.SubmitJobRequest:
    script = AWK.replace("{lines}", str(lines))
    command = ["awk", script] if capture else ["sh", "-c", 'exec awk "$0" > /dev/null', script]
    return orch_pb.SubmitJobRequest(definition=definition_from_mapping({"name": "printing", "steps": [{
        "name": "print", "type": "fanout", "count": children, "concurrency": CONCURRENCY,
        "child": {"type": "command", "command": command},
    }]}))


async def until_completed(stub: orch_grpc.OrchestratorServiceAsyncStub, job_id: str) -> None:
    """Until the job has ended; RuntimeError unless it completed (then its figures would mean nothing)."""
    async with asyncio.timeout(600):
        while (job := (await stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))).job).state not in TERMINAL:
            await asyncio.sleep(0.05)
    if job.state != s.JOB_STATE_COMPLETED:
        raise RuntimeError(f"the printing job ended {s.JobState.Name(job.state)}: {job.message}")


async def read_back(stub: orch_grpc.OrchestratorServiceAsyncStub, job_id: str, children: int) -> tuple[int, int]:
    """Every child's output through StreamOutput, back to back: (lines, bytes)."""
    lines = size = 0
    for child in range(children):
        async for response in stub.StreamOutput(orch_pb.StreamOutputRequest(job_id=job_id, step="print",
                                                                            child=child)):
            for line in response.chunk.lines:
                lines += 1
                size += len(line.data)
    return lines, size


async def timed_read_back(address: str, job_id: str, children: int) -> tuple[int, int, float]:
    """read_back() from `address` on a channel of its own: (lines, bytes, seconds)."""
    async with grpc.aio.insecure_channel(address) as channel:
        started = time.monotonic()
        lines, size = await read_back(orch_grpc.OrchestratorServiceStub(channel), job_id, children)
        return lines, size, time.monotonic() - started


async def scenario(outcome: Outcome, work: Path, *, children: int, lines: int, drain: float) -> None:
    """One scenario on services of its own: the status load and its watchers, the printing job
    (captured or not), whose run is the latency window, then (captured) its output read back."""
    orch_dir = work / f"{outcome.key}-orchestrator"
    status_dir = work / f"{outcome.key}-status"
    orch_service = orchestrator(orch_dir)
    orch_address = orch_service.start()
    status_service = status(status_dir, orch_address)
    try:
        status_address = status_service.start()
        async with rss_sampled([orch_service, status_service]), \
                grpc.aio.insecure_channel(orch_address) as orch_channel, \
                grpc.aio.insecure_channel(status_address) as status_channel:
            orch_stub = orch_grpc.OrchestratorServiceStub(orch_channel)
            status_stub = status_grpc.StatusServiceStub(status_channel)
            definitions = [definition_from_mapping({"name": f"load-{i}", "steps": job_steps(i, LOAD_STEPS)})
                           for i in range(LOAD_JOBS)]
            load = await asyncio.gather(*(orch_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))
                                          for definition in definitions))
            job_ids = [response.job.id for response in load]
            await wait_known(status_stub, job_ids)
            watched = [job_ids[i % len(job_ids)] for i in range(WATCHERS)]
            watchers = WatchClient(status_address, watched, "latency")
            async with watch_clients([watchers]):
                latest = (await orch_stub.GetJob(orch_pb.GetJobRequest(job_id=job_ids[0]))).seq
                async with asyncio.timeout(60):
                    while committed_cursor(status_dir) < latest:
                        await asyncio.sleep(0.01)
                window_start = time.time()
                started = time.monotonic()
                printing = await orch_stub.SubmitJob(output_job(children, lines, outcome.capture))
                await until_completed(orch_stub, printing.job.id)
                outcome.seconds = time.monotonic() - started
                window_end = time.time()
                await asyncio.sleep(drain)
                report = await watchers.finish({"command": "stop"})
            snapshots = {job_id: await status_stub.GetJob(status_pb.GetJobRequest(job_id=job_id))
                         for job_id in job_ids}
            if outcome.capture:
                outcome.served = await timed_read_back(orch_address, printing.job.id, children)
                async with started_services(Service("bench.bare_output", [str(lines)])) as (bare_address,):
                    outcome.bare = await timed_read_back(bare_address, "bare", children)
        outcome.rss = {"orchestrator": orch_service.peak_rss, "status": status_service.peak_rss}
    finally:
        status_service.stop()
        orch_service.stop()
    expected = {job_id: transitions(snapshot, window_start, window_end) for job_id, snapshot in snapshots.items()}
    outcome.latencies, received = in_window([report], window_start, window_end)
    outcome.missed = sum(len(expected[job_id] - received[i]) for i, job_id in enumerate(watched))


async def run(quick: bool) -> Report:
    children, lines = (4, 500) if quick else (CHILDREN, LINES)
    drain = 0.3 if quick else 1.0
    with_output = Outcome("with_output", capture=True)
    without = Outcome("without_output", capture=False)
    with tempfile.TemporaryDirectory(prefix="stepstream-bench-") as tmp:
        for outcome in (with_output, without):
            await scenario(outcome, Path(tmp), children=children, lines=lines, drain=drain)

    total = children * lines
    served_lines, served_bytes, served_seconds = with_output.served
    bare_lines, bare_bytes, bare_seconds = with_output.bare
    report = Report("logs")
    report.add("output job", f"{children} children x {lines:,} lines", f"~50 bytes a line, {CONCURRENCY} at a time")
    report.add("lines captured", fmt_rate(rate(total, with_output.seconds), "lines"),
               f"job {with_output.seconds:.2f} s; baseline: the same job, output to /dev/null, "
               f"{without.seconds:.2f} s")
    report.add("bytes served to a follower", fmt_rate(rate(served_bytes, served_seconds), "B"),
               f"{fmt_rate(rate(served_lines, served_seconds), 'lines')}, every child's StreamOutput back to back")
    report.add("  baseline: bare grpc.aio stream", fmt_rate(rate(bare_bytes, bare_seconds), "B"),
               f"{fmt_rate(rate(bare_lines, bare_seconds), 'lines')}, the same reader, the same lines from memory")
    report.add("transition -> watcher, with output", latency_text(with_output.latencies),
               f"p50 / p95 / p99 / max, n={len(with_output.latencies):,}, missed {with_output.missed}")
    report.add("  baseline: without output", latency_text(without.latencies),
               f"n={len(without.latencies):,}, missed {without.missed}, the same load and watchers")
    for outcome in (with_output, without):
        report.add(f"peak RSS, {outcome.key.replace('_', ' ')}",
                   f"{mb(outcome.rss['orchestrator'])} / {mb(outcome.rss['status'])} MB", "orchestrator / status")
    report.notes.append(f"status load: {LOAD_JOBS} jobs of sequential 0.1 s steps, {WATCHERS} watchers; latency "
                        "window: while the printing job runs")
    report.figures.update(
        lines=total, bytes=served_bytes, children=children, lines_per_child=lines,
        lines_per_second_captured=round(rate(total, with_output.seconds), 1),
        capture_seconds=round(with_output.seconds, 3), baseline_seconds_without_capture=round(without.seconds, 3),
        bytes_per_second_served=round(rate(served_bytes, served_seconds), 1),
        lines_per_second_served=round(rate(served_lines, served_seconds), 1),
        baseline_bare_bytes_per_second=round(rate(bare_bytes, bare_seconds), 1),
        baseline_bare_lines_per_second=round(rate(bare_lines, bare_seconds), 1),
        latency_with_output_p50_ms=pct_ms(with_output.latencies, 0.5),
        latency_with_output_p99_ms=pct_ms(with_output.latencies, 0.99),
        latency_without_output_p50_ms=pct_ms(without.latencies, 0.5),
        latency_without_output_p99_ms=pct_ms(without.latencies, 0.99),
        samples_with_output=len(with_output.latencies), samples_without_output=len(without.latencies),
        missed_with_output=with_output.missed, missed_without_output=without.missed,
        orchestrator_peak_rss_mb_with_output=mb(with_output.rss["orchestrator"]),
        status_peak_rss_mb_with_output=mb(with_output.rss["status"]),
        orchestrator_peak_rss_mb_without_output=mb(without.rss["orchestrator"]),
        status_peak_rss_mb_without_output=mb(without.rss["status"]),
    )
    return report
