"""The client's side of tokens, against both services run with --tokens-file: the
SDK's typed errors (never retried), Client(token=...)/token_file=, SyncClient,
who submitted and who cancelled a job as the SDK and the CLI show them, and the
CLI's exit codes and one-line messages.

Like every test here it imports nothing of the servers: tokens are made with
the services' own command (`python -m stepstream_common.tokens hash`) run by
their interpreter.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from stepstream_client import Client, SyncClient
from stepstream_client._policy import RetryPolicy
from stepstream_client.errors import PermissionDeniedError, UnauthenticatedError
from stepstream_client.sdk import read_token

from tests.client import services
from tests.client.services import DEADLINE, QUICK_ORCHESTRATOR, QUICK_STATUS, Service, gate_step, run_cli

NAMES = {"viewer": "val", "operator": "otto", "follower": "fern", "admin": "ada"}
SLEEP_JOB = {"name": "authorized", "steps": [{"name": "one", "type": "sleep", "seconds": 0}]}


def private_file(path: Path, text: str) -> Path:
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(text)
    return path


async def make_token(name: str, role: str) -> tuple[str, str]:
    """(the tokens-file line, the token), made by the services' own command."""
    process = await asyncio.create_subprocess_exec(
        services.SERVER_PYTHON, "-m", "stepstream_common.tokens", "hash", "--name", name, "--role", role,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE):
        out, err = await process.communicate()
    assert process.returncode == 0, err
    return out.decode(), err.decode().strip().rsplit(" ", 1)[1]


@dataclass
class Secured:
    orchestrator: Service
    status: Service
    tokens: dict[str, str]
    token_files: dict[str, Path]

    def client(self, role: str | None = None, **options: Any) -> Client:
        token = self.tokens[role] if role is not None else None
        return Client(self.orchestrator.address, self.status.address, token=token, **options)

    async def cli(self, *args: str, env: dict[str, str] | None = None) -> services.CliResult:
        return await run_cli("--orchestrator", self.orchestrator.address, "--status", self.status.address, *args,
                             env={"STEPSTREAM_TOKEN": "", "STEPSTREAM_TOKEN_FILE": "", **(env or {})})


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    made = {role: await make_token(name, role) for role, name in NAMES.items()}
    tokens_file = private_file(tmp_path / "tokens", "".join(line for line, _ in made.values()))
    tokens = {role: token for role, (_, token) in made.items()}
    files = {role: private_file(tmp_path / f"{role}.token", token + "\n") for role, token in tokens.items()}
    orchestrator = services.orchestrator(tmp_path / "orchestrator", *QUICK_ORCHESTRATOR,
                                         "--tokens-file", str(tokens_file))
    await orchestrator.start()
    status = services.status(tmp_path / "status", orchestrator.address, *QUICK_STATUS,
                             "--tokens-file", str(tokens_file), "--orchestrator-token-file", str(files["follower"]))
    try:
        await status.start()
        yield Secured(orchestrator, status, tokens, files)
    finally:
        await status.kill()
        await orchestrator.kill()


# --- the SDK ------------------------------------------------------------------------------------------------


async def test_no_token_is_unauthenticated_at_once_never_retried(secured: Secured) -> None:
    async with secured.client(retry=RetryPolicy(deadline=DEADLINE)) as client:
        with pytest.raises(UnauthenticatedError) as caught:
            await anext(aiter(client.list()))
    error = caught.value
    assert (error.code, error.reason, error.attempts) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING", 1)
    assert error.message.startswith(f"the status service at {secured.status.address} refused the call: no token")


async def test_a_wrong_token_is_unauthenticated(secured: Secured) -> None:
    wrong = "otto." + "x" * 43
    async with Client(secured.orchestrator.address, secured.status.address, token=wrong) as client:
        with pytest.raises(UnauthenticatedError) as caught:
            await client.submit(SLEEP_JOB, request_id="retried-if-it-could-be")
    assert (caught.value.reason, caught.value.attempts) == ("TOKEN_INVALID", 1)


async def test_a_role_that_may_not_is_permission_denied_naming_the_role_needed(secured: Secured) -> None:
    async with secured.client("viewer") as client:
        with pytest.raises(PermissionDeniedError) as caught:
            await client.submit(SLEEP_JOB, request_id="twice-would-be-safe")
    error = caught.value
    assert (error.code, error.reason, error.attempts) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED", 1)
    assert error.metadata == {"method": "/stepstream.orchestrator.v1.OrchestratorService/SubmitJob",
                              "role": "viewer", "allowed": "operator,admin"}
    assert error.message == (
        f"the orchestrator at {secured.orchestrator.address} refused the call: token 'val' has role viewer; "
        "stepstream.orchestrator.v1.OrchestratorService/SubmitJob needs role operator or admin")


def test_a_retry_policy_cannot_retry_a_refused_token() -> None:
    for code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        with pytest.raises(ValueError, match=f"{code.name} cannot be retried"):
            RetryPolicy(codes=frozenset({grpc.StatusCode.UNAVAILABLE, code}))


