"""Fixtures every end-to-end test gets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.client import services


@pytest.fixture(autouse=True)
def open_gates_afterwards() -> Iterator[None]:
    """After each test, end the gate commands it left waiting (see services.gate_step)."""
    yield
    services.open_gates()
