"""Builds the status service from its configuration, runs it, and shuts it down in order.

Two ways to run, chosen by the store (--store; start_service() picks):

- SQLite (the default; start()): one process ingests and serves. Ingest (the
  writer task and one follower task per orchestrator) is essential: if any of
  those tasks ends while the service runs (a storage error in the writer, a
  bug), the service cannot keep its data current, so it says so and exits
  non-zero (stepstream_common.rpc.RunningServer.fail): health NOT_SERVING,
  reads show every unfinished job stale with the reason, then EXIT_FATAL within
  seconds. A supervisor restarts it and it resumes from its committed cursors.
  (A follower restarts its own stream after an error; see ingest/follower.py.)
- PostgreSQL (start_replica()): one of several replicas on one database
  (status_svc.replication): it ingests only while it holds the lease, its
  watches are fed from the committed change log, and a database error is
  trouble it reports and recovers from in-process (health NOT_SERVING, reads
  stale, then back), not a reason to exit; so is a bug in a lease term (the
  replica steps down and says why). Only the lease loop or the tailer ending
  still ends the process as above: a bug of theirs, or a database that is
  behind what this replica already served (restored from a backup: a
  restarted replica starts from the database as it is).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from grpc_health.v1 import health_pb2
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from stepstream.channel import ClientTLS, client_tls
from stepstream.status.v1 import status_service_pb2

from status_svc.api.servicer import StatusServicer, WatchLimits
from status_svc.config import StatusConfig
from status_svc.ingest.follower import OrchestratorFollower
from status_svc.ingest.progress import AppliedPositions
from status_svc.ingest.writer import IngestWriter
from status_svc.replication.health import ReplicaHealth
from status_svc.replication.ingest import LeasedIngest
from status_svc.replication.lease import IngestLease, create_lease_table
from status_svc.replication.tailer import ChangeTailer
from status_svc.storage.base import OpenedStore, StatusStore, StoredChange
from status_svc.storage.open import DATABASE_FILE as DATABASE_FILE  # where tests and benches find the file
from status_svc.storage.open import store_from_config
from status_svc.storage.postgres import CHANGES_CHANNEL, PostgresStatusStore
from stepstream_common.auth import Authorizer
from stepstream_common.config import SettingError
from stepstream_common.feed import Feed
from stepstream_common.metrics import IngestMetrics, Metrics, MetricsServer, serve_metrics
from stepstream_common.rpc import RunningServer, Service, add_servicer, start_server
from stepstream_common.streaming import StreamAdmission, StreamLimits
from stepstream_common.tls import ServerTLS
from stepstream_common.tokens import read_token_file
from stepstream_common.tracing import Tracing

log = logging.getLogger(__name__)

LABEL = "stepstream status"


class _Stoppable:
    """Where a running service listens, and its graceful stop: health NOT_SERVING, ingest
    stopped (what arrived committed, the lease released), watches ended, the store closed."""

    config: StatusConfig
    server: RunningServer
    store: StatusStore

    @property
    def address(self) -> str:
        return self.server.address

    async def stop(self) -> None:
        try:
            await self.server.stop(self.config.shutdown_grace)
        finally:
            await self.store.close()


@dataclass
class StatusService(_Stoppable):
    """A running status service; stop() ends it gracefully."""

    config: StatusConfig
    server: RunningServer
    store: StatusStore
    feed: Feed[StoredChange]
    writer: IngestWriter
    writer_task: asyncio.Task[None]
    followers: list[OrchestratorFollower]
    follower_tasks: list[asyncio.Task[None]]
    metrics: MetricsServer | None = None

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


@dataclass
class ReplicaService(_Stoppable):
    """A running replica on a PostgreSQL store (status_svc.replication); stop() ends it gracefully."""

    config: StatusConfig
    server: RunningServer
    store: PostgresStatusStore
    feed: Feed[StoredChange]
    servicer: StatusServicer
    health: ReplicaHealth
    ingest: LeasedIngest
    ingest_task: asyncio.Task[None]
    tailer: ChangeTailer
    tailer_task: asyncio.Task[None]
    metrics: MetricsServer | None = None

    async def _stop_replication(self) -> None:
        await self.ingest.stop()
        await asyncio.gather(self.ingest_task, return_exceptions=True)
        self.tailer_task.cancel()
        await asyncio.gather(self.tailer_task, return_exceptions=True)

    async def run_until_stopped(self) -> None:
        """Serve until stop(); if the lease loop or the tailer ends first, fail loudly (see the module docstring)."""
        await self.server.serve_while({self.ingest_task: "ingest (the lease loop)",
                                       self.tailer_task: "the change tailer"})


async def start_service(config: StatusConfig, *, tracing: Tracing | None = None) -> Service:
    """The service --store asks for: a replica on PostgreSQL, else the single SQLite process.
    `tracing`: the service's OpenTelemetry tracing; by default as OTEL_* say (off unless they ask)."""
    store = store_from_config(config)
    if isinstance(store, PostgresStatusStore):
        return await start_replica(config, store, tracing=tracing)
    return await start(config, store, tracing=tracing)


