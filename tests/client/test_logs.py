"""What steps printed, through the SDK, the sync client and the `stepstream logs`
console script, against a real orchestrator (a subprocess) whose steps are
real commands: a follower that resumes across a kill -9 and restart of the
orchestrator, every step's output in order, bytes that are not UTF-8, colours
on a terminal (a pty) and off it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from stepstream_client import Client, LogLine, NotFoundError, SyncClient
from stepstream_client.cli import build_parser

from tests.client.services import DEADLINE, STEPSTREAM, Service, eventually, gate_step, run_cli

# Colour, a bell and a title change, then bytes that are not UTF-8.
TALK = r"""
import sys
sys.stdout.write("\x1b[31mred\x1b[0m \x07plain\x1b]0;title\x07\n"); sys.stdout.flush()
sys.stdout.buffer.write(b"bad \xff\xfe bytes\n")
"""
# 50 lines, then it waits for the gate file (argv[1]).
FIFTY_THEN_WAIT = """
import os, sys, time
for n in range(50):
    print(f"line {n}", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
"""
UNREACHABLE_STATUS = "127.0.0.1:1"  # logs never need the status service


def command(name: str, script: str, *args: str) -> dict[str, object]:
    return {"name": name, "type": "command", "command": [sys.executable, "-c", script, *args]}


DEMO = {"name": "demo", "steps": [
    command("talk", TALK),
    command("warn", "import sys; print('oops', file=sys.stderr)"),
    {"name": "fan", "type": "fanout", "count": 2,
     "child": {"type": "command", "command": ["echo", "child", "{index}"]}},
]}


@pytest.fixture
async def client(orchestrator: Service) -> AsyncIterator[Client]:
    async with Client(orchestrator.address, UNREACHABLE_STATUS) as client:
        yield client


async def demo_job(client: Client) -> str:
    job = await client.submit(DEMO)
    async with contextlib.aclosing(client.logs(job.id)) as lines:
        async for _ in lines:  # following every step to its end: the job has ended
            pass
    return job.id


async def test_a_follower_resumes_across_an_orchestrator_kill_and_restart(
    client: Client, orchestrator: Service, tmp_path: Path
) -> None:
    """The step prints 50 lines and waits; the orchestrator is killed -9 and
    started again. The follower reconnects from the line after its last one:
    the output up to the crash, with nothing missed or repeated, then the
    orchestrator's notice that the attempt was cut, and the end."""
    job = await client.submit({"name": "crash", "steps": [
        command("talk", FIFTY_THEN_WAIT, str(tmp_path / "gate")),
    ]})
    received: list[LogLine] = []
    async with contextlib.aclosing(client.logs(job.id, "talk")) as lines:
        async for line in lines:
            received.append(line)
            if len(received) == 50:
                await orchestrator.kill()
                await orchestrator.start()
    assert [line.number for line in received] == list(range(51))
    assert [line.text for line in received[:50]] == [f"line {n}" for n in range(50)]
    assert received[50].stream == "notice" and "output ends here" in received[50].text
    assert {line.attempt for line in received} == {1}


async def test_every_steps_output_in_order_through_the_sdk_and_the_sync_client(
    client: Client, orchestrator: Service
) -> None:
    job_id = await demo_job(client)
    lines = [line async for line in client.logs(job_id, follow=False)]
    assert [(line.step, line.child, line.stream, line.text) for line in lines] == [
        ("talk", None, "stdout", "\x1b[31mred\x1b[0m \x07plain\x1b]0;title\x07"),
        ("talk", None, "stdout", "bad \ufffd\ufffd bytes"),
        ("warn", None, "stderr", "oops"),
        ("fan", 0, "stdout", "child 0"),
        ("fan", 1, "stdout", "child 1"),
    ]
    assert lines[1].data == b"bad \xff\xfe bytes"

    def synchronously() -> tuple[list[str], list[tuple[str, int | None, int]], list[str]]:
        with SyncClient(orchestrator.address, UNREACHABLE_STATUS) as sync:
            errors = [line.text for step in ("talk", "warn") for line in sync.logs(job_id, step, streams=["stderr"])]
            listed = [(each.step, each.child, each.lines) for each in sync.output(job_id)]
            last = [line.text for line in sync.logs(job_id, "fan", child=1, tail=1)]
        return errors, listed, last

    errors, listed, last = await asyncio.to_thread(synchronously)
    assert errors == ["oops"]
    assert listed == [("talk", None, 2), ("warn", None, 1), ("fan", 0, 1), ("fan", 1, 1)]
    assert last == ["child 1"]
    with pytest.raises(NotFoundError, match="has no step 'nope'"):
        _ = [line async for line in client.logs(job_id, "nope")]
    with pytest.raises(ValueError, match="unknown output stream"):
        client.logs(job_id, "talk", streams=["stdin"])


async def test_the_logs_command(client: Client, orchestrator: Service, tmp_path: Path) -> None:
    job_id = await demo_job(client)
    cli = ("--orchestrator", orchestrator.address)
    every = await run_cli(*cli, "logs", job_id)
    assert every.code == 0, every
    assert every.stdout.splitlines() == [
        "talk › red \x07plain", "talk › bad \ufffd\ufffd bytes", "warn › oops", "fan/0 › child 0", "fan/1 › child 1",
    ]
    as_json = await run_cli(*cli, "logs", job_id, "--tail", "1", "-o", "json")
    assert as_json.code == 0, as_json
    last = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(each["step"], each["child"], each["number"], each["text"]) for each in last] == [
        ("talk", None, 1, "bad \ufffd\ufffd bytes"), ("warn", None, 0, "oops"), ("fan", 0, 0, "child 0"),
        ("fan", 1, 0, "child 1"),
    ]
    assert last[0]["data_base64"] == "YmFkIP/+IGJ5dGVz" and "data_base64" not in last[1]
    assert {each["attempt"] for each in last} == {1} and last[1]["stream"] == "stderr"
    child = await run_cli(*cli, "logs", job_id, "fan/1", "--stream", "stdout")
    assert (child.code, child.stdout) == (0, "child 1\n"), child

    gate = tmp_path / "gate"
    # Every step followed in turn; a line longer than a record (64 KiB) is joined again.
    waiting = await client.submit({"name": "wait", "steps": [
        gate_step("slow", gate), command("long", "print('x' * 100_000)"),
    ]})
    following = asyncio.create_task(run_cli(*cli, "logs", waiting.id, "-f"))
    await asyncio.sleep(0)
    gate.touch()
    followed = await following
    assert (followed.code, followed.stdout) == (0, "slow › gate open\nlong › " + "x" * 100_000 + "\n"), followed


