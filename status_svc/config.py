"""Status service settings from flags and their environment-variable twins."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stepstream.channel import DEFAULT_ORCHESTRATOR, DEFAULT_STATUS
from stepstream.flags import env_option, host_ports, positive_float, positive_int

from stepstream_common.config import service_parser

DEFAULT_LISTEN = DEFAULT_STATUS


@dataclass(frozen=True)
class StatusConfig:
    listen: str = DEFAULT_LISTEN
    data_dir: Path = Path("data/status")
    orchestrators: list[str] = field(default_factory=lambda: [DEFAULT_ORCHESTRATOR])
    heartbeat_interval: float = 5.0
    # An orchestrator not heard from for this long makes its unfinished jobs stale.
    stale_after: float = 15.0
    retain_changes: int = 1_000_000
    prune_interval: float = 60.0
    # A watcher more than this many changes behind reads from the change log instead.
    watcher_queue: int = 10_000
    shutdown_grace: float = 5.0
    # The longest a read with not_older_than waits for ingest to catch up (the call's deadline may be shorter).
    max_wait_applied: float = 30.0
    log_level: str = "info"


def parse_args(argv: list[str] | None = None) -> StatusConfig:
    parser = service_parser(
        "status", "stepstream status service: persists step_stats and serves snapshots and watches.",
        default_listen=DEFAULT_LISTEN, data_help="where the step_stats database lives",
        heartbeat_help="seconds between heartbeats on an idle watch",
    )
    env_option(parser, "--orchestrator", "STEPSTREAM_ORCHESTRATOR", default=DEFAULT_ORCHESTRATOR, type=host_ports,
               help="orchestrator(s) to follow, comma-separated HOST:PORT")
    env_option(parser, "--stale-after", "STEPSTREAM_STALE_AFTER", default="15", type=positive_float,
               help="seconds without a message from an orchestrator before its jobs are shown stale")
    env_option(parser, "--retain-changes", "STEPSTREAM_RETAIN_CHANGES", default="1000000", type=positive_int,
               help="how many of the newest revisions the change log keeps for resuming watches")
    env_option(parser, "--max-wait-applied", "STEPSTREAM_MAX_WAIT_APPLIED", default="30", type=positive_float,
               help="longest wait, in seconds, of a read that asks for not_older_than an orchestrator position")
    args = parser.parse_args(argv)
    return StatusConfig(
        listen=args.listen,
        data_dir=args.data_dir,
        orchestrators=args.orchestrator,
        heartbeat_interval=args.heartbeat_interval,
        stale_after=args.stale_after,
        retain_changes=args.retain_changes,
        max_wait_applied=args.max_wait_applied,
        log_level=args.log_level,
    )
