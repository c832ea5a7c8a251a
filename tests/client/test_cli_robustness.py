"""Nothing a client is fed can crash or fool the `stepstream` CLI: hostile definition
files, a stdout closed early, and server strings full of terminal control sequences.
All through the real console script, against real services where one is needed."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import re
import struct
import subprocess
import sys
import termios
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from stepstream.states import CHILD_STATES, step_state_word
from stepstream_client import Client
from stepstream_client.definitions import MAX_DEFINITION_BYTES, MAX_DEPTH, MAX_VALUES
from stepstream_client.render import CONTROL_CHARACTERS, dumps, printable

from tests.client.services import DEADLINE, REPO, STEPSTREAM, CliResult, Service, run_cli
from tests.client.services import nobody as nobody_listening

DEEP = 100_000
EXIT_INVALID = 6
EXIT_USAGE = 2
EXIT_STDOUT_CLOSED = 141


def _nobody() -> list[str]:
    """Addresses where nothing listens: a definition that got past reading would fail with 4, not 6."""
    nobody = nobody_listening()
    return ["--orchestrator", nobody, "--status", nobody]


def _bomb(levels: int) -> str:
    """A "billion laughs": each anchor a list of ten aliases of the one before."""
    lines = ['l0: &l0 "lol"']
    lines += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]" for n in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


BOMB_LEVELS = len(str(MAX_VALUES))  # 10**levels leaves: ten times the limit (not a billion, in case)


def _hostile_files() -> dict[str, tuple[Callable[[], bytes], str]]:
    """name -> (the file's bytes, what the one error line must say)."""
    deep = f"is nested more than {MAX_DEPTH} levels deep"
    bomb = _bomb(BOMB_LEVELS)
    return {
        "deep-lists.toml": (lambda: b"a = " + b"[" * DEEP + b"]" * DEEP + b"\n", deep),
        "deep-inline-tables.toml": (lambda: b"a = " + b"{b = " * DEEP + b"1" + b"}" * DEEP + b"\n", deep),
        "deep-table-header.toml": (lambda: b"[" + b".".join([b"a"] * DEEP) + b"]\n", deep),
        "deep-dotted-key.toml": (lambda: b".".join([b"a"] * DEEP) + b" = 1\n", deep),
        "deep-dotted-key-inline.toml": (lambda: b"a = {" + b'."b"'.join([b"c"] * DEEP) + b" = 1}\n", deep),
        "deep-lists.yaml": (lambda: b"a: " + b"[" * DEEP + b"]" * DEEP + b"\n", deep),
        "deep-mappings.yaml": (lambda: b"a: " + b"{b: " * DEEP + b"1" + b"}" * DEEP + b"\n", deep),
        "deep-lists.json": (lambda: b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}", deep),
        "deep-objects.json": (lambda: b'{"a": ' + b'{"b": ' * DEEP + b"1" + b"}" * DEEP + b"}", deep),
        "bomb-at-top.yaml": (lambda: (bomb + f"name: *l{BOMB_LEVELS}\n").encode(), "expands to more than"),
        "bomb-in-params.yaml": (lambda: (bomb + "name: x\nsteps:\n  - {name: s, type: sleep, seconds: 0, "
                                         f"extra: *l{BOMB_LEVELS}}}\n").encode(), "expands to more than"),
        "bomb-of-text.yaml": (lambda: b'big: &big "' + b"x" * (1 << 20) + b'"\nmany: [' +
                              b", ".join([b"*big"] * 17) + b"]\n", "expands to more than 16 MiB of text"),
        "alias-inside-itself.yaml": (lambda: b"name: &a [x, *a]\n", "has an alias inside the node it refers to"),
        "garbage.toml": (lambda: random.Random(1).randbytes(8192), "is not UTF-8 text"),
        "garbage.yaml": (lambda: random.Random(2).randbytes(8192), "is not UTF-8 text"),
        "garbage.json": (lambda: random.Random(3).randbytes(8192), "is not UTF-8 text"),
        "controls.toml": (lambda: "".join(map(chr, range(1, 0x3000))).encode(), "is not valid TOML"),
        "controls.yaml": (lambda: "".join(map(chr, range(1, 0x3000))).encode(), "is not valid YAML"),
        "long-integer.toml": (lambda: b"name = " + b"9" * 5000 + b"\n", "is not valid TOML"),
        "long-integer.yaml": (lambda: b"name: " + b"9" * 5000 + b"\n", "is not valid YAML"),
        "long-integer.json": (lambda: b'{"name": ' + b"9" * 5000 + b"}", "is not valid JSON"),
        # Valid TOML, but more than could ever be sent: refused before it is parsed.
        "huge.toml": (lambda: b'name = "x"\n# ' + b"x" * MAX_DEFINITION_BYTES + b"\n",
                      f"is larger than {MAX_DEFINITION_BYTES >> 20} MiB"),
    }


HOSTILE = _hostile_files()


def _one_clear_line(result: CliResult, says: str) -> None:
    assert result.code == EXIT_INVALID, result
    assert result.stdout == "", result
    assert result.stderr.startswith("stepstream: ") and result.stderr.count("\n") == 1, result
    assert says in result.stderr, result
    assert not set(result.stderr) & (CONTROL_CHARACTERS - {"\n"}), result
    assert len(result.stderr) < 500, result


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_a_hostile_definition_file_is_one_clear_error_line(name: str, tmp_path: Path) -> None:
    """Deep nesting, alias bombs, binary garbage and huge files: exit 6 and one line saying
    what is wrong, quickly, instead of a RecursionError traceback or filling memory."""
    content, says = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(content())
    result = await run_cli(*_nobody(), "submit", str(path), deadline=30)
    _one_clear_line(result, says)


async def test_a_definition_that_is_not_a_file_is_one_clear_error_line(tmp_path: Path) -> None:
    """/dev/zero never ends, and a directory cannot be read: neither hangs nor crashes."""
    _one_clear_line(await run_cli(*_nobody(), "submit", "/dev/zero", deadline=30), "is larger than")
    _one_clear_line(await run_cli(*_nobody(), "submit", str(tmp_path)), "cannot read")


async def test_json_definitions_say_what_is_wrong_with_them(tmp_path: Path) -> None:
    """Only JSON syntax errors are reported as invalid JSON; a wrong shape is reported as one."""
    syntax = tmp_path / "syntax.json"
    syntax.write_text('{"name": "x", ')
    _one_clear_line(await run_cli(*_nobody(), "submit", str(syntax)), "syntax.json is not valid JSON: Expecting")

    top = tmp_path / "top.json"
    top.write_text('[{"name": "x"}]')
    _one_clear_line(await run_cli(*_nobody(), "submit", str(top)),
                    "expected an object of job fields at the top level, got a list")

    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"name": "x", "steps": 3, "colour": "red"}))
    result = await run_cli(*_nobody(), "submit", str(shape))
    assert result.code == EXIT_INVALID, result
    assert "not valid JSON" not in result.stderr, result
    assert result.stderr.splitlines() == [
        "stepstream: the job definition has the wrong shape",
        "  colour: unknown field (expected: name, timeout, steps)",
        "  steps: must be a list of steps, got 3",
    ], result

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"name": "x", "steps": [{"name": "one", "type": "sleep", "seconds": 0}]}))
    unreachable = await run_cli(*_nobody(), "submit", str(good))
    assert unreachable.code == 4, "a valid JSON definition is read, then the orchestrator is called"


