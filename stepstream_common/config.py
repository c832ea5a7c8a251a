"""Command-line flags that each have an environment-variable twin."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def default_data_dir(service: str) -> Path:
    """$XDG_DATA_HOME/stepstream/SERVICE, or ~/.local/share/stepstream/SERVICE."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "stepstream" / service


def env_option(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    *,
    default: str | None,
    help: str,
    type: Callable[[str], Any] = str,
    **kwargs: Any,
) -> None:
    """Add `flag`, defaulting to $env, then to `default` (strings go through `type`)."""
    value = os.environ.get(env, default)
    shown = f" (env {env}; default {default})" if default is not None else f" (env {env})"
    parser.add_argument(flag, default=value, type=type, help=help + shown, **kwargs)


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def host_port(text: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text.strip()


def host_ports(text: str) -> list[str]:
    """A comma-separated list of HOST:PORT."""
    addresses = [host_port(part) for part in text.split(",") if part.strip()]
    if not addresses:
        raise argparse.ArgumentTypeError("expected at least one HOST:PORT")
    return addresses


def service_parser(
    service: str, description: str, *, default_listen: str, data_help: str, heartbeat_help: str
) -> argparse.ArgumentParser:
    """A service's parser with the flags every service has: --listen, --data-dir,
    --heartbeat-interval and --log-level (env STEPSTREAM_<SERVICE>_LISTEN, ...)."""
    parser = argparse.ArgumentParser(prog=f"python -m {service}_svc", description=description)
    prefix = f"STEPSTREAM_{service.upper()}"
    env_option(parser, "--listen", f"{prefix}_LISTEN", default=default_listen, type=host_port,
               help="address to serve on (port 0 picks a free port)")
    env_option(parser, "--data-dir", f"{prefix}_DATA_DIR", default=str(default_data_dir(service)), type=Path,
               help=data_help)
    env_option(parser, "--heartbeat-interval", "STEPSTREAM_HEARTBEAT_INTERVAL", default="5", type=positive_float,
               help=heartbeat_help)
    env_option(parser, "--log-level", "STEPSTREAM_LOG_LEVEL", default="info",
               choices=["debug", "info", "warning", "error"], help="log verbosity (to stderr)")
    return parser
