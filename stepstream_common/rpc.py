"""gRPC plumbing both services share: request decoding and error mapping at the edge,
reflection, start-up and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import inspect
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message, message_factory
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor, ServiceDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_status import rpc_status

from stepstream_common import logs
from stepstream_common.config import SettingError
from stepstream_common.errors import (
    LIMIT_EXCEEDED,
    AuthError,
    CursorOutOfRangeError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServiceError,
    UnauthenticatedError,
    UnavailableError,
)
from stepstream_common.exposure import Exposed, exposure_of
from stepstream_common.tls import ServerTLS

if TYPE_CHECKING:
    from stepstream_common.auth import Authorizer

log = logging.getLogger(__name__)

ERROR_DOMAIN = "stepstream"

_CODES: dict[type[ServiceError], tuple[grpc.StatusCode, int]] = {
    InvalidArgumentError: (grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
    NotFoundError: (grpc.StatusCode.NOT_FOUND, code_pb2.NOT_FOUND),
    FailedPreconditionError: (grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    CursorOutOfRangeError: (grpc.StatusCode.OUT_OF_RANGE, code_pb2.OUT_OF_RANGE),
    UnavailableError: (grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
    UnauthenticatedError: (grpc.StatusCode.UNAUTHENTICATED, code_pb2.UNAUTHENTICATED),
    PermissionDeniedError: (grpc.StatusCode.PERMISSION_DENIED, code_pb2.PERMISSION_DENIED),
    ResourceExhaustedError: (grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED),
}


# An error travels in the call's trailer (grpc-message, and grpc-status-details-bin
# holding the same message again plus the details). gRPC clients reject trailers
# over 16 KB, and from 8 KB on (their default soft limit) with a rising chance, as
# a transport failure ("Stream removed") in place of the error. So what a trailer
# carries is bounded well below 8 KB, whatever the client sent: the message, each
# field violation, and the number and total size of the violations listed; the
# rest are counted in one last violation, "and M more".
MAX_MESSAGE_BYTES = 256
MAX_FIELD_BYTES = 200
MAX_DESCRIPTION_BYTES = 400
MAX_VIOLATIONS = 50
MAX_BAD_REQUEST_BYTES = 6000


def grpc_code_of(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status code `error` is sent with."""
    return next(codes for kind, codes in _CODES.items() if isinstance(error, kind))[0]