@dataclass(frozen=True)
class _Links:
    """What is read and checked before anything starts: TLS, tokens, how to reach the orchestrators,
    and the tracing (by default as OTEL_* say: off unless they ask)."""

    tls: ServerTLS | None
    auth: Authorizer | None
    orchestrator_tls: ClientTLS | None
    orchestrator_token: str
    tracing: Tracing | None

    @classmethod
    def of(cls, config: StatusConfig, tracing: Tracing | None) -> _Links:
        tls = ServerTLS.from_config(config)  # checked before anything starts, as is:
        orchestrator_tls = _orchestrator_tls(config)
        auth = Authorizer.load(config.tokens_file)
        token = read_token_file(config.orchestrator_token_file) if config.orchestrator_token_file else ""
        return cls(tls, auth, orchestrator_tls, token, tracing or Tracing.from_env("stepstream-status"))

    def ingest(
        self, config: StatusConfig, store: StatusStore, feed: Feed[StoredChange] | None, opened: OpenedStore,
        metrics: IngestMetrics,
    ) -> tuple[IngestWriter, list[OrchestratorFollower]]:
        """A writer starting where `opened` stands, and a follower of each orchestrator feeding it."""
        writer = IngestWriter(
            store, feed, latest_revision=opened.revision, sources=opened.sources,
            keep_changes=config.retain_changes, prune_every=config.prune_interval, followed=config.orchestrators,
            metrics=metrics, tracing=self.tracing,
        )
        followers = [
            OrchestratorFollower(address, writer, stale_after=config.stale_after, tls=self.orchestrator_tls,
                                 token=self.orchestrator_token)
            for address in config.orchestrators
        ]
        return writer, followers


async def start(
    config: StatusConfig, store: StatusStore | None = None, *, tracing: Tracing | None = None
) -> StatusService:
    """The single-process service: this process ingests and serves (SQLite)."""
    links = _Links.of(config, tracing)
    store = store if store is not None else store_from_config(config)
    if isinstance(store, PostgresStatusStore):
        raise SettingError("a PostgreSQL --store runs as one of several replicas: start it with start_service()")
    opened = await store.open()
    feed: Feed[StoredChange] = Feed(max_pending=config.watcher_queue, key_of=lambda change: change.job_id)
    metrics = Metrics()
    writer, followers = links.ingest(config, store, feed, opened, IngestMetrics(metrics))
    servicer = StatusServicer(store, feed, config.heartbeat_interval, writer.applied, config.max_wait_applied,
                              limits=WatchLimits.of(config))
    server, metrics_server = await _serve_or_close(config, links, servicer, metrics, store)
    writer_task = asyncio.create_task(writer.run(), name="ingest-writer")
    follower_tasks = [asyncio.create_task(f.run(), name=f"follow-{f.address}") for f in followers]
    metrics.collect_with(lambda: _ingest_metrics(writer, followers, feed))
    running = StatusService(config, server, store, feed, writer, writer_task, followers, follower_tasks,
                            metrics_server)
    server.on_stop.extend([running._stop_ingest, feed.close])
    server.on_fail.append(lambda reason: servicer.ingest_stopped(f"ingest stopped: {reason}"))
    log.info("revision %d in %s, following %s", opened.revision, config.data_dir, ", ".join(config.orchestrators))
    return running


