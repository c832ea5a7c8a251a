"""OpenTelemetry tracing for every party (the services, the SDK, the CLI),
configured only by the standard OTEL_* environment variables.

Off unless they ask for traces (see `configured`); then, and only then,
opentelemetry is imported: a process that traces nothing loads none of it.
The packages come with the `otel` extra (pip install 'stepstream-server[otel]'
or 'stepstream-client[otel]'); asked for traces without them, a party warns
once and runs untraced rather than refuse to start over a variable that may
have been set for something else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

EXTRA_HINT = "install the otel extra: pip install 'stepstream-server[otel]' (or 'stepstream-client[otel]')"


def configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether OTEL_* ask for traces: OTEL_TRACES_EXPORTER names an exporter
    other than `none`, or an OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; the exporter is then `otlp`); never
    with OTEL_SDK_DISABLED=true."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return any(name.strip() not in ("", "none") for name in exporters.split(","))
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def provider_from_env(service_name: str, environ: Mapping[str, str] = os.environ) -> TracerProvider | None:
    """A tracer provider that exports as OTEL_* say (exporters by name, as the
    OpenTelemetry SDK finds them: `otlp` (gRPC, or http/protobuf per
    OTEL_EXPORTER_OTLP_PROTOCOL, if that exporter is installed), `console`, …; sampler, batch and
    resource settings read by the SDK itself), named OTEL_SERVICE_NAME or else
    `service_name`; None when they ask for no traces or the extra is missing."""
    if not configured(environ):
        return None
    try:
        from importlib.metadata import entry_points

        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_* ask for traces but OpenTelemetry is not installed; tracing stays off (%s)", EXTRA_HINT)
        return None
    name = environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    for exporter in (each.strip() for each in names.split(",")):
        if exporter in ("", "none"):
            continue
        if exporter == "otlp":  # as the SDK reads it: the OTLP exporter of the protocol asked for
            protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            exporter = "otlp_proto_http" if (protocol or "grpc").strip() == "http/protobuf" else "otlp_proto_grpc"
        found = entry_points(group="opentelemetry_traces_exporter", name=exporter)
        if not found:
            log.warning("OTEL_TRACES_EXPORTER names %r, which no installed package provides (%s)", exporter,
                        EXTRA_HINT)
            continue
        provider.add_span_processor(BatchSpanProcessor(next(iter(found)).load()()))
    return provider


def client_interceptors(provider: TracerProvider) -> list[grpc.aio.ClientInterceptor]:
    """The maintained OpenTelemetry gRPC instrumentation's grpc.aio client
    interceptors: a span per call, its context sent in the call's metadata."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=provider))  # type: ignore[no-untyped-call]


def client_interceptors_from_env(service_name: str) -> list[grpc.aio.ClientInterceptor]:
    """client_interceptors() when OTEL_* ask for traces (and the extra is installed), else none."""
    provider = provider_from_env(service_name)
    return client_interceptors(provider) if provider is not None else []
