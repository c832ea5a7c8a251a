"""A service's config dataclass is the one statement of its settings: every field
is a flag and an environment variable, the defaults are the dataclass's, an
environment value is checked as strictly as a flag, and the README's tables say
what the dataclasses say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from typing import Any

import pytest
from stepstream_client.cli import build_parser

from orchestrator_svc.config import OrchestratorConfig
from status_svc.config import StatusConfig
from stepstream_common.config import Option, ServiceConfig, options
from tests.helpers import REPO

SERVICES: dict[str, type[ServiceConfig]] = {"orchestrator_svc": OrchestratorConfig, "status_svc": StatusConfig}
EVERY_OPTION = [(module, option) for module, config in SERVICES.items() for option in options(config)]

# A valid value other than the default, and an invalid one, for each kind of
# setting (by its parse function). Any text is a valid --data-dir.
GOOD = {"positive_float": "2.5", "positive_int": "3", "host_port": "0.0.0.0:7", "host_ports": "a:1,b:2",
        "Path": "/srv/stepstream", "_log_level": "debug", "optional_path": "/srv/x.pem", "boolean": "true",
        "env_names": "HTTPS_PROXY,AWS_PROFILE", "server_name": "stepstream.example", "_log_format": "json",
        "optional_host_port": "127.0.0.1:9100", "store_url": "postgresql://stepstream@db.example:5432/stepstream"}
BAD = {"positive_float": "0", "positive_int": "1.5", "host_port": "no-port", "host_ports": ",",
       "_log_level": "INFO", "boolean": "maybe", "env_names": "A=B", "server_name": "host:443",
       "_log_format": "JSON", "optional_host_port": "no-port", "store_url": "postgresql://u:secret@db/stepstream"}


def cases(pairs: list[tuple[str, Option]]) -> list[Any]:
    return [pytest.param(module, option, id=f"{module}:{option.name}") for module, option in pairs]


@pytest.fixture(autouse=True)
def no_settings_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for _, option in EVERY_OPTION:
        monkeypatch.delenv(option.env, raising=False)


def kind(option: Option) -> str:
    return getattr(option.parse, "__name__", "")


@pytest.mark.parametrize("module", SERVICES)
def test_every_field_is_a_flag_and_an_env_var_shown_in_help(
    module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = SERVICES[module]
    found = options(config)
    assert [option.name for option in found] == [each.name for each in fields(config)]
    assert len({option.flag for option in found}) == len({option.env for option in found}) == len(found)
    with pytest.raises(SystemExit) as exited:
        config.from_args(["--help"])
    assert exited.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for option in found:
        assert option.flag in shown
        assert f"(env {option.env}; default {option.default_text})" in shown


@pytest.mark.parametrize("module", SERVICES)
def test_no_arguments_give_the_dataclass_defaults_help_shows(module: str) -> None:
    config = SERVICES[module]
    assert config.from_args([]) == config(**{option.name: option.default for option in options(config)})


# --data-dir's default is shown as where it is on any machine, not on this one.
@pytest.mark.parametrize(("module", "option"), cases([(m, o) for m, o in EVERY_OPTION if o.name != "data_dir"]))
def test_a_default_is_shown_as_it_would_be_written(module: str, option: Option) -> None:
    assert option.parse(option.default_text) == option.default


@pytest.mark.parametrize(("module", "option"), cases(EVERY_OPTION))
def test_an_env_value_is_used_and_a_flag_wins_over_it(
    module: str, option: Option, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SERVICES[module]
    value = option.parse(GOOD[kind(option)])
    assert value != option.default
    monkeypatch.setenv(option.env, GOOD[kind(option)])
    assert getattr(config.from_args([]), option.name) == value
    flagged = config.from_args([option.flag, option.default_text])
    assert getattr(flagged, option.name) == option.parse(option.default_text)


@pytest.mark.parametrize(("module", "option"), cases([(m, o) for m, o in EVERY_OPTION if kind(o) in BAD]))
def test_a_bad_env_value_is_one_line_naming_it_and_exit_2(
    module: str, option: Option, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = SERVICES[module]
    monkeypatch.setenv(option.env, BAD[kind(option)])
    with pytest.raises(SystemExit) as exited:
        config.from_args([])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert f"environment variable {option.env}: " in lines[0]


def test_a_service_started_with_a_bad_env_value_says_so_without_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "status_svc"], capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "STEPSTREAM_STATUS_ORCHESTRATORS": "orchestrator"},
    )
    assert result.returncode == 2
    assert result.stderr == (
        "python -m status_svc: error: environment variable STEPSTREAM_STATUS_ORCHESTRATORS: "
        "expected HOST:PORT, got 'orchestrator'\n"
    )


def test_a_variable_means_one_setting_wherever_it_is_read() -> None:
    """Both services read the shared settings under the same names, and no other;
    and neither reads a variable of the CLI's (STEPSTREAM_ORCHESTRATOR is the one
    orchestrator the CLI calls)."""
    orchestrator = {option.env: option.name for option in options(OrchestratorConfig)}
    status = {option.env: option.name for option in options(StatusConfig)}
    both = orchestrator.keys() & status.keys()
    assert {orchestrator[env] for env in both} == {each.name for each in fields(ServiceConfig)} - {"listen", "data_dir"}
    assert all(orchestrator[env] == status[env] for env in both)
    cli = set(re.findall(r"env\s+(STEPSTREAM_[A-Z_]+)", build_parser().format_help()))
    assert cli
    assert not cli & (orchestrator.keys() | status.keys())


def readme_table(config: type[ServiceConfig]) -> str:
    """The README's table of a service's settings, as the dataclass states them."""
    rows = [f"| `{o.flag}` | `{o.env}` | `{o.default_text}` | {o.help} |" for o in options(config)]
    return "\n".join(["| flag | env | default | meaning |", "|---|---|---|---|", *rows])


@pytest.mark.parametrize("module", SERVICES)
def test_the_readme_shows_the_settings_the_dataclass_states(module: str) -> None:
    config = SERVICES[module]
    assert readme_table(config) in (REPO / "README.md").read_text(), (
        f"README.md's Configuration table for {module} is out of date; "
        f"tests.e2e.test_config.readme_table({config.__name__}) gives it"
    )
