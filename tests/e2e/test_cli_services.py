"""The commands that run services (`demo`, `up`) and the live tree on a real
pseudo-terminal, all through the installed `stepstream` script."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pexpect
import psutil
import pytest
from stepstream_client import SyncClient

from stepstream_common.local.demo import DEMO_STEPS
from tests.helpers import (
    DEADLINE,
    STEPSTREAM,
    ServiceProcess,
    free_port,
    gate_step,
    orchestrator_process,
    run_cli,
    status_process,
)

COLOUR = re.compile(r"\x1b\[[0-9;]*(?:3[0-7]|38;[0-9;]+|9[0-7])m")


async def test_demo_runs_a_job_end_to_end_and_stops_its_services() -> None:
    result = await run_cli("demo", deadline=180)
    assert result.code == 0, result
    lines = result.stdout.splitlines()
    for step in DEMO_STEPS:
        assert any(f" step={step} state=completed " in line for line in lines), step
    assert any(" step=prepare state=running attempt=2/3 " in line for line in lines), "the retry is shown"
    assert any(" step=crawl " in line and "failed=3" in line and "state=completed" in line for line in lines)
    assert lines[-1].startswith("demo: job completed")
    addresses = re.findall(r"127\.0\.0\.1:\d+", lines[0])
    assert len(addresses) == 2
    listening = {
        f"{connection.laddr.ip}:{connection.laddr.port}"
        for connection in psutil.net_connections("tcp")
        if connection.status == psutil.CONN_LISTEN and connection.laddr
    }
    assert not listening & set(addresses), "the demo's services are gone"


def test_up_starts_both_services_and_the_web_page_and_ctrl_c_stops_them_cleanly(tmp_path: Path) -> None:
    orchestrator, status, web = (f"127.0.0.1:{free_port()}" for _ in range(3))
    with (tmp_path / "services.log").open("w") as log:
        up = subprocess.Popen(
            [str(STEPSTREAM), "--orchestrator", orchestrator, "--status", status, "up", "--data-dir",
             str(tmp_path / "data"), "--web-listen", web],
            stdout=subprocess.PIPE, stderr=log, text=True,
        )
    try:
        assert up.stdout is not None
        banner = [up.stdout.readline() for _ in range(4)]
        assert orchestrator in banner[0] and status in banner[1] and "Ctrl-C" in banner[3], banner
        assert banner[2].strip() == f"web page on http://{web}/"
        assert "stepstream jobs" in urllib.request.urlopen(f"http://{web}/", timeout=DEADLINE).read().decode()
        services = psutil.Process(up.pid).children()
        assert len(services) == 3
        with SyncClient(orchestrator, status) as client:
            job = client.submit({"name": "via-up", "steps": [{"name": "one", "type": "sleep", "seconds": 0}]})
            assert list(client.watch(job.id))[-1].state == "completed"
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, "both services exited 0 after a graceful stop"
        assert up.stdout.read().strip() == "stopped"
        _, alive = psutil.wait_procs(services, timeout=30)
        assert not alive
        assert (tmp_path / "data" / "orchestrator").is_dir() and (tmp_path / "data" / "status").is_dir()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


@pytest.fixture
def orchestrator_service(tmp_path: Path) -> Iterator[ServiceProcess]:
    service = orchestrator_process(tmp_path / "orchestrator", 0)
    service.start()
    yield service
    service.stop()


def spawn(*args: str, **env: str) -> pexpect.spawn:
    return pexpect.spawn(
        str(STEPSTREAM), list(args), dimensions=(40, 120), encoding="utf-8", timeout=60,
        env={**os.environ, "TERM": "xterm-256color", **env},
    )


def test_watch_on_a_terminal_redraws_the_tree_as_the_job_runs(
    orchestrator_service: ServiceProcess, tmp_path: Path
) -> None:
    """The tree follows the job; while the status service is down (killed, then
    restarted on the same address) it says since when it is stale."""
    first = status_process(tmp_path / "status", orchestrator_service.address)
    address = first.start()  # on port 0: a port found free beforehand may be taken before it binds
    second = status_process(tmp_path / "status", orchestrator_service.address, "--listen", address)
    addresses = ["--orchestrator", orchestrator_service.address, "--status", address]
    gate = tmp_path / "gate"
    try:
        with SyncClient(orchestrator_service.address, address) as client:
            job = client.submit({"name": "on-a-tty", "steps": [
                gate_step("gate", gate),
                {"name": "spread", "type": "fanout", "count": 5, "child": {"type": "sleep", "seconds": 0}},
            ]})
        terminal = spawn(*addresses, "watch", job.id)
        try:
            terminal.expect(f"on-a-tty[^\n]*{job.id}")
            terminal.expect("gate[^\n]*running")
            first.kill()
            terminal.expect("stale since [0-9]{2}:[0-9]{2}:[0-9]{2}")
            second.start()
            gate.touch()
            terminal.expect("gate[^\n]*completed")
            terminal.expect("spread[^\n]*completed[^\n]*children 5/5")
            terminal.expect(pexpect.EOF)
        finally:
            terminal.close()
        assert terminal.exitstatus == 0

        plain = spawn(*addresses, "get", job.id, NO_COLOR="1")
        plain.expect(pexpect.EOF)
        plain.close()
        assert plain.exitstatus == 0
        assert "spread" in (plain.before or "") and not COLOUR.search(plain.before or "")
    finally:
        first.stop()
        second.stop()