async def start_replica(
    config: StatusConfig, store: PostgresStatusStore, *, tracing: Tracing | None = None
) -> ReplicaService:
    """One replica on a PostgreSQL store: competes for the ingest lease, serves from the database."""
    links = _Links.of(config, tracing)
    opened = await store.open()
    try:
        connection = await store.connect()
        try:
            await create_lease_table(connection)
        finally:
            await connection.close()
    except BaseException:
        await store.close()
        raise
    feed: Feed[StoredChange] = Feed(max_pending=config.watcher_queue, key_of=lambda change: change.job_id)
    feed.latest = opened.revision
    metrics = Metrics()
    ingest_metrics = IngestMetrics(metrics)
    applied = AppliedPositions(opened.sources.values(), config.orchestrators)
    servicer = StatusServicer(store, feed, config.heartbeat_interval, applied, config.max_wait_applied,
                              limits=WatchLimits.of(config))
    server, metrics_server = await _serve_or_close(config, links, servicer, metrics, store)
    # Who holds the lease, as its row and the logs show it: host, process, address served.
    lease = IngestLease(store.connect, holder=f"{socket.gethostname()}:{os.getpid()}:{server.address}",
                        ttl=config.lease_ttl)
    health = ReplicaHealth(lambda serving: _set_health(server, serving), servicer.mark_stale)
    ingest = LeasedIngest(
        store, lease, lambda where: links.ingest(config, store, None, where, ingest_metrics),
        poll_interval=config.poll_interval, health=health,
    )
    metrics.collect_with(lambda: _replica_metrics(ingest, feed))
    tailer = ChangeTailer(store, feed, applied, store.connect, channel=CHANGES_CHANNEL,
                          poll_interval=config.poll_interval, health=health)
    running = ReplicaService(
        config, server, store, feed, servicer, health, ingest, asyncio.create_task(ingest.run(), name="lease"),
        tailer, asyncio.create_task(tailer.run(), name="change-tailer"), metrics_server,
    )
    server.on_stop.extend([running._stop_replication, feed.close])
    server.on_fail.append(lambda reason: servicer.ingest_stopped(f"ingest stopped: {reason}"))
    log.info("replica %s on %s at revision %d, following %s", lease.holder, store.where, opened.revision,
             ", ".join(config.orchestrators))
    return running


async def _serve_or_close(
    config: StatusConfig, links: _Links, servicer: StatusServicer, metrics: Metrics, store: StatusStore,
) -> tuple[RunningServer, MetricsServer | None]:
    """_serve(), or the store closed before the error goes on (a port taken, say): an embedding
    process that goes on keeps no open database behind a service that never started."""
    try:
        return await _serve(config, links, servicer, metrics)
    except BaseException:
        await store.close()
        raise


async def _serve(
    config: StatusConfig, links: _Links, servicer: StatusServicer, metrics: Metrics
) -> tuple[RunningServer, MetricsServer | None]:
    """The gRPC server (and the metrics listener, if asked for) for `servicer`; the tracing ends with it."""
    tracing = links.tracing
    server = await start_server(
        config.listen, lambda grpc_server: [add_servicer(grpc_server, SERVICE, servicer)],
        tls=links.tls, auth=links.auth, max_request_bytes=config.max_request_bytes,
        interceptors=[*([tracing.server_interceptor()] if tracing else []),
                      StreamAdmission(StreamLimits.of(config)), metrics.interceptor()],
    )
    if tracing is not None:
        server.on_stop.append(tracing.shutdown)
    metrics_server = None
    if config.metrics_listen is not None:
        metrics_server = serve_metrics(config.metrics_listen, metrics)
        server.on_stop.append(metrics_server.stop)
        print(f"{LABEL} metrics on {metrics_server.address}", flush=True)
    return server, metrics_server


SERVICE = status_service_pb2.DESCRIPTOR.services_by_name["StatusService"]
# The names grpc.health answers for (start_server sets them SERVING): the server's and the service's.
HEALTH_NAMES = ("", SERVICE.full_name)


async def _set_health(server: RunningServer, serving: bool) -> None:
    """Every health name SERVING or NOT_SERVING (ignored once the server is stopping)."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in HEALTH_NAMES:
        await server.health.set(name, status)


def _replica_metrics(ingest: LeasedIngest, feed: Feed[StoredChange]) -> list[Metric]:
    """_ingest_metrics of the term in progress (if this replica holds the lease), and the lease's own."""
    term = ingest.term
    families = _ingest_metrics(term.writer if term else None, term.followers if term else [], feed)
    families.append(GaugeMetricFamily("stepstream_ingest_lease_held", "1 while this replica holds the ingest "
                                      "lease (it ingests), else 0", value=0 if term is None else 1))
    families.append(GaugeMetricFamily("stepstream_ingest_lease_epoch", "the fencing epoch of the lease this "
                                      "replica holds (0 while it does not)", value=0 if term is None else term.epoch))
    return families


def _ingest_metrics(
    writer: IngestWriter | None, followers: Sequence[OrchestratorFollower], feed: Feed[StoredChange]
) -> list[Metric]:
    """What ingest and the watches already count, read when scraped (nothing on the hot path);
    without a writer (a replica not holding the lease) only the watches'."""
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
        if writer is None:
            break
        address = follower.address
        lag.add_metric([address], max(0, follower.latest_seq_heard - writer.applied.committed_seq(address)))
        lag_seconds.add_metric([address], follower.lag_seconds())
        stale.add_metric([address], 0 if writer.source(address).stale_since is None else 1)
        resyncs.add_metric([address], follower.resyncs)
    return [
        lag, lag_seconds, stale, resyncs,
        CounterMetricFamily("stepstream_ingest_events_applied", "events applied to the status store (by this "
                            "replica's current lease term)", value=writer.events_applied if writer else 0),
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
