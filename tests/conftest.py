"""The services in-process, for the tests of the servers (and of both sides together).

tests/client/conftest.py starts them as subprocesses instead, so that tests/client
also runs where only the client is installed; there this file must not be loaded:
run `pytest --confcutdir tests/client tests/client` (see tests/client/conftest.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

try:
    from orchestrator_svc.app import PROCESSES_DIR, Orchestrator, start
    from orchestrator_svc.config import OrchestratorConfig
    from orchestrator_svc.workers.processes import ProcessRegistry
    from status_svc.app import StatusService
    from status_svc.app import start as start_status
    from status_svc.config import StatusConfig
except ModuleNotFoundError as missing:
    raise ImportError(
        f"{missing}: these fixtures need the services (stepstream-server) installed; where only the client is, "
        "run the client's tests alone, against the services of an interpreter that has them: "
        "STEPSTREAM_SERVER_PYTHON=/path/to/bin/python pytest --confcutdir tests/client tests/client"
    ) from missing
from tests.helpers import channel
from tests.helpers.postgres import postgres  # noqa: F401  (the fixture, for every test under tests/)


def orchestrator_config(data_dir: Path, **overrides: object) -> OrchestratorConfig:
    settings: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "data_dir": data_dir,
        "heartbeat_interval": 0.2,
        "kill_grace": 1.0,
        "shutdown_grace": 1.0,
    }
    settings.update(overrides)
    return OrchestratorConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture
async def orchestrator(tmp_path: Path) -> AsyncIterator[Orchestrator]:
    running = await start(orchestrator_config(tmp_path / "orchestrator"))
    yield running
    await running.stop()


@pytest.fixture
async def orchestrator_stub(orchestrator: Orchestrator) -> AsyncIterator[orch_grpc.OrchestratorServiceAsyncStub]:
    async with channel(orchestrator.address) as ch:
        yield orch_grpc.OrchestratorServiceStub(ch)


def status_config(data_dir: Path, orchestrator_address: str, **overrides: object) -> StatusConfig:
    settings: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "data_dir": data_dir,
        "orchestrators": [orchestrator_address],
        "heartbeat_interval": 0.2,
        "stale_after": 1.0,
        "shutdown_grace": 1.0,
    }
    settings.update(overrides)
    return StatusConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture
async def status(tmp_path: Path, orchestrator: Orchestrator) -> AsyncIterator[StatusService]:
    running = await start_status(status_config(tmp_path / "status", orchestrator.address))
    yield running
    await running.stop()


@pytest.fixture
async def status_stub(status: StatusService) -> AsyncIterator[status_grpc.StatusServiceAsyncStub]:
    async with channel(status.address) as ch:
        yield status_grpc.StatusServiceStub(ch)


@pytest.fixture(autouse=True)
def stop_leftover_commands(tmp_path: Path) -> Iterator[None]:
    """After each test, kill the commands an orchestrator killed by the test left
    running, through the same registry a restarted orchestrator uses."""
    yield
    for directory in tmp_path.rglob(PROCESSES_DIR):
        if directory.is_dir():
            ProcessRegistry(directory).stop_leftovers()
