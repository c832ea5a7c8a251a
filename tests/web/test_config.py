"""`stepstream web`'s settings are WebConfig's fields, each a flag and an
environment variable, checked as strictly as the services' (tests/e2e/test_config.py)."""

from __future__ import annotations

from dataclasses import fields

import pytest
from stepstream_client.cli import build_parser

from stepstream_common.config import Option, options, values_of
from stepstream_web.config import WebConfig
from tests.e2e.test_config import BAD, GOOD, kind

WEB_OPTIONS = options(WebConfig)


@pytest.fixture(autouse=True)
def no_settings_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for option in WEB_OPTIONS:
        monkeypatch.delenv(option.env, raising=False)


def config(*argv: str) -> WebConfig:
    parser = build_parser()
    args = parser.parse_args(["web", *argv])
    return WebConfig(**values_of(args.web_parser, WebConfig, vars(args)))


def test_every_setting_is_a_flag_and_an_env_var_shown_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert [option.name for option in WEB_OPTIONS] == [each.name for each in fields(WebConfig)]
    assert all(option.env.startswith("STEPSTREAM_WEB_") for option in WEB_OPTIONS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["web", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for option in WEB_OPTIONS:
        assert f"{option.flag} " in shown and f"(env {option.env}; default {option.default_text})" in shown
    assert config() == WebConfig()


@pytest.mark.parametrize("option", WEB_OPTIONS, ids=lambda option: option.name)
def test_an_env_value_is_used_and_a_flag_wins_over_it(option: Option, monkeypatch: pytest.MonkeyPatch) -> None:
    value = option.parse(GOOD[kind(option)])
    assert value != option.default
    monkeypatch.setenv(option.env, GOOD[kind(option)])
    assert getattr(config(), option.name) == value
    assert getattr(config(option.flag, option.default_text or ""), option.name) == option.default


@pytest.mark.parametrize("option", [o for o in WEB_OPTIONS if kind(o) in BAD], ids=lambda option: option.name)
def test_a_bad_env_value_is_one_line_naming_it_and_exit_2(
    option: Option, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(option.env, BAD[kind(option)])
    with pytest.raises(SystemExit) as exited:
        config()
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"environment variable {option.env}: " in lines[0]