async def test_who_submitted_and_who_cancelled_as_the_sdk_shows_them(secured: Secured, tmp_path: Path) -> None:
    async with Client(secured.orchestrator.address, secured.status.address,
                      token_file=secured.token_files["operator"]) as operator, secured.client("admin") as admin:
        submitted = await operator.submit({"name": "gated", "steps": [gate_step("wait", tmp_path / "gate")]})
        assert (submitted.submitted_by, submitted.cancelled_by) == ("otto", "")
        async with operator.watch(submitted.id) as views:
            first = await anext(views)
            cancelled = await admin.cancel(submitted.id)
            assert (cancelled.submitted_by, cancelled.cancelled_by) == ("otto", "ada")
            rest = [view async for view in views]
        last = rest[-1]
        viewed = await admin.get(submitted.id)
    assert (first.submitted_by, first.cancelled_by) == ("otto", "")
    assert (last.state, last.submitted_by, last.cancelled_by) == ("cancelled", "otto", "ada")
    assert viewed == last
    with SyncClient(secured.orchestrator.address, secured.status.address,
                    token_file=secured.token_files["viewer"]) as viewer:
        listed = list(viewer.list())
    assert [(job.id, job.submitted_by, job.cancelled_by) for job in listed] == [(submitted.id, "otto", "ada")]


class Recorder(grpc.aio.UnaryUnaryClientInterceptor):
    """A user's interceptor that keeps the metadata of every call it sees."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def intercept_unary_unary(
        self, continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails, request: Any,
    ) -> Any:
        self.seen.append(client_call_details.metadata)
        return await continuation(client_call_details, request)


async def test_the_token_is_added_after_the_users_interceptors_have_seen_the_call(secured: Secured) -> None:
    recorder = Recorder()
    async with secured.client("operator", interceptors=[recorder]) as client:
        await client.submit(SLEEP_JOB)
    assert recorder.seen and not any(secured.tokens["operator"] in str(metadata) for metadata in recorder.seen)


def test_a_token_is_read_from_its_file_or_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  ci.secretsecretsecretsecret \n")
    assert read_token(None, path) == "ci.secretsecretsecretsecret"
    assert read_token("given", None) == "given"
    assert read_token(None, None) == ""
    (tmp_path / "empty").write_text("\n")
    for token, file, says in [
        ("given", path, "either a token or a token file"),
        (None, tmp_path / "missing", f"cannot read the token file {tmp_path / 'missing'}: No such file"),
        (None, tmp_path / "empty", "is empty"),
        ("two words", None, "printable ASCII without spaces"),
    ]:
        with pytest.raises(ValueError, match=says):
            read_token(token, file)


# --- the CLI ------------------------------------------------------------------------------------------------


async def test_cli_without_a_token_exits_8_with_one_line(secured: Secured, tmp_path: Path) -> None:
    result = await secured.cli("list")
    assert result.code == 8, result
    assert result.stderr == (
        f"stepstream: the status service at {secured.status.address} refused the call: no token: call with "
        "`authorization: Bearer <token>` metadata; give the token (--token-file FILE, or env STEPSTREAM_TOKEN)\n")


async def test_cli_with_a_wrong_token_exits_8_saying_to_check_it(secured: Secured) -> None:
    result = await secured.cli("list", env={"STEPSTREAM_TOKEN": "ada." + "y" * 43})
    assert result.code == 8, result
    assert len(result.stderr.splitlines()) == 1 and "check the token" in result.stderr
    assert "y" * 43 not in result.stderr


async def test_cli_with_a_role_that_may_not_exits_9_naming_the_role_needed(
    secured: Secured, tmp_path: Path
) -> None:
    definition = tmp_path / "job.json"
    definition.write_text(json.dumps(SLEEP_JOB))
    result = await secured.cli("--token-file", str(secured.token_files["viewer"]), "submit", str(definition))
    assert result.code == 9, result
    assert result.stderr == (
        f"stepstream: the orchestrator at {secured.orchestrator.address} refused the call: token 'val' has role "
        "viewer; stepstream.orchestrator.v1.OrchestratorService/SubmitJob needs role operator or admin\n")


async def test_cli_shows_who_submitted_and_who_cancelled(secured: Secured, tmp_path: Path) -> None:
    definition = tmp_path / "job.json"
    definition.write_text(json.dumps({"name": "gated", "steps": [gate_step("wait", tmp_path / "gate")]}))
    operator = {"STEPSTREAM_TOKEN_FILE": str(secured.token_files["operator"])}
    submitted = await secured.cli("submit", str(definition), "-o", "json", env=operator)
    assert submitted.code == 0, submitted
    job = json.loads(submitted.stdout)
    assert job["submitted_by"] == "otto"
    cancelled = await secured.cli("cancel", job["id"], env={"STEPSTREAM_TOKEN": secured.tokens["admin"]})
    assert cancelled.code == 0, cancelled
    assert f"cancel requested for job {job['id']} (gated) by ada: " in cancelled.stdout
    watched = await secured.cli("watch", job["id"], "-o", "json", env=operator)
    assert watched.code == 3, watched  # cancelled
    views = [json.loads(line) for line in watched.stdout.splitlines()]
    assert (views[-1]["submitted_by"], views[-1]["cancelled_by"]) == ("otto", "ada")
    got = await secured.cli("--token-file", str(secured.token_files["viewer"]), "get", job["id"], "-o", "json")
    assert got.code == 0, got
    assert json.loads(got.stdout) == views[-1]
    text = await secured.cli("get", job["id"], env={"STEPSTREAM_TOKEN": secured.tokens["viewer"]})
    assert text.code == 0, text
    assert " submitted_by=otto cancelled_by=ada " in text.stdout.splitlines()[0]


async def test_cli_with_a_token_file_it_cannot_read_is_a_usage_error(secured: Secured, tmp_path: Path) -> None:
    result = await secured.cli("--token-file", str(tmp_path / "missing"), "list")
    assert result.code == 2, result
    assert result.stderr.splitlines()[-1] == (
        f"stepstream: error: cannot read the token file {tmp_path / 'missing'}: No such file or directory")
