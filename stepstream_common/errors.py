"""Errors meant for the caller, free of gRPC so domain code can raise them.

stepstream_common.rpc maps each to its gRPC status code and google.rpc details.
"""

from __future__ import annotations

from dataclasses import dataclass

# How much of a client's string an error message quotes: errors travel in gRPC
# trailers, which clients cap at a few KB, so a message echoing a 1 MB job id
# whole would reach the caller as a transport failure instead of the error.
MAX_QUOTED_CHARS = 64


def quoted(value: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """`repr(value)` for an error message that quotes client input, bounded: of a
    longer string, its first `limit` characters and its length; of anything
    else, the first `limit` characters of its repr."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field, named by its path in the request (e.g. `steps[1].timeout`)."""

    field: str
    description: str


class ServiceError(Exception):
    """Base of the errors a caller can act on."""


# The google.rpc.ErrorInfo reason of an InvalidArgumentError whose request is over a size limit.
LIMIT_EXCEEDED = "LIMIT_EXCEEDED"


class InvalidArgumentError(ServiceError):
    """A request the service will not take as it is. `limits`, when the request
    is over some of the service's size limits, maps each such limit's setting
    (its flag without the dashes, e.g. "max-steps") to its value: it travels as
    a google.rpc.ErrorInfo (reason LIMIT_EXCEEDED), so an operator learns which
    setting to raise, while the field violations say what to shrink."""

    def __init__(
        self, message: str, violations: list[FieldViolation] | None = None, *, limits: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.violations = violations or []
        self.limits = limits or {}


class NotFoundError(ServiceError):
    pass


class FailedPreconditionError(ServiceError):
    pass


class UnavailableError(ServiceError):
    """The service cannot answer correctly right now; the same call may succeed later.

    `reason` and `metadata`, if given, travel as google.rpc.ErrorInfo."""

    def __init__(self, message: str, reason: str = "", metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = metadata or {}


# The reasons of a CursorOutOfRangeError, as clients read them in its google.rpc.ErrorInfo.
CURSOR_TOO_OLD = "CURSOR_TOO_OLD"  # older than what is retained
CURSOR_UNKNOWN = "CURSOR_UNKNOWN"  # from another log, or ahead of this one


class CursorOutOfRangeError(ServiceError):
    """A resume cursor the server cannot serve; the caller must resync from a
    snapshot. `reason` is CURSOR_TOO_OLD or CURSOR_UNKNOWN."""

    def __init__(self, reason: str, message: str, *, oldest: int, latest: int, log_id: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.oldest = oldest
        self.latest = latest
        self.log_id = log_id


class AuthError(ServiceError):
    """The caller may not make this call (see stepstream_common.auth); `reason`
    and `metadata` travel as google.rpc.ErrorInfo, so a client can tell why
    without parsing the message."""

    def __init__(self, message: str, reason: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = metadata or {}


class UnauthenticatedError(AuthError):
    """No token, or one the service does not know: UNAUTHENTICATED."""


class PermissionDeniedError(AuthError):
    """A known token whose role does not allow the call: PERMISSION_DENIED."""


class ResourceExhaustedError(ServiceError):
    """A limit the service keeps so that no client, hostile or clumsy, can take
    what the others need (memory, threads, database transactions): RESOURCE_EXHAUSTED.

    The caller learns which limit from google.rpc details: a QuotaFailure whose
    one violation names `subject` (what was counted, e.g. "connection
    ipv4:127.0.0.1:5000") and an ErrorInfo whose `reason` says which limit
    (e.g. STREAMS_PER_CONNECTION), with metadata `setting` (the flag that sets
    it) and `limit` (its value). Retrying later may succeed; retrying at once
    usually does not.
    """

    def __init__(self, message: str, *, reason: str, subject: str, setting: str, limit: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.subject = subject
        self.setting = setting
        self.limit = limit