def test_a_malformed_step_or_child_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for malformed in ("fan/x", "/1", "fan/", "fan/2147483648", "fan/99999999999", "fan/١"):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["logs", "some-job", malformed])
        assert exited.value.code == 2
        assert "is not STEP or STEP/INDEX" in capsys.readouterr().err
    for option in ("--attempt", "--tail"):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["logs", "some-job", "fan", option, "3000000000"])
        assert exited.value.code == 2
        assert "must be at most 2147483647, got 3000000000" in capsys.readouterr().err
    assert build_parser().parse_args(["logs", "some-job", "fan/2147483647"]).unit == ("fan", 2**31 - 1)


async def test_the_sdk_refuses_a_number_its_request_cannot_carry(client: Client) -> None:
    for arguments, message in (({"child": 2**31}, "child must be 0 to"), ({"attempt": 0}, "attempt must be 1 to"),
                               ({"tail": 3_000_000_000}, "tail must be 1 to"),
                               ({"attempt": 1, "from_line": 2**63}, "from_line must be 0 to")):
        with pytest.raises(ValueError, match=message):
            client.logs("some-job", "fan", **arguments)  # type: ignore[arg-type]


async def on_a_terminal(*args: str, env: dict[str, str]) -> str:
    """What `stepstream ARGS` writes to a terminal (a pty)."""
    leader, follower = os.openpty()
    try:
        process = await asyncio.create_subprocess_exec(str(STEPSTREAM), *args, stdout=follower,
                                                       stderr=asyncio.subprocess.PIPE, env={**os.environ, **env})
        os.close(follower)
        async with asyncio.timeout(DEADLINE):
            _, err = await process.communicate()
        assert process.returncode == 0, err
        written = b""
        with contextlib.suppress(OSError):  # EIO once the pty's other end is closed and read empty
            while chunk := os.read(leader, 65536):
                written += chunk
        return written.decode()
    finally:
        os.close(leader)


async def test_colours_reach_a_terminal_unless_no_color(client: Client, orchestrator: Service) -> None:
    """On a terminal a step's colours are kept (and reset after its line), every
    other control character escaped; --no-color and NO_COLOR strip the colours."""
    job_id = await demo_job(client)
    command_line = ("--orchestrator", orchestrator.address, "logs", job_id, "talk", "--tail", "3")
    coloured = await on_a_terminal(*command_line, env={"NO_COLOR": ""})
    assert coloured.splitlines()[0] == "\x1b[31mred\x1b[0m \\x07plain\\x1b]0;title\\x07\x1b[0m"
    for plain in (await on_a_terminal(*command_line, "--no-color", env={}),
                  await on_a_terminal(*command_line, env={"NO_COLOR": "1"})):
        assert plain.splitlines()[0] == "red \\x07plain"


