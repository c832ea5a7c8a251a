"""The split, proven: a fresh venv with only the contract (./protos) and the client
(./client) installed, plus the test tools, imports no server module, says what to
install for the commands that run the services, and passes the repository's
client tests (tests/client) against services run by this interpreter.

Slow (a venv, a pip install and every client test, each starting its own
services) and in need of the package index or pip's cache: `pytest -m slow`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
# Only the server distribution brings these; the client must neither import nor need them.
SERVER_ONLY = ("aiosqlite", "orchestrator_svc", "status_svc", "stepstream_common", "grpc_health", "grpc_reflection")
NOT_INSTALLED = ("aiosqlite", "orchestrator_svc", "status_svc", "stepstream_common")
TEST_TOOLS = ("pytest", "pytest-asyncio", "pytest-timeout", "hypothesis")
CLIENT_MODULES = ("stepstream_client", "stepstream_client.cli", "stepstream_client.sdk", "stepstream_client.sync",
                  "stepstream_client.watch", "stepstream_client.render")
# Bounds so that a hang fails the test instead of stalling CI; never speed checks.
INSTALL_BOUND = 600
RUN_BOUND = 1500
PROBE = "stepstream_client_only_probe"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(INSTALL_BOUND + RUN_BOUND + 300)]


def dev_pins(*names: str) -> list[str]:
    """The requirements of `names` exactly as the root pyproject's dev extra states them."""
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    by_name = {re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0].lower(): requirement for requirement in dev}
    return [by_name[name] for name in names]


def run(args: list[str], cwd: Path, timeout: float, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@dataclass(frozen=True)
class Venv:
    root: Path
    site_packages: Path

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    def env(self, **extra: str) -> dict[str, str]:
        return venv_env(self.root, **extra)


def venv_env(root: Path, **extra: str) -> dict[str, str]:
    """This environment as if the venv at `root` were activated, with nothing that reaches outside it."""
    env = {name: value for name, value in os.environ.items()
           if name not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTEST_ADDOPTS", "PYTEST_PLUGINS"}}
    env["VIRTUAL_ENV"] = str(root)
    env["PATH"] = os.pathsep.join([str(root / "bin"), env.get("PATH", "")])
    return {**env, **extra}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """`python -m venv`, then `pip install ./protos ./client` and the test tools: nothing else."""
    root = tmp_path_factory.mktemp("client-only") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True, timeout=INSTALL_BOUND)
    python = str(root / "bin" / "python")
    install = run([python, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                   str(REPO / "protos"), str(REPO / "client"), *dev_pins(*TEST_TOOLS)],
                  cwd=root.parent, timeout=INSTALL_BOUND, env=venv_env(root))
    assert install.returncode == 0, install.stderr[-4000:]
    purelib = run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                  cwd=root.parent, timeout=60, env=venv_env(root))
    assert purelib.returncode == 0, purelib.stderr
    return Venv(root, Path(purelib.stdout.strip()))


IMPORTS = f"""
import importlib, json, sys
for name in {CLIENT_MODULES!r}:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in {SERVER_ONLY!r})
assert not leaked, f"importing the client imported {{leaked}}"
for name in {NOT_INSTALLED!r}:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        assert error.name == name, error
    else:
        raise AssertionError(f"{{name}} is importable")
import stepstream, stepstream_client
print(json.dumps([stepstream_client.__file__, stepstream.__file__]))
"""


def test_the_client_imports_no_server_module(client_venv: Venv, tmp_path: Path) -> None:
    result = run([client_venv.python, "-I", "-c", IMPORTS], cwd=tmp_path, timeout=120, env=client_venv.env())
    assert result.returncode == 0, result.stderr
    for path in json.loads(result.stdout):
        assert Path(path).is_relative_to(client_venv.site_packages), path


@pytest.mark.parametrize("command", ["up", "demo"])
def test_a_command_that_runs_the_services_says_what_to_install(
    client_venv: Venv, tmp_path: Path, command: str
) -> None:
    stepstream = str(client_venv.root / "bin" / "stepstream")
    result = run([stepstream, command], cwd=tmp_path, timeout=120, env=client_venv.env())
    assert result.returncode == 2, result
    assert result.stdout == "", result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("stepstream: "), result
    assert f"`stepstream {command}`" in result.stderr and "stepstream-server" in result.stderr, result
    assert "pip install" in result.stderr, result


