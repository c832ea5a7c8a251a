"""`python -m orchestrator_svc --listen HOST:PORT --data-dir DIR` (see --help)."""

from __future__ import annotations

from orchestrator_svc.app import LABEL, start
from orchestrator_svc.config import OrchestratorConfig
from stepstream_common.rpc import run_main


def main(argv: list[str] | None = None) -> None:
    run_main(LABEL, OrchestratorConfig.from_args, start, argv)


if __name__ == "__main__":
    main()