def to_status(error: ServiceError) -> grpc.Status:
    """The gRPC status (with google.rpc details in the trailer) for an error, bounded in size."""
    _, code = next(codes for kind, codes in _CODES.items() if isinstance(error, kind))
    details: list[any_pb2.Any] = []
    if isinstance(error, InvalidArgumentError) and error.violations:
        bad_request = error_details_pb2.BadRequest(field_violations=_field_violations(error.violations))
        details.append(_pack(bad_request))
    if isinstance(error, InvalidArgumentError) and error.limits:
        details.append(_pack(error_details_pb2.ErrorInfo(reason=LIMIT_EXCEEDED, domain=ERROR_DOMAIN,
                                                          metadata=error.limits)))
    if isinstance(error, ResourceExhaustedError):
        quota = error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
            subject=bounded(error.subject, MAX_FIELD_BYTES), description=bounded(str(error), MAX_DESCRIPTION_BYTES),
        )])
        details.append(_pack(quota))
        details.append(_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata={
            "setting": error.setting, "limit": f"{error.limit:g}",
        })))
    if isinstance(error, CursorOutOfRangeError):
        info = error_details_pb2.ErrorInfo(
            reason=error.reason,
            domain=ERROR_DOMAIN,
            metadata={"oldest": str(error.oldest), "latest": str(error.latest), "log_id": error.log_id},
        )
        details.append(_pack(info))
    if isinstance(error, UnavailableError | AuthError) and error.reason:
        details.append(_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN,
                                                          metadata=error.metadata)))
    status = status_pb2.Status(code=code, message=bounded(str(error), MAX_MESSAGE_BYTES), details=details)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def bounded(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, ending in '…' when cut."""
    encoded = text.encode("utf-8", errors="replace")
    if len(encoded) <= limit:
        return encoded.decode("utf-8")
    return encoded[: limit - len("…".encode())].decode("utf-8", errors="ignore") + "…"


def _field_violations(violations: Sequence[FieldViolation]) -> list[error_details_pb2.BadRequest.FieldViolation]:
    """The first violations that fit the bounds above, then "and M more" for the rest."""
    listed: list[error_details_pb2.BadRequest.FieldViolation] = []
    size = 0
    for violation in violations[:MAX_VIOLATIONS]:
        entry = error_details_pb2.BadRequest.FieldViolation(
            field=bounded(violation.field, MAX_FIELD_BYTES),
            description=bounded(violation.description, MAX_DESCRIPTION_BYTES),
        )
        size += entry.ByteSize() + 3  # + its tag and length in BadRequest
        if size > MAX_BAD_REQUEST_BYTES:
            break
        listed.append(entry)
    rest = violations[len(listed):]
    if rest:
        # One root for all the rest ("definition" of "definition.steps[3].name"): name it.
        roots = {v.field.partition(".")[0].partition("[")[0] for v in rest}
        listed.append(error_details_pb2.BadRequest.FieldViolation(
            field=bounded(roots.pop(), MAX_FIELD_BYTES) if len(roots) == 1 else "",
            description=f"and {len(rest)} more problem{'s' if len(rest) > 1 else ''}, not listed to keep "
                        f"this error small (fix the ones above and retry)",
        ))
    return listed


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: ServiceError) -> NoReturn:
    await context.abort_with_status(to_status(error))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


# What a servicer method receives beside its request.
Context = grpc.aio.ServicerContext[Any, Any]

V = TypeVar("V")


class Violations:
    """A request's problems, all collected before one INVALID_ARGUMENT lists
    them, so a client fixes its request in one round trip:
    `Violations().require("job_id", bool(job_id), "is required").check()`."""

    def __init__(self) -> None:
        self._found: list[FieldViolation] = []

    def require(self, field: str, ok: bool, description: str) -> Violations:
        """Unless `ok`, `field` has the problem `description`."""
        if not ok:
            self._found.append(FieldViolation(field, description))
        return self

    def require_all_in(
        self, field: str, values: Iterable[V], allowed: Container[V], description: Callable[[V], str]
    ) -> Violations:
        """Each value is one of `allowed`; the i-th that is not is `field[i]`."""
        for i, value in enumerate(values):
            if value not in allowed:
                self._found.append(FieldViolation(f"{field}[{i}]", description(value)))
        return self

    def check(self) -> None:
        """Raise InvalidArgumentError listing every problem found, if any."""
        if self._found:
            raise InvalidArgumentError(
                "invalid request: " + "; ".join(f"{v.field}: {v.description}" for v in self._found),
                list(self._found),
            )


def _serialize(response: message.Message | bytes) -> bytes:
    """Responses may be messages or bytes already encoded as the declared message."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_servicer(
    server: grpc.aio.Server,
    service: ServiceDescriptor,
    servicer: object,
    request_class: Callable[[MethodDescriptor], type[message.Message]] | None = None,
) -> str:
    """Register `servicer` for every method of `service`; returns the service's full name.

    Unlike the generated add_*_to_server, a handler may yield pre-encoded bytes
    (see stepstream_common.wire) as well as messages, and every call goes through
    _boundary (requests decoded there, errors mapped). `request_class` picks the
    class requests decode into (default: the one generated for the input type).
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_type = (request_class or _generated_class)(method)
        handler = _boundary(getattr(servicer, method.name), request_type, method)
        if method.client_streaming:
            make = (grpc.stream_stream_rpc_method_handler if method.server_streaming
                    else grpc.stream_unary_rpc_method_handler)
        else:
            make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                    else grpc.unary_unary_rpc_method_handler)
        # No request_deserializer: requests arrive as bytes and _boundary decodes them.
        handlers[method.name] = make(handler, request_deserializer=None, response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
    return service.full_name


def _generated_class(method: MethodDescriptor) -> type[message.Message]:
    return message_factory.GetMessageClass(method.input_type)


def _boundary(behavior: Callable[..., Any], request_type: type[message.Message], method: MethodDescriptor) -> Any:
    """The handler grpc.aio runs for one method: the edge between a client and a servicer.

    It decodes the request itself: when a request_deserializer raises, grpc.aio
    answers UNKNOWN with the exception's text, while bytes that do not parse as
    the request message (corrupt, or nested deeper than protobuf's limit of 100)
    are the caller's mistake: INVALID_ARGUMENT. It maps what the servicer raises
    (ServiceError to its status; anything else, a bug, to INTERNAL with a short
    message, the traceback logged), so no exception text reaches a client
    unbounded. It keeps the handler's kind (coroutine or async generator):
    grpc.aio decides how to drive a handler by inspecting it.
    """
    name = method.full_name
    path = f"/{method.containing_service.full_name}/{method.name}"  # as gRPC and the auth lines name it

    def decode(data: bytes) -> message.Message:
        try:
            return request_type.FromString(data)
        except message.DecodeError as error:
            raise InvalidArgumentError(
                f"the request does not parse as {request_type.DESCRIPTOR.full_name}: {error}"
            ) from None

    async def decode_each(requests: AsyncIterator[bytes]) -> AsyncIterator[message.Message]:
        async for data in requests:
            yield decode(data)

    def argument(request: Any) -> Any:
        return decode_each(request) if method.client_streaming else decode(request)

    async def fail(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> NoReturn:
        if isinstance(error, ServiceError):
            await abort(context, error)
        if isinstance(error, NotImplementedError):
            # What a generated servicer base does for a method it leaves out (health's List, in
            # grpcio-health-checking's servicer): the method is not served, no bug.
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by this server")
        log.error("%s failed", name, exc_info=error, extra={"method": path})
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name} (logged by the service)")
        raise AssertionError("abort returned")  # pragma: no cover

    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            logs.set_log_context(method=path)  # grpc.aio serves each call in a task of its own
            try:
                async with contextlib.aclosing(behavior(argument(request), context)) as items:
                    async for item in items:
                        yield item
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await fail(context, error)

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        logs.set_log_context(method=path)  # grpc.aio serves each call in a task of its own
        try:
            return await behavior(argument(request), context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await fail(context, error)

    return unary


def server_options(max_request_bytes: int) -> list[tuple[str, Any]]:
    """The gRPC server's settings. A request message over `max_request_bytes`
    is refused by gRPC itself, RESOURCE_EXHAUSTED "Received message larger than
    max (N vs. M)", before any of our code sees it or it is kept whole."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", max_request_bytes),
    ]