async def test_watch_shows_the_running_steps_last_lines_under_the_tree(
    orchestrator: Service, status: Service, tmp_path: Path
) -> None:
    """`watch --logs` on a terminal: the step's lines appear under the live tree
    while it runs; the watch ends with the job."""
    gate = tmp_path / "gate"
    async with Client(orchestrator.address, status.address) as client:
        job = await client.submit({"name": "tails", "steps": [
            command("talk", "import os, sys, time\nprint('hello \\x1b[32mthere\\x1b[0m', flush=True)\n"
                            "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.02)", str(gate)),
        ]})
    leader, follower = os.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            str(STEPSTREAM), "--orchestrator", orchestrator.address, "--status", status.address,
            "watch", job.id, "--logs", stdout=follower, stderr=asyncio.subprocess.PIPE,
        )
        os.close(follower)
        shown = ""
        async with asyncio.timeout(DEADLINE):
            while "hello there" not in shown:  # under the tree (after its dimmed `talk › `)
                shown += (await asyncio.to_thread(os.read, leader, 65536)).decode(errors="replace")
            assert "running" in shown and "talk › " in shown, shown
            gate.touch()
            _, err = await process.communicate()
        assert process.returncode == 0, err
    finally:
        gate.touch()
        os.close(leader)


# The first attempt prints three lines and fails; the next prints two and succeeds (argv[1]: a marker file).
FAIL_ONCE = """
import os, sys
first = not os.path.exists(sys.argv[1])
open(sys.argv[1], "a").close()
for n in range(3 if first else 2):
    print(f"{'first' if first else 'second'} {n}", flush=True)
sys.exit(1 if first else 0)
"""


async def test_from_line_resumes_an_attempt_then_follows_the_later_ones(client: Client, tmp_path: Path) -> None:
    """A reader that kept its own place (attempt 1, line 0) gets the rest of that attempt, then the
    retry's lines from their start: nothing missed, nothing repeated (read once the job ended: a place
    past the lines there are is OUT_OF_RANGE)."""
    job = await client.submit({"name": "retried", "steps": [
        {**command("flaky", FAIL_ONCE, str(tmp_path / "marker")), "retries": 1, "retry_backoff": "0.1s"},
    ]})
    async with contextlib.aclosing(client.logs(job.id)) as every:
        assert [line.text async for line in every if line.stream == "stdout"] == [
            "first 0", "first 1", "first 2", "second 0", "second 1"]
    async with contextlib.aclosing(client.logs(job.id, "flaky", attempt=1, from_line=1)) as lines:
        got = [(line.attempt, line.number, line.text) async for line in lines if line.stream == "stdout"]
    assert got == [(1, 1, "first 1"), (1, 2, "first 2"), (2, 0, "second 0"), (2, 1, "second 1")]
    with pytest.raises(ValueError, match="from_line goes with an attempt"):
        client.logs(job.id, "flaky", from_line=1)


# A fan-out child: says which attempt it is; child 0 then waits for the gate (argv[3]) and fails its
# first attempt only, child 1 fails every attempt at once.
RETRIED_CHILD = """
import os, sys, time
marker = os.path.join(sys.argv[1], "tried-" + sys.argv[2])
first = not os.path.exists(marker)
open(marker, "a").close()
print(f"child {sys.argv[2]} attempt {1 if first else 2}", flush=True)
if sys.argv[2] == "0":
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.02)
    sys.exit(1 if first else 0)
sys.exit(1)
"""


async def test_following_a_child_follows_its_retries_and_ends_with_its_last_attempt(
    client: Client, tmp_path: Path
) -> None:
    """Child 1 fails both its attempts: its follower gets both and ends at once, though the fan-out
    still runs (child 0 waits for its gate). Child 0's follower gets its first attempt, and after the
    gate fails it, the retry's line too, then ends with the retry."""
    gate = tmp_path / "gate"
    job = await client.submit({"name": "children", "steps": [{
        "name": "fan", "type": "fanout", "count": 2, "concurrency": 2, "max_child_failures": 2,
        "child": {"type": "command", "retries": 1, "retry_backoff": "0.2s",
                  "command": [sys.executable, "-c", RETRIED_CHILD, str(tmp_path), "{index}", str(gate)]}}]})

    async def begun(child: int) -> bool | None:
        return True if [each async for each in client.output(job.id, "fan") if each.child == child] else None

    async def followed(child: int, first_line: asyncio.Event | None = None) -> list[tuple[int, str]]:
        """Child 1 from its first attempt's first line (it may be on its retry already when this begins),
        child 0 from its latest attempt (the first: it waits for the gate)."""
        logs = client.logs(job.id, "fan", 1, 1, from_line=0) if child == 1 else client.logs(job.id, "fan", 0)
        got = []
        async with contextlib.aclosing(logs) as lines:
            async for line in lines:
                got.append((line.attempt, line.text))
                if first_line is not None:
                    first_line.set()
        return got

    async with asyncio.timeout(DEADLINE):
        await eventually(lambda: begun(1), "child 1 to begin")
        # Child 0 waits for the gate, untouched yet: a follower that waited for the fan-out would time out here.
        assert await followed(1) == [(1, "child 1 attempt 1"), (2, "child 1 attempt 2")]
        await eventually(lambda: begun(0), "child 0 to begin")
        first_line = asyncio.Event()
        following = asyncio.create_task(followed(0, first_line))
        await first_line.wait()
        gate.touch()
        assert await following == [(1, "child 0 attempt 1"), (2, "child 0 attempt 2")]
