"""How the services log: to stderr, as text for a person (--log-format text) or
one JSON object per line for a log pipeline (--log-format json).

A JSON line has timestamp (RFC 3339, UTC), level, logger and message; and,
where the line is about one, job_id, step, child (a fan-out child's index) and
method (the gRPC method being served); and exc_info, the traceback as one
string. Those context fields come from the record's `extra=` if it has them,
else from the context variables log_context() sets: a job's task sets job_id
once and every line logged inside it carries it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The context fields a JSON line may carry, in the order it shows them.
CONTEXT_FIELDS = ("job_id", "step", "child", "method")
_CONTEXT: dict[str, contextvars.ContextVar[str | int | None]] = {
    name: contextvars.ContextVar(f"stepstream_log_{name}", default=None) for name in CONTEXT_FIELDS
}


@contextlib.contextmanager
def log_context(**fields: str | int | None) -> Iterator[None]:
    """Within the block, lines logged in this context carry `fields` (names from
    CONTEXT_FIELDS; None: without that field). Tasks created inside inherit them."""
    tokens = [(_CONTEXT[name], _CONTEXT[name].set(value)) for name, value in fields.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def set_log_context(**fields: str | int | None) -> None:
    """As log_context, for the rest of the current task (or context) rather than a block."""
    for name, value in fields.items():
        _CONTEXT[name].set(value)


def current_context() -> dict[str, str | int]:
    """The context fields set where this runs."""
    found = {name: var.get() for name, var in _CONTEXT.items()}
    return {name: value for name, value in found.items() if value is not None}


def rfc3339(created: float) -> str:
    """A record's time as RFC 3339 in UTC, to the millisecond: 2026-12-01T12:30:00.123Z."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (json.dumps escapes any newline)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = current_context()
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is None:
                value = context.get(name)
            if value is not None:
                line[name] = value if isinstance(value, (str, int)) else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for --log-format `log_format` (one of LOG_FORMATS)."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}, got {log_format!r}")


# Libraries whose debug lines are no event of ours and may quote what must not be
# logged (aiosqlite logs every statement with its parameters, the paging secret
# among them): never below WARNING, whatever --log-level says.
QUIET_LOGGERS = ("aiosqlite",)


def configure(level: str, log_format: str = "text") -> None:
    """Log records at `level` and above to stderr in `log_format`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
