"""A service's OpenTelemetry traces (optional; see stepstream.tracing for how
OTEL_* turn them on): a span for every call it serves but health checks (the
maintained OpenTelemetry gRPC instrumentation's grpc.aio server interceptor),
and the spans that join a job's trace across both services:

- SubmitJob's server span is the job's root: its context is kept in the job
  record (Job.trace_context), so it outlives the call and a restart;
- the orchestrator opens a span per step under it, and one per attempt of
  the step (or of each fan-out child) under that;
- the status service records a span per commit that applies one of the
  job's records, under the same root.

A service that traces nothing holds no Tracing (None) and pays one `is None`
test where a span would be opened; opentelemetry is never imported then.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import grpc
from stepstream.tracing import client_interceptors, provider_from_env

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

EXCLUDED_BY_DEFAULT = "grpc.health.v1.Health"

# Called once a traced unit of work ended: its final state word, and why it failed ("" if it did not).
Note = Callable[[str, str], None]


def _ignore(state: str, failure: str) -> None:
    """The Note of what is not traced."""


UNTRACED: contextlib.AbstractContextManager[Note] = contextlib.nullcontext(_ignore)


def untraced(attempt: int) -> contextlib.AbstractContextManager[Note]:
    """The span of an attempt when tracing is off: none."""
    return UNTRACED


class Tracing:
    """One service's tracer (its own provider's)."""

    def __init__(self, provider: TracerProvider, *, owned: bool = False) -> None:
        from opentelemetry import propagate, trace

        self._provider = provider
        self._owned = owned
        self._tracer = provider.get_tracer("stepstream")
        self._propagate = propagate
        self._trace = trace

    @classmethod
    def from_env(cls, service_name: str) -> Tracing | None:
        """The service's tracing as OTEL_* say; None (tracing off) by default."""
        provider = provider_from_env(service_name)
        return cls(provider, owned=True) if provider is not None else None

    def server_interceptor(self, environ: Mapping[str, str] = os.environ) -> grpc.aio.ServerInterceptor:
        """A span per call served, except for the services OTEL_PYTHON_GRPC_EXCLUDED_SERVICES
        names (comma-separated; by default grpc.health.v1.Health: probes every few seconds
        would drown the traces worth reading)."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        excluded = environ.get("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", EXCLUDED_BY_DEFAULT)
        names = [name.strip() for name in excluded.split(",") if name.strip()]
        traced = filters.negate(filters.any_of(*(filters.service_name(name) for name in names))) if names else None
        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self._provider, filter_=traced)
        return interceptor

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return client_interceptors(self._provider)

    def context(self) -> dict[str, str]:
        """The current span's context as W3C headers (traceparent, tracestate): what a job keeps."""
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier)
        return carrier

    @contextlib.contextmanager
    def span(self, name: str, parent: Mapping[str, str] | None = None, **attributes: str | int) -> Iterator[Note]:
        """A span around the block, the current one in it; its parent is
        `parent` (a kept context) or else the current span. The Note it gives
        marks how the work ended (a failure sets the span's status to error).
        Cancelled at any await in the block, the span ends there, marked
        cancelled (not an error, as OpenTelemetry counts them)."""
        context = self._propagate.extract(parent) if parent else None
        with self._tracer.start_as_current_span(name, context=context, attributes=_prefixed(attributes)) as span:

            def note(state: str, failure: str) -> None:
                span.set_attribute("stepstream.state", state)
                if failure:
                    span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, failure))

            try:
                yield note
            except asyncio.CancelledError:
                note("cancelled", "")
                raise

    def record(self, name: str, parent: Mapping[str, str], start_ns: int, end_ns: int, **attributes: str | int) -> None:
        """A span that already happened (from `start_ns` to `end_ns`, epoch nanoseconds) under `parent`."""
        span = self._tracer.start_span(name, context=self._propagate.extract(parent), start_time=start_ns,
                                       attributes=_prefixed(attributes))
        span.end(end_time=end_ns)

    async def shutdown(self) -> None:
        """Export what is pending and stop, if this service made the provider (off the loop: it may send)."""
        if self._owned:
            await asyncio.to_thread(self._provider.shutdown)


def _prefixed(attributes: Mapping[str, str | int]) -> dict[str, str | int]:
    return {f"stepstream.{key}": value for key, value in attributes.items()}
