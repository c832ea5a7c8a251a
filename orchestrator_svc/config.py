"""Orchestrator settings: each field is a flag with an environment-variable twin
(stepstream_common.config.setting), its default and help stated only here."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from stepstream.channel import DEFAULT_ORCHESTRATOR
from stepstream.flags import positive_float, positive_int

from orchestrator_svc.domain.spec import DefinitionLimits
from orchestrator_svc.output import OutputSettings
from stepstream_common.config import (
    ServiceConfig,
    data_dir_setting,
    default_data_dir,
    listen_setting,
    setting,
)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_names(text: str) -> list[str]:
    """A comma-separated list of environment variable names; "" is none."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if not _ENV_NAME.fullmatch(name):
            raise argparse.ArgumentTypeError(f"expected NAME[,NAME...] of letters, digits and '_', got {name!r}")
    return names


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
    # Step output (orchestrator_svc.output): kept under <data dir>/output, apart from the event log.
    output_limit: int = field(default=OutputSettings.limit_bytes, metadata=setting(
        "STEPSTREAM_OUTPUT_LIMIT",
        "most bytes of output kept per attempt of a step or child, as stored (lines plus 33 bytes per read "
        "of its output); past it lines are dropped and counted", positive_int,
    ))
    output_chunk_bytes: int = field(default=OutputSettings.chunk_bytes, metadata=setting(
        "STEPSTREAM_OUTPUT_CHUNK_BYTES", "a longer output line is kept as several records of at most this many bytes",
        positive_int,
    ))
    output_rate: int = field(default=OutputSettings.rate_bytes, metadata=setting(
        "STEPSTREAM_OUTPUT_RATE",
        "bytes per second of commands' output captured, all steps together; past it the loudest commands are slowed "
        "(their pipes fill) so that capturing never starves the event log", positive_int,
    ))
    output_retention_days: float = field(default=7.0, metadata=setting(
        "STEPSTREAM_OUTPUT_RETENTION_DAYS",
        "a finished job's output goes once its last line is older than this many days (a running job's never)",
        positive_float,
    ))
    subscriber_queue: int = field(default=10_000, metadata=setting(
        "STEPSTREAM_ORCHESTRATOR_SUBSCRIBER_QUEUE",
        "a stream more than this many events behind reads from the log instead of memory", positive_int,
    ))
    max_concurrent_work: int = field(default=1000, metadata=setting(
        "STEPSTREAM_MAX_CONCURRENT_WORK",
        "most steps and fan-out children running at once, across all jobs; the rest wait pending", positive_int,
    ))
    # Commands start from a minimal environment (workers/processes.py: start_environment).
    pass_env: list[str] = field(default_factory=list, metadata=setting(
        "STEPSTREAM_PASS_ENV",
        "names of the orchestrator's environment variables commands also get, comma-separated "
        "(commands start with only PATH, HOME, LANG and TZ of it)", env_names,
    ))
    # Limits against hostile or clumsy clients (the README's "Limits" table). A
    # definition over one is INVALID_ARGUMENT (see orchestrator_svc.domain.spec.DefinitionLimits).
    max_submit_bytes: int = field(default=8 * 1024 * 1024, metadata=setting(
        "STEPSTREAM_MAX_SUBMIT_BYTES",
        "most bytes of SubmitJob requests being checked and recorded at once (one request alone always is); "
        "past it a submission is RESOURCE_EXHAUSTED", positive_int,
    ))
    max_steps: int = field(default=DefinitionLimits.max_steps, metadata=setting(
        "STEPSTREAM_MAX_STEPS", "most steps in a job definition", positive_int,
    ))
    max_dependencies: int = field(default=DefinitionLimits.max_dependencies, metadata=setting(
        "STEPSTREAM_MAX_DEPENDENCIES", "most entries in one step's depends_on", positive_int,
    ))
    max_name_chars: int = field(default=DefinitionLimits.max_name_chars, metadata=setting(
        "STEPSTREAM_MAX_NAME_CHARS", "longest job name, in characters", positive_int,
    ))
    max_string_chars: int = field(default=DefinitionLimits.max_string_chars, metadata=setting(
        "STEPSTREAM_MAX_STRING_CHARS",
        "longest string in a step's params (command arguments, env values, fan-out items, keys), in characters",
        positive_int,
    ))
    max_fanout_children: int = field(default=DefinitionLimits.max_fanout_children, metadata=setting(
        "STEPSTREAM_MAX_FANOUT_CHILDREN", "most children of one fan-out step (its items, or its count)", positive_int,
    ))
    max_fanout_concurrency: int = field(default=DefinitionLimits.max_fanout_concurrency, metadata=setting(
        "STEPSTREAM_MAX_FANOUT_CONCURRENCY", "largest `concurrency` a fan-out step may ask for", positive_int,
    ))
    max_params_depth: int = field(default=DefinitionLimits.max_params_depth, metadata=setting(
        "STEPSTREAM_MAX_PARAMS_DEPTH", "most levels of tables and lists nested in a step's params", positive_int,
    ))
    max_params_bytes: int = field(default=DefinitionLimits.max_params_bytes, metadata=setting(
        "STEPSTREAM_MAX_PARAMS_BYTES", "most bytes of params in a job definition, all steps together, as encoded",
        positive_int,
    ))
    max_output_limit: int = field(default=DefinitionLimits.max_output_limit, metadata=setting(
        "STEPSTREAM_MAX_OUTPUT_LIMIT", "largest `output_limit` a step may ask for, in bytes per attempt", positive_int,
    ))
