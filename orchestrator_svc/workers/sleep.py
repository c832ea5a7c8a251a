"""Waits: for demos, pacing, and tests of timeouts and cancellation."""

from __future__ import annotations

import asyncio

from orchestrator_svc.workers import Field, FieldViolation, Params, WorkContext, Worker, WorkerCatalog, check_fields


class SleepWorker(Worker):
    """`seconds = 0.5`"""

    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> list[FieldViolation]:
        return check_fields(params, path, (Field("seconds", "number", required=True, minimum=0),))

    async def run(self, params: Params, context: WorkContext) -> str:
        await asyncio.sleep(float(params["seconds"]))
        return f"slept {float(params['seconds']):g}s"
