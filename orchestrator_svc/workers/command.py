"""Runs a real process, and really stops it (and everything it started)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque

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

FIELDS = (
    Field("command", "strings", required=True),
    Field("env", "string_map"),
    Field("cwd", "string"),
)
OUTPUT_TAIL_LINES = 5


class CommandWorker(Worker):
    """`command = ["prog", "arg", ...]` run without a shell, in its own process
    group, with `env` added to the orchestrator's environment.

    Stopping (timeout, cancel) sends SIGTERM to the whole group, then SIGKILL
    after the grace period. When the command exits, anything it left running in
    its group is killed too, so a step never leaks processes.
    """

    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> list[FieldViolation]:
        violations = check_fields(params, path, FIELDS)
        command = params.get("command")
        if isinstance(command, list) and not command:
            violations.append(FieldViolation(f"{path}.command", "must not be empty"))
        return violations

    async def run(self, params: Params, context: WorkContext) -> str:
        command = list(params["command"])
        env = {**os.environ, **params.get("env", {})}
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                env=env,
                cwd=params.get("cwd"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as error:
            raise WorkFailed(f"could not start {command[0]!r}: {error.strerror or error}") from error
        if context.processes is not None:
            context.processes.add(process.pid, _owner(context))
        tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
        reader = asyncio.create_task(_read_lines(process, tail))
        try:
            code = await process.wait()
        except asyncio.CancelledError:
            await _stop_group(process, context.kill_grace)
            reader.cancel()
            raise
        finally:
            _kill_group(process.pid, signal.SIGKILL)
            if context.processes is not None:
                context.processes.remove(process.pid)
        try:
            await reader  # ends at EOF, now that the whole group is gone
        except asyncio.CancelledError:
            reader.cancel()
            raise
        last = f": {tail[-1]}" if tail else ""
        if code == 0:
            return f"exit 0{last}"
        if code < 0:
            raise WorkFailed(f"killed by {signal.Signals(-code).name}{last}")
        raise WorkFailed(f"exit {code}{last}")


def _owner(context: WorkContext) -> str:
    child = f"[{context.child_index}]" if context.child_index is not None else ""
    return f"job {context.job_id} step {context.step_name}{child} attempt {context.attempt}"


async def _read_lines(process: asyncio.subprocess.Process, tail: deque[str]) -> None:
    assert process.stdout is not None
    async for raw in process.stdout:
        line = raw.decode(errors="replace").strip()
        if line:
            tail.append(line[:200])


def _kill_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


async def _stop_group(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the group, give it `grace` seconds, then SIGKILL; reap the leader."""
    _kill_group(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(process.wait()), grace)
    except TimeoutError:
        _kill_group(process.pid, signal.SIGKILL)
    await asyncio.shield(process.wait())
