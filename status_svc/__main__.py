"""`python -m status_svc --listen HOST:PORT --data-dir DIR --orchestrator HOST:PORT` (see --help)."""

from __future__ import annotations

from status_svc.app import LABEL, start_service
from status_svc.config import StatusConfig
from stepstream_common.rpc import run_main


def main(argv: list[str] | None = None) -> None:
    run_main(LABEL, StatusConfig.from_args, start_service, argv)


if __name__ == "__main__":
    main()
