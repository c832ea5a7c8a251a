"""Waits: for demos, pacing, and tests of timeouts and cancellation."""

from __future__ import annotations

import asyncio

from orchestrator_svc.domain.spec import Params, Violations, WorkerCatalog
from orchestrator_svc.workers.base import Field, WorkContext, Worker, check_fields


class SleepWorker(Worker):
    """`seconds = 0.5`"""

    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> Violations:
        return check_fields(params, path, (Field("seconds", "number", required=True, minimum=0),))

    async def run(self, params: Params, context: WorkContext) -> str:
        await asyncio.sleep(float(params["seconds"]))
        return f"slept {float(params['seconds']):g}s"
