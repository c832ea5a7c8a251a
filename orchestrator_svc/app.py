"""Builds the orchestrator from its configuration, runs it, and shuts it down in order.

The journal's writer task is essential: if it ends while the orchestrator
runs (the event log cannot be written), nothing it decides can be recorded,
so it says so and exits non-zero (stepstream_common.rpc.RunningServer.fail):
health NOT_SERVING, then EXIT_FATAL within seconds. Its runs are interrupted
on the way out (bounded by rpc.FAIL_CLEANUP); commands still running then are
stopped by the next start (ProcessRegistry.stop_leftovers), whose recovery
ends the unfinished jobs ORCHESTRATOR_RESTARTED.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from stepstream.orchestrator.v1 import orchestrator_service_pb2

from orchestrator_svc.api.servicer import ApiLimits, OrchestratorServicer
from orchestrator_svc.config import OrchestratorConfig
from orchestrator_svc.engine.engine import Engine
from orchestrator_svc.engine.journal import Journal, Retention
from orchestrator_svc.engine.recorder import Recorder
from orchestrator_svc.engine.runner import RunSettings, WorkSlots
from orchestrator_svc.output import OutputSettings, OutputStore
from orchestrator_svc.storage.base import StoredEvent
from orchestrator_svc.storage.sqlite import SqliteEventStore
from orchestrator_svc.workers.processes import ProcessRegistry
from orchestrator_svc.workers.registry import WorkerRegistry
from stepstream_common.auth import Authorizer
from stepstream_common.feed import Feed
from stepstream_common.metrics import Metrics, MetricsServer, OrchestratorMetrics, serve_metrics
from stepstream_common.rpc import RunningServer, add_servicer, start_server
from stepstream_common.streaming import StreamAdmission, StreamLimits
from stepstream_common.tls import ServerTLS
from stepstream_common.tracing import Tracing

log = logging.getLogger(__name__)

LABEL = "stepstream orchestrator"
DATABASE_FILE = "orchestrator.sqlite3"
PROCESSES_DIR = "processes"
OUTPUT_DIR = "output"


@dataclass
class Orchestrator:
    """A running orchestrator; stop() ends it gracefully."""

    config: OrchestratorConfig
    server: RunningServer
    engine: Engine
    journal: Journal
    store: SqliteEventStore
    feed: Feed[StoredEvent]
    journal_task: asyncio.Task[None]
    # Every step's output: what the API's output RPCs serve.
    output: OutputStore
    metrics: MetricsServer | None = None

    @property
    def address(self) -> str:
        return self.server.address

    async def stop(self) -> None:
        """Health NOT_SERVING; stop every run (recording why); commit; end streams; close."""
        try:
            await self.server.stop(self.config.shutdown_grace)
        finally:
            await self.store.close()

    async def run_until_stopped(self) -> None:
        """Serve until stop(); if the journal's writer ends first, fail loudly (see the module docstring).

        This is the service process's main loop (python -m orchestrator_svc),
        so what start-up built (modules, descriptors, the server) lives as long
        as the process: it is frozen out of the garbage collector, whose full
        passes would otherwise walk it all and stall the loop ~20 ms each.
        """
        gc.collect()
        gc.freeze()
        await self.server.serve_while({self.journal_task: "the event log (journal writer)"})


async def start(
    config: OrchestratorConfig, workers: WorkerRegistry | None = None, *, tracing: Tracing | None = None
) -> Orchestrator:
    """`tracing`: the service's OpenTelemetry tracing; by default as OTEL_* say (off unless they ask)."""
    tracing = tracing or Tracing.from_env("stepstream-orchestrator")
    tls = ServerTLS.from_config(config)  # checked before anything starts
    auth = Authorizer.load(config.tokens_file)  # so is the tokens file
    store = SqliteEventStore(config.data_dir / DATABASE_FILE)
    info = await store.open()
    feed: Feed[StoredEvent] = Feed(max_pending=config.subscriber_queue)
    metrics = Metrics()
    orchestrator_metrics = OrchestratorMetrics(metrics)
    metrics.collect_with(lambda: [GaugeMetricFamily(
        "stepstream_event_stream_subscribers", "event streams (StreamStepEvents) open", value=feed.subscriber_count,
    )])
    journal = Journal(
        store, feed, latest_seq=info.latest_seq,
        retention=Retention(
            keep_events=config.retain_events, job_days=config.job_retention_days,
            every_seconds=config.prune_interval,
        ),
        metrics=orchestrator_metrics,
    )
    journal_task = journal.start()
    processes = ProcessRegistry(config.data_dir / PROCESSES_DIR, config.pass_env)
    processes.stop_leftovers()
    workers = workers or WorkerRegistry.from_entry_points()
    output = OutputStore(OutputSettings.of(config, config.data_dir / OUTPUT_DIR))
    await output.open()
    engine = Engine(
        store, journal, Recorder(journal, metrics=orchestrator_metrics), workers,
        RunSettings(output=output, kill_grace=config.kill_grace, processes=processes,
                    slots=WorkSlots(config.max_concurrent_work), tracing=tracing),
    )
    output.running = engine.is_running
    await engine.recover()
    output.start_retention(config.prune_interval)
    servicer = OrchestratorServicer(engine, store, feed, info.log_id, config.heartbeat_interval,
                                    output=output, workers=workers, limits=ApiLimits.of(config))
    service = orchestrator_service_pb2.DESCRIPTOR.services_by_name["OrchestratorService"]
    server = await start_server(config.listen, lambda grpc_server: [add_servicer(grpc_server, service, servicer)],
                                tls=tls, auth=auth, max_request_bytes=config.max_request_bytes,
                                interceptors=[*([tracing.server_interceptor()] if tracing else []),
                                              StreamAdmission(StreamLimits.of(config)), metrics.interceptor()])
    server.on_stop.extend([engine.shutdown, journal.close, feed.close, output.close])
    metrics_server = None
    if config.metrics_listen is not None:
        metrics_server = serve_metrics(config.metrics_listen, metrics)
        server.on_stop.append(metrics_server.stop)
        print(f"{LABEL} metrics on {metrics_server.address}", flush=True)
    if tracing is not None:
        server.on_stop.append(tracing.shutdown)
    log.info("log %s at seq %d in %s", info.log_id, info.latest_seq, config.data_dir)
    return Orchestrator(config, server, engine, journal, store, feed, journal_task, output, metrics_server)
