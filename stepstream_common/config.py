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

from stepstream.flags import host_port, positive_float

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

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> Self:
        """The config from `argv`'s flags, else their environment variables, else
        the dataclass defaults. A bad environment value is rejected as a bad flag
        is: one line naming the variable, exit code 2."""
        parser = argparse.ArgumentParser(prog=cls.prog, description=cls.description)
        every = options(cls)
        for option in every:
            parser.add_argument(option.flag, dest=option.name, type=option.parse, default=argparse.SUPPRESS,
                                help=f"{option.help} (env {option.env}; default {option.default_text})")
        values = vars(parser.parse_args(argv))
        for option in every:
            if option.name not in values and option.env in os.environ:
                try:
                    values[option.name] = _parse(option, os.environ[option.env])
                except argparse.ArgumentTypeError as error:
                    parser.exit(2, f"{parser.prog}: error: environment variable {option.env}: {error}\n")
        return cls(**values)


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


def options(config_class: type[ServiceConfig]) -> list[Option]:
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
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _parse(option: Option, text: str) -> Any:
    """`option.parse(text)`, any failure an ArgumentTypeError worded as argparse words a bad flag."""
    try:
        return option.parse(text)
    except (TypeError, ValueError) as error:
        name = getattr(option.parse, "__name__", "value")
        raise argparse.ArgumentTypeError(f"invalid {name} value: {text!r}") from error
