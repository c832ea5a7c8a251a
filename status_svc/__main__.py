"""`python -m status_svc --listen HOST:PORT --data-dir DIR --orchestrator HOST:PORT` (see --help)."""

from __future__ import annotations

import asyncio
import sys

from status_svc.app import LABEL, start
from status_svc.config import parse_args
from stepstream_common.rpc import configure_logging, serve_until_signalled


async def _serve(argv: list[str] | None) -> None:
    config = parse_args(argv)
    configure_logging(config.log_level)
    service = await start(config)
    await serve_until_signalled(service.server, LABEL, service.stop, service.run_until_stopped)


def main(argv: list[str] | None = None) -> None:
    try:
        asyncio.run(_serve(argv))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
