"""Tokens and roles, end to end, against both services as real subprocesses.

Every method each server serves (as its own reflection lists and describes
them: its service, health, reflection v1 and v1alpha) is called with no token,
a wrong one and each role's token, and must answer UNAUTHENTICATED,
PERMISSION_DENIED or anything else (allowed) exactly as the policy below says;
no token ever reaches a log. Also: a table missing a rule keeps a server from
starting, a tokens file that others may read (or that is malformed) keeps a
service from starting, a status service whose token may not follow says so in
its staleness, who submitted and who cancelled a job is kept and shown by both
services, and SIGHUP re-reads the tokens file.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status
from stepstream.channel import bearer_metadata
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from orchestrator_svc.api.servicer import OrchestratorServicer
from stepstream_common import auth, rpc
from stepstream_common.tokens import load_tokens, new_entry
from tests.client.services import QUICK_ORCHESTRATOR, QUICK_STATUS, Service
from tests.helpers import (
    DEADLINE,
    REPO,
    ends_job,
    eventually,
    gate_step,
    job_definition,
    orchestrator_process,
    private_file,
    read_watch,
    wait_status_job,
    watch_until,
)

# The policy, stated here on its own: method -> the roles allowed, OPEN for anyone (no token needed).
OPEN = None
READERS = {"viewer", "operator", "admin"}
ORCHESTRATOR = "stepstream.orchestrator.v1.OrchestratorService"
STATUS = "stepstream.status.v1.StatusService"
EVERY_SERVER: dict[str, set[str] | None] = {
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/List": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": READERS,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": READERS,
}
POLICY: dict[str, dict[str, set[str] | None]] = {
    "orchestrator": {
        f"/{ORCHESTRATOR}/SubmitJob": {"operator", "admin"},
        f"/{ORCHESTRATOR}/CancelJob": {"operator", "admin"},
        f"/{ORCHESTRATOR}/GetJob": READERS,
        f"/{ORCHESTRATOR}/ListJobs": READERS,
        f"/{ORCHESTRATOR}/StreamStepEvents": {"follower", "admin"},
        f"/{ORCHESTRATOR}/StreamSnapshot": {"follower", "admin"},
        f"/{ORCHESTRATOR}/StreamOutput": READERS,
        f"/{ORCHESTRATOR}/ListOutput": READERS,
        **EVERY_SERVER,
    },
    "status": {
        f"/{STATUS}/GetJob": READERS,
        f"/{STATUS}/ListJobs": READERS,
        f"/{STATUS}/ListChildren": READERS,
        f"/{STATUS}/WatchJob": READERS,
        f"/{STATUS}/WatchJobs": READERS,
        **EVERY_SERVER,
    },
}
ROLES = ("viewer", "operator", "follower", "admin")
# Token names differ from role names: what a job records is the name.
NAMES = {"viewer": "val", "operator": "otto", "follower": "fern", "admin": "ada"}
WRONG_SECRET = "otto." + "x" * 43


def tokens_file(path: Path, roles: tuple[str, ...] = ROLES) -> dict[str, str]:
    """A tokens file at `path` with a token for each of `roles` (named NAMES[role]); role -> token."""
    made = {role: new_entry(NAMES[role], role) for role in roles}
    private_file(path, "# made by the test\n\n" + "".join(entry.line() + "\n" for entry, _ in made.values()))
    return {role: token for role, (_, token) in made.items()}


def as_(token: str) -> tuple[tuple[str, str], ...]:
    return bearer_metadata(token)


@dataclass
class Secured:
    """Both services with tokens on; the status service follows with the follower's token."""

    tmp: Path
    tokens: dict[str, str]
    orchestrator: Service
    status: Service = field(init=False)

    @property
    def logs(self) -> list[Path]:
        return sorted(self.tmp.glob("*.log"))

    def address(self, server: str) -> str:
        return self.orchestrator.address if server == "orchestrator" else self.status.address

    def token_file(self, role: str) -> Path:
        """A file holding `role`'s token in clear, as --orchestrator-token-file reads one."""
        path = self.tmp / f"{role}.token"
        if not path.exists():
            private_file(path, self.tokens[role] + "\n")
        return path

    def status_following_as(self, role: str) -> Service:
        """The status service (same data directory), following the orchestrator with `role`'s token."""
        return Service("status_svc", self.tmp / "status", "--orchestrator", self.orchestrator.address,
                       *QUICK_STATUS, "--log-level", "debug", "--tokens-file", str(self.tmp / "tokens"),
                       "--orchestrator-token-file", str(self.token_file(role)))


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    tokens = tokens_file(tmp_path / "tokens")
    orchestrator = Service("orchestrator_svc", tmp_path / "orchestrator", *QUICK_ORCHESTRATOR,
                           "--log-level", "debug", "--tokens-file", str(tmp_path / "tokens"))
    await orchestrator.start()
    setup = Secured(tmp_path, tokens, orchestrator)
    setup.status = setup.status_following_as("follower")
    try:
        await setup.status.start()
        yield setup
    finally:
        await setup.status.kill()
        await orchestrator.kill()


