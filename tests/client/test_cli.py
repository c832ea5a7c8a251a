"""The real `stepstream` console script against real services: JSON and line output
of every read command, exit codes, one-line errors, and the shipped examples."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.client.services import (
    DEADLINE,
    REPO,
    STEPSTREAM,
    CliResult,
    Service,
    eventually,
    gate_step,
    run_cli,
)
from tests.client.services import nobody as nobody_listening

JOB_FIELDS = {
    "id", "name", "state", "reason", "message", "revision", "live", "stale", "stale_since", "stale_detail", "source",
    "created_at", "started_at", "finished_at", "cancel_requested_at", "submitted_by", "cancelled_by", "step_counts",
    "steps",
}
STEP_FIELDS = {
    "name", "index", "type", "state", "reason", "message", "attempt", "max_attempts", "started_at", "finished_at",
    "duration_seconds", "revision", "children",
}
CHILD_COUNT_FIELDS = {"total", "pending", "running", "completed", "failed", "cancelled", "unknown"}


class Cli:
    """`stepstream --orchestrator ... --status ... ARGS` against the test's services."""

    def __init__(self, orchestrator: str, status: str) -> None:
        self.addresses = ["--orchestrator", orchestrator, "--status", status]

    async def __call__(self, *args: str) -> CliResult:
        return await run_cli(*self.addresses, *args)

    async def json(self, *args: str) -> object:
        result = await self(*args, "--output", "json")
        assert result.code == 0, result
        return json.loads(result.stdout)


@pytest.fixture
def cli(orchestrator: Service, status: Service) -> Cli:
    return Cli(orchestrator.address, status.address)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


FANOUT_TOML = """\
name = "cli-fan"

[[steps]]
name = "prepare"
type = "sleep"
seconds = 0

[[steps]]
name = "spread"
type = "fanout"
items = ["a", "13", "b", "c"]
concurrency = 2
max_child_failures = 1
child = { type = "python", function = "demo.crawl", args = { item = "{item}" } }
"""


async def test_submit_watch_get_list_and_children_as_json(cli: Cli, tmp_path: Path) -> None:
    submitted = await cli.json("submit", str(write(tmp_path, "fan.toml", FANOUT_TOML)))
    assert isinstance(submitted, dict) and set(submitted) >= {"id", "name", "state", "created_at"}
    job_id = submitted["id"]

    watched = await cli("watch", job_id, "--output", "json")
    assert watched.code == 0, watched
    views = [json.loads(line) for line in watched.stdout.splitlines()]
    assert all(set(view) == JOB_FIELDS for view in views)
    revisions = [view["revision"] for view in views]
    assert revisions == sorted(set(revisions))
    assert views[-1]["state"] == "completed"

    got = await cli.json("get", job_id)
    assert isinstance(got, dict) and set(got) == JOB_FIELDS
    assert got == views[-1]
    assert (got["id"], got["name"], got["state"], got["reason"], got["stale"]) == (
        job_id, "cli-fan", "completed", "", False)
    assert got["created_at"].endswith("Z") and got["finished_at"].endswith("Z") and got["stale_since"] is None
    assert got["step_counts"]["total"] == 2 and got["step_counts"]["completed"] == 2
    assert [step["name"] for step in got["steps"]] == ["prepare", "spread"]
    spread = got["steps"][1]
    assert set(spread) == STEP_FIELDS and set(spread["children"]) == CHILD_COUNT_FIELDS
    assert spread["children"] == {"total": 4, "pending": 0, "running": 0, "completed": 3, "failed": 1,
                                  "cancelled": 0, "unknown": 0}
    assert (spread["type"], spread["attempt"], spread["max_attempts"]) == ("fanout", 1, 1)
    assert isinstance(spread["duration_seconds"], float)

    listed = await cli.json("list", "--state", "completed", "--name", "cli-fan")
    assert isinstance(listed, list) and [job["id"] for job in listed] == [job_id]
    assert "steps" not in listed[0] and listed[0]["state"] == "completed"
    assert await cli.json("list", "--state", "running") == []

    children = await cli.json("children", job_id, "spread")
    assert isinstance(children, list) and [child["item"] for child in children] == ["a", "13", "b", "c"]
    failed = await cli.json("children", job_id, "spread", "--state", "failed")
    assert isinstance(failed, list) and len(failed) == 1
    assert (failed[0]["item"], failed[0]["state"], failed[0]["reason"]) == ("13", "failed", "work_failed")
    assert set(failed[0]) == {"index", "item", "state", "reason", "message", "attempt", "started_at",
                              "finished_at", "duration_seconds", "revision"}


