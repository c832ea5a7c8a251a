"""An example worker plugin: `type = "shout"` writes its text, shouted, to a file.

    [[steps]]
    name = "greet"
    type = "shout"
    text = "hello"
    path = "/tmp/greeting.txt"   # absolute: the orchestrator's working directory is not yours
    times = 3                    # exclamation marks, 1 to 10 (default 1)

It imports only from orchestrator_svc.workers, the plugin API.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from orchestrator_svc.workers import (
    Field,
    FieldViolation,
    Params,
    WorkContext,
    Worker,
    WorkerCatalog,
    WorkFailed,
    check_fields,
)

MAX_TIMES = 10
FIELDS = (
    Field("text", "string", required=True),
    Field("path", "string", required=True),
    Field("times", "integer", minimum=1, maximum=MAX_TIMES),
)


class ShoutWorker(Worker):
    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> list[FieldViolation]:
        violations = check_fields(params, path, FIELDS)
        text, target = params.get("text"), params.get("path")
        if isinstance(text, str) and not text.strip():
            violations.append(FieldViolation(f"{path}.text", "must not be blank: there is nothing to shout"))
        if isinstance(target, str) and not Path(target).is_absolute():
            violations.append(FieldViolation(f"{path}.path", f"must be an absolute path, got {target!r}"))
        return violations

    async def run(self, params: Params, context: WorkContext) -> str:
        shouted = params["text"].upper() + "!" * int(params.get("times", 1))
        try:
            # Off the event loop: the orchestrator runs every step on it.
            await asyncio.to_thread(Path(params["path"]).write_text, shouted + "\n")
        except OSError as error:
            raise WorkFailed(f"cannot write {params['path']}: {error.strerror or error}") from error
        return f"shouted {len(shouted)} characters"
