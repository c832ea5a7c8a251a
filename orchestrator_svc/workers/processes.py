"""Process groups that commands started, written down next to the event log.

A graceful stop ends every command itself; a kill -9 of the orchestrator
cannot, and its commands (each in its own session) would run on unowned. On
the next start the orchestrator kills every group recorded during the same
boot of the machine (after a reboot the ids mean nothing and are forgotten).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


class ProcessRegistry:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._boot = _boot_id()

    def add(self, pgid: int, owner: str) -> None:
        (self._directory / str(pgid)).write_text(f"{self._boot}\n{owner}\n")

    def remove(self, pgid: int) -> None:
        (self._directory / str(pgid)).unlink(missing_ok=True)

    def stop_leftovers(self) -> int:
        """SIGKILL every group a previous process recorded during this boot; forget all."""
        stopped = 0
        for path in list(self._directory.iterdir()):
            with contextlib.suppress(OSError, ValueError):
                boot, owner = path.read_text().split("\n")[:2]
                if boot == self._boot:
                    os.killpg(int(path.name), signal.SIGKILL)
                    stopped += 1
                    log.warning("killed process group %s left running by %s", path.name, owner)
            path.unlink(missing_ok=True)
        return stopped
