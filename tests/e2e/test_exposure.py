"""Safe defaults, checked on the real services run as subprocesses: without
TLS and tokens a service serves loopback only (another address needs
--insecure, and then it warns at every start), and what it keeps on disk is
its user's alone (directories 0700, files 0600), whatever the umask."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from stepstream_client import SyncClient

from orchestrator_svc.app import DATABASE_FILE as ORCHESTRATOR_DB
from orchestrator_svc.app import PROCESSES_DIR
from orchestrator_svc.config import OrchestratorConfig
from status_svc.app import DATABASE_FILE as STATUS_DB
from status_svc.config import StatusConfig
from stepstream_common.config import ServiceConfig, options
from stepstream_common.exposure import assess_exposure, is_loopback
from tests.helpers import DEADLINE, REPO, eventually, gate_step

CONFIGS: dict[str, type[ServiceConfig]] = {"orchestrator_svc": OrchestratorConfig, "status_svc": StatusConfig}
MODULES = list(CONFIGS)
# No follower should find a real orchestrator: nothing listens on port 1.
EXTRA = {"orchestrator_svc": [], "status_svc": ["--orchestrator", "127.0.0.1:1"]}


@pytest.fixture
def clean_env() -> dict[str, str]:
    """This environment less every service setting, so only the test's flags count."""
    settings = {option.env for config in CONFIGS.values() for option in options(config)}
    return {name: value for name, value in os.environ.items() if name not in settings}