# A service that cannot do its job says so, then ends: when one of its essential
# tasks (a single writer, a follower) ends, health turns NOT_SERVING for every
# service name and readers are told their data is stale (on_fail hooks), for
# FAIL_LINGER seconds so health checks and clients can see why; then the server
# stops (cleanup bounded by FAIL_CLEANUP) and the process exits EXIT_FATAL,
# even if a thread it cannot stop (e.g. a database's) is still running.
EXIT_FATAL = 70  # EX_SOFTWARE (sysexits.h): "an internal software error"
FAIL_LINGER = 2.0
FAIL_CLEANUP = 5.0


class ServiceFailed(RuntimeError):
    """An essential task of a service ended: the process must not go on (already logged)."""


@dataclass
class RunningServer:
    """A started server with its health service; stop() shuts it down gracefully."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    address: str
    on_stop: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)
    # Called with the reason when an essential task fails (before the linger).
    on_fail: list[Callable[[str], None]] = field(default_factory=list)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self, grace: float = 5.0) -> None:
        """Health NOT_SERVING, end long streams (on_stop hooks), then stop the server.

        Every hook runs and the server stops even if a hook fails; the first
        failure is raised afterwards, so a stop that lost data is not a clean exit.
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        failure: BaseException | None = None
        for hook in self.on_stop:
            try:
                result = hook()
                if result is not None:
                    await result
            except Exception as error:
                log.debug("stop hook %r failed", hook, exc_info=True)
                failure = failure or error
        await self.server.stop(grace)
        if failure is not None:
            raise failure

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
        await self.server.wait_for_termination()

    async def serve_while(self, essential: Mapping[asyncio.Task[Any], str]) -> None:
        """Serve until stopped. Each essential task (named by its value) must
        run as long as the service: if one ends first, however it ends, the
        service cannot do its job, so it fails (see fail()) and raises
        ServiceFailed; the process must not go on."""
        waiter = asyncio.create_task(self.wait_stopped())
        done, _ = await asyncio.wait({waiter, *essential}, return_when=asyncio.FIRST_COMPLETED)
        ended = next((task for task in essential if task in done), None)
        if ended is None or self._stopped.is_set():
            await waiter  # a graceful stop ends essential tasks on purpose
            return
        waiter.cancel()
        cause = None if ended.cancelled() else ended.exception()
        reason = f"{essential[ended]} {_how_it_ended(ended)}"
        log.debug("%s", reason, exc_info=cause)
        await self.fail(reason)
        raise ServiceFailed(reason) from cause

    async def fail(self, reason: str) -> None:
        """Say so before going: one CRITICAL line, health NOT_SERVING, on_fail
        hooks; then FAIL_LINGER seconds still answering (health, reads)."""
        log.critical("%s; health NOT_SERVING, exiting with code %d in %gs", reason, EXIT_FATAL, FAIL_LINGER)
        await self.health.enter_graceful_shutdown()
        for hook in self.on_fail:
            try:
                hook(reason)
            except Exception:
                log.debug("fail hook %r failed", hook, exc_info=True)
        await asyncio.sleep(FAIL_LINGER)


