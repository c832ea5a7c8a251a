"""The web tests: the services and the gateway as real subprocesses, and Debian's
chromium driven by Playwright (never a browser download: `playwright install` is
not needed, the browser is /usr/bin/chromium from `apt-get install -y chromium`).

Without chromium the browser tests skip with one line saying how to install it,
except under CI (CI=1 or true), where they fail: a CI that cannot run them must
not look green.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

from tests.client.conftest import open_gates_afterwards, orchestrator, status  # noqa: F401 (fixtures)
from tests.client.services import START_BOUND, Service
from tests.web.chromium import CHROMIUM, CHROMIUM_ARGS, INSTALL

# Heartbeats every half second: a quiet page stream is noticed within 1.5 s.
QUICK_WEB = ("--heartbeat-interval", "0.5")


def require_chromium() -> None:
    if shutil.which(CHROMIUM):
        return
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM}: {INSTALL}")
    pytest.skip(f"needs Debian's chromium ({INSTALL})")


class WebGateway:
    """`python -m stepstream_web` (= `stepstream web`) as a subprocess. start() after kill()
    restarts it on the same address, as a supervisor would."""

    def __init__(self, log: Path, status_service: Service, orchestrator_service: Service, *args: str) -> None:
        self.log = log
        self.args = ["--status", status_service.address, "--orchestrator", orchestrator_service.address,
                     *QUICK_WEB, *args]
        self.address = ""
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def start(self) -> str:
        with self.log.open("a") as log:
            self._process = process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "stepstream_web", "--listen", self.address or "127.0.0.1:0", *self.args,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log,
            )
        assert process.stdout is not None
        async with asyncio.timeout(START_BOUND):
            while line := (await process.stdout.readline()).decode():
                if " listening on " in line:
                    self.address = line.strip().rsplit(" ", 1)[1]
                    return self.address
        await process.wait()
        raise AssertionError(f"the gateway exited with code {process.returncode}: {self.log.read_text()[-2000:]}")

    async def kill(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        await process.wait()
        assert process.stdout is not None
        await process.stdout.read()


@pytest.fixture
async def gateway(
    tmp_path: Path, status: Service, orchestrator: Service  # noqa: F811 (the fixtures imported above)
) -> AsyncIterator[WebGateway]:
    web = WebGateway(tmp_path / "web.log", status, orchestrator)
    await web.start()
    yield web
    await web.kill()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    require_chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()
