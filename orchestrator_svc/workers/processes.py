"""The processes commands start: the environment they begin with, and their
process groups, written down next to the event log.

A graceful stop ends every command itself; a kill -9 of the orchestrator
cannot, and its commands (each in its own session) would run on unowned. On
the next start the orchestrator kills the groups it can prove are those
leftovers: recorded during the same boot of the machine (after a reboot the
ids mean nothing and are forgotten), and still led by the very process that
was recorded, the same pid with the same start time. A pid alone proves
nothing: once a leftover has ended, the kernel may give its number to an
unrelated process, which a restart must not kill.

Start times come from /proc/<pid>/stat (Linux). Where it cannot be read
(another OS, a sandbox without /proc) none is recorded, and the restart,
unable to prove anything, leaves the group alone and logs it for the operator
rather than risk killing a stranger. So it does with a group whose leader has
ended while other members live on: there is no leader left to check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# What a command gets from the orchestrator's environment without being asked
# for, and what it gets where the orchestrator has none of them (TZ stays unset:
# the machine's zone applies, as it does to the orchestrator).
BASE_VARIABLES = ("PATH", "HOME", "LANG", "TZ")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_LANG = "C.UTF-8"


def start_environment(pass_env: Sequence[str] = ()) -> dict[str, str]:
    """The environment every command starts from: BASE_VARIABLES and the names
    the operator passes (--pass-env), as the orchestrator has them, and nothing
    else. The orchestrator's environment holds what only it should see
    (database passwords, tokens), while a command does what whoever submitted
    its job wrote: it inherits nothing it was not explicitly given."""
    env = {"PATH": DEFAULT_PATH, "HOME": _home(), "LANG": DEFAULT_LANG}
    env.update((name, os.environ[name]) for name in (*BASE_VARIABLES, *pass_env) if name in os.environ)
    return env


def _home() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:  # a uid the password database does not know, as containers often run under
        return "/"


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _start_time(pgid: int) -> str:
    """When process `pgid` started (clock ticks after boot), if it leads process
    group `pgid`; "" if there is no such process or /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pgid}/stat").read_text()
    except OSError:
        return ""
    # After "pid (comm)", where comm may hold anything: field 3 (state) onwards;
    # field 5 is the process group, field 22 the start time.
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20 or fields[2] != str(pgid):
        return ""
    return fields[19]


class ProcessRegistry:
    """One file per process group, in a directory of the orchestrator's own:
    0700, each file 0600 (which jobs run, and the ids a restart will kill, are
    no one else's to read or plant). The directory is always the
    orchestrator's, so a looser one (made by an older version) is tightened.

    Every command is handed the registry (WorkContext.processes), so it also
    carries `environment`, what commands start from (start_environment),
    taken once when the orchestrator starts."""

    def __init__(self, directory: Path, pass_env: Sequence[str] = ()) -> None:
        self._directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        self._boot = _boot_id()
        self.environment: Mapping[str, str] = MappingProxyType(start_environment(pass_env))
        unset = [name for name in pass_env if name not in os.environ]
        if unset:
            log.warning("--pass-env names what the orchestrator's environment does not set: %s", ", ".join(unset))

    def add(self, pgid: int, owner: str) -> None:
        descriptor = os.open(self._directory / str(pgid), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(f"{self._boot}\n{owner}\n{_start_time(pgid)}\n")

    def remove(self, pgid: int) -> None:
        (self._directory / str(pgid)).unlink(missing_ok=True)

    def stop_leftovers(self) -> int:
        """SIGKILL every group a previous process provably left running (see the
        module docstring); forget all. Returns how many were killed."""
        stopped = 0
        for path in list(self._directory.iterdir()):
            with contextlib.suppress(OSError, ValueError):
                # An older version's file ends after the owner: its start time reads as "".
                boot, owner, started = path.read_text().split("\n")[:3]
                if boot == self._boot:
                    stopped += _stop_leftover(int(path.name), owner, started)
            path.unlink(missing_ok=True)
        return stopped


def _stop_leftover(pgid: int, owner: str, started: str) -> int:
    """Kill group `pgid` if its leader is still the process started at `started`; 1 if killed."""
    now = _start_time(pgid)
    if started and now == started:
        os.killpg(pgid, signal.SIGKILL)
        log.warning("killed process group %d left running by %s", pgid, owner)
        return 1
    if started and now:
        log.info("process group %d of %s has ended; its id now belongs to another process, left alone", pgid, owner)
        return 0
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return 0  # ended with the previous orchestrator, as it should have
    why = "its start time was not recorded" if not started else "its leader has ended"
    log.warning("process group %d left running by %s is not killed: %s, so it cannot be proven the same "
                "group; stop it by hand if it is", pgid, owner, why)
    return 0
