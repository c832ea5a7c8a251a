"""TLS and mutual TLS, end to end: both services as real subprocesses serving
certificates made for the test (tests/helpers/certs.py), reached by the SDK, the
CLI, grpcurl and the health probe, and the status service following the
orchestrator over (m)TLS. What must be refused is: a server certificate from
another CA, expired, or for another host (unless the client names that host),
a plaintext client, and at an mTLS server a client without a certificate or
with one from another CA. Renewed certificate files are served to new
connections while streams opened before keep flowing. Files that cannot be
served stop a service at start with one line and exit code 2."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from stepstream.channel import ClientTLS, open_channel
from stepstream.common.v1 import states_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.states import TERMINAL_JOB_STATES
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc
from stepstream_client import Client, SyncClient
from stepstream_client.errors import NotFoundError, UnavailableError

from tests.client.services import QUICK_ORCHESTRATOR, QUICK_STATUS, Service
from tests.contract.test_contract import tool
from tests.helpers import DEADLINE, REPO, ends_job, gate_step, run_cli, watch_until
from tests.helpers.certs import OTHER_HOST, Certificates, Issued, peer_serial

EXIT_USAGE = 2
EXIT_UNREACHABLE = 4


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return Certificates.make(tmp_path / "certs")


Start = Callable[..., Awaitable[Service]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """start(module, *args): the service as a subprocess, killed after the test;
    its stderr is in tmp_path/MODULE-N.log."""
    started: list[Service] = []

    async def start_service(module: str, *args: str) -> Service:
        service = Service(module, tmp_path / f"{module}-{len(started)}", *args)
        started.append(service)
        await service.start()
        return service

    yield start_service
    for service in started:
        await service.kill()


def serving(pair: Issued, client_ca: Path | None = None) -> list[str]:
    """A service's flags to serve `pair`, requiring client certificates `client_ca` signed."""
    flags = ["--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]
    return flags if client_ca is None else [*flags, "--tls-client-ca", str(client_ca)]


async def tls_services(start: Start, certs: Certificates, *, mutual: bool) -> tuple[Service, Service]:
    """Both services over TLS (mTLS if `mutual`), the status service following the
    orchestrator over the same, showing its own client certificate if `mutual`."""
    client_ca = certs.ca.cert if mutual else None
    orchestrator = await start("orchestrator_svc", *QUICK_ORCHESTRATOR, *serving(certs.server, client_ca))
    follow = ["--orchestrator", orchestrator.address, "--orchestrator-tls-ca", str(certs.ca.cert)]
    if mutual:
        follow += ["--orchestrator-tls-cert", str(certs.client.cert), "--orchestrator-tls-key", str(certs.client.key)]
    status = await start("status_svc", *QUICK_STATUS, *follow, *serving(certs.server, client_ca))
    return orchestrator, status


def one_step_job(name: str) -> dict[str, Any]:
    return {"name": name, "steps": [{"name": "hello", "type": "command",
                                     "command": [sys.executable, "-c", "print('hello over TLS')"]}]}


# --- the SDK and the CLI, end to end --------------------------------------------------------------------------


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
async def test_the_sdk_submits_and_watches_a_job_to_the_end(
    start: Start, certs: Certificates, mutual: bool
) -> None:
    orchestrator, status = await tls_services(start, certs, mutual=mutual)
    client_cert, client_key = (certs.client.cert, certs.client.key) if mutual else (None, None)
    async with Client(orchestrator.address, status.address, tls_ca=certs.ca.cert, tls_cert=client_cert,
                      tls_key=client_key) as client:
        job = await client.submit(one_step_job("sdk-over-tls"))
        views = [view async for view in client.watch(job.id)]
    assert views[-1].state == "completed", views[-1]
    assert [step.state for step in views[-1].steps] == ["completed"]


async def test_the_blocking_client_takes_the_same_tls_options(start: Start, certs: Certificates) -> None:
    orchestrator, status = await tls_services(start, certs, mutual=True)

    def submit_and_watch() -> str:
        with SyncClient(orchestrator.address, status.address, tls_ca=certs.ca.cert, tls_cert=certs.client.cert,
                        tls_key=certs.client.key) as client:
            job = client.submit(one_step_job("sync-over-mtls"))
            return [view.state for view in client.watch(job.id)][-1]

    assert await asyncio.to_thread(submit_and_watch) == "completed"


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
async def test_the_cli_submits_and_watches_a_job_to_the_end(
    start: Start, certs: Certificates, mutual: bool, tmp_path: Path
) -> None:
    """The CA as a flag; the client certificate from the environment, as a container would set it."""
    orchestrator, status = await tls_services(start, certs, mutual=mutual)
    definition = tmp_path / "job.json"
    definition.write_text(json.dumps(one_step_job("cli-over-tls")))
    env = {"STEPSTREAM_CLIENT_TLS_CERT": str(certs.client.cert),
           "STEPSTREAM_CLIENT_TLS_KEY": str(certs.client.key)} if mutual else {}
    result = await run_cli("--orchestrator", orchestrator.address, "--status", status.address,
                           "--tls-ca", str(certs.ca.cert), "submit", str(definition), "--watch", env=env)
    assert result.code == 0, result
    assert "state=completed" in result.stdout.splitlines()[-1], result


async def test_cli_flags_are_taken_after_the_command_and_from_the_environment(
    start: Start, certs: Certificates
) -> None:
    orchestrator, status = await tls_services(start, certs, mutual=False)
    addresses = ["--orchestrator", orchestrator.address, "--status", status.address]
    after = await run_cli(*addresses, "list", "--tls-ca", str(certs.ca.cert))
    assert after.code == 0, after
    from_env = await run_cli(*addresses, "list", env={"STEPSTREAM_TLS_CA": str(certs.ca.cert)})
    assert from_env.code == 0, from_env
    plaintext = await run_cli(*addresses, "--retry-for", "0.1", "list")
    assert plaintext.code == EXIT_UNREACHABLE, plaintext


# --- what a client refuses, and what a server refuses -----------------------------------------------------------


async def reached(address: str, **tls: Any) -> bool:
    """Whether one call gets through to the orchestrator at `address` (a job that does not
    exist: NOT_FOUND is an answer), or the connection is refused (UNAVAILABLE)."""
    async with Client(address, address, retry=None, **tls) as client:
        try:
            await client.cancel("no-such-job")
        except NotFoundError:
            return True
        except UnavailableError:
            return False
    raise AssertionError("a job that does not exist was cancelled")


# Each case: the server's certificate, and the client's TLS arguments.
CLIENT_REFUSES: dict[str, Callable[[Certificates], tuple[Issued, dict[str, Any]]]] = {
    "server certificate from another CA": lambda c: (c.server, {"tls_ca": c.foreign_ca.cert}),
    "expired server certificate": lambda c: (c.expired_server, {"tls_ca": c.ca.cert}),
    "server certificate for another host": lambda c: (c.other_host_server, {"tls_ca": c.ca.cert}),
    "plaintext client": lambda c: (c.server, {}),
    "test CA not among the system's roots": lambda c: (c.server, {"tls": True}),
}


@pytest.mark.parametrize("case", CLIENT_REFUSES)
async def test_a_connection_that_must_not_be_trusted_is_refused(start: Start, certs: Certificates, case: str) -> None:
    pair, client_tls = CLIENT_REFUSES[case](certs)
    orchestrator = await start("orchestrator_svc", *serving(pair))
    assert not await reached(orchestrator.address, **client_tls)


async def test_the_server_name_override_accepts_a_certificate_for_another_host(
    start: Start, certs: Certificates
) -> None:
    orchestrator = await start("orchestrator_svc", *serving(certs.other_host_server))
    assert await reached(orchestrator.address, tls_ca=certs.ca.cert, tls_server_name=OTHER_HOST)
    assert not await reached(orchestrator.address, tls_ca=certs.ca.cert, tls_server_name="elsewhere.example")


async def test_a_tls_client_does_not_fall_back_to_plaintext(start: Start, certs: Certificates) -> None:
    orchestrator = await start("orchestrator_svc")
    assert await reached(orchestrator.address)
    assert not await reached(orchestrator.address, tls_ca=certs.ca.cert)


async def test_an_mtls_server_accepts_only_clients_with_a_certificate_its_ca_signed(
    start: Start, certs: Certificates
) -> None:
    orchestrator = await start("orchestrator_svc", *serving(certs.server, certs.ca.cert))
    address, ca = orchestrator.address, certs.ca.cert
    assert not await reached(address, tls_ca=ca)
    assert not await reached(address, tls_ca=ca, tls_cert=certs.foreign_client.cert, tls_key=certs.foreign_client.key)
    assert await reached(address, tls_ca=ca, tls_cert=certs.client.cert, tls_key=certs.client.key)


async def test_the_cli_says_it_cannot_reach_a_service_it_does_not_trust(start: Start, certs: Certificates) -> None:
    orchestrator = await start("orchestrator_svc", *serving(certs.server))
    result = await run_cli("--orchestrator", orchestrator.address, "--retry-for", "0.1",
                           "--tls-ca", str(certs.foreign_ca.cert), "cancel", "no-such-job")
    assert result.code == EXIT_UNREACHABLE, result
    # One line is ours; gRPC itself may log the failed handshake around it (GRPC_VERBOSITY,
    # read at `import grpc`), from its own threads, so in either order.
    ours = [line for line in result.stderr.splitlines() if line.startswith("stepstream: ")]
    assert len(ours) == 1, result
    assert ours[0].startswith(f"stepstream: cannot reach the orchestrator at {orchestrator.address}"), result
    grpc_own = re.compile(r"[IWE]\d{4} [\d:.]+ +\d+ \S+:\d+\] ")
    assert all(line in ours or grpc_own.match(line) for line in result.stderr.splitlines()), result


@pytest.mark.parametrize(("flags", "says"), [
    (["--tls-ca", "missing.pem"], "cannot read the CA certificate missing.pem"),
    (["--tls-cert", "{client_cert}"], "a client certificate needs its private key"),
    (["--tls-ca", "{client_key}"], "holds no PEM certificate"),
    (["--tls-server-name", "host:443"], "expected a host name"),
])
async def test_the_cli_rejects_tls_files_it_cannot_use_as_a_usage_error(
    certs: Certificates, flags: list[str], says: str
) -> None:
    named = [flag.format(client_cert=certs.client.cert, client_key=certs.client.key) for flag in flags]
    result = await run_cli(*named, "list")
    assert result.code == EXIT_USAGE, result
    assert says in result.stderr and "Traceback" not in result.stderr, result


# --- grpcurl and the health probe ----------------------------------------------------------------------------


async def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [tool("grpcurl"), *args], capture_output=True, text=True,
                                   timeout=DEADLINE)