async def test_error_lines_escape_control_characters(tmp_path: Path) -> None:
    """A path or a field name quoted in an error cannot drive the terminal."""
    sneaky = tmp_path / "x\x1b[2J\x1b]0;pwned\x07.toml"
    missing = await run_cli(*_nobody(), "submit", str(sneaky))
    _one_clear_line(missing, "cannot read")
    assert "x\\x1b[2J\\x1b]0;pwned\\x07.toml" in missing.stderr

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"name": "x", "\x1b]8;;http://evil\x07": 1, "steps": []}))
    bad = await run_cli(*_nobody(), "submit", str(keys))
    assert bad.code == EXIT_INVALID, bad
    assert not set(bad.stderr) & (CONTROL_CHARACTERS - {"\n"}), bad
    assert "  \\x1b]8;;http://evil\\x07: unknown field" in bad.stderr, bad


# --- against real services ----------------------------------------------------------


def _addresses(orchestrator: Service, status: Service) -> list[str]:
    return ["--orchestrator", orchestrator.address, "--status", status.address]


async def _finished_job(orchestrator: Service, status: Service, definition: Mapping[str, Any]) -> str:
    async with Client(orchestrator.address, status.address) as client:
        job = await client.submit(definition)
        final = None
        async with client.watch(job.id) as views:
            async for view in views:
                final = view
        assert final is not None and final.state == "completed", final
        return job.id