# --- every method, every identity --------------------------------------------------------------------------


async def served_methods(address: str, token: str) -> dict[str, tuple[bool, bool]]:
    """Every method the server at `address` serves, as its reflection lists and describes it:
    "/package.Service/Method" -> (client streaming, server streaming)."""
    async with grpc.aio.insecure_channel(address) as channel:
        reflect = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )

        async def ask(*requests: reflection_pb2.ServerReflectionRequest) -> list[Any]:
            async with asyncio.timeout(DEADLINE):
                return [response async for response in reflect(iter(requests), metadata=as_(token))]

        listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
        names = [service.name for service in listed[0].list_services_response.service]
        answers = await ask(*(reflection_pb2.ServerReflectionRequest(file_containing_symbol=n) for n in names))
    found: dict[str, tuple[bool, bool]] = {}
    for name, answer in zip(names, answers, strict=True):
        files = [descriptor_pb2.FileDescriptorProto.FromString(data)
                 for data in answer.file_descriptor_response.file_descriptor_proto]
        service = next(service for file in files for service in file.service
                       if f"{file.package}.{service.name}" == name)
        for method in service.method:
            found[f"/{name}/{method.name}"] = (method.client_streaming, method.server_streaming)
    return found


async def outcome(
    channel: grpc.aio.Channel, method: str, streaming: tuple[bool, bool], metadata: tuple[tuple[str, str], ...]
) -> grpc.StatusCode | grpc.aio.AioRpcError:
    """Call `method` with an empty request (none for a client stream): the error it ends
    with, or OK once it answered (a stream's first message or end: it is then cancelled)."""
    client_streaming, server_streaming = streaming
    try:
        async with asyncio.timeout(DEADLINE):
            if not (client_streaming or server_streaming):
                unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
                await unary(b"", metadata=metadata)
                return grpc.StatusCode.OK
            call: Any
            if client_streaming:
                bidi: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(method)
                call = bidi(metadata=metadata)
                # No request: a message sent while the server ends the call (denied) makes
                # grpc.aio end it INTERNAL on the client, hiding the status the server sent.
                await call.done_writing()
            else:
                stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(method)
                call = stream(b"", metadata=metadata)
            try:
                await call.read()  # raises the error the call ends with, if it does
            finally:
                call.cancel()
            return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        return error


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None, error
    infos = [detail for detail in status.details if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, status
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    return info


def problem(method: str, identity: str, allowed: set[str] | None, got: grpc.StatusCode | grpc.aio.AioRpcError) -> str:
    """What is wrong with how `method` answered `identity` (None: a role, "none", "wrong"); "" if nothing."""
    code = got.code() if isinstance(got, grpc.aio.AioRpcError) else got
    if allowed is OPEN or identity in allowed:
        bad = code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        return f"{method} as {identity}: {code.name}, expected it allowed" if bad else ""
    expected = grpc.StatusCode.UNAUTHENTICATED if identity in ("none", "wrong") else grpc.StatusCode.PERMISSION_DENIED
    if not isinstance(got, grpc.aio.AioRpcError) or code != expected:
        return f"{method} as {identity}: {code.name}, expected {expected.name}"
    info = error_info(got)
    reason = {"none": auth.TOKEN_MISSING, "wrong": auth.TOKEN_INVALID}.get(identity, auth.ROLE_NOT_ALLOWED)
    if (info.reason, info.domain) != (reason, "stepstream"):
        return f"{method} as {identity}: ErrorInfo {info.reason}/{info.domain}, expected {reason}/stepstream"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        details = got.details() or ""
        if dict(info.metadata) != {"method": method, "role": identity, "allowed": ",".join(
                role for role in ROLES if role in allowed)} or not all(role in details for role in allowed):
            return f"{method} as {identity}: {details!r} {dict(info.metadata)} does not name the roles needed"
    return ""


async def test_every_method_admits_exactly_its_roles_and_no_token_reaches_a_log(secured: Secured) -> None:
    identities = {"none": (), "wrong": as_(WRONG_SECRET), **{role: as_(secured.tokens[role]) for role in ROLES}}
    problems = []
    for server, policy in POLICY.items():
        address = secured.address(server)
        served = await served_methods(address, secured.tokens["admin"])
        assert set(served) == set(policy), f"the {server} serves methods the policy here does not state"
        async with grpc.aio.insecure_channel(address) as channel:
            for method, streaming in sorted(served.items()):
                for identity, metadata in identities.items():
                    got = await outcome(channel, method, streaming, metadata)
                    problems.append(problem(method, identity, policy[method], got))
    assert [found for found in problems if found] == []
    secrets = [*secured.tokens.values(), WRONG_SECRET]
    secrets += [token.partition(".")[2] for token in secrets]
    for log in secured.logs:
        text = log.read_text()
        assert "denied" in text, f"{log.name} logged no denial"
        leaked = [secret for secret in secrets if secret in text]
        assert not leaked, f"{log.name} holds a token"


@pytest.mark.parametrize("header", [
    "Bearer", "Basic b3R0bzp4", "bearer otto", "Bearer otto.", "Bearer nobody.secretsecretsecret",
])
async def test_a_malformed_authorization_is_unauthenticated(secured: Secured, header: str) -> None:
    async with grpc.aio.insecure_channel(secured.orchestrator.address) as channel:
        stub = orch_grpc.OrchestratorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListJobs(orch_pb.ListJobsRequest(), metadata=(("authorization", header),))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == auth.TOKEN_INVALID


async def test_two_tokens_in_one_call_are_unauthenticated(secured: Secured) -> None:
    async with grpc.aio.insecure_channel(secured.orchestrator.address) as channel:
        stub = orch_grpc.OrchestratorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListJobs(orch_pb.ListJobsRequest(),
                                metadata=(*as_(secured.tokens["viewer"]), *as_(secured.tokens["admin"])))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- the table is checked at start-up ------------------------------------------------------------------------


@pytest.mark.parametrize("removed", [
    f"/{ORCHESTRATOR}/SubmitJob", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.health.v1.Health/Watch",
])
async def test_a_server_does_not_start_with_a_method_its_table_has_no_rule_for(tmp_path: Path, removed: str) -> None:
    tokens_file(tmp_path / "tokens", ("viewer",))
    rules = {method: access for method, access in auth.RULES.items() if method != removed}
    authorizer = auth.Authorizer(tmp_path / "tokens", load_tokens(tmp_path / "tokens"), rules)
    service = orch_pb.DESCRIPTOR.services_by_name["OrchestratorService"]
    servicer = object.__new__(OrchestratorServicer)  # never called: the server must not even start
    with pytest.raises(RuntimeError, match=f"no authorization rule for {removed}: "):
        await rpc.start_server("127.0.0.1:0", lambda server: [rpc.add_servicer(server, service, servicer)],
                               auth=authorizer, max_request_bytes=1024 * 1024)


# --- the tokens file is checked at start-up ----------------------------------------------------------------


def start_orchestrator(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Start an orchestrator that is expected not to start."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator_svc", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "o"),
         *args], capture_output=True, text=True, timeout=DEADLINE, cwd=REPO,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o602])
