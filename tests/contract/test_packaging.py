"""Three distributions, each with exactly its own packages: the contract
(protos/), the thin client (client/) and the services (the root)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO


def build_wheel(source: Path, into: Path) -> tuple[set[str], str, str]:
    """(top-level names, METADATA, entry_points.txt) of the wheel built from `source`."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(into),
         str(source)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = into.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        entry_points = (archive.read(f"{dist_info}/entry_points.txt").decode()
                        if f"{dist_info}/entry_points.txt" in names else "")
    return {name.split("/")[0] for name in names} - {dist_info}, metadata, entry_points


def test_the_contract_wheel_holds_the_generated_code_and_the_vocabulary(tmp_path: Path) -> None:
    top, metadata, _ = build_wheel(REPO / "protos", tmp_path)
    assert top == {"stepstream"}
    assert "Name: stepstream-api" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert sorted(re.split(r"[<>=!~ ;]", line.removeprefix("Requires-Dist: "))[0] for line in requires) == [
        "grpcio", "protobuf"]


def test_the_client_wheel_holds_only_the_client(tmp_path: Path) -> None:
    top, metadata, entry_points = build_wheel(REPO / "client", tmp_path)
    assert top == {"stepstream_client"}
    assert "Requires-Dist: stepstream-api==0.1.0" in metadata
    for server_only in ("aiosqlite", "grpcio-health-checking", "grpcio-reflection", "stepstream-server"):
        assert server_only not in metadata
    assert "stepstream = stepstream_client.cli:main" in entry_points


def test_the_server_wheel_holds_the_services_and_pulls_in_contract_and_client(tmp_path: Path) -> None:
    top, metadata, entry_points = build_wheel(REPO, tmp_path)
    assert top == {"orchestrator_svc", "status_svc", "stepstream_common", "stepstream_web"}
    # The web page's assets ship inside the wheel: no build step, nothing fetched at run time.
    with zipfile.ZipFile(next(tmp_path.glob("*.whl"))) as archive:
        assets = {name for name in archive.namelist() if name.startswith("stepstream_web/static/")}
    assert {f"stepstream_web/static/{name}" for name in ("jobs.html", "job.html", "app.css", "common.js", "jobs.js",
                                                          "job.js")} <= assets
    assert "Requires-Dist: starlette" in metadata and "Requires-Dist: uvicorn" in metadata
    assert f"Requires-Dist: stepstream-api @ {(REPO / 'protos').as_uri()}" in metadata
    assert f"Requires-Dist: stepstream-client @ {(REPO / 'client').as_uri()}" in metadata
    for line in (
        "stepstream-orchestrator = orchestrator_svc.__main__:main",
        "stepstream-status = status_svc.__main__:main",
        "[stepstream.workers]",
        "fanout = orchestrator_svc.workers.fanout:ItemsFanoutWorker",
        "[stepstream.cli]",
        "up = stepstream_common.local.commands:Up",
        "web = stepstream_web.command:Web",
        "demo.crawl = stepstream_common.local.demo:crawl",
    ):
        assert line in entry_points, line


@pytest.mark.parametrize("module", ["orchestrator_svc", "status_svc"])
def test_the_services_never_import_the_client(module: str) -> None:
    """The orchestrator runs user code, the demo's included, without the SDK or CLI."""
    code = (f"import sys, {module}.app, {module}.__main__; "
            "assert not [m for m in sys.modules if m.startswith('stepstream_client')], sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
