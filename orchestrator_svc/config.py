"""Orchestrator settings: each field is a flag with an environment-variable twin
(stepstream_common.config.setting), its default and help stated only here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stepstream.channel import DEFAULT_ORCHESTRATOR
from stepstream.flags import positive_float, positive_int

from stepstream_common.config import (
    ServiceConfig,
    data_dir_setting,
    default_data_dir,
    listen_setting,
    setting,
)


@dataclass(frozen=True)
class OrchestratorConfig(ServiceConfig):
    prog = "python -m orchestrator_svc"
    description = "stepstream orchestrator: runs jobs and streams every step transition."

    listen: str = field(default=DEFAULT_ORCHESTRATOR, metadata=listen_setting("orchestrator"))
    data_dir: Path = field(
        default_factory=lambda: default_data_dir("orchestrator"),
        metadata=data_dir_setting("orchestrator", "where the event log (orchestrator.sqlite3) lives"),
    )
    kill_grace: float = field(default=5.0, metadata=setting(
        "STEPSTREAM_KILL_GRACE", "seconds between SIGTERM and SIGKILL when stopping a command", positive_float,
    ))
    retain_events: int = field(default=1_000_000, metadata=setting(
        "STEPSTREAM_RETAIN_EVENTS", "how many of the newest events the log keeps for resuming streams", positive_int,
    ))
    job_retention_days: float = field(default=7.0, metadata=setting(
        "STEPSTREAM_JOB_RETENTION_DAYS", "finished jobs older than this many days are forgotten", positive_float,
    ))
    subscriber_queue: int = field(default=10_000, metadata=setting(
        "STEPSTREAM_ORCHESTRATOR_SUBSCRIBER_QUEUE",
        "a stream more than this many events behind reads from the log instead of memory", positive_int,
    ))

