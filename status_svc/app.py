"""Builds the status service from its configuration, runs it, and shuts it down in order.

Ingest (the writer task and one follower task per orchestrator) is essential:
if any of those tasks ends while the service runs (a storage error in the
writer, a bug), the service cannot keep its data current, so it says so and
exits non-zero (stepstream_common.rpc.RunningServer.fail): health NOT_SERVING,
reads show every unfinished job stale with the reason, then EXIT_FATAL within
seconds. A supervisor restarts it and it resumes from its committed cursors.
(A follower restarts its own stream after an error; see ingest/follower.py.)
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from stepstream.channel import ClientTLS, client_tls
from stepstream.status.v1 import status_service_pb2

from status_svc.api.servicer import StatusServicer, WatchLimits
from status_svc.config import StatusConfig
from status_svc.ingest.follower import OrchestratorFollower
from status_svc.ingest.writer import IngestWriter
from status_svc.storage.base import StoredChange
from status_svc.storage.sqlite import SqliteStatusStore
from stepstream_common.auth import Authorizer
from stepstream_common.config import SettingError
from stepstream_common.feed import Feed
from stepstream_common.metrics import IngestMetrics, Metrics, MetricsServer, serve_metrics
from stepstream_common.rpc import RunningServer, add_servicer, start_server
from stepstream_common.streaming import StreamAdmission, StreamLimits
from stepstream_common.tls import ServerTLS
from stepstream_common.tokens import read_token_file
from stepstream_common.tracing import Tracing

log = logging.getLogger(__name__)

LABEL = "stepstream status"
DATABASE_FILE = "status.sqlite3"


@dataclass
class StatusService:
    """A running status service; stop() ends it gracefully."""

    config: StatusConfig
    server: RunningServer
    store: SqliteStatusStore
    feed: Feed[StoredChange]
    writer: IngestWriter
    writer_task: asyncio.Task[None]
    followers: list[OrchestratorFollower]
    follower_tasks: list[asyncio.Task[None]]
    metrics: MetricsServer | None = None

    @property
    def address(self) -> str:
        return self.server.address

    async def stop(self) -> None:
        """Health NOT_SERVING; stop following; commit what arrived; end watches; close."""
        try:
            await self.server.stop(self.config.shutdown_grace)
        finally:
            await self.store.close()

    async def _stop_ingest(self) -> None:
        """Followers first (whatever became of them), then the writer commits what they queued."""
        for task in self.follower_tasks:
            task.cancel()
        await asyncio.gather(*self.follower_tasks, return_exceptions=True)
        if not self.writer_task.done():
            await self.writer.stop()
            await self.writer_task

    async def run_until_stopped(self) -> None:
        """Serve until stop(); if ingest ends first, fail loudly (see the module docstring)."""
        essential = {self.writer_task: "ingest (the writer)"}
        for follower, task in zip(self.followers, self.follower_tasks, strict=True):
            essential[task] = f"ingest (following {follower.address})"
        await self.server.serve_while(essential)


async def start(config: StatusConfig, *, tracing: Tracing | None = None) -> StatusService:
    """`tracing`: the service's OpenTelemetry tracing; by default as OTEL_* say (off unless they ask)."""
    tracing = tracing or Tracing.from_env("stepstream-status")
    tls = ServerTLS.from_config(config)  # checked before anything starts, as is:
    orchestrator_tls = _orchestrator_tls(config)
    auth = Authorizer.load(config.tokens_file)
    orchestrator_token = read_token_file(config.orchestrator_token_file) if config.orchestrator_token_file else ""
    store = SqliteStatusStore(config.data_dir / DATABASE_FILE)
    opened = await store.open()
    feed: Feed[StoredChange] = Feed(max_pending=config.watcher_queue, key_of=lambda change: change.job_id)
    metrics = Metrics()
    writer = IngestWriter(
        store, feed, latest_revision=opened.revision, sources=opened.sources,
        keep_changes=config.retain_changes, prune_every=config.prune_interval, followed=config.orchestrators,
        metrics=IngestMetrics(metrics), tracing=tracing,
    )
    writer_task = asyncio.create_task(writer.run(), name="ingest-writer")
    followers = [
        OrchestratorFollower(address, writer, stale_after=config.stale_after, tls=orchestrator_tls,
                             token=orchestrator_token)
        for address in config.orchestrators
    ]
    follower_tasks = [asyncio.create_task(f.run(), name=f"follow-{f.address}") for f in followers]
    servicer = StatusServicer(store, feed, config.heartbeat_interval, writer.applied, config.max_wait_applied,
                              limits=WatchLimits.of(config))
    service = status_service_pb2.DESCRIPTOR.services_by_name["StatusService"]
    server = await start_server(config.listen, lambda grpc_server: [add_servicer(grpc_server, service, servicer)],
                                tls=tls, auth=auth, max_request_bytes=config.max_request_bytes,
                                interceptors=[*([tracing.server_interceptor()] if tracing else []),
                                              StreamAdmission(StreamLimits.of(config)), metrics.interceptor()])
    metrics.collect_with(lambda: _ingest_metrics(writer, followers, feed))
    metrics_server = None
    if config.metrics_listen is not None:
        metrics_server = serve_metrics(config.metrics_listen, metrics)
        server.on_stop.append(metrics_server.stop)
        print(f"{LABEL} metrics on {metrics_server.address}", flush=True)
    running = StatusService(config, server, store, feed, writer, writer_task, followers, follower_tasks,
                            metrics_server)
    server.on_stop.extend([running._stop_ingest, feed.close])
    if tracing is not None:
        server.on_stop.append(tracing.shutdown)
    server.on_fail.append(lambda reason: servicer.ingest_stopped(f"ingest stopped: {reason}"))
    log.info("revision %d in %s, following %s", opened.revision, config.data_dir, ", ".join(config.orchestrators))
    return running