async def test_without_a_terminal_watch_prints_one_line_per_change(cli: Cli, tmp_path: Path) -> None:
    result = await cli("submit", "--watch", str(write(tmp_path, "fan.toml", FANOUT_TOML)))
    assert result.code == 0, result
    first, *lines = result.stdout.splitlines()
    assert first.startswith("submitted job ")
    job_id = first.split()[2]
    assert all(line.startswith("rev=") and f" job={job_id} " in line for line in lines)
    spread = [line for line in lines if " step=spread " in line]
    assert "state=completed" in spread[-1] and "children=3/4" in spread[-1] and "failed=1" in spread[-1]
    assert "\x1b[" not in result.stdout, "no terminal codes when stdout is not a terminal"
    header = [line for line in lines if " name=cli-fan " in line]
    assert "state=completed" in header[-1]

    got = await cli("get", job_id)
    assert got.code == 0 and f"job={job_id} step=spread state=completed" in got.stdout
    listed = await cli("list")
    assert listed.code == 0 and f"job={job_id} name=cli-fan state=completed" in listed.stdout
    children = await cli("children", job_id, "spread", "--state", "failed")
    assert children.code == 0 and children.stdout.startswith("index=1 item=13 state=failed")


async def test_exit_codes_follow_the_final_state_of_the_job(cli: Cli, tmp_path: Path) -> None:
    ok = write(tmp_path, "ok.yaml", "name: ok\nsteps:\n  - {name: one, type: sleep, seconds: 0}\n")
    completed = await cli("submit", "--watch", "--output", "json", str(ok))
    assert completed.code == 0, completed
    submitted, *views = (json.loads(line) for line in completed.stdout.splitlines())
    assert views[-1]["id"] == submitted["id"] and views[-1]["state"] == "completed"

    failing = write(tmp_path, "fail.toml", 'name = "bad"\n[[steps]]\nname = "boom"\ntype = "command"\n'
                                           'command = ["sh", "-c", "echo broken; exit 3"]\n')
    failed = await cli("submit", "--watch", str(failing))
    assert failed.code == 1, failed
    assert "step=boom state=failed" in failed.stdout and "exit 3: broken" in failed.stdout

    long = write(tmp_path, "long.yaml", json.dumps({"name": "long", "steps": [gate_step("wait", tmp_path / "no")]}))
    job = await cli.json("submit", str(long))
    assert isinstance(job, dict)
    watcher = asyncio.create_task(cli("watch", job["id"]))
    cancelled = await cli("cancel", job["id"])
    assert cancelled.code == 0 and job["id"] in cancelled.stdout, cancelled
    watched = await watcher
    assert watched.code == 3, watched
    assert "state=cancelled" in watched.stdout.splitlines()[-1]
    again = await cli("cancel", job["id"])
    assert again.code == 0, again

    refused = await cli("cancel", submitted["id"])
    assert refused.code == 7, refused
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr


async def test_errors_are_one_clear_line_with_their_exit_code(cli: Cli, tmp_path: Path) -> None:
    nobody = nobody_listening()
    for args in (["get", "x"], ["watch", "x"], ["list"], ["submit", str(write(tmp_path, "ok.toml", FANOUT_TOML))]):
        unreachable = await run_cli("--orchestrator", nobody, "--status", nobody, "--retry-for", "0.3", *args)
        assert unreachable.code == 4, unreachable
        assert unreachable.stderr.count("\n") == 1 and nobody in unreachable.stderr, unreachable
        assert "Traceback" not in unreachable.stderr
    with_env = await run_cli("get", "x", env={"STEPSTREAM_STATUS": nobody, "STEPSTREAM_ORCHESTRATOR": nobody,
                                              "STEPSTREAM_RETRY_FOR": "0.3"})
    assert with_env.code == 4 and nobody in with_env.stderr, with_env

    for args in (["get", "no-such-job"], ["watch", "no-such-job"], ["cancel", "no-such-job"],
                 ["children", "no-such-job", "step"]):
        unknown = await cli(*args)
        assert unknown.code == 5, unknown
        assert unknown.stderr.count("\n") == 1 and "no-such-job" in unknown.stderr, unknown

    invalid = write(tmp_path, "invalid.toml", """\
name = "invalid"
[[steps]]
name = "one"
type = "sleep"
seconds = 0
[[steps]]
name = "two"
type = "command"
command = "not a list"
timeout = "10x"
""")
    rejected = await cli("submit", str(invalid))
    assert rejected.code == 6, rejected
    lines = rejected.stderr.splitlines()
    assert any(line.strip().startswith("steps[1].timeout: ") for line in lines), lines
    assert any(line.strip().startswith("steps[1].command: ") for line in lines), lines
    assert "definition." not in rejected.stderr and ".params." not in rejected.stderr
    for bad in (write(tmp_path, "broken.toml", "name = \n"), tmp_path / "missing.toml"):
        unreadable = await cli("submit", str(bad))
        assert unreadable.code == 6 and "Traceback" not in unreadable.stderr, unreadable

    usage = await cli("list", "--state", "sleeping")
    assert usage.code == 2, usage


@pytest.mark.parametrize("example", sorted((REPO / "examples").iterdir()), ids=lambda path: path.name)
async def test_every_example_runs_to_completion(cli: Cli, example: Path) -> None:
    result = await cli("submit", "--watch", str(example))
    assert result.code == 0, result
    assert "state=completed" in result.stdout.splitlines()[-1]


async def test_python_dash_m_runs_the_same_cli(cli: Cli, tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stepstream_client", *cli.addresses, "submit", "--output", "json",
        str(write(tmp_path, "fan.toml", FANOUT_TOML)), stdout=asyncio.subprocess.PIPE, cwd=REPO,
    )
    stdout, _ = await process.communicate()
    assert process.returncode == 0
    job_id = json.loads(stdout)["id"]

    async def done() -> object:
        got = await cli.json("get", job_id)
        assert isinstance(got, dict)
        return got if got["state"] == "completed" else None

    await eventually(done, "the job to complete")


# Runs argv[1:] with SIGINT at its default, as a terminal's foreground process has it: where the suite itself
# runs with SIGINT ignored (a background job of a script: `cmd &`), its children inherit that, and the CLI
# rightly keeps an ignored SIGINT, so a Ctrl-C test would wait forever.
DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execv(sys.argv[1], sys.argv[1:])"]


async def test_ctrl_c_ends_a_watch_with_130_and_no_traceback(cli: Cli, tmp_path: Path) -> None:
    long = write(tmp_path, "long.yaml", json.dumps({"name": "long", "steps": [gate_step("wait", tmp_path / "no")]}))
    job = await cli.json("submit", str(long))
    assert isinstance(job, dict)
    process = await asyncio.create_subprocess_exec(
        *DEFAULT_SIGINT, str(STEPSTREAM), *cli.addresses, "watch", job["id"], stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(DEADLINE):
            while b"step=wait state=running" not in await process.stdout.readline():
                pass
            process.send_signal(signal.SIGINT)
            _, stderr = await process.communicate()
    except TimeoutError:
        # Never left running; SIGABRT makes its faulthandler print where each thread was.
        if process.returncode is None:
            process.send_signal(signal.SIGABRT)
        _, stderr = await process.communicate()
        raise AssertionError(f"the watch did not end after Ctrl-C: {stderr.decode()[-6000:]}") from None
    assert process.returncode == 130
    assert b"Traceback" not in stderr
    assert (await cli("cancel", job["id"])).code == 0


class _Writes:
    """A stderr that keeps each write() call apart, as an unbuffered one hands each to the pipe."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_an_error_is_written_whole_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under PYTHONUNBUFFERED each write() reaches the pipe at once; `up` shares its stderr with its
    services, whose log lines must not land inside (or glued to the end of) the CLI's error line."""
    from stepstream_client.cli import fail
    from stepstream_client.errors import Violation

    writes = _Writes()
    monkeypatch.setattr(sys, "stderr", writes)
    assert fail("the orchestrator died", 1) == 1
    assert fail("bad job", 3, [Violation("steps[0].name", "is required")]) == 3
    assert writes.calls == ["stepstream: the orchestrator died\n",
                            "stepstream: bad job\n  steps[0].name: is required\n"]
