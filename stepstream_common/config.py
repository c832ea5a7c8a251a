"""Service settings stated once: each is a field of the service's frozen config
dataclass, whose metadata (see setting()) makes it a flag with an
environment-variable twin. ServiceConfig.from_args builds the command line
from the dataclass, so the defaults and help live only there."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self

from stepstream.flags import host_port, positive_float, positive_int

from stepstream_common.logs import LOG_FORMATS

LOG_LEVELS = ("debug", "info", "warning", "error")
_SETTING = "stepstream_setting"


def default_data_dir(service: str) -> Path:
    """$XDG_DATA_HOME/stepstream/SERVICE, or ~/.local/share/stepstream/SERVICE."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "stepstream" / service


def setting(env: str, help: str, parse: Callable[[str], Any], *, flag: str = "", shown: str = "") -> dict[str, Any]:
    """The metadata that makes a config field a flag (`flag`, else --field-name)
    and the environment variable `env`; `parse` turns either's text into the
    value. `shown` describes the default where its value depends on the machine.
    Use it as `field(default=..., metadata=setting(...))`."""
    return {_SETTING: {"env": env, "help": help, "parse": parse, "flag": flag, "shown": shown}}


def listen_setting(service: str) -> dict[str, Any]:
    """A service's --listen (env STEPSTREAM_<SERVICE>_LISTEN)."""
    return setting(f"STEPSTREAM_{service.upper()}_LISTEN", "address to serve on; port 0 picks a free one", host_port)


def data_dir_setting(service: str, help: str) -> dict[str, Any]:
    """A service's --data-dir (env STEPSTREAM_<SERVICE>_DATA_DIR), whose default is default_data_dir(service)."""
    return setting(f"STEPSTREAM_{service.upper()}_DATA_DIR", help, Path,
                   shown=f"$XDG_DATA_HOME/stepstream/{service} or ~/.local/share/stepstream/{service}")


def _log_level(text: str) -> str:
    if text not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text


def _log_format(text: str) -> str:
    if text not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_FORMATS)}, got {text!r}")
    return text


TRUE_WORDS = ("1", "true", "yes")
FALSE_WORDS = ("0", "false", "no")


def boolean(text: str) -> bool:
    """A yes/no setting's value: only 1/true/yes or 0/false/no (any case), so
    a typo such as "ture" or "off" is an error, not a silent false. A field
    parsed by this is a switch: its flag alone (`--insecure`) means true, and
    it also takes a value (`--insecure=false`)."""
    word = text.strip().lower()
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}, got {text!r}")
    return word in TRUE_WORDS


def optional_host_port(text: str) -> str | None:
    """An address setting that may be left unset: the empty string (its default's text) is None."""
    return host_port(text) if text.strip() else None


def optional_path(text: str) -> Path | None:
    """A file setting that may be left unset: the empty string (its default's text) is None."""
    return Path(text) if text else None


class SettingError(Exception):
    """A setting's value parses but cannot work (e.g. the file it names is malformed
    or readable by others): the service refuses to start, with one line saying why
    and exit code 2, as for a bad flag (see stepstream_common.rpc.run_main)."""