# A call the server refuses after the handshake (plaintext to TLS, mTLS without a client certificate) is
# redialled by grpcurl until its connect timeout (10 s by default) and then fails: only its failure counts,
# so it is given 3 s, many times what a dial that succeeds takes here (the calls that must succeed keep
# grpcurl's default).
REFUSED_DIAL = ["-connect-timeout", "3"]


async def test_grpcurl_lists_and_calls_the_services_with_the_ca(start: Start, certs: Certificates) -> None:
    orchestrator, status = await tls_services(start, certs, mutual=False)
    ca = ["-cacert", str(certs.ca.cert)]
    listed = await grpcurl(*ca, status.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert "stepstream.status.v1.StatusService" in listed.stdout.split()
    called = await grpcurl(*ca, "-d", "{}", orchestrator.address,
                           "stepstream.orchestrator.v1.OrchestratorService/ListJobs")
    assert called.returncode == 0, called.stderr
    untrusted = await grpcurl(status.address, "list")
    assert untrusted.returncode != 0 and "certificate" in untrusted.stderr, untrusted
    plaintext = await grpcurl(*REFUSED_DIAL, "-plaintext", status.address, "list")
    assert plaintext.returncode != 0, plaintext


async def test_grpcurl_reaches_an_mtls_service_only_with_a_client_certificate(
    start: Start, certs: Certificates
) -> None:
    orchestrator = await start("orchestrator_svc", *serving(certs.server, certs.ca.cert))
    ca = ["-cacert", str(certs.ca.cert)]
    without = await grpcurl(*REFUSED_DIAL, *ca, orchestrator.address, "list")
    assert without.returncode != 0, without
    client = ["-cert", str(certs.client.cert), "-key", str(certs.client.key)]
    listed = await grpcurl(*ca, *client, orchestrator.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert "stepstream.orchestrator.v1.OrchestratorService" in listed.stdout.split()


async def healthcheck(address: str, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "stepstream_common.healthcheck", address, *flags],
        capture_output=True, text=True, cwd=REPO, timeout=DEADLINE, env={**os.environ, **(env or {})},
    )


async def test_the_health_probe_speaks_tls_with_the_ca_from_its_flags_or_environment(
    start: Start, certs: Certificates
) -> None:
    orchestrator = await start("orchestrator_svc", *serving(certs.server, certs.ca.cert))
    address = orchestrator.address
    assert (await healthcheck(address)).returncode == 1
    assert (await healthcheck(address, "--tls-ca", str(certs.ca.cert))).returncode == 1, "mTLS: no client cert"
    env = {"STEPSTREAM_TLS_CA": str(certs.ca.cert), "STEPSTREAM_CLIENT_TLS_CERT": str(certs.client.cert),
           "STEPSTREAM_CLIENT_TLS_KEY": str(certs.client.key)}
    serving_probe = await healthcheck(address, env=env)
    assert serving_probe.returncode == 0, serving_probe.stderr


# --- rotation ---------------------------------------------------------------------------------------------


async def read_until(call: Any, done: Callable[[Any], bool]) -> None:
    """Read a stream until `done(message)`; an ended or failed stream fails the test."""
    async with asyncio.timeout(DEADLINE):
        while not done(message := await call.read()):
            assert message is not grpc.aio.EOF, "the stream ended"


def has_job_event(job_id: str, terminal: bool) -> Callable[[orch_pb.StreamStepEventsResponse], bool]:
    def check(message: orch_pb.StreamStepEventsResponse) -> bool:
        return any(event.WhichOneof("record") == "job" and event.job.id == job_id
                   and (event.job.state in TERMINAL_JOB_STATES) == terminal for event in message.batch.events)
    return check


async def test_renewed_certificates_reach_new_connections_while_open_streams_keep_flowing(
    start: Start, certs: Certificates, tmp_path: Path
) -> None:
    """Each service serves files that are then replaced by a renewed certificate
    (same CA and names, another serial), one file at a time. While only the
    certificate is new, its key still the old one, new connections get the old
    certificate; once both are, the renewed one. An event stream from the
    orchestrator and a watch from the status service, both opened before,
    keep delivering to the job's end: one gRPC stream each, which cannot
    reconnect by itself."""
    live = {name: Issued(tmp_path / name / "tls.pem", tmp_path / name / "tls.key") for name in ("orch", "status")}
    for pair in live.values():
        pair.cert.parent.mkdir()
        certs.server.install(pair.cert, pair.key)
    orchestrator = await start("orchestrator_svc", *QUICK_ORCHESTRATOR, *serving(live["orch"]))
    status = await start("status_svc", *QUICK_STATUS, "--orchestrator", orchestrator.address,
                         "--orchestrator-tls-ca", str(certs.ca.cert), *serving(live["status"]))
    gate = tmp_path / "gate"
    async with Client(orchestrator.address, status.address, tls_ca=certs.ca.cert) as client:
        job = await client.submit({"name": "rotation", "steps": [gate_step("wait", gate)]})
        await client.get(job.id)  # waits until the status service has it, so that a watch finds it

    tls = ClientTLS.from_files(certs.ca.cert)
    async with open_channel(orchestrator.address, tls=tls) as orch_channel, \
            open_channel(status.address, tls=tls) as status_channel:
        events = orch_grpc.OrchestratorServiceStub(orch_channel).StreamStepEvents(
            orch_pb.StreamStepEventsRequest(after_seq=0))
        watch = status_grpc.StatusServiceStub(status_channel).WatchJob(status_pb.WatchJobRequest(job_id=job.id))
        await read_until(events, has_job_event(job.id, terminal=False))
        await read_until(watch, lambda message: message.WhichOneof("event") == "initial_state_complete")
        for service in (orchestrator, status):
            assert peer_serial(service.address, certs.ca.cert) == certs.server.serial

        renewed = certs.renewed_server
        for pair in live.values():  # half-way: the new certificate beside the old key
            pair.cert.write_bytes(renewed.cert.read_bytes())
        for service in (orchestrator, status):
            assert peer_serial(service.address, certs.ca.cert) == certs.server.serial
        for pair in live.values():
            renewed.install(pair.cert, pair.key)
        for service in (orchestrator, status):
            assert peer_serial(service.address, certs.ca.cert) == renewed.serial
        async with Client(orchestrator.address, status.address, tls_ca=certs.ca.cert) as fresh:
            assert (await fresh.get(job.id)).state == "running"

        gate.touch()
        await read_until(events, has_job_event(job.id, terminal=True))
        updates, _ = await watch_until(watch, ends_job)
        assert updates[-1].job.state == states_pb2.JOB_STATE_COMPLETED
        events.cancel()
        watch.cancel()
    status_log = (tmp_path / "status_svc-1.log").read_text()
    assert "serving the TLS certificate now in" in status_log, status_log


async def test_unusable_renewed_files_keep_the_certificate_in_use(start: Start, certs: Certificates,
                                                                 tmp_path: Path) -> None:
    live = Issued(tmp_path / "live" / "tls.pem", tmp_path / "live" / "tls.key")
    live.cert.parent.mkdir()
    certs.server.install(live.cert, live.key)
    orchestrator = await start("orchestrator_svc", *serving(live))
    live.cert.write_text("not a certificate\n")
    assert peer_serial(orchestrator.address, certs.ca.cert) == certs.server.serial
    live.key.unlink()
    assert peer_serial(orchestrator.address, certs.ca.cert) == certs.server.serial
    certs.renewed_server.install(live.cert, live.key)
    assert peer_serial(orchestrator.address, certs.ca.cert) == certs.renewed_server.serial
    log = (tmp_path / "orchestrator_svc-0.log").read_text()
    assert "keeping the TLS certificate in use" in log, log


# --- files a service cannot serve ------------------------------------------------------------------------------


# Each case: the flags (files named as {server.cert}, {encrypted_key}...), and what the one line says.
UNUSABLE = {
    "a missing certificate": (["--tls-cert", "missing.pem", "--tls-key", "{server.key}"],
                              "cannot read --tls-cert missing.pem: No such file or directory"),
    "a certificate without its key": (["--tls-cert", "{server.cert}"], "--tls-cert and --tls-key go together"),
    "a key that is not the certificate's": (["--tls-cert", "{server.cert}", "--tls-key", "{client.key}"],
                                            "are not a certificate and its key"),
    "an encrypted key": (["--tls-cert", "{server.cert}", "--tls-key", "{encrypted_key}"], "is encrypted"),
    "a key given as the certificate": (["--tls-cert", "{server.key}", "--tls-key", "{server.key}"],
                                       "holds no PEM certificate"),
    "a client CA without a certificate": (["--tls-client-ca", "{ca.cert}"], "--tls-client-ca needs --tls-cert"),
    "a client CA that is not one": (["--tls-cert", "{server.cert}", "--tls-key", "{server.key}",
                                     "--tls-client-ca", "{server.key}"], "holds no PEM certificate"),
}


@pytest.mark.parametrize("module", ["orchestrator_svc", "status_svc"])
@pytest.mark.parametrize("case", UNUSABLE)
def test_a_service_given_tls_files_it_cannot_serve_says_so_in_one_line(
    certs: Certificates, tmp_path: Path, module: str, case: str
) -> None:
    flags, says = UNUSABLE[case]
    files = {"server": certs.server, "client": certs.client, "ca": certs.ca,
             "encrypted_key": certs.server.encrypted_key(tmp_path / "encrypted.key")}
    result = subprocess.run(
        [sys.executable, "-m", module, "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"),
         *[flag.format(**files) for flag in flags]],
        capture_output=True, text=True, cwd=tmp_path, timeout=DEADLINE,
    )
    assert result.returncode == EXIT_USAGE, result
    assert result.stderr.startswith(f"python -m {module}: error: "), result.stderr
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


def test_the_status_service_says_it_cannot_read_the_orchestrators_ca(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "status_svc", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"),
         "--orchestrator-tls-ca", "missing-ca.pem"],
        capture_output=True, text=True, cwd=tmp_path, timeout=DEADLINE,
    )
    assert result.returncode == EXIT_USAGE, result
    assert result.stderr == ("python -m status_svc: error: --orchestrator-tls-*: cannot read the CA certificate "
                             "missing-ca.pem: No such file or directory\n")


async def test_a_key_others_can_read_is_served_with_a_warning(start: Start, certs: Certificates,
                                                              tmp_path: Path) -> None:
    certs.server.key.chmod(0o640)
    orchestrator = await start("orchestrator_svc", *serving(certs.server))
    assert await reached(orchestrator.address, tls_ca=certs.ca.cert)
    log = (tmp_path / "orchestrator_svc-0.log").read_text()
    assert f"--tls-key {certs.server.key} can be read by others than its owner (mode 640): chmod 600 it" in log