def _how_it_ended(task: asyncio.Task[Any]) -> str:
    if task.cancelled():
        return "was cancelled"
    error = task.exception()
    return "ended unexpectedly" if error is None else f"failed: {describe_error(error)}"


def describe_error(error: BaseException) -> str:
    """`Kind: message` on one line (of the first error, for a task group's)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__



# By (request_streaming, response_streaming): a handler's behavior attribute, and how to make one.
_BEHAVIORS = {
    (False, False): "unary_unary", (False, True): "unary_stream",
    (True, False): "stream_unary", (True, True): "stream_stream",
}
_MAKE_HANDLER = {
    (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
}


def wrapped_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    enter: Callable[[Context], Awaitable[contextlib.AbstractContextManager[Any]]],
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler`, of the same kind, running its behavior inside what `enter(context)`
    returns (for server interceptors that admit a call, or hold something for it).

    The behavior keeps its own shape (coroutine or async generator): grpc.aio
    decides how to drive a handler by inspecting it, and a generator abandoned
    at a yield is closed at once (aclosing), releasing what `enter` gave.
    """
    kind = (handler.request_streaming, handler.response_streaming)
    behavior: Callable[..., Any] = getattr(handler, _BEHAVIORS[kind])

    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            with await enter(context):
                async with contextlib.aclosing(behavior(request, context)) as items:
                    async for item in items:
                        yield item

        wrapped: Callable[..., Any] = stream
    else:

        async def call(request: Any, context: Context) -> Any:
            with await enter(context):
                return await behavior(request, context)

        wrapped = call
    make: Callable[..., grpc.RpcMethodHandler[Any, Any]] = _MAKE_HANDLER[kind]
    return make(wrapped, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

# --- Server reflection ---------------------------------------------------------------------------

V1_REFLECTION_SERVICE = "grpc.reflection.v1.ServerReflection"
# Written by scripts/gen_protos.py beside the generated code: our .proto files as
# protoc parsed them, with their comments (source info).
DESCRIPTOR_SET = ("stepstream", "descriptors.binpb")


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> list[ServiceDescriptor]:
    """Serve gRPC server reflection, both grpc.reflection.v1 (what current tools
    ask first) and v1alpha (what older ones, like grpcurl 1.8, only know).
    Returns every service the server now serves (`service_names`' and
    reflection's) as reflection describes them.

    The .proto comments reach reflection clients too (`grpcurl describe` prints
    them): the file descriptors of our own protos are served from the
    descriptor set that scripts/gen_protos.py writes with --include_source_info,
    since descriptors rebuilt from the generated code never carry comments.
    Should that file be missing or out of step with the generated code, they
    are served without comments; the comments always live in protos/.
    """
    names = (*service_names, reflection.SERVICE_NAME, V1_REFLECTION_SERVICE)
    pool = _reflection_pool(names)
    servicer = _ReflectionServicer(names, pool, _descriptors_with_comments(pool))
    for service in (reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
                    pool.FindServiceByName(V1_REFLECTION_SERVICE)):
        # v1 and v1alpha messages are the same on the wire: one servicer, v1alpha classes, serves both.
        add_servicer(server, service, servicer, request_class=lambda _: reflection_pb2.ServerReflectionRequest)
    return [pool.FindServiceByName(name) for name in names]


def _v1_reflection_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: v1alpha's file with the v1 names
    (the two are the same messages, field for field); grpcio-reflection ships
    only v1alpha."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    proto.options.Clear()
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.java_multiple_files = True
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    for message_type in proto.message_type:
        for message_field in message_type.field:
            if message_field.type_name:
                message_field.type_name = message_field.type_name.replace(old, new)
    for service in proto.service:
        for rpc in service.method:
            rpc.input_type = rpc.input_type.replace(old, new)
            rpc.output_type = rpc.output_type.replace(old, new)
    return proto


def _reflection_pool(service_names: Sequence[str]) -> descriptor_pool.DescriptorPool:
    """A pool of the files that define `service_names` (and their imports), the
    google.rpc error details our errors carry (so that tools like grpcurl can
    print a BadRequest's violations), and v1 reflection: a pool of its own, so
    that the process-wide default pool never holds a v1 reflection file a later
    grpcio-reflection might bring."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.AddSerializedFile(proto.SerializeToString())
        added.add(file.name)

    default = descriptor_pool.Default()
    for name in service_names:
        if name != V1_REFLECTION_SERVICE:
            add(default.FindFileContainingSymbol(name))
    add(error_details_pb2.DESCRIPTOR)
    pool.AddSerializedFile(_v1_reflection_file().SerializeToString())
    return pool


def _descriptors_with_comments(pool: descriptor_pool.DescriptorPool) -> dict[str, bytes]:
    """File name -> the serialized FileDescriptorProto with source info, for each
    file of DESCRIPTOR_SET that matches, comments aside, what `pool` has."""
    package, name = DESCRIPTOR_SET
    try:
        data = importlib.resources.files(package).joinpath(name).read_bytes()
        files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    except (OSError, message.DecodeError) as error:
        log.warning("reflection serves no .proto comments: cannot read %s/%s: %s", package, name, error)
        return {}
    found: dict[str, bytes] = {}
    for file in files:
        try:
            generated = descriptor_pb2.FileDescriptorProto()
            pool.FindFileByName(file.name).CopyToProto(generated)
        except KeyError:
            continue
        commented = _without_json_names(file)
        uncommented = descriptor_pb2.FileDescriptorProto()
        uncommented.CopyFrom(commented)
        uncommented.ClearField("source_code_info")
        if uncommented == generated:
            found[file.name] = commented.SerializeToString()
        else:
            log.warning("reflection serves %s without comments: %s/%s is out of date", file.name, package, name)
    return found


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """`file` less the json_name protoc adds to every field in a descriptor set:
    the generated code has none, and with them reflection clients would change
    how they print fields (grpcurl: `logId` in place of `log_id`)."""
    stripped = descriptor_pb2.FileDescriptorProto()
    stripped.CopyFrom(file)
    fields = [*stripped.extension]
    messages = [*stripped.message_type]
    while messages:
        message_type = messages.pop()
        fields.extend([*message_type.field, *message_type.extension])
        messages.extend(message_type.nested_type)
    for each in fields:
        each.ClearField("json_name")
    return stripped


class _ReflectionServicer(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """grpcio-reflection's servicer, answering with the descriptors that carry comments where it has them."""

    def __init__(
        self, service_names: Sequence[str], pool: descriptor_pool.DescriptorPool, with_comments: Mapping[str, bytes]
    ) -> None:
        super().__init__(service_names, pool=pool)
        self._with_comments = with_comments

    def _file_by_filename(self, request: Any, filename: str) -> Any:
        return self._commented(super()._file_by_filename(request, filename))

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        return self._commented(super()._file_containing_symbol(request, fully_qualified_name))

    def _file_containing_extension(self, request: Any, containing_type: str, extension_number: int) -> Any:
        return self._commented(super()._file_containing_extension(request, containing_type, extension_number))

    def _commented(self, response: Any) -> Any:
        if response.HasField("file_descriptor_response"):
            files = response.file_descriptor_response.file_descriptor_proto
            for position, data in enumerate(files):
                name = descriptor_pb2.FileDescriptorProto.FromString(data).name
                files[position] = self._with_comments.get(name, data)
        return response


async def start_server(
    listen: str,
    register: Callable[[grpc.aio.Server], Sequence[str]],
    *,
    tls: ServerTLS | None = None,
    auth: Authorizer | None = None,
    max_request_bytes: int,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """Bind `listen` (port 0 picks a free one), register the services plus
    reflection and grpc.health.v1, and start serving: over TLS with `tls`'s
    certificate (re-read when it changes, see stepstream_common.tls), else plaintext.

    With `auth`, every call goes through it (stepstream_common.auth), it must
    have a rule for every method served or the server does not start, and
    SIGHUP makes it re-read its tokens file. A request message over
    `max_request_bytes` is refused (see server_options). `interceptors` see
    every call after `auth` has admitted it."""
    server = grpc.aio.server(options=server_options(max_request_bytes),
                             interceptors=[*([auth] if auth is not None else []), *interceptors])
    service_names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    add_servicer(server, health_pb2.DESCRIPTOR.services_by_name["Health"], health_servicer)
    served = enable_reflection(server, (*service_names, health.SERVICE_NAME))
    if auth is not None:
        auth.check_rules(served)
    port = server.add_secure_port(listen, tls.credentials()) if tls else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"could not bind {listen}")
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = listen.rsplit(":", 1)[0]
    running = RunningServer(server=server, health=health_servicer, address=f"{host}:{port}")
    if auth is not None:
        _reload_on_sighup(running, auth)
    return running


def _reload_on_sighup(running: RunningServer, auth: Authorizer) -> None:
    """SIGHUP re-reads the tokens file, for as long as `running` serves."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, auth.reload)

    def stop_reloading() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    running.on_stop.append(stop_reloading)


async def serve_until_signalled(
    running: RunningServer,
    label: str,
    stop: Callable[[], Awaitable[None]],
    serve: Callable[[], Awaitable[None]],
) -> None:
    """Print the one 'listening' line, `serve()`, and run `stop()` on SIGTERM or SIGINT.

    If serving fails (ServiceFailed), `stop()` still runs, bounded by
    FAIL_CLEANUP (its errors are expected then: what failed is often what it
    closes), and the failure is raised.
    """
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Future[None]] = []

    def on_signal() -> None:
        if not stopping:
            stopping.append(asyncio.ensure_future(stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    print(f"{label} listening on {running.address}", flush=True)
    try:
        await serve()
    except ServiceFailed:
        on_signal()
        try:
            async with asyncio.timeout(FAIL_CLEANUP):
                await stopping[0]
        except Exception:
            log.debug("cleanup after the failure did not complete", exc_info=True)
        raise
    for task in stopping:
        await task


class Service(Protocol):
    """What a service's app.py builds: a started server, a graceful stop, and a way to serve."""

    @property
    def server(self) -> RunningServer: ...

    async def stop(self) -> None: ...

    async def run_until_stopped(self) -> None: ...


class Configured(Exposed, Protocol):
    @property
    def prog(self) -> str: ...

    @property
    def log_level(self) -> str: ...

    @property
    def log_format(self) -> str: ...


ConfigT = TypeVar("ConfigT", bound=Configured)


def run_main(
    label: str,
    parse_args: Callable[[list[str] | None], ConfigT],
    start: Callable[[ConfigT], Awaitable[Service]],
    argv: list[str] | None,
) -> None:
    """A service process from start to end: flags, logging, start, serve until SIGTERM/SIGINT.

    Exit codes: 0 after a graceful stop, 130 on an interrupt outside the loop,
    EXIT_FATAL when the service cannot go on: an essential task ended (see
    RunningServer.fail), it could not start (e.g. its port is taken), or its
    graceful stop failed. Then stderr has one CRITICAL line saying why (the
    traceback only at --log-level debug), and the process ends at once with
    os._exit: a thread it could not stop must not keep it alive, port closed.
    2, with one line on stderr, when a setting cannot be used (SettingError,
    e.g. a tokens file others may read), as for a bad flag.
    """

    async def serve() -> None:
        config = parse_args(argv)
        exposure = exposure_of(config)
        if exposure.refusal:  # a usage error, told as a bad flag is: one line, exit code 2
            print(f"{config.prog}: error: {exposure.refusal}", file=sys.stderr)
            sys.exit(2)
        configure_logging(config.log_level, config.log_format)
        if exposure.warning:
            log.warning("%s", exposure.warning)
        try:
            service = await start(config)
            await serve_until_signalled(service.server, label, service.stop, service.run_until_stopped)
        except ServiceFailed:
            _exit_now(EXIT_FATAL)  # already logged when it failed
        except SettingError as error:  # a file a setting names cannot be used: told as a bad flag is
            print(f"{config.prog}: error: {error}", file=sys.stderr)
            _exit_now(2)
        except Exception as error:
            log.critical("%s failed: %s; exiting with code %d", label, describe_error(error), EXIT_FATAL)
            log.debug("%s", label, exc_info=True)
            _exit_now(EXIT_FATAL)

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        sys.exit(130)


def _exit_now(code: int) -> NoReturn:
    """End the process now: flush what was written, skip waiting for threads."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at `level` and above, as text or one JSON object per line (see stepstream_common.logs)."""
    logs.configure(level, log_format)
