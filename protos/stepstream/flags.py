"""Command-line flags that each have an environment-variable twin, and the
value types stepstream's commands accept: the convention the CLI and both
services follow, so a flag and its variable mean the same everywhere."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any


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
