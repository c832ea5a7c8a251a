"""The flags every service has, and where services keep their data by default."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from stepstream.flags import env_option, host_port, positive_float


def default_data_dir(service: str) -> Path:
    """$XDG_DATA_HOME/stepstream/SERVICE, or ~/.local/share/stepstream/SERVICE."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "stepstream" / service


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
