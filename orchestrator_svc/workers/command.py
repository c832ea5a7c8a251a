"""Runs a real process, and really stops it (and everything it started)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from typing import Any

from orchestrator_svc.domain.spec import SECRET_KEY
from orchestrator_svc.output import OutputSink, OutputStream
from orchestrator_svc.workers import (
    Field,
    FieldViolation,
    Params,
    WorkContext,
    Worker,
    WorkerCatalog,
    WorkFailed,
    check_fields,
    quoted,
)
from orchestrator_svc.workers.processes import start_environment

FIELDS = (
    Field("command", "strings", required=True),
    Field("env", "table"),
    Field("cwd", "string"),
)
# Bytes read from a command's pipe at once (asyncio's stream buffer holds at most twice this).
READ_BYTES = 64 * 1024
SECRET_FILE_KEY = "secret_file"
# An environment variable's value is at most 128 KiB on Linux; no real secret comes near.
MAX_SECRET_BYTES = 64 * 1024
# What every command is told about itself. They win over the same names in `env`.
JOB_ID_VARIABLE = "STEPSTREAM_JOB_ID"
STEP_VARIABLE = "STEPSTREAM_STEP"
# What a fan-out adds to its command children's `env` (fanout.py), substituted
# like any string of the child table: a shell script reads "$STEPSTREAM_ITEM"
# instead of having the item spliced into its text, where it would be code.
FANOUT_CHILD_ENV = {"STEPSTREAM_ITEM": "{item}", "STEPSTREAM_INDEX": "{index}"}


class CommandWorker(Worker):
    """`command = ["prog", "arg", ...]` run without a shell, in its own process
    group, in a minimal environment: PATH, HOME, LANG, TZ and the names the
    operator passes with --pass-env (processes.start_environment), then `env`,
    then STEPSTREAM_JOB_ID and STEPSTREAM_STEP (and a fan-out child's
    STEPSTREAM_ITEM and STEPSTREAM_INDEX). Nothing else of the orchestrator's
    environment (its database password, its tokens) reaches a command.

    A value in `env` is a string or a secret:

        env = { REGION = "eu", TOKEN = { secret = "..." }, API_KEY = { secret_file = "/run/secrets/api" } }

    `{ secret = "..." }` is stored and shown only redacted (domain/spec.py). The file
    of `{ secret_file = "/abs/path" }` is read by the orchestrator as each
    attempt starts (a rotated secret is picked up by the next one), one
    trailing newline dropped; validation already wants an absolute path to a
    regular file the orchestrator can read, so a typo is rejected up front
    rather than failing later. The path is not secret: it is shown as written.
    (This reaches no further than the command itself could: it runs as the
    orchestrator's user.) Every line of a secret the command prints shows as
    "<secret>" in its stored output and the step's message: a safety net
    against accidents, no more, since a command that encodes or splits a
    secret prints it.

    Its stdout and stderr are captured whole into the attempt's output
    (orchestrator_svc.output), interleaved as they are read; the step's
    message is the last non-blank line of either.

    Stopping (timeout, cancel) sends SIGTERM to the whole group, then SIGKILL
    after the grace period. When the command exits, anything it left running in
    its group is killed too, so a step never leaks processes.
    """

    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> list[FieldViolation]:
        violations = check_fields(params, path, FIELDS)
        command = params.get("command")
        if isinstance(command, list) and not command:
            violations.append(FieldViolation(f"{path}.command", "must not be empty"))
        env = params.get("env")
        if isinstance(env, Mapping):
            for name, value in env.items():
                violations.extend(_env_problems(name, value, f"{path}.env.{name}"))
        return violations

    async def run(self, params: Params, context: WorkContext) -> str:
        command = list(params["command"])
        env, secrets = await _environment(params.get("env", {}), context)
        context.output.hide(secrets)
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                env=env,
                cwd=params.get("cwd"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as error:
            raise WorkFailed(f"could not start {command[0]!r}: {error.strerror or error}") from error
        if context.processes is not None:
            context.processes.add(process.pid, _owner(context))
        assert process.stdout is not None
        assert process.stderr is not None
        readers = [
            asyncio.create_task(_capture(process.stdout, OutputStream.STDOUT, context.output)),
            asyncio.create_task(_capture(process.stderr, OutputStream.STDERR, context.output)),
        ]
        try:
            code = await process.wait()
        except asyncio.CancelledError:
            await _stop_group(process, context.kill_grace)
            for reader in readers:
                reader.cancel()
            raise
        finally:
            _kill_group(process.pid, signal.SIGKILL)
            if context.processes is not None:
                context.processes.remove(process.pid)
        try:
            await asyncio.gather(*readers)  # they end at EOF, now that the whole group is gone
        except asyncio.CancelledError:
            for reader in readers:
                reader.cancel()
            raise
        last = f": {context.output.last_line}" if context.output.last_line else ""
        if code == 0:
            return f"exit 0{last}"
        if code < 0:
            raise WorkFailed(f"killed by {signal.Signals(-code).name}{last}")
        raise WorkFailed(f"exit {code}{last}")


def _env_problems(name: str, value: Any, where: str) -> list[FieldViolation]:
    """What is wrong with one `env` entry, never quoting its value: a secret in
    the wrong shape is still a secret."""
    problems = []
    if not name or "=" in name or "\0" in name:
        problems.append(FieldViolation(where, "a variable's name must not be empty or hold '=' or NUL"))
    if isinstance(value, str):
        if "\0" in value:
            problems.append(FieldViolation(where, "must not hold a NUL character"))
    elif isinstance(value, Mapping) and list(value) == [SECRET_KEY]:
        if not isinstance(value[SECRET_KEY], str):
            problems.append(FieldViolation(f"{where}.{SECRET_KEY}", "must be a string"))
    elif isinstance(value, Mapping) and list(value) == [SECRET_FILE_KEY]:
        problems.extend(_secret_file_problems(value[SECRET_FILE_KEY], f"{where}.{SECRET_FILE_KEY}"))
    else:
        problems.append(FieldViolation(
            where, f'must be a string, {{ {SECRET_KEY} = "..." }} or {{ {SECRET_FILE_KEY} = "/path" }}, '
                   f"got {_shape(value)}"
        ))
    return problems


def _shape(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a table of {', '.join(quoted(key) for key in sorted(value))}" if value else "an empty table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    return "a number" if isinstance(value, int | float) else "null"


def _secret_file_problems(path: Any, where: str) -> list[FieldViolation]:
    if not isinstance(path, str):
        return [FieldViolation(where, "must be a string")]
    if not os.path.isabs(path):
        return [FieldViolation(where, f"must be an absolute path on the orchestrator, got {quoted(path)}")]
    if not os.path.isfile(path):
        return [FieldViolation(where, f"no regular file {quoted(path)} on the orchestrator")]
    if not os.access(path, os.R_OK):
        return [FieldViolation(where, f"{quoted(path)} is not readable by the orchestrator")]
    return []


async def _environment(env: Mapping[str, Any], context: WorkContext) -> tuple[dict[str, str], list[str]]:
    """The command's environment (see CommandWorker), and the secret values in it."""
    resolved = dict(context.processes.environment if context.processes is not None else start_environment())
    secrets = []
    for name, value in env.items():
        if isinstance(value, str):
            resolved[name] = value
            continue
        if SECRET_KEY in value:
            secret = value[SECRET_KEY]
        else:
            secret = await asyncio.to_thread(_read_secret_file, name, value[SECRET_FILE_KEY])
        if "\0" in secret:
            raise WorkFailed(f"env {name}: a secret must not hold a NUL character")
        resolved[name] = secret
        secrets.append(secret)
    resolved.update({JOB_ID_VARIABLE: context.job_id, STEP_VARIABLE: context.step_name})
    return resolved, secrets


def _read_secret_file(name: str, path: str) -> str:
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_SECRET_BYTES + 1)
    except OSError as error:
        raise WorkFailed(f"env {name}: cannot read secret_file {path!r}: {error.strerror or error}") from error
    if len(data) > MAX_SECRET_BYTES:
        raise WorkFailed(f"env {name}: secret_file {path!r} holds more than {MAX_SECRET_BYTES} bytes")
    # Bytes that are not UTF-8 pass through unchanged (surrogateescape, as os.environ does).
    return os.fsdecode(data.removesuffix(b"\n"))


def _owner(context: WorkContext) -> str:
    child = f"[{context.child_index}]" if context.child_index is not None else ""
    return f"job {context.job_id} step {context.step_name}{child} attempt {context.attempt}"


async def _capture(pipe: asyncio.StreamReader, stream: OutputStream, output: OutputSink) -> None:
    """Drain `pipe` into `output` until EOF, a read at a time: each read is written
    before the next, so memory holds one read whatever the command prints, and
    within the service's output budget (OutputStore.pace)."""
    while chunk := await pipe.read(READ_BYTES):
        output.emit(stream, chunk)
        await output.drain()
        await output.pace(len(chunk))
    output.end_stream(stream)
    await output.drain()  # an unfinished last line may be the step's message


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
