"""Client.watch as the status service sees it: what only its insides show (moved
here from tests/client/test_watch.py, whose tests reach the services only
through the network, so that they also run where only the client is installed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from stepstream_client import Client

from orchestrator_svc.app import Orchestrator
from status_svc.app import StatusService
from tests.helpers import eventually, gate_step


@pytest.fixture
async def client(orchestrator: Orchestrator, status: StatusService) -> AsyncIterator[Client]:
    async with Client(orchestrator.address, status.address) as client:
        yield client


async def test_closing_a_watch_cancels_its_rpc(client: Client, status: StatusService, tmp_path: Path) -> None:
    job = await client.submit({"name": "left", "steps": [gate_step("gate", tmp_path / "gate")]})

    async def subscribers(count: int) -> bool | None:
        return True if status.feed.subscriber_count == count else None

    async with client.watch(job.id) as views:
        async for _ in views:
            break
        assert status.feed.subscriber_count == 1
    await eventually(lambda: subscribers(0), "the server to drop the watch (async with)")

    async for _ in client.watch(job.id):
        break
    await eventually(lambda: subscribers(0), "the server to drop the watch (plain break)")

    watch = client.watch(job.id)
    await anext(watch)
    await watch.aclose()
    await eventually(lambda: subscribers(0), "the server to drop the watch (aclose)")
    (tmp_path / "gate").touch()
