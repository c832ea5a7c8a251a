"""The web gateway's own settings (`stepstream web`): where it serves and how it
protects the page. Where it reads from (--status) and the credentials it
presents there (--token-file, --tls-*) are the CLI's, shared with every command."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stepstream.flags import host_port, positive_float, positive_int

from stepstream_common.config import boolean, optional_path, setting

DEFAULT_LISTEN = "127.0.0.1:8080"


@dataclass(frozen=True)
class WebConfig:
    listen: str = field(default=DEFAULT_LISTEN, metadata=setting(
        "STEPSTREAM_WEB_LISTEN", "address the page is served on; port 0 picks a free one", host_port,
    ))
    access_token_file: Path | None = field(default=None, metadata=setting(
        "STEPSTREAM_WEB_ACCESS_TOKEN_FILE",
        "file holding the token every request must carry (a bearer token, or the cookie a visit of "
        "/login?token=TOKEN sets); unset: no token asked for, allowed on a loopback address only",
        optional_path,
    ))
    https_cert: Path | None = field(default=None, metadata=setting(
        "STEPSTREAM_WEB_HTTPS_CERT", "serve HTTPS with this certificate chain (PEM) and --https-key; unset: HTTP",
        optional_path,
    ))
    https_key: Path | None = field(default=None, metadata=setting(
        "STEPSTREAM_WEB_HTTPS_KEY", "the private key (PEM, unencrypted) of --https-cert", optional_path,
    ))
    insecure: bool = field(default=False, metadata=setting(
        "STEPSTREAM_WEB_INSECURE",
        "serve an address other machines may reach without HTTPS and an access token (logged as a warning at "
        "every start); without it such a gateway refuses to start", boolean,
    ))
    heartbeat_interval: float = field(default=5.0, metadata=setting(
        "STEPSTREAM_WEB_HEARTBEAT_INTERVAL",
        "seconds between heartbeat events on a quiet page stream; the page shows itself stale after 3 missed",
        positive_float,
    ))
    send_timeout: float = field(default=15.0, metadata=setting(
        "STEPSTREAM_WEB_SEND_TIMEOUT",
        "seconds a page stream waits for a browser that reads nothing; then it is dropped and the browser "
        "reconnects from its Last-Event-ID", positive_float,
    ))
    max_streams: int = field(default=2_000, metadata=setting(
        "STEPSTREAM_WEB_MAX_STREAMS",
        "most page streams (job pages and jobs lists) open at once; past it a new one is answered 503",
        positive_int,
    ))
    max_output_streams: int = field(default=90, metadata=setting(
        "STEPSTREAM_WEB_MAX_OUTPUT_STREAMS",
        "most step output streams open at once, all on the gateway's one connection to the orchestrator: keep it "
        "below the orchestrator's --max-streams-per-connection (100); past it a new one is answered 503",
        positive_int,
    ))
