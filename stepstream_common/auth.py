"""Who may call what, enforced in one place: a server interceptor that checks
every call's bearer token against one table of rules.

The model is Kubernetes' bearer tokens with RBAC roles (and Temporal's API
keys): a call carries `authorization: Bearer NAME.SECRET` metadata; the
service knows each token's NAME, role and a slow hash of its SECRET from its
tokens file (stepstream_common.tokens).

- RULES is the one table: each method's full name -> the roles that may call
  it. Deny by default: a service refuses to start unless every method it
  serves (its own, reflection's, health's) has a rule (check_rules, called by
  stepstream_common.rpc.start_server), and a call to a method without one is
  denied.
- Health is open to anyone: probes (a load balancer, Kubernetes) carry no
  token, and it says nothing but SERVING or not. Reflection, which describes
  the whole API, needs a reader's role.
- UNAUTHENTICATED when the token is missing or unknown (google.rpc.ErrorInfo
  reason TOKEN_MISSING or TOKEN_INVALID); PERMISSION_DENIED, naming the roles
  the method needs, when the token's role is not one of them (reason
  ROLE_NOT_ALLOWED, metadata `method`, `role`, `allowed`), both in domain
  "stepstream".
- The servicers learn who calls from caller_name(), which the orchestrator
  records as a job's submitted_by and cancelled_by.
- No token, nor any part of one, is ever logged: a denial is logged with the
  method and the token's NAME only once the token is proven.

Without a tokens file there is no interceptor at all: every call is allowed
and caller_name() is "".
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from stepstream.channel import AUTHORIZATION

from stepstream_common.config import SettingError
from stepstream_common.errors import AuthError, PermissionDeniedError, UnauthenticatedError
from stepstream_common.rpc import Context, abort, wrapped_handler
from stepstream_common.tokens import Role, TokenTable, load_tokens

log = logging.getLogger(__name__)

# Who may call a method: the roles whose tokens may, or OPEN for anyone, with or without a token.
OPEN: Final = "open"
Access = frozenset[Role] | Literal["open"]

READERS: Final = frozenset({Role.VIEWER, Role.OPERATOR, Role.ADMIN})
OPERATORS: Final = frozenset({Role.OPERATOR, Role.ADMIN})
FOLLOWERS: Final = frozenset({Role.FOLLOWER, Role.ADMIN})

_ORCHESTRATOR = "stepstream.orchestrator.v1.OrchestratorService"
_STATUS = "stepstream.status.v1.StatusService"

# The authorization table: "/package.Service/Method" -> who may call it.
RULES: Final[Mapping[str, Access]] = {
    f"/{_ORCHESTRATOR}/SubmitJob": OPERATORS,
    f"/{_ORCHESTRATOR}/CancelJob": OPERATORS,
    f"/{_ORCHESTRATOR}/GetJob": READERS,
    f"/{_ORCHESTRATOR}/ListJobs": READERS,
    f"/{_ORCHESTRATOR}/StreamStepEvents": FOLLOWERS,
    f"/{_ORCHESTRATOR}/StreamSnapshot": FOLLOWERS,
    # Whoever may read a job may read what its steps printed (as Kubernetes' view
    # role reads pods/log): a step's message, visible to readers, is its last line
    # of output already. A follower (the status service) never needs it.
    f"/{_ORCHESTRATOR}/StreamOutput": READERS,
    f"/{_ORCHESTRATOR}/ListOutput": READERS,
    f"/{_STATUS}/GetJob": READERS,
    f"/{_STATUS}/ListJobs": READERS,
    f"/{_STATUS}/ListChildren": READERS,
    f"/{_STATUS}/WatchJob": READERS,
    f"/{_STATUS}/WatchJobs": READERS,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": READERS,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": READERS,
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/List": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
}

# The reasons of google.rpc.ErrorInfo that a denial carries.
TOKEN_MISSING = "TOKEN_MISSING"
TOKEN_INVALID = "TOKEN_INVALID"
ROLE_NOT_ALLOWED = "ROLE_NOT_ALLOWED"

_BEARER = "bearer"


@dataclass(frozen=True)
class Caller:
    """Whose proven token a call carries."""

    name: str
    role: Role


_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("stepstream_caller", default=None)


def caller_name() -> str:
    """The token name of the call being served: "" without auth (or outside a call)."""
    caller = _caller.get()
    return caller.name if caller is not None else ""


def method_names(services: Iterable[ServiceDescriptor]) -> list[str]:
    """The full name ("/package.Service/Method") of every method of `services`."""
    return [f"/{service.full_name}/{method.name}" for service in services for method in service.methods]


class Authorizer(grpc.aio.ServerInterceptor):
    """The interceptor that admits or denies every call by RULES (see the module docstring)."""

    def __init__(self, path: Path, tokens: TokenTable, rules: Mapping[str, Access] = RULES) -> None:
        self.path = path
        self._tokens = tokens
        self._rules = rules

    @classmethod
    def load(cls, tokens_file: Path | None) -> Authorizer | None:
        """The authorizer of `tokens_file` (None: auth off); SettingError if the file cannot be used."""
        return cls(tokens_file, load_tokens(tokens_file)) if tokens_file is not None else None

    def check_rules(self, services: Iterable[ServiceDescriptor]) -> None:
        """RuntimeError naming every method of `services` that has no rule: a server must not start with one."""
        missing = [name for name in method_names(services) if name not in self._rules]
        if missing:
            raise RuntimeError(f"no authorization rule for {', '.join(missing)}: add one to "
                               "stepstream_common.auth.RULES (deny by default)")

    def reload(self) -> None:
        """Read the tokens file again (on SIGHUP): a good file's tokens replace the ones in use,
        for the next call; a bad one is logged and the ones in use are kept."""
        try:
            self._tokens = load_tokens(self.path)
        except SettingError as error:
            log.error("kept the tokens in use: %s", error)
            return
        log.info("reloaded %d token(s) from %s", len(self._tokens.entries), self.path)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        method = handler_call_details.method
        access = self._rules.get(method, frozenset())
        if handler is None or access == OPEN:
            return handler
        return _guarded(handler, lambda context: self._admit(method, access, context))

    async def _admit(self, method: str, access: Access, context: Context) -> Caller:
        """The caller, if its token allows `method`; else the call is aborted with why."""
        try:
            caller = await self._caller(context)
            if caller.role not in access:
                allowed = [role for role in Role if role in access]
                raise PermissionDeniedError(
                    f"token {caller.name!r} has role {caller.role}; {method.lstrip('/')} needs role "
                    f"{' or '.join(allowed) if allowed else '(none: the method has no authorization rule)'}",
                    ROLE_NOT_ALLOWED, {"method": method, "role": caller.role, "allowed": ",".join(allowed)},
                )
        except AuthError as error:
            log.info("denied %s: %s", method, error, extra={"method": method})
            await abort(context, error)
        return caller

    async def _caller(self, context: Context) -> Caller:
        """Who the call's bearer token proves it is; UnauthenticatedError if none."""
        presented = [value for key, value in context.invocation_metadata() or () if key == AUTHORIZATION]
        if not presented:
            raise UnauthenticatedError(
                "no token: call with `authorization: Bearer <token>` metadata", TOKEN_MISSING
            )
        scheme, _, token = str(presented[0]).partition(" ")
        entry = None
        if len(presented) == 1 and scheme.lower() == _BEARER:
            entry = self._tokens.verify(token.strip())
        if entry is None:
            raise UnauthenticatedError(
                "the token is not valid here: expected one `authorization: Bearer <token>` with a token "
                "of this service's tokens file", TOKEN_INVALID,
            )
        return Caller(entry.name, entry.role)


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any], admit: Callable[[Context], Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler`, admitting the call (and noting its caller) before its behavior runs."""

    async def enter(context: Context) -> contextlib.AbstractContextManager[None]:
        _caller.set(await admit(context))
        return contextlib.nullcontext()

    return wrapped_handler(handler, enter)
