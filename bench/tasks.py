"""Trivial work for the fan-out benchmark, run by the python worker inside the orchestrator."""

from __future__ import annotations


async def noop() -> str:
    return "ok"