FANOUT = {"name": "fan", "steps": [
    {"name": "spread", "type": "fanout", "count": 3000, "concurrency": 500, "child": {"type": "sleep", "seconds": 0}},
]}


async def _into_pipe(args: list[str], reader: list[str] | None) -> tuple[CliResult, bytes]:
    """Run the CLI with stdout a real pipe into `reader`, a process that stops reading early;
    with no reader, the pipe's only reader has already exited before the CLI starts."""
    read_end, write_end = os.pipe()
    try:
        consumer = await asyncio.create_subprocess_exec(
            *(reader or [sys.executable, "-c", "import sys; sys.stdin.close()"]),
            stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        if reader is None:
            await consumer.wait()
        os.close(read_end)
        read_end = -1
        cli = await asyncio.create_subprocess_exec(
            str(STEPSTREAM), *args, stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO,
        )
        os.close(write_end)
        write_end = -1
        async with asyncio.timeout(DEADLINE):
            _, stderr = await cli.communicate()
            consumed, _ = await consumer.communicate()
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    assert cli.returncode is not None
    return CliResult(cli.returncode, "", stderr.decode()), consumed


async def test_a_stdout_closed_early_ends_every_command_quietly(
    orchestrator: Service, status: Service
) -> None:
    """`stepstream ... | <a reader that is gone>`: exit 141 and nothing at all on stderr
    (no BrokenPipeError traceback, no "Exception ignored")."""
    addresses = _addresses(orchestrator, status)
    job_id = await _finished_job(orchestrator, status, {"name": "tiny", "steps": [
        {"name": "spread", "type": "fanout", "count": 3, "child": {"type": "sleep", "seconds": 0}},
    ]})
    for command in (["list"], ["list", "-o", "json"], ["get", job_id], ["watch", job_id],
                    ["watch", job_id, "-o", "json"], ["children", job_id, "spread"]):
        result, _ = await _into_pipe([*addresses, *command], reader=None)
        assert (result.code, result.stderr) == (EXIT_STDOUT_CLOSED, ""), (command, result)


async def test_children_piped_into_head_stops_quietly_mid_output(
    orchestrator: Service, status: Service
) -> None:
    """`stepstream children JOB STEP | head -1` with far more output than a pipe holds: head
    gets its line and exits, and the CLI stops at its next write, quietly."""
    job_id = await _finished_job(orchestrator, status, FANOUT)
    result, consumed = await _into_pipe([*_addresses(orchestrator, status), "children", job_id, "spread"],
                                        reader=["head", "-n", "1"])
    assert consumed.decode().startswith("index=0 item=0 state=completed") and consumed.count(b"\n") == 1
    assert (result.code, result.stderr) == (EXIT_STDOUT_CLOSED, ""), result


async def test_children_offers_exactly_the_states_the_service_accepts(
    orchestrator: Service, status: Service
) -> None:
    """`--state waiting` (or skipped) is a usage error, listing the choices, which are the
    child states the status service filters by; all of those it accepts."""
    addresses = _addresses(orchestrator, status)
    job_id = await _finished_job(orchestrator, status, {"name": "few", "steps": [
        {"name": "spread", "type": "fanout", "count": 2, "child": {"type": "sleep", "seconds": 0}},
    ]})
    for word in ("waiting", "skipped"):
        refused = await run_cli(*addresses, "children", job_id, "spread", "--state", word)
        assert refused.code == EXIT_USAGE, refused
        assert f"invalid choice: '{word}'" in refused.stderr, refused
        offered = re.search(r"\(choose from (.*)\)", refused.stderr)
        assert offered is not None, refused
        assert set(re.findall(r"'(\w+)'", offered.group(1))) == {step_state_word(s) for s in CHILD_STATES}

    every = sorted(step_state_word(s) for s in CHILD_STATES)
    accepted = await run_cli(*addresses, "children", job_id, "spread", "--state", *every, "-o", "json")
    assert accepted.code == 0, accepted
    assert [child["state"] for child in json.loads(accepted.stdout)] == ["completed", "completed"]


# Injected through a job name, a step's output (its message) and a fan-out item: clear the
# screen, set the window title, a hyperlink, a bell, an 8-bit CSI, DEL, and rich markup.
NAME = "[bold red]x\x1b[2J\x1b]0;pwned\x07\x9b31m\x7f"
OUTPUT = "\x1b]8;;http://evil.example\x07click\x1b]8;;\x07 [blink]y\x1b[H\x9b2J\x7f\x07"
ITEM = "[bold red]i\x1b[2J\x9b1A\x7f"
RAW = ("\x1b[2J", "\x1b]", "\x1b[H", "\x07", "\x9b", "\x7f")  # none of these may reach a terminal


def _hostile_job(tmp_path: Path) -> Path:
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps({"name": NAME, "steps": [
        {"name": "say", "type": "command", "command": [sys.executable, "-c", f"print({OUTPUT!r})"]},
        {"name": "spread", "type": "fanout", "items": [ITEM, "plain"], "child": {"type": "sleep", "seconds": 0}},
    ]}))
    return path


