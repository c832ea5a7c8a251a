"""Orchestrator settings from flags and their environment-variable twins."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stepstream.channel import DEFAULT_ORCHESTRATOR
from stepstream.flags import env_option, positive_float, positive_int

from stepstream_common.config import service_parser

DEFAULT_LISTEN = DEFAULT_ORCHESTRATOR


@dataclass(frozen=True)
class OrchestratorConfig:
    listen: str = DEFAULT_LISTEN
    data_dir: Path = Path("data/orchestrator")
    heartbeat_interval: float = 5.0
    kill_grace: float = 5.0
    retain_events: int = 1_000_000
    job_retention_days: float = 7.0
    # Seconds between prunes of the event log and of old finished jobs.
    prune_interval: float = 60.0
    # A stream more than this many events behind reads from the log instead.
    subscriber_queue: int = 10_000
    shutdown_grace: float = 5.0
    log_level: str = "info"


def parse_args(argv: list[str] | None = None) -> OrchestratorConfig:
    parser = service_parser(
        "orchestrator", "stepstream orchestrator: runs jobs and streams every step transition.",
        default_listen=DEFAULT_LISTEN, data_help="where the event log lives",
        heartbeat_help="seconds between heartbeats on an idle event stream",
    )
    env_option(parser, "--kill-grace", "STEPSTREAM_KILL_GRACE", default="5", type=positive_float,
               help="seconds between SIGTERM and SIGKILL when stopping a command")
    env_option(parser, "--retain-events", "STEPSTREAM_RETAIN_EVENTS", default="1000000", type=positive_int,
               help="how many of the newest events the log keeps for resuming streams")
    env_option(parser, "--job-retention-days", "STEPSTREAM_JOB_RETENTION_DAYS", default="7",
               type=positive_float, help="finished jobs older than this are forgotten")
    args = parser.parse_args(argv)
    return OrchestratorConfig(
        listen=args.listen,
        data_dir=args.data_dir,
        heartbeat_interval=args.heartbeat_interval,
        kill_grace=args.kill_grace,
        retain_events=args.retain_events,
        job_retention_days=args.job_retention_days,
        log_level=args.log_level,
    )
