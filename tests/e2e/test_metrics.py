"""Prometheus metrics (--metrics-listen): both services as real subprocesses,
a real fan-out job, and their /metrics scraped over HTTP and parsed as
Prometheus parses them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from orchestrator_svc.app import start
from status_svc.ingest.follower import OrchestratorFollower
from status_svc.ingest.writer import IngestWriter
from status_svc.storage.base import Source, StoredChange
from status_svc.storage.sqlite import SqliteStatusStore
from stepstream_common.feed import Feed
from tests.conftest import orchestrator_config
from tests.helpers import (
    REPO,
    ServiceProcess,
    channel,
    ends_job,
    eventually,
    free_port,
    job_definition,
    orchestrator_process,
    read_watch,
    status_job_finished,
    status_process,
    wait_job_state,
    wait_status_job,
    watch_until,
)
from tests.helpers.postgres import in_ci

CHILDREN = 50
PROMTOOL_INSTALL = "apt-get install -y --no-install-recommends prometheus"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class MetricsProcess(ServiceProcess):
    """A service subprocess whose "metrics on HOST:PORT" line (printed before "listening on") is kept."""

    metrics = ""

    def saw(self, line: str) -> None:
        if " metrics on " in line:
            self.metrics = line.strip().rsplit(" ", 1)[1]


def _as(plain: ServiceProcess) -> MetricsProcess:
    return MetricsProcess(plain.module, plain.args)


def exposition(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return str(response.read().decode())


def scrape(address: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(exposition(address)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until_value(address: str, name: str, expected: float, **labels: str) -> None:
    async def probe() -> bool | None:
        samples = await asyncio.to_thread(scrape, address)
        return True if value(samples, name, **labels) == expected else None

    await eventually(probe, f"{name}{labels} == {expected} at {address}")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[tuple[MetricsProcess, MetricsProcess]]:
    orchestrator = _as(orchestrator_process(tmp_path / "orchestrator", 0, "--metrics-listen", "127.0.0.1:0"))
    orchestrator.start()
    status = _as(status_process(tmp_path / "status", orchestrator.address, "--metrics-listen", "127.0.0.1:0"))
    try:
        status.start()
        yield orchestrator, status
    finally:
        status.stop()
        orchestrator.stop()


async def test_metrics_of_a_fanout_job(services: tuple[MetricsProcess, MetricsProcess]) -> None:
    orchestrator, status = services
    assert orchestrator.metrics and status.metrics
    definition = job_definition([{"name": "fan", "type": "fanout", "count": CHILDREN,
                                  "child": {"type": "sleep", "seconds": 0}}])
    async with channel(orchestrator.address) as orch_channel, channel(status.address) as status_channel:
        stub = orch_grpc.OrchestratorServiceStub(orch_channel)
        submitted = await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))
        job = await wait_job_state(stub, submitted.job.id, {s.JOB_STATE_COMPLETED})

        samples = await asyncio.to_thread(scrape, orchestrator.metrics)
        completed = sum(progress.children.completed for progress in job.steps)
        assert completed == CHILDREN
        assert value(samples, "stepstream_children_finished_total", state="completed") == completed
        assert value(samples, "stepstream_jobs_finished_total", state="completed") == 1
        assert value(samples, "stepstream_grpc_server_handled_total", service="stepstream.orchestrator.v1."
                     "OrchestratorService", method="SubmitJob", code="OK") == 1
        assert value(samples, "stepstream_events_appended_total") > CHILDREN
        assert value(samples, "stepstream_grpc_server_handled_total", service="stepstream.orchestrator.v1."
                     "OrchestratorService", method="GetJob", code="OK") >= 1
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetJob(orch_pb.GetJobRequest(job_id="no-such-job"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        await until_value(orchestrator.metrics, "stepstream_grpc_server_handled_total", 1, service="stepstream."
                          "orchestrator.v1.OrchestratorService", method="GetJob", code="NOT_FOUND")
        assert value(samples, "stepstream_journal_commit_seconds_count") >= 1

        assert value(samples, "stepstream_steps_finished_total", state="completed") == len(job.steps) == 1
        appended = value(samples, "stepstream_events_appended_total")

        # Ingest catches up with everything the orchestrator has: lag back to 0, in events and seconds.
        await until_value(status.metrics, "stepstream_ingest_lag_events", 0, orchestrator=orchestrator.address)
        await until_value(status.metrics, "stepstream_ingest_lag_seconds", 0, orchestrator=orchestrator.address)
        samples = await asyncio.to_thread(scrape, status.metrics)
        # Every event the orchestrator committed was applied, once.
        assert value(samples, "stepstream_ingest_events_applied_total") == appended
        assert value(samples, "stepstream_ingest_batch_events_sum") == appended
        assert value(samples, "stepstream_watcher_overflows_total") == 0
        assert value(samples, "stepstream_ingest_source_stale", orchestrator=orchestrator.address) == 0
        assert value(samples, "stepstream_revision") > 0
        assert value(samples, "stepstream_watchers_attached") == 0

        # A watch open: the gauge counts it, and it is counted off once it ends.
        watch = status_grpc.StatusServiceStub(status_channel).WatchJob(
            status_pb.WatchJobRequest(job_id=submitted.job.id))
        await watch.read()
        await until_value(status.metrics, "stepstream_watchers_attached", 1)
        watch.cancel()
        await until_value(status.metrics, "stepstream_watchers_attached", 0)
        await until_value(status.metrics, "stepstream_grpc_server_handled_total", 1,
                          service="stepstream.status.v1.StatusService", method="WatchJob", code="CANCELLED")
        samples = await asyncio.to_thread(scrape, status.metrics)
        assert value(samples, "stepstream_grpc_server_msg_sent_total",
                     service="stepstream.status.v1.StatusService", method="WatchJob") >= 1


async def test_metrics_off_by_default(tmp_path: Path) -> None:
    config = orchestrator_config(tmp_path / "orchestrator")
    assert config.metrics_listen is None
    running = await start(config)
    try:
        assert running.metrics is None
    finally:
        await running.stop()


STALLED_CHILDREN = 1500
# A small flow-control window: a watch's writes block soon after its client stops reading.
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


async def test_a_stalled_watcher_shows_in_queue_depth_and_overflows(tmp_path: Path) -> None:
    """One orchestrator, two status services following it, each with a watch whose
    client stops reading while a fan-out runs: with a queue bound above what the
    job changes, the watch's queue depth shows what waits for it; with a bound of
    5 it overflows (and reads the change log instead) rather than growing."""
    orchestrator = _as(orchestrator_process(tmp_path / "orchestrator", 0, "--metrics-listen", "127.0.0.1:0"))
    orchestrator.start()
    statuses: list[MetricsProcess] = []
    try:
        for queue in (100_000, 5):
            status = _as(status_process(tmp_path / f"status-{queue}", orchestrator.address,
                                        "--metrics-listen", "127.0.0.1:0", "--watcher-queue", str(queue)))
            statuses.append(status)
            status.start()
        roomy, small = statuses
        await _stall_two_watchers(orchestrator, roomy, small, tmp_path)
    finally:
        for status in statuses:
            status.stop()
        orchestrator.stop()


def gate(name: str, release: Path) -> dict[str, object]:
    """A command step that runs until `release` exists."""
    return {"name": name, "type": "command",
            "command": ["sh", "-c", f"while [ ! -f {shlex.quote(str(release))} ]; do sleep 0.02; done"]}


async def _stall_two_watchers(
    orchestrator: MetricsProcess, roomy: MetricsProcess, small: MetricsProcess, tmp_path: Path
) -> None:
    """The job: a gate (the watches open meanwhile), a fan-out whose thousands of
    changes fill the stalled streams' flow-control windows (their writes block),
    a second gate (until they have), then a chain of steps whose changes can only
    queue up."""
    first, second = tmp_path / "first", tmp_path / "second"
    fan = {"name": "fan", "type": "fanout", "count": STALLED_CHILDREN, "concurrency": 20,
           "child": {"type": "sleep", "seconds": 0}}
    chain = [{"name": f"link-{i:03d}", "type": "sleep", "seconds": 0} for i in range(100)]
    async with (channel(orchestrator.address) as orch_channel,
                grpc.aio.insecure_channel(roomy.address, options=SMALL_WINDOW) as roomy_channel,
                grpc.aio.insecure_channel(small.address, options=SMALL_WINDOW) as small_channel):
        submitted = await orch_grpc.OrchestratorServiceStub(orch_channel).SubmitJob(
            orch_pb.SubmitJobRequest(definition=job_definition([gate("first", first), fan,
                                                                 gate("second", second), *chain])))
        job_id = submitted.job.id
        watches = []
        for status_channel in (roomy_channel, small_channel):
            stub = status_grpc.StatusServiceStub(status_channel)
            await wait_status_job(stub, job_id, lambda r: r.steps[0].state == s.STEP_STATE_RUNNING, "the gate")
            call = stub.WatchJob(status_pb.WatchJobRequest(job_id=job_id))
            assert (await read_watch(call)).WhichOneof("event") == "updates"
            assert (await read_watch(call)).WhichOneof("event") == "initial_state_complete"
            watches.append((stub, call))
        # From here on nobody reads either watch.
        first.touch()
        for stub, _ in watches:
            await wait_status_job(stub, job_id, lambda r: r.steps[2].state == s.STEP_STATE_RUNNING,
                                  "the fan-out to end while watches stall")
        second.touch()
        for stub, _ in watches:
            done = await wait_status_job(stub, job_id, status_job_finished, "the job to end while watches stall")
            assert done.job.state == s.JOB_STATE_COMPLETED
        for status in (roomy, small):
            await until_value(status.metrics, "stepstream_ingest_lag_events", 0, orchestrator=orchestrator.address)
            await until_value(status.metrics, "stepstream_ingest_lag_seconds", 0, orchestrator=orchestrator.address)
        at_roomy = await asyncio.to_thread(scrape, roomy.metrics)
        at_small = await asyncio.to_thread(scrape, small.metrics)
        # The chain's changes came while the streams' writes were blocked: they wait in the queue.
        assert 0 < value(at_roomy, "stepstream_watcher_queue_max") <= 100_000
        assert value(at_roomy, "stepstream_watcher_overflows_total") == 0
        # Over the bound of 5: the queue was dropped (depth 0), counted, and the watch kept.
        assert value(at_small, "stepstream_watcher_overflows_total") >= 1
        assert value(at_small, "stepstream_watcher_queue_max") == 0
        assert value(at_small, "stepstream_watchers_attached") == 1
        # Once read, both watches reach the job's end and nothing is queued any more.
        for status, (_, call) in zip((roomy, small), watches, strict=True):
            await watch_until(call, ends_job)
            await until_value(status.metrics, "stepstream_watcher_queue_max", 0)
            call.cancel()


def promql_of_dashboard(path: Path) -> list[str]:
    dashboard = json.loads(path.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def promql_of_rules(path: Path) -> list[str]:
    rules = [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule
        assert rule["labels"]["severity"] in ("critical", "warning", "info") and rule["annotations"]["summary"]
    return [rule["expr"] for rule in rules]


async def test_dashboard_and_alerts_name_only_metrics_the_services_export(
    services: tuple[MetricsProcess, MetricsProcess],
) -> None:
    """Every stepstream_* name in deploy/grafana/stepstream.json and
    deploy/prometheus/alerts.yml is a series one of the services really
    serves (scraped once a job has run and a watch was open)."""
    orchestrator, status = services
    definition = job_definition([{"name": "fan", "type": "fanout", "count": 3,
                                  "child": {"type": "sleep", "seconds": 0}}])
    async with channel(orchestrator.address) as orch_channel, channel(status.address) as status_channel:
        submitted = await orch_grpc.OrchestratorServiceStub(orch_channel).SubmitJob(
            orch_pb.SubmitJobRequest(definition=definition))
        stub = status_grpc.StatusServiceStub(status_channel)
        await wait_status_job(stub, submitted.job.id, status_job_finished, "the job to end")
        watch = stub.WatchJob(status_pb.WatchJobRequest(job_id=submitted.job.id))
        await read_watch(watch)
        watch.cancel()
    await until_value(status.metrics, "stepstream_watchers_attached", 0)
    exported = {name for address in (orchestrator.metrics, status.metrics)
                for name, _ in await asyncio.to_thread(scrape, address)}
    for path, expressions in ((REPO / "deploy/grafana/stepstream.json",
                               promql_of_dashboard(REPO / "deploy/grafana/stepstream.json")),
                              (REPO / "deploy/prometheus/alerts.yml",
                               promql_of_rules(REPO / "deploy/prometheus/alerts.yml"))):
        assert expressions, path
        for expression in expressions:
            named = set(re.findall(r"\bstepstream_[a-z_]+", expression))
            assert named, f"{path.name}: {expression!r} names no stepstream metric"
            assert named <= exported, f"{path.name}: {sorted(named - exported)} are not exported"
    if promtool := require_from_prometheus("promtool"):
        for address in (orchestrator.metrics, status.metrics):
            text = await asyncio.to_thread(exposition, address)
            linted = await asyncio.to_thread(subprocess.run, [promtool, "check", "metrics"], input=text,
                                             capture_output=True, text=True, check=False)
            assert linted.returncode == 0 and not linted.stdout.strip(), f"{address}: {linted.stdout}{linted.stderr}"


def require_from_prometheus(program: str) -> str:
    """`program` (prometheus or its checker, promtool) from Debian's prometheus package; skipped off CI without it."""
    found = shutil.which(program)
    if found:
        return found
    if in_ci():
        pytest.fail(f"the metrics tests need {program}: {PROMTOOL_INSTALL}")
    pytest.skip(f"needs {program} ({PROMTOOL_INSTALL})")