@dataclass(frozen=True)
class ServiceConfig:
    """The settings every service has. A service's subclass declares listen and
    data_dir again with their defaults (metadata listen_setting, data_dir_setting),
    and every field of its own with setting() metadata."""

    # The subclass's: how --help names the command, and what it says the service is.
    prog: ClassVar[str]
    description: ClassVar[str]

    listen: str
    data_dir: Path
    heartbeat_interval: float = field(default=5.0, metadata=setting(
        "STEPSTREAM_HEARTBEAT_INTERVAL", "seconds between heartbeats on an idle stream (event stream or watch)",
        positive_float,
    ))
    prune_interval: float = field(default=60.0, metadata=setting(
        "STEPSTREAM_PRUNE_INTERVAL", "seconds between prunes of what the retention settings no longer keep",
        positive_float,
    ))
    shutdown_grace: float = field(default=5.0, metadata=setting(
        "STEPSTREAM_SHUTDOWN_GRACE", "seconds a graceful stop (SIGTERM) gives calls in flight before it cancels them",
        positive_float,
    ))
    log_level: str = field(default="info", metadata=setting(
        "STEPSTREAM_LOG_LEVEL", f"log verbosity (to stderr): {', '.join(LOG_LEVELS)}", _log_level,
    ))
    insecure: bool = field(default=False, metadata=setting(
        "STEPSTREAM_INSECURE",
        "serve an address other machines may reach without TLS and tokens (logged as a warning at every start); "
        "without it such a service refuses to start",
        boolean,
    ))
    tokens_file: Path | None = field(default=None, metadata=setting(
        "STEPSTREAM_TOKENS_FILE",
        "the tokens callers must present, with their roles (see stepstream_common.tokens); unset: no authentication",
        optional_path,
    ))
    tls_cert: Path | None = field(default=None, metadata=setting(
        "STEPSTREAM_TLS_CERT",
        "serve TLS with this certificate chain (PEM) and --tls-key; both are re-read when they change, "
        "so new connections get a renewed certificate and open ones keep going; unset: plaintext",
        optional_path,
    ))
    tls_key: Path | None = field(default=None, metadata=setting(
        "STEPSTREAM_TLS_KEY", "the private key (PEM, unencrypted) of --tls-cert", optional_path,
    ))
    tls_client_ca: Path | None = field(default=None, metadata=setting(
        "STEPSTREAM_TLS_CLIENT_CA",
        "require a client certificate signed by this CA (PEM) of every caller: mutual TLS, with --tls-cert; "
        "re-read when it changes; unset: no client certificate asked for",
        optional_path,
    ))
    # Limits against hostile or clumsy clients (the README's "Limits" table).
    max_request_bytes: int = field(default=4 * 1024 * 1024, metadata=setting(
        "STEPSTREAM_MAX_REQUEST_BYTES",
        "largest request message taken, in bytes; gRPC refuses a larger one (RESOURCE_EXHAUSTED) before reading it "
        "whole", positive_int,
    ))
    max_streams: int = field(default=10_000, metadata=setting(
        "STEPSTREAM_MAX_STREAMS",
        "most streams (event streams, snapshots, watches) open at once; past it a new one is RESOURCE_EXHAUSTED",
        positive_int,
    ))
    max_streams_per_connection: int = field(default=100, metadata=setting(
        "STEPSTREAM_MAX_STREAMS_PER_CONNECTION",
        "most streams open at once on one client connection; past it a new one is RESOURCE_EXHAUSTED", positive_int,
    ))
    max_streams_per_token: int = field(default=1_000, metadata=setting(
        "STEPSTREAM_MAX_STREAMS_PER_TOKEN",
        "most streams open at once with one token (with --tokens-file); past it a new one is RESOURCE_EXHAUSTED",
        positive_int,
    ))
    max_snapshots: int = field(default=8, metadata=setting(
        "STEPSTREAM_MAX_SNAPSHOTS",
        "most snapshots being sent at once (the orchestrator's StreamSnapshot, each holding a database read; "
        "the status service's WatchJobs current state, each holding its listing); past it RESOURCE_EXHAUSTED",
        positive_int,
    ))
    stream_stall_timeout: float = field(default=60.0, metadata=setting(
        "STEPSTREAM_STREAM_STALL_TIMEOUT",
        "seconds a stream waits for a client that takes none of its messages; then it lets go of what it holds "
        "and ends RESOURCE_EXHAUSTED", positive_float,
    ))
    metrics_listen: str | None = field(default=None, metadata=setting(
        "STEPSTREAM_METRICS_LISTEN",
        "serve Prometheus metrics over HTTP on this HOST:PORT (a listener of its own, plaintext, no tokens: "
        "keep it on a private address); port 0 picks a free one; unset: no metrics listener",
        optional_host_port,
    ))
    log_format: str = field(default="text", metadata=setting(
        "STEPSTREAM_LOG_FORMAT",
        "log line format (to stderr): text, or json (one object per line: timestamp, level, logger, message, "
        "and job_id, step, child, method, exc_info where they apply)", _log_format,
    ))

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> Self:
        """The config from `argv`'s flags, else their environment variables, else
        the dataclass defaults. A bad environment value is rejected as a bad flag
        is: one line naming the variable, exit code 2."""
        parser = argparse.ArgumentParser(prog=cls.prog, description=cls.description)
        add_options(parser, cls)
        return cls(**values_of(parser, cls, vars(parser.parse_args(argv))))


def add_options(parser: argparse.ArgumentParser, config_class: type[Any]) -> None:
    """A flag on `parser` for every setting of `config_class`; a flag not given is left out of the
    parsed values, so that values_of can take its environment variable, else the default."""
    for option in options(config_class):
        switch: dict[str, Any] = {"nargs": "?", "const": True} if option.parse is boolean else {}
        parser.add_argument(option.flag, dest=option.name, type=option.parse, default=argparse.SUPPRESS,
                            help=f"{option.help} (env {option.env}; default {option.default_text})", **switch)


def values_of(parser: argparse.ArgumentParser, config_class: type[Any], parsed: dict[str, Any]) -> dict[str, Any]:
    """`config_class`'s settings from the flags `parsed` (add_options made them), else their environment
    variables (a bad value exits 2 with one line naming the variable); unset ones keep their defaults."""
    values = {option.name: parsed[option.name] for option in options(config_class) if option.name in parsed}
    for option in options(config_class):
        if option.name not in values and option.env in os.environ:
            try:
                values[option.name] = _parse(option, os.environ[option.env])
            except argparse.ArgumentTypeError as error:
                parser.exit(2, f"{parser.prog}: error: environment variable {option.env}: {error}\n")
    return values


@dataclass(frozen=True)
class Option:
    """One config field as the command line and the docs show it."""

    name: str
    flag: str
    env: str
    help: str
    parse: Callable[[str], Any]
    default: Any
    default_text: str


def options(config_class: type[Any]) -> list[Option]:
    """Every field of `config_class` as an Option, in field order."""
    found = []
    for each in fields(config_class):
        if _SETTING not in each.metadata:
            raise TypeError(f"{config_class.__name__}.{each.name} is not a setting(): it has no flag or env twin")
        meta = each.metadata[_SETTING]
        default = each.default if each.default_factory is MISSING else each.default_factory()
        found.append(Option(
            name=each.name, flag=meta["flag"] or "--" + each.name.replace("_", "-"), env=meta["env"],
            help=meta["help"], parse=meta["parse"], default=default, default_text=meta["shown"] or _text(default),
        ))
    return found


def _text(value: Any) -> str:
    """A default as it would be written on the command line."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse(option: Option, text: str) -> Any:
    """`option.parse(text)`, any failure an ArgumentTypeError worded as argparse words a bad flag."""
    try:
        return option.parse(text)
    except (TypeError, ValueError) as error:
        name = getattr(option.parse, "__name__", "value")
        raise argparse.ArgumentTypeError(f"invalid {name} value: {text!r}") from error
