"""The two services as real subprocesses, for client tests that import nothing of
the servers (this module uses only the standard library): a venv with only the
client and the contract installed runs them against the services of another
interpreter, named by STEPSTREAM_SERVER_PYTHON."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

SERVER_PYTHON = os.environ.get("STEPSTREAM_SERVER_PYTHON", sys.executable)
# A bound so that a service that never starts fails the test instead of hanging it; never a speed check.
START_BOUND = 60.0


class Service:
    """`python -m MODULE --listen ... --data-dir ... ARGS`. start() after kill() restarts it
    on the same address and data directory, as a supervisor would."""

    def __init__(self, module: str, data_dir: Path, *args: str) -> None:
        self.module = module
        self.data_dir = data_dir
        self.args = list(args)
        self.address = ""
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> str:
        """Start it and return its address once it says it listens (port 0 the first time)."""
        assert self._process is None or self._process.returncode is not None, f"{self.module} is running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with (self.data_dir.parent / f"{self.data_dir.name}.log").open("a") as log:
            self._process = process = await asyncio.create_subprocess_exec(
                SERVER_PYTHON, "-m", self.module, "--listen", self.address or "127.0.0.1:0",
                "--data-dir", str(self.data_dir), *self.args,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log,
            )
        assert process.stdout is not None
        try:
            async with asyncio.timeout(START_BOUND):
                while line := (await process.stdout.readline()).decode():
                    if " listening on " in line:
                        self.address = line.strip().rsplit(" ", 1)[1]
                        return self.address
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"{self.module} did not say it listens (see {log.name})") from None
        await process.wait()
        raise AssertionError(f"{self.module} exited with code {process.returncode} (see {log.name})")

    async def kill(self) -> None:
        """SIGKILL, and wait until it is gone (its port closed)."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        if process.stdout is not None:
            await process.stdout.read()

    async def terminate(self) -> int:
        """SIGTERM (a graceful stop, as a supervisor asks for one) and its exit code once it has ended."""
        process = self._process
        assert process is not None, f"{self.module} was never started"
        if process.returncode is None:
            self.resume()  # a paused process would not act on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        try:
            async with asyncio.timeout(START_BOUND):
                code = await process.wait()
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"{self.module} did not end within {START_BOUND:g}s of SIGTERM") from None
        if process.stdout is not None:
            await process.stdout.read()
        return code

    def pause(self) -> None:
        """SIGSTOP: it keeps its connections open and answers nothing (a hung service)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, number: signal.Signals) -> None:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(number)


def orchestrator(data_dir: Path, *args: str) -> Service:
    return Service("orchestrator_svc", data_dir, *args)


def status(data_dir: Path, orchestrator_address: str, *args: str) -> Service:
    return Service("status_svc", data_dir, "--orchestrator", orchestrator_address, *args)


def free_port() -> int:
    """A loopback port that was free a moment ago, for a service to listen on. Only a moment: another
    process may take it before the service binds it, so prefer port 0 (and the address the service says
    it listens on) wherever the test need not know the port beforehand, and nobody() for an address
    where nothing must listen."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_reserved: list[socket.socket] = []


def nobody() -> str:
    """A loopback address where nothing listens, the same one for the whole test run: its port is held
    bound (never listening) until this process exits, so a connection to it is refused and no other
    process can start listening on it meanwhile."""
    if not _reserved:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        _reserved.append(sock)
    return f"127.0.0.1:{_reserved[0].getsockname()[1]}"


# --- for the SDK and CLI tests (test_sdk, test_watch, test_cli, test_cli_robustness) ----------------------------

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
# A bound so that a broken test fails instead of hanging; never a speed check.
DEADLINE = 60.0
# This interpreter's `stepstream` console script: the client-only venv's own when the tests run there.
STEPSTREAM = Path(sys.executable).with_name("stepstream")
# Heartbeats, staleness and kill grace as quick as the in-process fixtures of tests/conftest.py make them.
QUICK_ORCHESTRATOR = ("--heartbeat-interval", "0.2", "--kill-grace", "1")
QUICK_STATUS = ("--heartbeat-interval", "0.2", "--stale-after", "1")

_gates: list[Path] = []


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, deadline: float = DEADLINE) -> T:
    """Poll `probe` until it returns something other than None."""
    end = time.monotonic() + deadline
    while True:
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def gate_step(name: str, gate: Path, **fields: Any) -> dict[str, Any]:
    """A command step that runs until the file `gate` exists: the test decides when it ends.
    open_gates() (after every client test, see conftest.py) opens any gate the test left shut,
    so no command outlives its test, not even one whose orchestrator was killed with -9."""
    _gates.append(gate)
    script = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n    time.sleep(0.02)\nprint('gate open')"
    return {"name": name, "type": "command", "command": [sys.executable, "-c", script, str(gate)], **fields}


def open_gates() -> None:
    """Open every gate gate_step() made (whose folder still exists)."""
    while _gates:
        gate = _gates.pop()
        if gate.parent.is_dir():
            gate.touch()


class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, stdout={self.stdout[-2000:]!r}, stderr={self.stderr[-2000:]!r})"


async def run_cli(*args: str, env: Mapping[str, str] | None = None, deadline: float = DEADLINE) -> CliResult:
    """Run the real `stepstream` console script without blocking the test's loop."""
    process = await asyncio.create_subprocess_exec(
        str(STEPSTREAM), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env={**os.environ, **(env or {})}, cwd=REPO,
    )
    try:
        async with asyncio.timeout(deadline):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())