# Loaded into each client-only pytest with -p: what that process imported, where from, and what it ran
# (written to the file named by $STEPSTREAM_PROBE_JSON).
PROBE_PLUGIN = f"""
import json, os, sys
from pathlib import Path

def pytest_terminal_summary(terminalreporter):
    import stepstream, stepstream_client
    Path(os.environ["STEPSTREAM_PROBE_JSON"]).write_text(json.dumps({{
        "python": sys.executable,
        "client": stepstream_client.__file__,
        "contract": stepstream.__file__,
        "server_modules": sorted(m for m in sys.modules if m.partition(".")[0] in {SERVER_ONLY!r}),
        "outcomes": {{key: len(reports) for key, reports in terminalreporter.stats.items() if key}},
    }}))
"""

# The client tests only, every one of them (slow ones too), without tests/conftest.py (the
# servers' in-process fixtures) and without writing pytest's cache into the repository.
CLIENT_OPTIONS = ["-m", "", "-p", "no:cacheprovider", "--confcutdir", "tests/client"]
CLIENT_TESTS = ["tests/client", *CLIENT_OPTIONS]
# The client-only run shares tests/client's modules out to this many pytest processes at a time (the
# machine the suite is sized for has 2 cores, idle meanwhile: the tests mostly wait on their services).
WORKERS = max(1, min(2, os.cpu_count() or 1))


def collected_here() -> int:
    """How many client tests this interpreter (with the servers installed) collects."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *CLIENT_TESTS], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    found = re.search(r"^(\d+) tests? collected", result.stdout, re.MULTILINE)
    assert found is not None, result.stdout[-4000:]
    return int(found.group(1))


def client_test_modules() -> list[str]:
    """tests/client's test modules, the largest first (a rough guess at the longest first)."""
    modules = sorted((REPO / "tests" / "client").glob("test_*.py"), key=lambda path: -path.stat().st_size)
    return [str(module.relative_to(REPO)) for module in modules]


@dataclass(frozen=True)
class ModuleRun:
    module: str
    result: subprocess.CompletedProcess[str]
    probe: dict[str, Any]


def test_the_client_tests_pass_with_only_the_client_installed(client_venv: Venv, tmp_path: Path) -> None:
    """The repository's tests/client, collected from the repository's root, run by the venv's
    python: the client comes from the venv's site-packages (the repository's client/ is not
    on sys.path), the services from this interpreter (STEPSTREAM_SERVER_PYTHON). Each module runs
    in a pytest process of its own, WORKERS at a time; together they ran every client test."""
    (client_venv.site_packages / f"{PROBE}.py").write_text(PROBE_PLUGIN)

    def run_module(index: int, module: str) -> ModuleRun:
        probe = tmp_path / f"probe-{index}.json"
        result = run(
            [client_venv.python, "-m", "pytest", module, *CLIENT_OPTIONS, "-q", "-p", PROBE,
             "--basetemp", str(tmp_path / f"basetemp-{index}")],
            cwd=REPO, timeout=RUN_BOUND,
            env=client_venv.env(STEPSTREAM_SERVER_PYTHON=sys.executable, STEPSTREAM_PROBE_JSON=str(probe)),
        )
        return ModuleRun(module, result, json.loads(probe.read_text()) if probe.exists() else {})

    with ThreadPoolExecutor(WORKERS) as pool:
        runs = list(pool.map(run_module, *zip(*enumerate(client_test_modules()), strict=True)))
    passed = 0
    for module_run in runs:
        result, probe = module_run.result, module_run.probe
        assert result.returncode == 0, (module_run.module, result.stdout[-8000:] + result.stderr[-4000:])
        assert Path(probe["python"]).parent == client_venv.root / "bin", probe
        for module in ("client", "contract"):
            assert Path(probe[module]).is_relative_to(client_venv.site_packages), probe
        assert probe["server_modules"] == [], probe

        outcomes = {outcome: count for outcome, count in probe["outcomes"].items() if count}
        assert set(outcomes) <= {"passed", "warnings"}, \
            f"{module_run.module}: not only passes: {outcomes}\n{result.stdout[-4000:]}"
        assert outcomes["passed"] > 0, (module_run.module, outcomes)
        passed += outcomes["passed"]
    assert passed == collected_here(), "every client test collected here ran there"
