"""Both services (and the web gateway, when asked for) as local child processes,
for `stepstream up` and `stepstream demo`.

Each service prints one "... listening on HOST:PORT" line once it serves, which
is how a port-0 address is learned. The children get their own session, so a
Ctrl-C in the terminal reaches only the CLI, which then stops them in order:
the status service first (so it does not record its orchestrator going away),
then the orchestrator, each with SIGTERM (graceful), SIGKILL only if it hangs.

If either service exits on its own while they run, `stepstream up` stops the
other and exits non-zero with one line naming the one that died and how
(exit_notice). It does not restart it: a service exits only when it cannot do
its job (or was killed), the two are only useful together, and a restart loop
would hide the cause; supervising belongs to systemd, Compose or Kubernetes
(see deploy/), which restart with backoff and keep the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
ORCHESTRATOR = "orchestrator"
STATUS = "status service"
WEB = "web gateway"


class ServiceStartError(Exception):
    """A service exited or stayed silent instead of reporting that it listens."""


@dataclass
class Service:
    name: str
    process: asyncio.subprocess.Process
    address: str = ""

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def how_it_ended(self) -> str:
        """`exited with code N`, or `was killed by SIGNAME (exit code -N)`."""
        code = self.returncode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"was killed by {name} (exit code {code})"
        return f"exited with code {code}"


@dataclass
class LocalServices:
    """`async with LocalServices(...) as services:` runs the orchestrator and the
    status service (following it) until the block ends.

    `log` receives both services' stderr (None: inherit ours). With `web_listen`,
    the web gateway (`stepstream web`) serves the page there, reading the status service.
    """

    data_dir: Path
    orchestrator_listen: str
    status_listen: str
    log: IO[str] | None = None
    log_level: str = "info"
    web_listen: str | None = None
    services: list[Service] = field(default_factory=list)

    @property
    def orchestrator(self) -> str:
        return self.services[0].address

    @property
    def status(self) -> str:
        return self.services[1].address

    @property
    def web_url(self) -> str:
        """The page's address (with web_listen)."""
        return f"http://{self.services[2].address}/"

    async def __aenter__(self) -> LocalServices:
        try:
            orchestrator = await self._start(
                ORCHESTRATOR, "orchestrator_svc",
                ["--listen", self.orchestrator_listen, "--data-dir", str(self.data_dir / "orchestrator"),
                 "--log-level", self.log_level],
            )
            status = await self._start(
                STATUS, "status_svc",
                ["--listen", self.status_listen, "--data-dir", str(self.data_dir / "status"),
                 "--orchestrator", orchestrator.address, "--log-level", self.log_level],
            )
            if self.web_listen is not None:
                await self._start(WEB, "stepstream_web", ["--listen", self.web_listen, "--status", status.address,
                                                          "--orchestrator", orchestrator.address])
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.stop()

    async def _start(self, name: str, module: str, args: list[str]) -> Service:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=self.log,
            start_new_session=True,
        )
        service = Service(name, process)
        self.services.append(service)
        assert process.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while line := (await process.stdout.readline()).decode():
                    if " listening on " in line:
                        service.address = line.strip().rsplit(" ", 1)[1]
                        return service
        except TimeoutError:
            raise ServiceStartError(f"the {name} did not start within {START_TIMEOUT:g}s") from None
        await process.wait()
        raise ServiceStartError(f"the {name} exited with code {process.returncode} before it was listening")

    def exit_notice(self, dead: Service) -> str:
        """The one line that says which service died, how, and what happens to the others."""
        others = [service.name for service in self.services if service is not dead and service.returncode is None]
        after = f"; stopping the {' and the '.join(others)}" if others else ""
        return f"the {dead.name} (pid {dead.process.pid}) {dead.how_it_ended()}{after}"

    async def wait_any_exit(self) -> Service:
        """The first service to exit on its own."""
        waits = {asyncio.create_task(service.process.wait()): service for service in self.services}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return waits[done.pop()]

    async def stop(self) -> list[int | None]:
        """Stop every service still running, newest first; returns their exit codes."""
        for service in reversed(self.services):
            await _terminate(service.process)
        return [service.returncode for service in self.services]


async def _terminate(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    if process.stdout is not None:
        # Read what is left so the transport closes cleanly.
        await process.stdout.read()
