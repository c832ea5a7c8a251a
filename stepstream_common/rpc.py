"""gRPC plumbing both services share: error mapping, start-up and graceful shutdown."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2, message, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from stepstream_common.errors import (
    CursorOutOfRange,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)

log = logging.getLogger(__name__)

ERROR_DOMAIN = "stepstream.v1"

_CODES: dict[type[ServiceError], tuple[grpc.StatusCode, int]] = {
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
    NotFound: (grpc.StatusCode.NOT_FOUND, code_pb2.NOT_FOUND),
    FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    CursorOutOfRange: (grpc.StatusCode.OUT_OF_RANGE, code_pb2.OUT_OF_RANGE),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
}


def to_status(error: ServiceError) -> grpc.Status:
    """The gRPC status (with google.rpc details in the trailer) for an error."""
    _, code = next(codes for kind, codes in _CODES.items() if isinstance(error, kind))
    details: list[any_pb2.Any] = []
    if isinstance(error, InvalidArgument) and error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        details.append(_pack(bad_request))
    if isinstance(error, CursorOutOfRange):
        info = error_details_pb2.ErrorInfo(
            reason=error.reason,
            domain=ERROR_DOMAIN,
            metadata={"oldest": str(error.oldest), "latest": str(error.latest), "log_id": error.log_id},
        )
        details.append(_pack(info))
    status = status_pb2.Status(code=code, message=str(error), details=details)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: ServiceError) -> NoReturn:
    await context.abort_with_status(to_status(error))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


Handler = TypeVar("Handler", bound=Callable[..., Any])


def maps_errors(handler: Handler) -> Handler:
    """Turn ServiceErrors raised by a servicer method into their gRPC status.

    Keeps the handler's kind (coroutine or async generator): grpc.aio decides how
    to drive a handler by inspecting it.
    """
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in handler(self, request, context):
                    yield item
            except ServiceError as error:
                await abort(context, error)

        return stream  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            return await handler(self, request, context)
        except ServiceError as error:
            await abort(context, error)

    return unary  # type: ignore[return-value]


def require(violations: list[tuple[str, str]]) -> None:
    """Raise InvalidArgument listing every (field, problem) pair, if any."""
    if violations:
        raise InvalidArgument(
            "invalid request: " + "; ".join(f"{f}: {d}" for f, d in violations),
            [FieldViolation(f, d) for f, d in violations],
        )


def _serialize(response: message.Message | bytes) -> bytes:
    """Responses may be messages or bytes already encoded as the declared message."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> str:
    """Register `servicer` for every method of `service`; returns the service's full name.

    Unlike the generated add_*_to_server, a handler may yield pre-encoded bytes
    (see stepstream_common.wire) as well as messages.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        behavior = getattr(servicer, method.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            behavior, request_deserializer=request_type.FromString, response_serializer=_serialize
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
    return service.full_name


def server_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ]


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]


@dataclass
class RunningServer:
    """A started server with its health service; stop() shuts it down gracefully."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    address: str
    on_stop: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self, grace: float = 5.0) -> None:
        """Health NOT_SERVING, end long streams (on_stop hooks), then stop the server."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        for hook in self.on_stop:
            result = hook()
            if result is not None:
                await result
        await self.server.stop(grace)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
        await self.server.wait_for_termination()

    async def serve_while(self, essential: asyncio.Task[None], what: str) -> None:
        """Serve until stopped; if `essential` (a service's single writer) fails
        first, stop serving at once and raise: the process must not go on."""
        waiter = asyncio.create_task(self.wait_stopped())
        done, _ = await asyncio.wait({waiter, essential}, return_when=asyncio.FIRST_COMPLETED)
        if essential in done and essential.exception() is not None:
            waiter.cancel()
            await self.server.stop(None)
            raise RuntimeError(f"{what} failed") from essential.exception()
        await waiter


async def start_server(
    listen: str,
    register: Callable[[grpc.aio.Server], Sequence[str]],
) -> RunningServer:
    """Bind `listen` (port 0 picks a free one), register the services plus
    reflection and grpc.health.v1, and start serving."""
    server = grpc.aio.server(options=server_options())
    service_names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"could not bind {listen}")
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = listen.rsplit(":", 1)[0]
    return RunningServer(server=server, health=health_servicer, address=f"{host}:{port}")


async def serve_until_signalled(
    running: RunningServer,
    label: str,
    stop: Callable[[], Awaitable[None]],
    serve: Callable[[], Awaitable[None]],
) -> None:
    """Print the one 'listening' line, `serve()`, and run `stop()` on SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Future[None]] = []

    def on_signal() -> None:
        if not stopping:
            stopping.append(asyncio.ensure_future(stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    print(f"{label} listening on {running.address}", flush=True)
    await serve()
    for task in stopping:
        await task


class Service(Protocol):
    """What a service's app.py builds: a started server, a graceful stop, and a way to serve."""

    @property
    def server(self) -> RunningServer: ...

    async def stop(self) -> None: ...

    async def run_until_stopped(self) -> None: ...


class Configured(Protocol):
    @property
    def log_level(self) -> str: ...


ConfigT = TypeVar("ConfigT", bound=Configured)


def run_main(
    label: str,
    parse_args: Callable[[list[str] | None], ConfigT],
    start: Callable[[ConfigT], Awaitable[Service]],
    argv: list[str] | None,
) -> None:
    """A service process from start to end: flags, logging, start, serve until SIGTERM/SIGINT."""

    async def serve() -> None:
        config = parse_args(argv)
        configure_logging(config.log_level)
        service = await start(config)
        await serve_until_signalled(service.server, label, service.stop, service.run_until_stopped)

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        sys.exit(130)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
