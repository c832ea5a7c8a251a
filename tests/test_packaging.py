"""`pip install .` ships what the services and the CLI need, under the names the README promises."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import REPO

TOP_LEVEL = {"orchestrator_svc", "status_svc", "stepstream", "stepstream_client", "stepstream_common"}


def test_the_wheel_holds_the_packages_the_generated_code_and_the_entry_points(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = tmp_path.glob("stepstream-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert {name.split("/")[0] for name in names} - {dist_info} == TOP_LEVEL
    for proto in ("definition", "records", "states", "orchestrator_service", "status_service"):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", ".proto"):
            assert f"stepstream/v1/{proto}{suffix}" in names
    assert not any(name.startswith(("tests/", "bench/", "scripts/")) for name in names)
    for line in (
        "stepstream = stepstream_client.cli:main",
        "stepstream-orchestrator = orchestrator_svc.__main__:main",
        "stepstream-status = status_svc.__main__:main",
        "[stepstream.workers]",
        "fanout = orchestrator_svc.workers.fanout:ItemsFanoutWorker",
    ):
        assert line in entry_points, line