async def test_a_real_prometheus_scrapes_both_services_and_evaluates_every_alert_rule(
    services: tuple[MetricsProcess, MetricsProcess], tmp_path: Path,
) -> None:
    """A Prometheus server (Debian's) scrapes both services every second with alerts.yml loaded: both
    targets are up, a job's counters arrive as series it can query, and every rule evaluates without
    an error (none fires on a healthy pair)."""
    prometheus = require_from_prometheus("prometheus")
    orchestrator, status = services
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(REPO / "deploy/prometheus/alerts.yml")],
        "scrape_configs": [{"job_name": "stepstream",
                            "static_configs": [{"targets": [orchestrator.metrics, status.metrics]}]}],
    }))
    with (tmp_path / "prometheus.log").open("w") as log:
        server = await asyncio.create_subprocess_exec(
            prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", stdout=asyncio.subprocess.DEVNULL, stderr=log)
    api = f"http://127.0.0.1:{port}/api/v1"

    def get(path: str) -> Any:
        with urllib.request.urlopen(api + path, timeout=10) as response:
            return json.loads(response.read())["data"]

    async def answer(path: str, holds: Callable[[Any], bool]) -> Any:
        async def probe() -> Any:
            with contextlib.suppress(OSError):
                data = await asyncio.to_thread(get, path)
                return data if holds(data) else None
            return None
        return await eventually(probe, f"Prometheus to answer {path} as expected")

    try:
        async with channel(orchestrator.address) as orch_channel:
            await orch_grpc.OrchestratorServiceStub(orch_channel).SubmitJob(orch_pb.SubmitJobRequest(
                definition=job_definition([{"name": "one", "type": "sleep", "seconds": 0}])))
        targets = await answer("/targets", lambda data: len(data["activeTargets"]) == 2
                               and all(t["health"] == "up" for t in data["activeTargets"]))
        assert {t["labels"]["instance"] for t in targets["activeTargets"]} == {orchestrator.metrics, status.metrics}
        query = urllib.parse.quote('sum(stepstream_jobs_finished_total{state="completed"})')
        await answer(f"/query?query={query}", lambda data: bool(data["result"])
                     and float(data["result"][0]["value"][1]) >= 1)
        rules = await answer("/rules", lambda data: all(
            not rule["lastEvaluation"].startswith("0001-") for group in data["groups"] for rule in group["rules"]))
        evaluated = [(rule["name"], rule["health"], rule["state"])
                     for group in rules["groups"] for rule in group["rules"]]
        assert len(evaluated) == len(promql_of_rules(REPO / "deploy/prometheus/alerts.yml"))
        assert all(health == "ok" and state == "inactive" for _, health, state in evaluated), evaluated
    finally:
        server.terminate()
        await server.wait()


def test_the_alert_rules_load_and_fire_exactly_as_their_unit_tests_say() -> None:
    """`promtool test rules` on deploy/prometheus/alerts_test.yml: every alert of alerts.yml and
    alerts-replicas.yml fires on the series it is for, with its labels and words, and not on a near miss."""
    promtool = require_from_prometheus("promtool")
    rules = REPO / "deploy/prometheus"
    checked = subprocess.run([promtool, "check", "rules", "alerts.yml", "alerts-replicas.yml"], cwd=rules,
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=rules,
                            capture_output=True, text=True, check=False)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


async def test_ingest_lag_seconds_is_the_age_of_the_oldest_event_heard_of_and_not_committed(tmp_path: Path) -> None:
    """What stepstream_ingest_lag_seconds reads, on a real follower and writer
    (not running: commits are advanced by hand) with a clock the test sets."""
    address, now = "orchestrator:50051", [1000.0]
    store = SqliteStatusStore(tmp_path / "status.sqlite3")
    opened = await store.open()
    try:
        feed: Feed[StoredChange] = Feed(max_pending=10)
        writer = IngestWriter(store, feed, latest_revision=opened.revision, sources=opened.sources,
                              followed=[address])
        follower = OrchestratorFollower(address, writer, stale_after=60, clock=lambda: now[0])

        async def heard(latest_seq: int) -> None:
            await follower._handle(orch_pb.StreamStepEventsResponse(
                log_id="log", heartbeat=orch_pb.EventStreamHeartbeat(latest_seq=latest_seq)))

        def committed(cursor: int) -> None:
            writer.applied.advance([Source(address, "log", cursor)])

        assert follower.lag_seconds() == 0
        await heard(5)  # seqs 1-5 heard of at 1000
        now[0] = 1003.0
        assert follower.lag_seconds() == 3
        await heard(8)  # 6-8 at 1003
        now[0] = 1004.5
        assert follower.lag_seconds() == 4.5
        committed(5)
        assert follower.lag_seconds() == 1.5  # the oldest not committed is now seq 6
        committed(8)
        assert follower.lag_seconds() == 0
        now[0] = 1010.0
        await heard(8)  # nothing new: still caught up
        assert follower.lag_seconds() == 0
    finally:
        await store.close()