async def _on_terminal(*args: str) -> str:
    """Everything the CLI writes to a real pseudo-terminal, wide enough that nothing wraps.
    (Not pexpect: a client-only install has none, and its fork of a process running gRPC threads is unsafe.)"""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 400, 0, 0))
    try:
        process = await asyncio.create_subprocess_exec(
            str(STEPSTREAM), *args, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, cwd=REPO,
            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "400"},
        )
    finally:
        os.close(terminal)

    def read_all() -> bytes:
        chunks = []
        with contextlib.suppress(OSError):  # EIO once the last writer has gone
            while chunk := os.read(controller, 65536):
                chunks.append(chunk)
        return b"".join(chunks)

    try:
        async with asyncio.timeout(DEADLINE):
            output, code = await asyncio.gather(asyncio.to_thread(read_all), process.wait())
    finally:
        os.close(controller)
    assert code == 0, output
    return output.decode()


def _without_colours(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


async def test_server_strings_cannot_drive_the_terminal(
    orchestrator: Service, status: Service, tmp_path: Path
) -> None:
    """The tree (get), the tables (list, children) and key=value lines show control
    characters as escapes and markup literally; JSON keeps every string exact."""
    addresses = _addresses(orchestrator, status)
    submitted = await run_cli(*addresses, "submit", "--watch", str(_hostile_job(tmp_path)))
    assert submitted.code == 0, submitted
    job_id = submitted.stdout.split()[2]
    message = f"exit 0: {OUTPUT.strip()}"

    for args in (["get", job_id], ["list"], ["children", job_id, "spread"]):
        lines = await run_cli(*addresses, *args)
        assert lines.code == 0, lines
        assert not set(lines.stdout) & (CONTROL_CHARACTERS - {"\n"}), (args, lines)
    assert not set(submitted.stdout) & (CONTROL_CHARACTERS - {"\n"}), submitted
    assert f"name={dumps(NAME)}" in submitted.stdout and f"message={dumps(message)}" in submitted.stdout
    assert f"item={dumps(ITEM)}" in (await run_cli(*addresses, "children", job_id, "spread")).stdout

    got = await run_cli(*addresses, "get", job_id, "-o", "json")
    view = json.loads(got.stdout)
    assert (view["name"], view["steps"][0]["message"]) == (NAME, message)
    children = await run_cli(*addresses, "children", job_id, "spread", "-o", "json")
    assert json.loads(children.stdout)[0]["item"] == ITEM
    for raw in (got.stdout, children.stdout):
        assert not set(raw) & (CONTROL_CHARACTERS - {"\n"})

    tree = await _on_terminal(*addresses, "get", job_id)
    table = await _on_terminal(*addresses, "list")
    child_table = await _on_terminal(*addresses, "children", job_id, "spread")
    for shown in (tree, table, child_table):
        assert not any(raw in shown for raw in RAW), repr(shown)
    assert printable(NAME) in _without_colours(tree) and printable(NAME) in _without_colours(table)
    assert printable(OUTPUT.strip()) in _without_colours(tree)
    assert printable(ITEM) in _without_colours(child_table)
