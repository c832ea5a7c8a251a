"""What a job can reach: a command starts from a minimal environment, never the
orchestrator's; a fan-out hands a command child its item as data (an
environment variable), not as shell text; secret values reach the command and
nothing else: no RPC, log line or database file holds them.

The orchestrator runs as a real process wherever its own environment or its log
is what is tested; the commands are real processes, and each reports the
environment it was given by copying /proc/self/environ (exactly what the
orchestrator passed to exec, untouched by any shell)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import json_format
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream_client.errors import InvalidArgumentError, from_rpc_error

from orchestrator_svc.app import Orchestrator
from stepstream_common.errors import quoted
from tests.helpers import (
    DEADLINE,
    REPO,
    channel,
    finished,
    job_definition,
    read_events,
    run_cli,
    wait_job_state,
)

if TYPE_CHECKING:
    from stepstream.orchestrator.v1.orchestrator_service_pb2_grpc import OrchestratorServiceAsyncStub as Stub
else:
    Stub = orch_grpc.OrchestratorServiceStub

SERVICE = orch_pb.DESCRIPTOR.services_by_name["OrchestratorService"].full_name
# What the orchestrator's own environment holds and no command may see.
DATABASE_PASSWORD = "orchestrator-db-password-7f3a"
# Secret values a job gives its commands.
LITERAL_SECRET = "literal-secret-5d1e"
FILE_SECRET = "file-secret-9c2b"


@dataclass
class RunningOrchestrator:
    address: str
    log: Path
    data_dir: Path


@contextlib.contextmanager
def orchestrator_process(
    tmp_path: Path, env: Mapping[str, str], *args: str
) -> Iterator[RunningOrchestrator]:
    """`python -m orchestrator_svc` with exactly `env` as its environment, logging
    everything (debug) to a file; stopped (SIGTERM) on the way out."""
    data_dir, log = tmp_path / "orchestrator", tmp_path / "orchestrator.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator_svc", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
             "--log-level", "debug", "--kill-grace", "1", *args],
            stdout=subprocess.PIPE, stderr=stderr, env=dict(env), cwd=REPO, text=True,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            while line and " listening on " not in line:
                line = process.stdout.readline()
            assert line, f"the orchestrator did not start: {log.read_text()}"
            yield RunningOrchestrator(line.strip().rsplit(" ", 1)[1], log, data_dir)
        finally:
            process.terminate()
            process.wait(DEADLINE)
            if process.stdout is not None:
                process.stdout.close()


@contextlib.asynccontextmanager
async def stub_for(address: str) -> AsyncIterator[Stub]:
    async with channel(address) as ch:
        yield Stub(ch)


def environ_of(path: Path) -> dict[str, str]:
    """A copy of /proc/<pid>/environ as a dict."""
    entries = path.read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if entry)


def report_environ(name: str) -> list[str]:
    """A command that copies the environment it was started with to the file `name`."""
    return ["sh", "-c", f"cat /proc/$$/environ > {name}"]


async def run_to_end(stub: Stub, steps: list[Mapping[str, Any]], expected: int = s.JOB_STATE_COMPLETED) -> str:
    """Submit a job of `steps`; its id once it has ended `expected`."""
    submitted = await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(steps)))
    view = await wait_job_state(stub, submitted.job.id, {s.JOB_STATE_COMPLETED, s.JOB_STATE_FAILED})
    assert view.job.state == expected, view
    return submitted.job.id


def environment_job(cwd: Path) -> list[Mapping[str, Any]]:
    """A command step with an `env` of its own, and a fan-out of two command children."""
    return [
        {"name": "step", "type": "command", "command": report_environ("step.environ"), "cwd": str(cwd),
         "env": {"STEP_VAR": "from the step"}},
        {"name": "fan", "type": "fanout", "count": 2,
         "child": {"type": "command", "command": report_environ("child-{index}.environ"), "cwd": str(cwd)}},
    ]


# --- a minimal environment -------------------------------------------------------------------------------


async def test_commands_get_only_path_home_lang_tz_and_the_passed_names(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    orchestrator_env = {
        "PATH": "/usr/bin:/bin", "HOME": home, "LANG": "en_US.UTF-8", "TZ": "Europe/Paris",
        "DATABASE_PASSWORD": DATABASE_PASSWORD, "STEPSTREAM_ORCHESTRATOR_TOKEN": DATABASE_PASSWORD,
        "ALLOWED": "passed on", "STEPSTREAM_PASS_ENV": "ALLOWED,NEVER_SET",
    }
    with orchestrator_process(tmp_path, orchestrator_env) as orchestrator:
        async with stub_for(orchestrator.address) as stub:
            job_id = await run_to_end(stub, environment_job(tmp_path))
    base = {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "en_US.UTF-8", "TZ": "Europe/Paris",
            "ALLOWED": "passed on", "STEPSTREAM_JOB_ID": job_id}
    assert environ_of(tmp_path / "step.environ") == {**base, "STEP_VAR": "from the step", "STEPSTREAM_STEP": "step"}
    for index in (0, 1):
        assert environ_of(tmp_path / f"child-{index}.environ") == {
            **base, "STEPSTREAM_STEP": "fan", "STEPSTREAM_ITEM": str(index), "STEPSTREAM_INDEX": str(index),
        }
    for reported in tmp_path.glob("*.environ"):
        assert DATABASE_PASSWORD.encode() not in reported.read_bytes()
    assert "--pass-env names what the orchestrator's environment does not set: NEVER_SET" in (
        orchestrator.log.read_text()
    )


async def test_where_the_orchestrator_has_none_commands_get_defaults(tmp_path: Path) -> None:
    # No PATH, HOME, LANG or TZ at all; the name to pass comes by flag this time.
    orchestrator_env = {"DATABASE_PASSWORD": DATABASE_PASSWORD, "ALLOWED": "passed on"}
    with orchestrator_process(tmp_path, orchestrator_env, "--pass-env", "ALLOWED") as orchestrator:
        async with stub_for(orchestrator.address) as stub:
            job_id = await run_to_end(stub, environment_job(tmp_path)[:1])
    assert environ_of(tmp_path / "step.environ") == {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": pwd.getpwuid(os.getuid()).pw_dir, "LANG": "C.UTF-8",
        "ALLOWED": "passed on", "STEP_VAR": "from the step", "STEPSTREAM_JOB_ID": job_id, "STEPSTREAM_STEP": "step",
    }


# --- fan-out items as data ---------------------------------------------------------------------------------

HOSTILE_ITEMS = ["x; rm -f keep.txt", "$(rm -f keep.txt)", "`rm -f keep.txt`", "a' && rm -f keep.txt; echo '", "*"]


async def test_an_item_read_from_the_environment_is_data_where_spliced_into_a_shell_it_is_code(
    orchestrator_stub: Stub, tmp_path: Path
) -> None:
    safe, spliced = tmp_path / "safe", tmp_path / "spliced"
    for directory in (safe, spliced):
        directory.mkdir()
        (directory / "keep.txt").write_text("still here")
    job_id = await run_to_end(orchestrator_stub, [
        {"name": "safe", "type": "fanout", "items": HOSTILE_ITEMS, "child": {
            "type": "command", "command": ["sh", "-c", 'echo "$STEPSTREAM_INDEX $STEPSTREAM_ITEM"'],
            "cwd": str(safe)}},
        # The README's pattern: the item becomes part of the script.
        {"name": "spliced", "type": "fanout", "items": HOSTILE_ITEMS[:1], "child": {
            "type": "command", "command": ["sh", "-c", "echo {item}"], "cwd": str(spliced)}},
    ])
    events = await read_events(orchestrator_stub, 0, finished(job_id))
    messages = {(e.child.step_name, e.child.index): e.child.message for e in events if e.HasField("child")}
    assert [messages["safe", index] for index in range(len(HOSTILE_ITEMS))] == [
        f"exit 0: {index} {item}" for index, item in enumerate(HOSTILE_ITEMS)
    ]
    assert (safe / "keep.txt").read_text() == "still here"
    assert not (spliced / "keep.txt").exists()


# --- secret values -----------------------------------------------------------------------------------------


def secret_job(tmp_path: Path, secret_file: Path) -> list[Mapping[str, Any]]:
    secrets = {"API_KEY": {"secret_file": str(secret_file)}, "TOKEN": {"secret": LITERAL_SECRET}}
    return [
        # Uses both, and prints them: the step's message must not show them.
        {"name": "use", "type": "command", "cwd": str(tmp_path), "env": {**secrets, "REGION": "eu"},
         "command": ["sh", "-c", 'printf "%s|%s" "$API_KEY" "$TOKEN" > seen.txt; echo "token=$TOKEN key=$API_KEY"']},
        {"name": "fan", "type": "fanout", "count": 1, "child": {
            "type": "command", "cwd": str(tmp_path), "env": secrets,
            "command": ["sh", "-c", 'printf "%s|%s" "$API_KEY" "$TOKEN" > seen-by-child.txt']}},
    ]


async def raw_get_job(ch: grpc.aio.Channel, job_id: str) -> bytes:
    call: grpc.aio.UnaryUnaryMultiCallable[orch_pb.GetJobRequest, bytes] = ch.unary_unary(
        f"/{SERVICE}/GetJob", request_serializer=orch_pb.GetJobRequest.SerializeToString
    )
    return await call(orch_pb.GetJobRequest(job_id=job_id))


async def raw_event_stream(ch: grpc.aio.Channel) -> bytes:
    """Every message of StreamStepEvents from the start, as sent, until a
    heartbeat says nothing newer exists."""
    stream: grpc.aio.UnaryStreamMultiCallable[orch_pb.StreamStepEventsRequest, bytes] = ch.unary_stream(
        f"/{SERVICE}/StreamStepEvents", request_serializer=orch_pb.StreamStepEventsRequest.SerializeToString
    )
    call = stream(orch_pb.StreamStepEventsRequest(after_seq=0))
    received, last = b"", 0
    try:
        async with asyncio.timeout(DEADLINE):
            async for raw in call:
                received += raw
                message = orch_pb.StreamStepEventsResponse.FromString(raw)
                last = message.batch.events[-1].seq if message.batch.events else last
                if message.HasField("heartbeat") and message.heartbeat.latest_seq == last:
                    return received
    finally:
        call.cancel()
    raise AssertionError("the stream ended early")


async def test_secrets_reach_the_command_and_no_rpc_log_or_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "api-key"
    secret_file.write_text(FILE_SECRET + "\n")
    with orchestrator_process(tmp_path, {"PATH": os.environ["PATH"]}) as orchestrator:
        async with channel(orchestrator.address) as ch:
            stub = Stub(ch)
            job_id = await run_to_end(stub, secret_job(tmp_path, secret_file))
            view = await stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))
            get_job, stream = await raw_get_job(ch, job_id), await raw_event_stream(ch)

    # The commands got both (the file's trailing newline dropped).
    assert (tmp_path / "seen.txt").read_text() == f"{FILE_SECRET}|{LITERAL_SECRET}"
    assert (tmp_path / "seen-by-child.txt").read_text() == f"{FILE_SECRET}|{LITERAL_SECRET}"
    # What a command prints of them is masked.
    assert view.steps[0].step.message == "exit 0: token=<secret> key=<secret>"
    # GetJob echoes the definition with the literal redacted (a secret_file's path is not secret).
    redacted = {"API_KEY": {"secret_file": str(secret_file)}, "TOKEN": {"secret": "<secret>"}}
    use, fan = (json_format.MessageToDict(step.params) for step in view.definition.steps)
    assert use["env"] == {**redacted, "REGION": "eu"}
    assert fan["child"]["env"] == redacted
    stored = b"".join(path.read_bytes() for path in orchestrator.data_dir.rglob("*") if path.is_file())
    for where, data in {"GetJob": get_job, "StreamStepEvents": stream, "the log": orchestrator.log.read_bytes(),
                        "the data directory": stored}.items():
        for secret in (LITERAL_SECRET, FILE_SECRET):
            assert secret.encode() not in data, f"{where} holds a secret"
    for data in (get_job, stream, stored):
        assert b"<secret>" in data


async def test_a_secret_file_is_read_as_the_step_starts(orchestrator_stub: Stub, tmp_path: Path) -> None:
    secret_file = tmp_path / "api-key"
    secret_file.write_text(FILE_SECRET)
    job_id = await run_to_end(orchestrator_stub, [
        # Valid when submitted; gone when the next step starts.
        {"name": "rotate", "type": "command", "command": ["rm", str(secret_file)]},
        {"name": "use", "type": "command", "command": ["true"], "env": {"API_KEY": {"secret_file": str(secret_file)}}},
    ], expected=s.JOB_STATE_FAILED)
    view = await orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))
    assert view.steps[1].step.message == (
        f"env API_KEY: cannot read secret_file '{secret_file}': No such file or directory"
    )


async def test_a_python_step_that_quotes_a_secret_shows_it_masked(
    orchestrator_stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    """Any worker's message passes the same mask as a command's output: here an
    exception quoting its argument, and a function returning it."""
    secret = "py-secret-Sup3r-XYZ"
    job_id = await run_to_end(orchestrator_stub, [
        {"name": "echo", "type": "python", "function": "tests.helpers.workers:sync_echo",
         "args": {"text": {"secret": secret}}},
        {"name": "raise", "type": "python", "function": "ipaddress:ip_address",
         "args": {"address": {"secret": secret}}},
    ], expected=s.JOB_STATE_FAILED)
    view = await orchestrator_stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))
    messages = [step.step.message for step in view.steps]
    assert messages[0] == "{'secret': '<secret>'}", messages
    assert messages[1].startswith("ValueError: {'secret': '<secret>'} does not appear"), messages
    assert secret not in view.SerializeToString().decode("utf-8", "replace")
    assert secret not in caplog.text


HUNTER2 = "hunter2-in-the-wrong-shape"


def bad_env_definition(tmp_path: Path) -> Any:
    return job_definition([
        {"name": "a", "type": "command", "command": ["true"], "env": {
            "NUMBER": 5,
            "BOTH": {"secret": HUNTER2, "secret_file": "/etc/hostname"},
            "TYPO": {"secrets": HUNTER2},
            "NOT_A_STRING": {"secret": [HUNTER2]},
            "RELATIVE": {"secret_file": "run/secrets/api"},
            "MISSING": {"secret_file": str(tmp_path / "missing")},
            "DIRECTORY": {"secret_file": str(tmp_path)},
            "A=B": "x",
            "FINE": {"secret": HUNTER2},
        }},
        {"name": "fan", "type": "fanout", "count": 1,
         "child": {"type": "command", "command": ["true"], "env": {"LISTED": [HUNTER2]}}},
    ])


async def test_bad_env_shapes_are_invalid_argument_naming_the_field_and_never_quoting_a_secret(
    orchestrator_stub: Stub, tmp_path: Path
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=bad_env_definition(tmp_path)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidArgumentError)
    shapes = 'must be a string, { secret = "..." } or { secret_file = "/path" }, got'
    env = "definition.steps[0].params.env"
    assert sorted((v.field, v.description) for v in error.violations) == sorted([
        (f"{env}.NUMBER", f"{shapes} a number"),
        (f"{env}.BOTH", f"{shapes} a table of 'secret', 'secret_file'"),
        (f"{env}.TYPO", f"{shapes} a table of 'secrets'"),
        (f"{env}.NOT_A_STRING.secret", "must be a string"),
        (f"{env}.RELATIVE.secret_file", "must be an absolute path on the orchestrator, got 'run/secrets/api'"),
        (f"{env}.MISSING.secret_file", f"no regular file {quoted(str(tmp_path / 'missing'))} on the orchestrator"),
        (f"{env}.DIRECTORY.secret_file", f"no regular file {quoted(str(tmp_path))} on the orchestrator"),
        (f"{env}.A=B", "a variable's name must not be empty or hold '=' or NUL"),
        ("definition.steps[1].params.child.env.LISTED", f"{shapes} a list"),
    ])
    everything = repr(caught.value.details()) + repr(caught.value.trailing_metadata())
    assert HUNTER2 not in everything


async def test_the_cli_shows_no_secret_of_a_rejected_definition(orchestrator: Orchestrator, tmp_path: Path) -> None:
    definition = tmp_path / "job.toml"
    definition.write_text(
        'name = "bad"\n[[steps]]\nname = "a"\ntype = "command"\ncommand = ["true"]\n'
        f'env = {{ TOKEN = {{ secret = "{HUNTER2}", extra = 1 }} }}\n'
    )
    result = await run_cli("--orchestrator", orchestrator.address, "submit", str(definition))
    assert result.code == 6, result
    assert "steps[0].env.TOKEN" in result.stderr
    assert HUNTER2 not in result.stdout + result.stderr
