"""Prometheus metrics: each service process keeps one CollectorRegistry (Metrics)
and, with --metrics-listen, serves it over HTTP on a listener of its own
(prometheus_client's server, on a thread; stopped with the service).

Cost on the hot paths is kept small: counters and histograms move once per
batch (a journal commit, an ingest commit) or once per finished record, and
what the services already count (events applied, resyncs, subscribers, the
revision) is read only when scraped, by a collector (see `collect_with`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from threading import Thread
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from stepstream_common.errors import ServiceError
from stepstream_common.rpc import Context, grpc_code_of, wrapped_handler

NAMESPACE = "stepstream"

# Batch sizes (events per commit): 1 when idle, up to the writers' bounds under load.
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# Durations of jobs, steps and children: from a fraction of a second to hours.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 12 * 3600)
# Commits on the database thread: sub-millisecond to seconds.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """One service process's registry and the metrics every service has (gRPC server side)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.handled = Counter(
            "grpc_server_handled", "gRPC calls completed, by service, method and status code",
            ["service", "method", "code"], namespace=NAMESPACE, registry=self.registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds", "time from a call's start to its end (streams: their whole length)",
            ["service", "method"], namespace=NAMESPACE, registry=self.registry,
        )
        self.messages_sent = Counter(
            "grpc_server_msg_sent", "messages sent on server-streaming calls",
            ["service", "method"], namespace=NAMESPACE, registry=self.registry,
        )

    def interceptor(self) -> GrpcMetrics:
        return GrpcMetrics(self)

    def collect_with(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Register metrics computed at scrape time by `collect` (on the metrics server's thread)."""
        self.registry.register(_Callback(collect))


class _Callback(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        # Read while the event loop may change what is read: a dict that changed
        # size mid-iteration is read again, never fails the scrape.
        for _ in range(3):
            with contextlib.suppress(RuntimeError):
                return list(self._collect())
        return []


class _Call:
    """One call's timing and outcome, recorded when its handler ends."""

    __slots__ = ("_context", "_labels", "_metrics", "_start")

    def __init__(self, metrics: Metrics, labels: tuple[str, str], context: Context) -> None:
        self._metrics, self._labels, self._context = metrics, labels, context
        self._start = time.perf_counter()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        service, method = self._labels
        self._metrics.handling_seconds.labels(service, method).observe(time.perf_counter() - self._start)
        self._metrics.handled.labels(service, method, _code(self._context, error)).inc()


def _code(context: Context, error: BaseException | None) -> str:
    """The status the call ended with: what the context was given (an abort,
    set_code), else what its error maps to, else OK."""
    code: grpc.StatusCode | None = None
    with contextlib.suppress(Exception):
        code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # some grpcio versions keep the raw value
        return next((each.name for each in grpc.StatusCode if each.value[0] == code), "UNKNOWN")
    if error is None:
        return "OK"
    if isinstance(error, ServiceError):
        return grpc_code_of(error).name
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN"


class GrpcMetrics(grpc.aio.ServerInterceptor):
    """Counts every call by service, method and code, times it, and counts the
    messages a streaming call sends. Placed after auth and the stream limits,
    so it sees the calls they admit (and, since they abort through the
    context, those they refuse too)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        labels = (service, method)
        metrics = self._metrics

        async def call(context: Context) -> _Call:
            return _Call(metrics, labels, context)

        wrapped = wrapped_handler(handler, call)
        if not handler.response_streaming:
            return wrapped
        sent = metrics.messages_sent.labels(service, method)
        serialize: Callable[[Any], bytes] | None = handler.response_serializer

        def counted(response: Any) -> bytes:
            sent.inc()
            return serialize(response) if serialize is not None else response

        replace = getattr(wrapped, "_replace", None)  # grpc's handlers are namedtuples
        return replace(response_serializer=counted) if replace is not None else wrapped


@dataclass
class MetricsServer:
    """The HTTP listener serving a registry at /metrics (and any path)."""

    address: str
    _server: WSGIServer
    _thread: Thread
    stopped: bool = field(default=False)

    async def stop(self) -> None:
        """Stop serving (off the event loop: shutdown() waits for the server's poll)."""
        if self.stopped:
            return
        self.stopped = True
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(listen: str, metrics: Metrics) -> MetricsServer:
    """Serve `metrics` on `listen` (HOST:PORT; port 0 picks a free one)."""
    host, _, port = listen.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    server, thread = start_http_server(int(port), bare, registry=metrics.registry)
    return MetricsServer(f"{host}:{server.server_port}", server, thread)


class OrchestratorMetrics:
    """The orchestrator's own metrics, moved by the journal (per commit) and the recorder (per finished record)."""

    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.events_appended = Counter(
            "events_appended", "events committed to the event log", namespace=NAMESPACE, registry=registry,
        )
        self.commit_seconds = Histogram(
            "journal_commit_seconds", "time to commit one batch of events to the event log",
            namespace=NAMESPACE, registry=registry, buckets=COMMIT_BUCKETS,
        )
        self.batch_events = Histogram(
            "journal_batch_events", "events per event-log commit", namespace=NAMESPACE, registry=registry,
            buckets=BATCH_BUCKETS,
        )
        self.finished: dict[str, Counter] = {}
        self.durations: dict[str, Histogram] = {}
        self._series: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        for kind in ("jobs", "steps", "children"):
            self.finished[kind] = Counter(
                f"{kind}_finished", f"{kind} that reached a terminal state, by state", ["state"],
                namespace=NAMESPACE, registry=registry,
            )
        for kind, of in (("job", "jobs"), ("step", "steps"), ("child", "children")):
            self.durations[of] = Histogram(
                f"{kind}_duration_seconds", f"how long {of} ran (from start, or creation if never started) "
                f"to their terminal state, by state", ["state"], namespace=NAMESPACE, registry=registry,
                buckets=DURATION_BUCKETS,
            )

    def committed(self, events: int, seconds: float) -> None:
        self.events_appended.inc(events)
        self.batch_events.observe(events)
        self.commit_seconds.observe(seconds)

    def finish(self, kind: str, state: str, seconds: float | None) -> None:
        """One job/step/child (`kind`: jobs, steps, children) reached terminal `state`.
        Called once per child of every fan-out: the labelled series are looked up once."""
        series = self._series.get((kind, state))
        if series is None:
            series = self._series[kind, state] = (self.finished[kind].labels(state),
                                                  self.durations[kind].labels(state))
        count, duration = series
        count.inc()
        if seconds is not None:
            duration.observe(max(0.0, seconds))


class IngestMetrics:
    """The status service's commit-side metrics (per ingest commit); the rest is read when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.commit_seconds = Histogram(
            "ingest_commit_seconds", "time to commit one ingest batch (state, change log, cursors)",
            namespace=NAMESPACE, registry=metrics.registry, buckets=COMMIT_BUCKETS,
        )
        self.batch_events = Histogram(
            "ingest_batch_events", "events applied per ingest commit", namespace=NAMESPACE,
            registry=metrics.registry, buckets=BATCH_BUCKETS,
        )

    def committed(self, events: int, seconds: float) -> None:
        self.batch_events.observe(events)
        self.commit_seconds.observe(seconds)
