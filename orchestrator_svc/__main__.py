"""`python -m orchestrator_svc --listen HOST:PORT --data-dir DIR` (see --help)."""

from __future__ import annotations

import asyncio
import sys

from orchestrator_svc.app import LABEL, start
from orchestrator_svc.config import parse_args
from stepstream_common.rpc import configure_logging, serve_until_signalled


async def _serve(argv: list[str] | None) -> None:
    config = parse_args(argv)
    configure_logging(config.log_level)
    orchestrator = await start(config)
    await serve_until_signalled(orchestrator.server, LABEL, orchestrator.stop, orchestrator.run_until_stopped)


def main(argv: list[str] | None = None) -> None:
    try:
        asyncio.run(_serve(argv))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
