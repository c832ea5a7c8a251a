"""Typed errors: every failure carries its gRPC code, message and field violations."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class Violation:
    """One bad field, e.g. `definition.steps[1].timeout`."""

    field: str
    description: str


class StepstreamError(Exception):
    """Base of every error the SDK raises."""

    def __init__(self, message: str, violations: list[Violation] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.violations = violations or []


class DefinitionError(StepstreamError):
    """A definition file or dict that cannot even be turned into a JobDefinition."""


class RpcError(StepstreamError):
    """A call failed; `code` is the gRPC status code."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        violations: list[Violation] | None = None,
        metadata: dict[str, str] | None = None,
        reason: str = "",
        attempts: int = 1,
    ) -> None:
        super().__init__(message, violations)
        # google.rpc.ErrorInfo, when the server sent one (e.g. OUT_OF_RANGE cursors).
        self.reason = reason
        self.metadata = metadata or {}
        # How many times the call was sent (more than 1 only for a retried idempotent call).
        self.attempts = attempts


class InvalidArgumentError(RpcError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(RpcError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(RpcError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRangeError(RpcError):
    code = grpc.StatusCode.OUT_OF_RANGE


class UnavailableError(RpcError):
    """The service could not be reached (or is shutting down)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(RpcError):
    """No answer within the call's timeout (a hung or overloaded service, or a slow network)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(RpcError):
    """The service does not accept the caller: no token, or one it does not know
    (`reason` TOKEN_MISSING or TOKEN_INVALID). Never retried: it would be refused again."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(RpcError):
    """The token's role may not make this call; the message names the role it needs
    (`reason` ROLE_NOT_ALLOWED, `metadata` method, role, allowed). Never retried."""

    code = grpc.StatusCode.PERMISSION_DENIED


_BY_CODE: dict[grpc.StatusCode, type[RpcError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError, NotFoundError, FailedPreconditionError, OutOfRangeError, UnavailableError,
        DeadlineExceededError, UnauthenticatedError, PermissionDeniedError,
    )
}


def from_rpc_error(error: grpc.aio.AioRpcError, *, target: str = "", attempts: int = 1) -> RpcError:
    """The typed error for a failed call, with the google.rpc details it carried.

    `target` names what was called (e.g. "the status service at 127.0.0.1:50052")
    so that UNAVAILABLE says which address could not be reached, and a refused
    token which service refused it. `attempts`: how
    many times a retried call was sent; the message says so when more than once.
    """
    violations: list[Violation] = []
    metadata: dict[str, str] = {}
    reason = ""
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        status = None
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(Violation(v.field, v.description) for v in bad_request.field_violations)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            metadata = dict(info.metadata)
    cls = _BY_CODE.get(error.code(), RpcError)
    message = error.details() or error.code().name
    if cls is UnavailableError and target:
        message = f"cannot reach {target} ({_last_clause(message)})"
    elif cls in (UnauthenticatedError, PermissionDeniedError) and target:
        message = f"{target} refused the call: {message}"
    if attempts > 1:
        message = f"{message}; gave up after {attempts} attempts"
    typed = cls(message, violations, metadata, reason, attempts)
    if cls is RpcError:
        typed.code = error.code()
    return typed


def _last_clause(details: str) -> str:
    """gRPC's connection errors run on for a whole paragraph; the last clause says why
    (a failed TLS handshake's paragraph ends in a bare status word, "OK", after it)."""
    clauses = [clause.strip() for clause in details.split(": ")]
    telling = [clause for clause in clauses if clause and clause != "OK"]
    return telling[-1] if telling else details
