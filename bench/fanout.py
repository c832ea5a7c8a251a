"""Fan-out: one job with one fan-out step of N trivial children, end to end
(`--children N`, default 10,000; `--fanouts K` runs K such steps side by side
in the one job, K x N children in all).

Measured, with the orchestrator and the status service as separate
subprocesses (fresh data directories) and a client in this process using the
generated stubs:

- seconds: from just before SubmitJob until the *status service's* GetJob
  shows all N children terminal (completed + failed + cancelled == N in the
  step's child counts), polled every 20 ms;
- children_per_second: N / seconds;
- orchestrator_seconds: the step's own finished_at (the orchestrator's clock
  when it decided the step completed) minus the submit time: the part of the
  wall time spent running children, before the status service catches up;
- orchestrator_peak_rss_mb / status_peak_rss_mb: the peak of both processes'
  RSS, sampled every 50 ms from before SubmitJob until the job is terminal
  in the status service (and *_start_rss_mb before the job, for reference);
- getjob_median_ms / getjob_p99_ms: the status service's GetJob for the
  finished job, sequential calls on a warm channel;
- orchestrator_max_stall_ms / status_max_stall_ms: the longest event-loop
  stall inside each service over the whole run, from a probe task on its own
  loop (bench/loop_lag.py), with orchestrator_stalls_over_100ms the number of
  stalls longer than 100 ms: what decides whether heartbeats, GetJob and
  streams stay live while a large fan-out is planned and recorded;
  *_max_busy_ms: the most CPU the loop's thread used between two wake-ups of
  the probe (a stall of the loop itself, not the process waiting for a core).

Baselines in the same run:
- baseline_children_per_second: the same K x N `await bench.tasks.noop()` calls
  in this process with the same concurrency, K x CONCURRENCY (that many asyncio
  workers taking the next index from a shared iterator, as the orchestrator's
  fan-out does): the cost of the work itself, without stepstream;
- baseline_unary_median_ms / baseline_unary_p99_ms: a grpc.health.v1 Check
  round trip against a bare grpc.aio server (bench/bare_unary.py);
- status_health_median_ms: the same Check against the status service (the
  server's floor, without the GetJob handler).

JSON keys: children, fanouts, concurrency, seconds, children_per_second,
orchestrator_seconds, orchestrator_peak_rss_mb, status_peak_rss_mb,
orchestrator_start_rss_mb, status_start_rss_mb, orchestrator_max_stall_ms,
orchestrator_max_busy_ms, orchestrator_stalls_over_100ms, status_max_stall_ms,
status_max_busy_ms, getjob_median_ms,
getjob_p99_ms, getjob_calls, baseline_children_per_second,
baseline_unary_median_ms, baseline_unary_p99_ms, status_health_median_ms.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import grpc
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc
from stepstream_client.definitions import definition_from_mapping

from bench import tasks
from bench.common import (
    bare_unary,
    loop_lag,
    mb,
    ms,
    orchestrator,
    pct_ms,
    rss_sampled,
    started,
    status,
    unary_round_trips,
    verdict,
)
from bench.report import Report, fmt_rate, percentile, rate
from stepstream_common.timeutil import seconds as timestamp_seconds

CONCURRENCY = 100
POLL = 0.02
TARGET_CHILDREN_PER_SECOND = 2000
TARGET_RSS_MB = 300
TARGET_GETJOB_MS = 20
TARGET_STALL_MS = 50
DEFAULT_CHILDREN = 10_000


async def bare_children(children: int, concurrency: int) -> float:
    """children/s of the same calls, in-process, same concurrency."""
    indexes = iter(range(children))
    done = 0

    async def take() -> None:
        nonlocal done
        for _ in indexes:
            await tasks.noop()
            done += 1

    started_at = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, children)):
            group.create_task(take())
    elapsed = time.perf_counter() - started_at
    assert done == children
    return rate(children, elapsed)


def terminal_children(response: status_pb.GetJobResponse) -> int:
    return sum(step.children.completed + step.children.failed + step.children.cancelled for step in response.steps)


async def get_job(stub: status_grpc.StatusServiceAsyncStub, job_id: str) -> status_pb.GetJobResponse | None:
    try:
        return await stub.GetJob(status_pb.GetJobRequest(job_id=job_id))
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:  # not ingested yet
            return None
        raise


async def run(quick: bool, children: int | None = None, fanouts: int = 1) -> Report:
    per_step = children if children is not None else 300 if quick else DEFAULT_CHILDREN
    children = per_step * fanouts
    getjob_calls = 20 if quick else 100
    report = Report("fanout")
    definition = definition_from_mapping({"name": "bench-fanout", "steps": [{
        "name": "crawl" if fanouts == 1 else f"crawl-{number}", "type": "fanout", "depends_on": [],
        "count": per_step, "concurrency": CONCURRENCY,
        "child": {"type": "python", "function": "bench.tasks:noop"},
    } for number in range(fanouts)]})
    with tempfile.TemporaryDirectory(prefix="stepstream-bench-") as tmp:
        work = Path(tmp)
        orch_lag, status_lag = work / "orchestrator-lag.json", work / "status-lag.json"
        orch_service = orchestrator(work / "orchestrator", lag_log=orch_lag)
        orch_address = orch_service.start()
        status_service = status(work / "status", orch_address, lag_log=status_lag)
        try:
            status_address = status_service.start()
            async with started(bare_unary()) as (bare_address,), \
                    grpc.aio.insecure_channel(orch_address) as orch_channel, \
                    grpc.aio.insecure_channel(status_address) as status_channel:
                orch_stub = orch_grpc.OrchestratorServiceStub(orch_channel)
                status_stub = status_grpc.StatusServiceStub(status_channel)
                await orch_channel.channel_ready()
                await status_channel.channel_ready()
                orch_start_rss, status_start_rss = orch_service.sample_rss(), status_service.sample_rss()
                async with rss_sampled([orch_service, status_service]):
                    submitted_wall = time.time()
                    submitted = time.perf_counter()
                    response = await orch_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))
                    job_id = response.job.id
                    while True:
                        snapshot = await get_job(status_stub, job_id)
                        if snapshot is not None and terminal_children(snapshot) >= children:
                            break
                        await asyncio.sleep(POLL)
                    elapsed = time.perf_counter() - submitted
                    while snapshot is None or snapshot.job.state not in (
                        s.JOB_STATE_COMPLETED, s.JOB_STATE_FAILED, s.JOB_STATE_CANCELLED
                    ):
                        await asyncio.sleep(POLL)
                        snapshot = await get_job(status_stub, job_id)
                step_finished = max(timestamp_seconds(step.finished_at) or float("nan") for step in snapshot.steps)
                orchestrator_seconds = step_finished - submitted_wall
                outcome = ", ".join(sorted({s.StepState.Name(step.state) for step in snapshot.steps}))
                completed = sum(step.children.completed for step in snapshot.steps)
                getjob: list[float] = []
                for _ in range(getjob_calls):
                    t0 = time.perf_counter()
                    await status_stub.GetJob(status_pb.GetJobRequest(job_id=job_id))
                    getjob.append(time.perf_counter() - t0)
                bare_calls = await unary_round_trips(bare_address, max(getjob_calls, 200))
                status_health = await unary_round_trips(status_address, max(getjob_calls, 200))
        finally:
            status_service.stop()
            orch_service.stop()
        orch_stall, status_stall = loop_lag(orch_lag), loop_lag(status_lag)
    baseline = await bare_children(children, CONCURRENCY * fanouts)
    ours = rate(children, elapsed)
    orch_peak, status_peak = mb(orch_service.peak_rss), mb(status_service.peak_rss)
    getjob_median, getjob_p99 = percentile(getjob, 0.5), percentile(getjob, 0.99)

    shape = f"{fanouts} fan-outs of {per_step:,}, each" if fanouts > 1 else "python worker bench.tasks:noop,"
    report.add("children", f"{children:,}", f"{shape} concurrency {CONCURRENCY}; "
               f"step {outcome}, {completed:,} completed")
    report.add("submit -> all children terminal", f"{elapsed:,.2f} s", "as seen by the status service's GetJob")
    report.add("  of which orchestrator", f"{orchestrator_seconds:,.2f} s", "submit -> the step's finished_at")
    report.add("stepstream fan-out", fmt_rate(ours, "children"),
               f"target >= {TARGET_CHILDREN_PER_SECOND:,}/s: {verdict(ours >= TARGET_CHILDREN_PER_SECOND)}")
    report.add("baseline: bare asyncio calls", fmt_rate(baseline, "children"),
               f"same {children:,} awaits, {CONCURRENCY * fanouts} workers, in-process")
    report.add("ratio to bare asyncio", f"{ours / baseline:.2%}", "")
    report.add("orchestrator peak RSS", f"{orch_peak:,.1f} MB",
               f"{mb(orch_start_rss):,.1f} MB before the job; target < {TARGET_RSS_MB} MB: "
               f"{verdict(orch_peak < TARGET_RSS_MB)}")
    report.add("status service peak RSS", f"{status_peak:,.1f} MB",
               f"{mb(status_start_rss):,.1f} MB before the job; target < {TARGET_RSS_MB} MB: "
               f"{verdict(status_peak < TARGET_RSS_MB)}")
    report.add("orchestrator longest loop stall", f"{orch_stall['max_ms']:,.1f} ms",
               f"of which busy on its loop {orch_stall['max_busy_ms']:,.1f} ms (target < {TARGET_STALL_MS} ms: "
               f"{verdict(orch_stall['max_busy_ms'] < TARGET_STALL_MS)}); "
               f"{int(orch_stall['over_100ms'])} stalls over 100 ms")
    report.add("status service longest loop stall", f"{status_stall['max_ms']:,.1f} ms",
               f"of which busy on its loop {status_stall['max_busy_ms']:,.1f} ms; "
               f"{int(status_stall['over_100ms'])} stalls over 100 ms")
    report.add("status GetJob median", ms(getjob_median), f"{getjob_calls} sequential calls after the job finished")
    report.add("status GetJob p99", ms(getjob_p99),
               f"target < {TARGET_GETJOB_MS} ms: {verdict(getjob_p99 * 1000 < TARGET_GETJOB_MS)}")
    report.add("baseline: bare unary median", ms(percentile(bare_calls, 0.5)),
               f"grpc.health Check on a bare grpc.aio server, {len(bare_calls)} calls")
    report.add("baseline: bare unary p99", ms(percentile(bare_calls, 0.99)), "")
    report.add("status service health Check median", ms(percentile(status_health, 0.5)),
               "same call on the status service: its server floor")
    report.add("GetJob / bare unary (median)", f"{getjob_median / percentile(bare_calls, 0.5):.1f}x", "")
    report.notes.append("orchestrator, status service and this client share the machine's cores; the "
                        "status service is polled with GetJob every 20 ms while the job runs")
    report.figures.update(
        children=children,
        fanouts=fanouts,
        concurrency=CONCURRENCY,
        seconds=round(elapsed, 3),
        children_per_second=round(ours),
        orchestrator_seconds=round(orchestrator_seconds, 3),
        orchestrator_peak_rss_mb=orch_peak,
        status_peak_rss_mb=status_peak,
        orchestrator_start_rss_mb=mb(orch_start_rss),
        status_start_rss_mb=mb(status_start_rss),
        orchestrator_max_stall_ms=orch_stall["max_ms"],
        orchestrator_max_busy_ms=orch_stall["max_busy_ms"],
        orchestrator_stalls_over_100ms=int(orch_stall["over_100ms"]),
        status_max_stall_ms=status_stall["max_ms"],
        status_max_busy_ms=status_stall["max_busy_ms"],
        getjob_median_ms=pct_ms(getjob, 0.5),
        getjob_p99_ms=pct_ms(getjob, 0.99),
        getjob_calls=getjob_calls,
        baseline_children_per_second=round(baseline),
        baseline_unary_median_ms=pct_ms(bare_calls, 0.5),
        baseline_unary_p99_ms=pct_ms(bare_calls, 0.99),
        status_health_median_ms=pct_ms(status_health, 0.5),
    )
    return report