def test_a_tokens_file_others_may_access_keeps_the_service_from_starting(tmp_path: Path, mode: int) -> None:
    tokens_file(tmp_path / "tokens", ("admin",))
    (tmp_path / "tokens").chmod(mode)
    line = one_line(start_orchestrator(tmp_path, "--tokens-file", str(tmp_path / "tokens")))
    assert line == (f"python -m orchestrator_svc: error: tokens file {tmp_path / 'tokens'}: group or others have "
                    f"access to it (mode {mode:04o}); it must be private: chmod 600 {tmp_path / 'tokens'}")


def valid_line(role: str = "viewer") -> str:
    return new_entry("someone", role)[0].line()


BAD_FILES = {
    "unknown role": ("ci boss " + valid_line().split()[2], "line 1: unknown role 'boss' (expected one of viewer, "
                                                          "operator, follower, admin)"),
    "missing hash": ("ci viewer", "line 1: expected NAME ROLE HASH, found 2 field(s)"),
    "secret in clear": ("ci viewer ci.hunter2hunter2hunter2", "line 1: the hash is not in the format"),
    "bad name": ("c.i viewer " + valid_line().split()[2], "line 1: a name is 1 to 64 of"),
    "name twice": (f"# comment\n{valid_line()}\n{valid_line('admin')}", "line 3: the name 'someone' is already used"),
    "slow hash of an older format": ("ci viewer $scrypt$ln=15,r=8,p=1$" + "A" * 22 + "$" + "A" * 43,
                                     "line 1: the hash is not in the format $sha256$SALT$DIGEST"),
    "short digest": ("ci viewer $sha256$" + "A" * 22 + "$" + "A" * 20, "line 1: the hash needs a salt"),
    "no token": ("# nobody yet\n", "holds no token, so no call would be allowed"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_malformed_tokens_file_keeps_the_service_from_starting_saying_where(tmp_path: Path, case: str) -> None:
    text, says = BAD_FILES[case]
    private_file(tmp_path / "tokens", text + "\n")
    line = one_line(start_orchestrator(tmp_path, "--tokens-file", str(tmp_path / "tokens")))
    assert line.startswith(f"python -m orchestrator_svc: error: tokens file {tmp_path / 'tokens'}: "), line
    assert says in line


def test_a_missing_tokens_file_keeps_the_service_from_starting(tmp_path: Path) -> None:
    line = one_line(start_orchestrator(tmp_path, "--tokens-file", str(tmp_path / "nowhere")))
    assert line == f"python -m orchestrator_svc: error: tokens file {tmp_path / 'nowhere'}: No such file or directory"


def test_a_follower_token_file_others_may_read_keeps_the_status_service_from_starting(tmp_path: Path) -> None:
    (tmp_path / "follower.token").write_text("fern.secretsecretsecretsecret\n")
    (tmp_path / "follower.token").chmod(0o644)
    result = subprocess.run(
        [sys.executable, "-m", "status_svc", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "s"),
         "--orchestrator-token-file", str(tmp_path / "follower.token")],
        capture_output=True, text=True, timeout=DEADLINE, cwd=REPO,
    )
    assert one_line(result).startswith(
        f"python -m status_svc: error: token file {tmp_path / 'follower.token'}: group or others have access")


def test_the_hash_command_makes_a_line_the_service_accepts_and_shows_the_token_once(tmp_path: Path) -> None:
    made = subprocess.run([sys.executable, "-m", "stepstream_common.tokens", "hash", "--name", "ci", "--role",
                           "operator"], capture_output=True, text=True, timeout=DEADLINE, check=True)
    token = made.stderr.strip().rsplit(" ", 1)[1]
    name, _, secret = token.partition(".")
    assert name == "ci" and len(secret) >= 40 and secret not in made.stdout
    given = subprocess.run([sys.executable, "-m", "stepstream_common.tokens", "hash", "--name", "me", "--role",
                            "viewer", "--secret-stdin"], input="correct-horse-battery-staple-and-more\n",
                           capture_output=True, text=True, timeout=DEADLINE, check=True)
    assert given.stderr == "" and "correct-horse" not in given.stdout
    private_file(tmp_path / "tokens", made.stdout + given.stdout)
    table = load_tokens(tmp_path / "tokens")
    assert {name: entry.role for name, entry in table.entries.items()} == {"ci": "operator", "me": "viewer"}

    verified = [table.verify(t) for t in (token, "me.correct-horse-battery-staple-and-more",
                                          "me.wrong-horse-battery-staple-and-more", "me.", "nobody.x")]
    assert [entry.name if entry else None for entry in verified] == ["ci", "me", None, None, None]


@pytest.mark.parametrize(("args", "says"), [
    (["--name", "c.i", "--role", "viewer"], "bad name 'c.i'"),
    (["--name", "ci", "--role", "boss"], "invalid choice: 'boss'"),
])
def test_the_hash_command_refuses_a_bad_entry(args: list[str], says: str) -> None:
    result = subprocess.run([sys.executable, "-m", "stepstream_common.tokens", "hash", *args],
                            capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 2 and says in result.stderr and result.stdout == ""


def test_the_hash_command_refuses_a_short_secret() -> None:
    result = subprocess.run([sys.executable, "-m", "stepstream_common.tokens", "hash", "--name", "ci", "--role",
                             "viewer", "--secret-stdin"], input="correct-horse-battery\n", capture_output=True,
                            text=True, timeout=DEADLINE)
    assert result.returncode == 2 and "at least 32" in result.stderr and result.stdout == ""


# --- the follower's token ----------------------------------------------------------------------------------


async def submit(secured: Secured, *gates: Path) -> orch_pb.SubmitJobResponse:
    """A job of one gate step per gate, submitted by the operator."""
    steps: list[Mapping[str, Any]] = [gate_step(f"wait{n}", gate) for n, gate in enumerate(gates)]
    async with grpc.aio.insecure_channel(secured.orchestrator.address) as channel:
        response: orch_pb.SubmitJobResponse = await orch_grpc.OrchestratorServiceStub(channel).SubmitJob(
            orch_pb.SubmitJobRequest(definition=job_definition(steps)), metadata=as_(secured.tokens["operator"]))
    return response


async def status_job(secured: Secured, job_id: str, until: Any, what: str) -> status_pb.GetJobResponse:
    """The status service's GetJob (as the viewer) once `until(response)` holds."""
    async with grpc.aio.insecure_channel(secured.status.address) as channel:
        stub = _ViewerStatus(status_grpc.StatusServiceStub(channel), as_(secured.tokens["viewer"]))
        response: status_pb.GetJobResponse = await wait_status_job(stub, job_id, until, what)
        return response


async def test_a_status_service_whose_token_may_not_follow_shows_why_it_is_stale(
    secured: Secured, tmp_path: Path
) -> None:
    job_id = (await submit(secured, tmp_path / "gate")).job.id
    await status_job(secured, job_id, lambda r: r.job.state == s.JOB_STATE_RUNNING and not r.job.freshness.stale,
                     "the job running")
    await secured.status.kill()
    secured.status = secured.status_following_as("viewer")
    await secured.status.start()
    stale = await status_job(secured, job_id, lambda r: r.job.freshness.stale, "the job shown stale")
    detail = stale.job.freshness.detail
    assert detail.startswith(f"cannot follow {secured.orchestrator.address}: PERMISSION_DENIED: token 'val' has role "
                             "viewer; stepstream.orchestrator.v1.OrchestratorService/StreamStepEvents needs role "
                             "follower or admin"), detail


class _ViewerStatus:
    """A status stub whose GetJob presents a token (what wait_status_job calls)."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata

    async def GetJob(self, request: status_pb.GetJobRequest) -> status_pb.GetJobResponse:
        response: status_pb.GetJobResponse = await self._stub.GetJob(request, metadata=self._metadata)
        return response


# --- who did what -------------------------------------------------------------------------------------------


async def test_who_submitted_and_who_cancelled_is_kept_by_both_services_and_watched(
    secured: Secured, tmp_path: Path
) -> None:
    viewer = as_(secured.tokens["viewer"])
    submitted = await submit(secured, tmp_path / "gate")
    job_id = submitted.job.id
    async with grpc.aio.insecure_channel(secured.orchestrator.address) as ochannel, \
            grpc.aio.insecure_channel(secured.status.address) as schannel:
        orchestrator = orch_grpc.OrchestratorServiceStub(ochannel)
        status = status_grpc.StatusServiceStub(schannel)
        assert (submitted.job.submitted_by, submitted.job.cancelled_by) == ("otto", "")
        watch = status.WatchJob(status_pb.WatchJobRequest(job_id=job_id, not_older_than=status_pb.LogPosition(
            log_id=submitted.log_id, seq=submitted.seq)), metadata=viewer)
        try:
            cancelled = await orchestrator.CancelJob(orch_pb.CancelJobRequest(job_id=job_id),
                                                     metadata=as_(secured.tokens["admin"]))
            assert (cancelled.job.submitted_by, cancelled.job.cancelled_by) == ("otto", "ada")
            initial = []
            while (message := await read_watch(watch)).WhichOneof("event") != "initial_state_complete":
                initial.extend(message.updates.updates)
            updates, _ = await watch_until(watch, ends_job)
        finally:
            watch.cancel()
        headers = [update.job for update in [*initial, *updates] if update.HasField("job")]
        assert headers[0].submitted_by == "otto" and headers[-1].state == s.JOB_STATE_CANCELLED
        cancelling = [header for header in headers if header.HasField("cancel_requested_at")]
        assert cancelling and all((h.submitted_by, h.cancelled_by) == ("otto", "ada") for h in cancelling)
        from_orchestrator = await orchestrator.GetJob(orch_pb.GetJobRequest(job_id=job_id), metadata=viewer)
        from_status = await status.GetJob(status_pb.GetJobRequest(job_id=job_id), metadata=viewer)
        listed = await status.ListJobs(status_pb.ListJobsRequest(), metadata=viewer)
    assert (from_orchestrator.job.submitted_by, from_orchestrator.job.cancelled_by) == ("otto", "ada")
    assert (from_status.job.submitted_by, from_status.job.cancelled_by) == ("otto", "ada")
    assert [(job.id, job.submitted_by, job.cancelled_by) for job in listed.jobs] == [(job_id, "otto", "ada")]


async def test_calls_at_once_each_record_their_own_caller(secured: Secured) -> None:
    sleep = job_definition([{"name": "nap", "type": "sleep", "seconds": 0}])
    async with grpc.aio.insecure_channel(secured.orchestrator.address) as channel:
        stub = orch_grpc.OrchestratorServiceStub(channel)
        roles = ["operator", "admin"] * 10
        answers = await asyncio.gather(*(
            stub.SubmitJob(orch_pb.SubmitJobRequest(definition=sleep), metadata=as_(secured.tokens[role]))
            for role in roles))
    assert [answer.job.submitted_by for answer in answers] == [NAMES[role] for role in roles]


async def test_who_did_what_survives_a_status_restart(secured: Secured, tmp_path: Path) -> None:
    """The status service stores the names (its columns) and restores them with the job it holds: after a
    restart, a step's change re-stores the job's header (its step counts) from the restored job, with no new
    job record from the orchestrator to fill them in again."""
    first, second = tmp_path / "first", tmp_path / "second"
    job_id = (await submit(secured, first, second)).job.id
    await status_job(secured, job_id, lambda r: r.job.state == s.JOB_STATE_RUNNING, "the job running")
    await secured.status.kill()
    await secured.status.start()
    first.touch()
    moved = await status_job(secured, job_id, lambda r: r.job.steps.completed == 1, "the first step completed")
    assert (moved.job.state, moved.job.submitted_by, moved.job.cancelled_by) == (s.JOB_STATE_RUNNING, "otto", "")


# --- SIGHUP -------------------------------------------------------------------------------------------------


async def test_sighup_rereads_the_tokens_file_and_keeps_the_tokens_when_the_new_file_is_bad(tmp_path: Path) -> None:
    viewer = tokens_file(tmp_path / "tokens", ("viewer",))["viewer"]
    admin_entry, admin = new_entry("ada", "admin")
    process = orchestrator_process(tmp_path / "orchestrator", 0, "--tokens-file", str(tmp_path / "tokens"))
    process.start()
    try:
        assert process.process is not None
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = orch_grpc.OrchestratorServiceStub(channel)

            async def code_as(token: str) -> grpc.StatusCode:
                try:
                    await stub.ListJobs(orch_pb.ListJobsRequest(), metadata=as_(token))
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

            async def until(token: str, code: grpc.StatusCode) -> None:
                async def probe() -> bool | None:
                    return True if await code_as(token) == code else None
                await eventually(probe, f"{code.name} for a token")

            assert await code_as(admin) == grpc.StatusCode.UNAUTHENTICATED
            with (tmp_path / "tokens").open("a") as file:
                file.write(admin_entry.line() + "\n")
            process.process.send_signal(signal.SIGHUP)
            await until(admin, grpc.StatusCode.OK)
            (tmp_path / "tokens").write_text("garbage\n")
            process.process.send_signal(signal.SIGHUP)
            # Not reloaded: both tokens still work, and the service still runs.
            await until(viewer, grpc.StatusCode.OK)
            assert await code_as(admin) == grpc.StatusCode.OK
            (tmp_path / "tokens").write_text(admin_entry.line() + "\n")
            process.process.send_signal(signal.SIGHUP)
            await until(viewer, grpc.StatusCode.UNAUTHENTICATED)
            assert await code_as(admin) == grpc.StatusCode.OK
        assert process.process.poll() is None
    finally:
        process.stop()
