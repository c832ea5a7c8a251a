"""Builds the status service from its configuration, runs it, and shuts it down in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from stepstream.v1 import status_service_pb2

from status_svc.api.servicer import StatusServicer
from status_svc.config import StatusConfig
from status_svc.ingest.follower import OrchestratorFollower
from status_svc.ingest.writer import IngestWriter
from status_svc.storage.base import StoredChange
from status_svc.storage.sqlite import SqliteStatusStore
from stepstream_common.feed import Feed
from stepstream_common.rpc import RunningServer, add_servicer, start_server

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

    @property
    def address(self) -> str:
        return self.server.address

    async def stop(self) -> None:
        """Health NOT_SERVING; stop following; commit what arrived; end watches; close."""
        await self.server.stop(self.config.shutdown_grace)
        await self.store.close()

    async def _stop_ingest(self) -> None:
        for task in self.follower_tasks:
            task.cancel()
        for task in self.follower_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not self.writer_task.done():
            await self.writer.stop()
            await self.writer_task

    async def run_until_stopped(self) -> None:
        """Serve until stop() (or a storage failure in ingest, which stops the process loudly)."""
        await self.server.serve_while(self.writer_task, "ingest")


async def start(config: StatusConfig) -> StatusService:
    store = SqliteStatusStore(config.data_dir / DATABASE_FILE)
    latest_revision, sources = await store.open()
    feed: Feed[StoredChange] = Feed(max_pending=config.watcher_queue, key_of=lambda change: change.job_id)
    writer = IngestWriter(
        store, feed, latest_revision=latest_revision, sources=sources,
        keep_changes=config.retain_changes, prune_every=config.prune_interval,
    )
    writer_task = asyncio.create_task(writer.run(), name="ingest-writer")
    followers = [
        OrchestratorFollower(address, writer, stale_after=config.stale_after) for address in config.orchestrators
    ]
    follower_tasks = [asyncio.create_task(f.run(), name=f"follow-{f.address}") for f in followers]
    servicer = StatusServicer(store, feed, config.heartbeat_interval)
    service = status_service_pb2.DESCRIPTOR.services_by_name["StatusService"]
    server = await start_server(config.listen, lambda grpc_server: [add_servicer(grpc_server, service, servicer)])
    running = StatusService(config, server, store, feed, writer, writer_task, followers, follower_tasks)
    server.on_stop.extend([running._stop_ingest, feed.close])
    log.info("revision %d in %s, following %s", latest_revision, config.data_dir, ", ".join(config.orchestrators))
    return running
