"""A starting orchestrator kills only the process groups that are provably the
leftovers of a previous one: recorded during this boot and still led by the
very process recorded, the same pid with the same start time. An id alone
proves nothing: the kernel reuses it once the leftover is gone.

The processes are real, each the leader of its own group as a command is. One
that must survive proves it did by answering on its stdin after the
orchestrator has started (a killed process never returns to read it)."""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator_svc.app import PROCESSES_DIR
from orchestrator_svc.workers.processes import ProcessRegistry
from tests.helpers import DEADLINE, orchestrator_process

ANSWER = ["sh", "-c", 'read line && echo "$line"']


@pytest.fixture
def group_leaders() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes the test starts, each leading its own process group; killed at the end."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def leader(started: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    process = subprocess.Popen(ANSWER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    started.append(process)
    return process


def start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]


def recorded(registry_dir: Path, pid: int) -> list[str]:
    """The record of `pid` as ProcessRegistry.add wrote it: boot id, owner, start time."""
    lines = (registry_dir / str(pid)).read_text().split("\n")
    assert lines[2] == start_time(pid), "the record holds the leader's start time"
    return lines


def rewrite(registry_dir: Path, pid: int, lines: list[str]) -> None:
    (registry_dir / str(pid)).write_text("\n".join(lines))


def answers(process: subprocess.Popen[str]) -> bool:
    """True if `process` is alive to echo a line back."""
    out, _ = process.communicate("alive\n", timeout=DEADLINE)
    return out == "alive\n" and process.returncode == 0


def test_a_start_kills_its_leftover_and_spares_what_took_over_a_recorded_id(
    tmp_path: Path, group_leaders: list[subprocess.Popen[str]]
) -> None:
    data_dir = tmp_path / "data"
    registry_dir = data_dir / PROCESSES_DIR
    registry = ProcessRegistry(registry_dir)
    leftover, stranger, before_reboot = (leader(group_leaders) for _ in range(3))
    for process in (leftover, stranger, before_reboot):
        registry.add(process.pid, f"job planted step s attempt 1 (pid {process.pid})")
    # The process recorded under `stranger`'s id has ended and the id went to an
    # unrelated process, started at another time.
    lines = recorded(registry_dir, stranger.pid)
    rewrite(registry_dir, stranger.pid, [lines[0], lines[1], str(int(lines[2]) - 1), ""])
    # Recorded before a reboot: whatever has the id now is not what was recorded.
    lines = recorded(registry_dir, before_reboot.pid)
    rewrite(registry_dir, before_reboot.pid, ["another-boot", *lines[1:]])

    orchestrator = orchestrator_process(data_dir, 0)
    try:
        orchestrator.start()  # serving: the leftovers have been dealt with
        assert leftover.wait(DEADLINE) == -signal.SIGKILL
        assert answers(stranger)
        assert answers(before_reboot)
        assert list(registry_dir.iterdir()) == [], "every record is forgotten"
    finally:
        orchestrator.stop()


def test_a_group_whose_start_time_was_not_recorded_is_left_alone_and_logged(
    tmp_path: Path, group_leaders: list[subprocess.Popen[str]], caplog: pytest.LogCaptureFixture
) -> None:
    """As where /proc cannot be read, or the record was written by an older version."""
    registry_dir = tmp_path / PROCESSES_DIR
    registry = ProcessRegistry(registry_dir)
    process = leader(group_leaders)
    registry.add(process.pid, "job old step s attempt 1")
    lines = recorded(registry_dir, process.pid)
    rewrite(registry_dir, process.pid, [lines[0], lines[1], ""])

    with caplog.at_level(logging.WARNING, logger="orchestrator_svc.workers.processes"):
        assert ProcessRegistry(registry_dir).stop_leftovers() == 0
    assert answers(process)
    assert caplog.messages == [
        f"process group {process.pid} left running by job old step s attempt 1 is not killed: its start time "
        "was not recorded, so it cannot be proven the same group; stop it by hand if it is"
    ]
