"""Fixtures of the client's tests: both services as real subprocesses (services.py).

Nothing in tests/client imports the servers (orchestrator_svc, status_svc,
stepstream_common), tests.helpers or tests/conftest.py: these tests run in a venv
holding only stepstream-api and stepstream-client, against services run by
another interpreter ($STEPSTREAM_SERVER_PYTHON, by default this one). From the
repository's root, in such a venv:

    STEPSTREAM_SERVER_PYTHON=/path/to/server/venv/bin/python \\
        python -m pytest --confcutdir tests/client -p no:cacheprovider tests/client

(--confcutdir keeps pytest from loading tests/conftest.py, the servers' in-process
fixtures.) tests/contract/test_client_only_install.py does exactly that.

`orchestrator` and `status` here shadow the in-process fixtures of tests/conftest.py
for these tests: the same services, reached the same way (`.address`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import stepstream_client

from tests.client import services
from tests.client.services import QUICK_ORCHESTRATOR, QUICK_STATUS, Service


def pytest_report_header() -> list[str]:
    return [f"stepstream_client from {Path(stepstream_client.__file__).parent}",
            f"services run by {services.SERVER_PYTHON}"]


@pytest.fixture
async def orchestrator(tmp_path: Path) -> AsyncIterator[Service]:
    service = services.orchestrator(tmp_path / "orchestrator", *QUICK_ORCHESTRATOR)
    await service.start()
    yield service
    await service.kill()


@pytest.fixture
async def status(tmp_path: Path, orchestrator: Service) -> AsyncIterator[Service]:
    service = services.status(tmp_path / "status", orchestrator.address, *QUICK_STATUS)
    await service.start()
    yield service
    await service.kill()


@pytest.fixture(autouse=True)
def open_gates_afterwards() -> Iterator[None]:
    """After each test, end the gate commands it left waiting (see services.gate_step)."""
    yield
    services.open_gates()
