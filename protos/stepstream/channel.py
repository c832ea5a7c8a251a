"""How every party dials a stepstream service: the default addresses and the
channel options (keepalive, message size) servers and clients agree on."""

from __future__ import annotations

from typing import Any

ORCHESTRATOR_PORT = 50051
STATUS_PORT = 50052
DEFAULT_ORCHESTRATOR = f"127.0.0.1:{ORCHESTRATOR_PORT}"
DEFAULT_STATUS = f"127.0.0.1:{STATUS_PORT}"

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
