"""Status service settings: each field is a flag with an environment-variable twin
(stepstream_common.config.setting), its default and help stated only here."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from stepstream.channel import DEFAULT_ORCHESTRATOR, DEFAULT_STATUS, server_name
from stepstream.flags import host_ports, positive_float, positive_int

from stepstream_common.config import (
    ServiceConfig,
    data_dir_setting,
    default_data_dir,
    listen_setting,
    optional_path,
    setting,
)

SQLITE_SCHEME = "sqlite://"
POSTGRES_SCHEMES = ("postgresql", "postgres")


def store_url(text: str) -> str | None:
    """--store: "" (the default: SQLite under --data-dir), sqlite://PATH, or a
    postgresql:// URL without a password (a flag or an environment listing would
    show it: the password comes from PGPASSWORD, PGPASSFILE or --store-password-file).
    The message of a refusal never repeats the URL."""
    if not text:
        return None
    if text.startswith(SQLITE_SCHEME):
        if not text[len(SQLITE_SCHEME):]:
            raise argparse.ArgumentTypeError("expected sqlite://PATH, got no path")
        return text
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a URL: {error}") from None
    if parts.scheme not in POSTGRES_SCHEMES:
        raise argparse.ArgumentTypeError(
            "expected sqlite://PATH or postgresql://USER@HOST:PORT/DATABASE (the URL is not repeated here)"
        )
    if password is not None or "password" in parse_qs(parts.query):
        raise argparse.ArgumentTypeError(
            "a password in the store URL would show in ps and in the environment: give it in PGPASSWORD, "
            "PGPASSFILE or --store-password-file instead (the URL is not repeated here)"
        )
    return text


@dataclass(frozen=True)
class StatusConfig(ServiceConfig):
    prog = "python -m status_svc"
    description = "stepstream status service: persists step_stats and serves snapshots and watches."

    listen: str = field(default=DEFAULT_STATUS, metadata=listen_setting("status"))
    data_dir: Path = field(
        default_factory=lambda: default_data_dir("status"),
        metadata=data_dir_setting("status", "where the step_stats database (status.sqlite3) lives"),
    )
    store: str | None = field(default=None, metadata=setting(
        "STEPSTREAM_STATUS_STORE",
        "where step_stats lives: sqlite://PATH (a file), or postgresql://USER@HOST:PORT/DATABASE (tables in the "
        "database's schema stepstream; several replicas may share it); no password in it: see "
        "--store-password-file; unset: SQLite in --data-dir (status.sqlite3)", store_url,
    ))
    store_password_file: Path | None = field(default=None, metadata=setting(
        "STEPSTREAM_STATUS_STORE_PASSWORD_FILE",
        "file (mode 0600) holding the PostgreSQL password of --store; unset: libpq's PGPASSWORD or PGPASSFILE "
        "(~/.pgpass), else none", optional_path,
    ))
    store_pool_size: int = field(default=10, metadata=setting(
        "STEPSTREAM_STATUS_STORE_POOL_SIZE",
        "most PostgreSQL connections the reads (GetJob, ListJobs, watches catching up) use at once; the writer "
        "has one more of its own", positive_int,
    ))
    store_timeout: float = field(default=60.0, metadata=setting(
        "STEPSTREAM_STATUS_STORE_TIMEOUT",
        "seconds a PostgreSQL statement, a connection attempt or a wait for a pooled connection may take before "
        "the store gives up on it (as on a lost connection: UNAVAILABLE, the replica reports the trouble)",
        positive_float,
    ))
    # Not STEPSTREAM_ORCHESTRATOR: to the CLI that is the one orchestrator it calls.
    orchestrators: list[str] = field(default_factory=lambda: [DEFAULT_ORCHESTRATOR], metadata=setting(
        "STEPSTREAM_STATUS_ORCHESTRATORS", "orchestrator(s) to follow, comma-separated HOST:PORT", host_ports,
        flag="--orchestrator",
    ))
    stale_after: float = field(default=15.0, metadata=setting(
        "STEPSTREAM_STALE_AFTER",
        "seconds without a message from an orchestrator before its unfinished jobs are shown stale", positive_float,
    ))
    retain_changes: int = field(default=1_000_000, metadata=setting(
        "STEPSTREAM_RETAIN_CHANGES", "how many of the newest revisions the change log keeps for resuming watches",
        positive_int,
    ))
    watcher_queue: int = field(default=10_000, metadata=setting(
        "STEPSTREAM_STATUS_WATCHER_QUEUE",
        "a watch more than this many changes behind reads from the change log instead of memory", positive_int,
    ))
    max_wait_applied: float = field(default=30.0, metadata=setting(
        "STEPSTREAM_MAX_WAIT_APPLIED",
        "longest wait, in seconds, of a read that asks for not_older_than an orchestrator position "
        "(the call's deadline may be shorter)", positive_float,
    ))
    orchestrator_token_file: Path | None = field(default=None, metadata=setting(
        "STEPSTREAM_STATUS_ORCHESTRATOR_TOKEN_FILE",
        "file holding the token (role follower) this service presents to the orchestrators it follows; "
        "unset: none", optional_path,
    ))
    # Dialing the orchestrators with TLS: on when any of these is set.
    orchestrator_tls_ca: Path | None = field(default=None, metadata=setting(
        "STEPSTREAM_STATUS_ORCHESTRATOR_TLS_CA",
        "CA certificate (PEM) that verifies the orchestrators' certificates; setting any --orchestrator-tls-* "
        "dials them with TLS, verified against the system's trusted CAs without this; unset: plaintext",
        optional_path,
    ))
    orchestrator_tls_server_name: str | None = field(default=None, metadata=setting(
        "STEPSTREAM_STATUS_ORCHESTRATOR_TLS_SERVER_NAME",
        "the name the orchestrators' certificates must carry, instead of the host dialed; unset: that host",
        server_name,
    ))
    orchestrator_tls_cert: Path | None = field(default=None, metadata=setting(
        "STEPSTREAM_STATUS_ORCHESTRATOR_TLS_CERT",
        "client certificate (PEM) this service shows orchestrators that require one (mutual TLS), with "
        "--orchestrator-tls-key; read at start; unset: none", optional_path,
    ))
    orchestrator_tls_key: Path | None = field(default=None, metadata=setting(
        "STEPSTREAM_STATUS_ORCHESTRATOR_TLS_KEY", "the private key (PEM) of --orchestrator-tls-cert", optional_path,
    ))
    # A limit against hostile or clumsy clients (the README's "Limits" table).
    max_watchers_per_job: int = field(default=1_000, metadata=setting(
        "STEPSTREAM_MAX_WATCHERS_PER_JOB", "most WatchJob streams of one job open at once; past it RESOURCE_EXHAUSTED",
        positive_int,
    ))
    # Replicas on one PostgreSQL store (status_svc.replication); unused with SQLite.
    lease_ttl: float = field(default=10.0, metadata=setting(
        "STEPSTREAM_STATUS_LEASE_TTL",
        "PostgreSQL store: seconds the ingest lease lasts unless renewed (every third of it); a replica that "
        "hangs while holding it is replaced after this", positive_float,
    ))
    poll_interval: float = field(default=1.0, metadata=setting(
        "STEPSTREAM_STATUS_POLL_INTERVAL",
        "PostgreSQL store: seconds between a replica's reads of the change log without a notification, and "
        "between its tries for the ingest lease (a killed holder is replaced within about this)", positive_float,
    ))