class Service:
    """`python -m MODULE ARGS` as a real subprocess, its stderr kept in a file."""

    def __init__(self, module: str, args: list[str], stderr: Path, env: dict[str, str], umask: int = 0o022) -> None:
        self.stderr_path = stderr
        with stderr.open("w") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=sink, text=True,
                env=env, cwd=REPO, umask=umask,
            )

    def started(self) -> str:
        """The address from its "listening on" line (it fails if the process ends first)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if " listening on " in line:
                return line.strip().rsplit(" ", 1)[1]
        raise AssertionError(f"exited {self.process.wait(DEADLINE)} before listening: {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> int:
        """SIGTERM, then its exit code (a kill if it ignores it past DEADLINE)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()
        return self.process.returncode


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Every Service a test starts (append it), stopped afterwards whatever happened."""
    started: list[Service] = []
    yield started
    for service in reversed(started):
        service.stop()


@pytest.mark.parametrize(("listen", "loopback"), [
    ("127.0.0.1:50051", True), ("127.8.9.10:0", True), ("[::1]:50051", True), ("::1:50051", True),
    ("localhost:0", True), ("LocalHost.:0", True),
    ("0.0.0.0:50051", False), ("[::]:0", False), (":50051", False), ("192.168.1.20:0", False),
    ("[fe80::1]:0", False), ("orchestrator:50051", False), ("localhost.example.com:0", False),
])
def test_only_loopback_addresses_count_as_loopback(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


@pytest.mark.parametrize(("tls", "tokens", "insecure", "refused", "warned"), [
    (True, True, False, False, False),
    (False, False, False, True, False),
    (True, False, False, True, False),
    (False, True, False, True, False),
    (False, False, True, False, True),
    (True, False, True, False, True),
    (True, True, True, False, False),
])
def test_a_reachable_address_needs_tls_and_tokens_or_insecure(
    tls: bool, tokens: bool, insecure: bool, refused: bool, warned: bool
) -> None:
    exposure = assess_exposure("0.0.0.0:50051", tls_enabled=tls, auth_enabled=tokens, insecure=insecure)
    assert bool(exposure.refusal) is refused
    assert bool(exposure.warning) is warned
    said = exposure.refusal or exposure.warning
    assert ("--tls-cert" in said) is (said != "" and not tls)
    assert ("--tokens-file" in said) is (said != "" and not tokens)
    loopback = assess_exposure("127.0.0.1:50051", tls_enabled=tls, auth_enabled=tokens, insecure=insecure)
    assert not loopback.refusal and not loopback.warning


@pytest.mark.parametrize("module", MODULES)
def test_a_wildcard_address_without_tls_and_tokens_is_refused_saying_how_to_configure(
    module: str, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    data_dir = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-m", module, "--listen", "0.0.0.0:0", "--data-dir", str(data_dir), *EXTRA[module]],
        capture_output=True, text=True, env=clean_env, cwd=REPO, timeout=DEADLINE,
    )
    assert result.returncode == 2, result
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "error: refusing to serve 0.0.0.0:0 unauthenticated and in plaintext" in line
    for how in ("--tls-cert", "--tls-key", "--tokens-file", "STEPSTREAM_TOKENS_FILE", "--insecure", "127.0.0.1"):
        assert how in line, how
    assert not data_dir.exists(), "refused before touching anything"


@pytest.mark.parametrize(("module", "how"), [
    ("orchestrator_svc", "flag"), ("status_svc", "flag"), ("orchestrator_svc", "env"),
])
def test_insecure_serves_a_wildcard_address_and_warns(
    module: str, how: str, tmp_path: Path, clean_env: dict[str, str], services: list[Service]
) -> None:
    args = ["--listen", "0.0.0.0:0", "--data-dir", str(tmp_path / "data"), *EXTRA[module]]
    if how == "flag":
        args.append("--insecure")
    else:
        clean_env["STEPSTREAM_INSECURE"] = "yes"
    service = Service(module, args, tmp_path / "stderr", clean_env)
    services.append(service)
    assert service.started().startswith("0.0.0.0:")
    assert service.stop() == 0
    warnings = [line for line in service.stderr().splitlines() if " WARNING " in line and "--insecure" in line]
    assert len(warnings) == 1, service.stderr()
    assert "serving 0.0.0.0:0 unauthenticated and in plaintext (--insecure)" in warnings[0]
    assert "--tokens-file" in warnings[0] and "--tls-cert" in warnings[0]


def test_a_bad_insecure_value_is_rejected_as_any_bad_setting(tmp_path: Path, clean_env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator_svc", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, env={**clean_env, "STEPSTREAM_INSECURE": "on"}, cwd=REPO, timeout=DEADLINE,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "python -m orchestrator_svc: error: environment variable STEPSTREAM_INSECURE: "
        "expected one of 1, true, yes, 0, false, no, got 'on'\n"
    )


@pytest.mark.parametrize("module", MODULES)
def test_loopback_needs_nothing_and_warns_of_nothing(
    module: str, tmp_path: Path, clean_env: dict[str, str], services: list[Service]
) -> None:
    service = Service(module, ["--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), *EXTRA[module]],
                      tmp_path / "stderr", clean_env)
    services.append(service)
    assert service.started().startswith("127.0.0.1:")
    assert service.stop() == 0
    assert " WARNING " not in service.stderr(), service.stderr()


def modes(root: Path) -> dict[str, tuple[str, str]]:
    """Every path under `root` (relative; `.` is root) as its kind and permission bits."""
    return {
        str(path.relative_to(root)): ("dir" if path.is_dir() else "file", oct(stat.S_IMODE(path.lstat().st_mode)))
        for path in (root, *root.rglob("*"))
    }


def private(found: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """What `found` (from modes()) must be: 0700 for each directory, 0600 for each file."""
    return {name: (kind, oct(0o700 if kind == "dir" else 0o600)) for name, (kind, _) in found.items()}


async def test_both_services_keep_their_files_private_whatever_the_umask(
    tmp_path: Path, clean_env: dict[str, str], services: list[Service]
) -> None:
    """Run with umask 000 (every file they made without saying otherwise would be
    world-writable): data directories 0700; the SQLite files, their -wal and
    -shm while open, and the process registry's files while a command runs, 0600."""
    orchestrator_dir, status_dir = tmp_path / "data" / "orchestrator", tmp_path / "data" / "status"
    orchestrator = Service("orchestrator_svc", ["--listen", "127.0.0.1:0", "--data-dir", str(orchestrator_dir)],
                           tmp_path / "orchestrator.stderr", clean_env, umask=0)
    services.append(orchestrator)
    orchestrator_address = orchestrator.started()
    status = Service("status_svc", ["--listen", "127.0.0.1:0", "--data-dir", str(status_dir),
                                    "--orchestrator", orchestrator_address],
                     tmp_path / "status.stderr", clean_env, umask=0)
    services.append(status)
    status_address = status.started()

    gate = tmp_path / "gate"
    with SyncClient(orchestrator_address, status_address) as client:
        job = client.submit({"name": "private", "steps": [gate_step("held", gate)]})
        registry = orchestrator_dir / PROCESSES_DIR

        async def command_recorded() -> list[Path] | None:
            return list(registry.iterdir()) or None

        await eventually(command_recorded, "the running command's process group to be recorded")

        async def status_ingested() -> bool | None:
            return True if (status_dir / f"{STATUS_DB}-wal").exists() else None

        await eventually(status_ingested, "the status service to write its database")
        while_running = {"orchestrator": modes(orchestrator_dir), "status": modes(status_dir)}
        gate.touch()
        assert list(client.watch(job.id))[-1].state == "completed"

    for name in (ORCHESTRATOR_DB, f"{ORCHESTRATOR_DB}-wal", f"{ORCHESTRATOR_DB}-shm"):
        assert name in while_running["orchestrator"], name
    assert any(name.startswith(f"{PROCESSES_DIR}/") for name in while_running["orchestrator"])
    for name in (STATUS_DB, f"{STATUS_DB}-wal", f"{STATUS_DB}-shm"):
        assert name in while_running["status"], name
    for found in while_running.values():
        assert found == private(found)

    assert status.stop() == 0
    assert orchestrator.stop() == 0
    for data_dir in (orchestrator_dir, status_dir):
        assert modes(data_dir) == private(modes(data_dir))


def test_a_data_directory_left_open_is_warned_about_and_left_alone(
    tmp_path: Path, clean_env: dict[str, str], services: list[Service]
) -> None:
    """The operator chose that directory (it may be a shared mount): the service
    says how to close it rather than changing it; its own files are 0600 anyway."""
    data_dir = tmp_path / "shared"
    data_dir.mkdir()
    data_dir.chmod(0o755)
    service = Service("orchestrator_svc", ["--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
                      tmp_path / "stderr", clean_env)
    services.append(service)
    service.started()
    assert service.stop() == 0
    [warning] = [line for line in service.stderr().splitlines() if " WARNING " in line]
    assert f"data directory {data_dir} has mode 0755" in warning and f"chmod 700 {data_dir}" in warning
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o755
    assert stat.S_IMODE((data_dir / ORCHESTRATOR_DB).stat().st_mode) == 0o600