def _ingest_metrics(
    writer: IngestWriter, followers: list[OrchestratorFollower], feed: Feed[StoredChange]
) -> list[Metric]:
    """What ingest and the watches already count, read when scraped (nothing on the hot path)."""
    lag = GaugeMetricFamily("stepstream_ingest_lag_events", "events the orchestrator said it has (heartbeats, "
                            "batches) that are not committed here yet", labels=["orchestrator"])
    lag_seconds = GaugeMetricFamily("stepstream_ingest_lag_seconds", "how long the oldest event heard of from the "
                                    "orchestrator (in a batch, or a heartbeat's latest seq) but not committed here "
                                    "has waited since it was heard of; 0 when caught up", labels=["orchestrator"])
    stale = GaugeMetricFamily("stepstream_ingest_source_stale", "1 while the orchestrator cannot be followed "
                              "(its jobs are shown stale), else 0", labels=["orchestrator"])
    resyncs = CounterMetricFamily("stepstream_ingest_resyncs", "resyncs from a snapshot (cursor out of range)",
                                  labels=["orchestrator"])
    for follower in followers:
        address = follower.address
        lag.add_metric([address], max(0, follower.latest_seq_heard - writer.applied.committed_seq(address)))
        lag_seconds.add_metric([address], follower.lag_seconds())
        stale.add_metric([address], 0 if writer.source(address).stale_since is None else 1)
        resyncs.add_metric([address], follower.resyncs)
    return [
        lag, lag_seconds, stale, resyncs,
        CounterMetricFamily("stepstream_ingest_events_applied", "events applied to the status store",
                            value=writer.events_applied),
        GaugeMetricFamily("stepstream_watchers_attached", "watches (WatchJob, WatchJobs) open",
                          value=feed.subscriber_count),
        GaugeMetricFamily("stepstream_watcher_queue_max", "changes queued for the most behind watch (its bound "
                          "is --watcher-queue; past it the watch reads the change log instead)",
                          value=feed.deepest_queue),
        CounterMetricFamily("stepstream_watcher_overflows", "times a watch fell more than --watcher-queue changes "
                            "behind and went back to reading the change log (a resnapshot from storage)",
                            value=feed.overflow_count),
        GaugeMetricFamily("stepstream_revision", "the status store's current revision", value=feed.latest),
    ]


def _orchestrator_tls(config: StatusConfig) -> ClientTLS | None:
    """How the followers dial the orchestrators (None: plaintext); its files are read now."""
    try:
        return client_tls(ca=config.orchestrator_tls_ca, cert=config.orchestrator_tls_cert,
                          key=config.orchestrator_tls_key, server_name=config.orchestrator_tls_server_name)
    except ValueError as error:
        raise SettingError(f"--orchestrator-tls-*: {error}") from error
