"""--log-format json, end to end: both services as real subprocesses with tokens
on and --log-level debug run a whole job whose command has a secret in its
environment. Every line either writes to stderr is one JSON object with the
fields a log pipeline needs, the job's lines carry its id, and no secret (a
token, the follower's token, the env secret) is in anything they wrote.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from stepstream_client import Client
from stepstream_client.errors import UnauthenticatedError

from stepstream_common.logs import JsonFormatter, log_context
from tests.client.services import DEADLINE, QUICK_ORCHESTRATOR, QUICK_STATUS, Service
from tests.helpers import private_file

ENV_SECRET = "env-secret-7f3a9c1e"
REQUIRED = {"timestamp", "level", "logger", "message"}
LEVELS = {"debug", "info", "warning", "error", "critical"}


def hashed(name: str, role: str) -> tuple[str, str]:
    """The tokens file line (stdout) and the token (the last word of stderr) the hash command makes."""
    made = subprocess.run([sys.executable, "-m", "stepstream_common.tokens", "hash", "--name", name,
                           "--role", role], capture_output=True, text=True, timeout=DEADLINE, check=True)
    return made.stdout, made.stderr.strip().rsplit(" ", 1)[1]


def json_lines(log: Path) -> list[dict[str, object]]:
    """Every line of `log`, each required to be one JSON object with the required fields."""
    found = []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"{log.name}:{number} is not JSON: {line!r}") from None
        assert isinstance(entry, dict), f"{log.name}:{number}: {line!r}"
        assert entry.keys() >= REQUIRED, f"{log.name}:{number} lacks {REQUIRED - entry.keys()}: {line!r}"
        assert entry["level"] in LEVELS, line
        assert isinstance(entry["timestamp"], str) and entry["timestamp"].endswith("Z"), line
        assert datetime.fromisoformat(entry["timestamp"]).utcoffset() == timedelta(0), line
        found.append(entry)
    return found


def page_secret(database: Path) -> str:
    with sqlite3.connect(database) as db:
        (value,) = db.execute("SELECT value FROM meta WHERE key = 'page_secret'").fetchone()
    assert isinstance(value, str) and value
    return value


async def test_json_logs_are_one_object_per_line_carry_the_job_and_hold_no_secret(tmp_path: Path) -> None:
    lines = {role: hashed(f"ci-{role}", role) for role in ("operator", "follower")}
    private_file(tmp_path / "tokens", "".join(line for line, _ in lines.values()))
    tokens = {role: token for role, (_, token) in lines.items()}
    follower = private_file(tmp_path / "follower.token", tokens["follower"] + "\n")
    logging_args = ("--log-format", "json", "--log-level", "debug", "--tokens-file", str(tmp_path / "tokens"))
    orchestrator = Service("orchestrator_svc", tmp_path / "orchestrator", *QUICK_ORCHESTRATOR, *logging_args)
    status = Service("status_svc", tmp_path / "status", *QUICK_STATUS, *logging_args)
    definition = f"""
name = "logs"

[[steps]]
name = "use-secret"
type = "command"
command = ["sh", "-c", "echo token=$API_TOKEN; echo token=$API_TOKEN >&2"]
env = {{ API_TOKEN = {{ secret = "{ENV_SECRET}" }} }}

[[steps]]
name = "fails"
type = "command"
depends_on = ["use-secret"]
command = ["sh", "-c", "echo token=$API_TOKEN >&2; exit 3"]
env = {{ API_TOKEN = {{ secret = "{ENV_SECRET}" }} }}
"""
    try:
        await orchestrator.start()
        status.args += ["--orchestrator", orchestrator.address, "--orchestrator-token-file", str(follower)]
        await status.start()
        async with Client(orchestrator.address, status.address, token=tokens["operator"]) as client:
            (tmp_path / "job.toml").write_text(definition)
            job = await client.submit(tmp_path / "job.toml")
            async with client.watch(job.id) as views:
                async for view in views:
                    if view.terminal:
                        break
            assert view.terminal and view.state == "failed", view
            assert [step.state for step in view.steps] == ["completed", "failed"], view
            # A call that is refused is logged (at info): still no token in it.
            async with Client(orchestrator.address, status.address, token=tokens["operator"] + "x") as wrong:
                with pytest.raises(UnauthenticatedError):
                    await wrong.get(job.id)
    finally:
        await status.kill()
        await orchestrator.kill()

    logs = {name: tmp_path / f"{name}.log" for name in ("orchestrator", "status")}
    entries = {name: json_lines(log) for name, log in logs.items()}
    assert all(entries.values()), "each service logged something at debug"
    about_job = [entry for entry in entries["orchestrator"] if entry.get("job_id") == job.id]
    assert any(entry["message"] == f"job {job.id} ended JOB_STATE_FAILED" for entry in about_job), about_job
    assert any(entry.get("step") == "fails" for entry in about_job), about_job
    assert not any("method" in entry for entry in about_job), "a job's lines are not the submitting call's"

    # The paging secrets the services keep (aiosqlite's debug lines would quote them).
    paging = [page_secret(tmp_path / "orchestrator" / "orchestrator.sqlite3"),
              page_secret(tmp_path / "status" / "status.sqlite3")]
    secrets = [ENV_SECRET, *tokens.values(), *(token.partition(".")[2] for token in tokens.values()), *paging]
    for log in logs.values():
        text = log.read_text()
        for secret in secrets:
            assert secret not in text, f"{log.name} holds a secret"


def test_a_json_line_has_the_context_fields_and_the_traceback_as_one_string() -> None:
    formatter = JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x.y", logging.ERROR, __file__, 1, "step %s failed", ("a",), sys.exc_info())
    failed.child = 3  # as extra={"child": 3} sets it
    with log_context(job_id="j1", step="a"):
        line = json.loads(formatter.format(failed))
        with log_context(step=None):
            bare = json.loads(formatter.format(logging.LogRecord("x", logging.INFO, __file__, 1, "hi", (), None)))
    assert line["message"] == "step a failed" and line["level"] == "error" and line["logger"] == "x.y"
    assert (line["job_id"], line["step"], line["child"]) == ("j1", "a", 3) and "method" not in line
    assert line["exc_info"].startswith("Traceback") and "ValueError: boom" in line["exc_info"]
    assert bare == {"timestamp": bare["timestamp"], "level": "info", "logger": "x", "message": "hi", "job_id": "j1"}
    assert "\n" not in formatter.format(failed)
