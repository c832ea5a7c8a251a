"""`--telemetry` for the ingest and latency benchmarks: the same measurement
with the services' telemetry off, with metrics on, with tracing on, and with
another commit's code (main's by default), in one run, in interleaved rounds
so that the machine's other load falls on all of them alike.

- off: this tree, no --metrics-listen, tracing off (the default deployment);
- metrics: both services with --metrics-listen 127.0.0.1:0, each scraped
  every second by this process (Prometheus scrapes every 15 to 60 s);
- tracing: both services with OTEL_TRACES_EXPORTER=otlp to an OTLP/gRPC sink
  in this process that counts the spans it receives: every span is built,
  batched, serialized and sent, as with a real collector;
- main: the services of another commit (`git archive` of --baseline-ref,
  `main` by default) with everything off: what this tree costs over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc

from bench.common import repeating
from bench.processes import REPO, Service

SCRAPE_EVERY = 1.0
OFF_ENV = {"OTEL_SDK_DISABLED": "true"}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: OFF_ENV)
    cwd: Path = REPO
    scraped: bool = False

    def service(self, module: str, args: Sequence[str]) -> Service:
        return Service(module, [*args, *self.args], env=self.env, cwd=self.cwd)

    def wrap(self, service: Service) -> Service:
        """`service` as this variant runs it."""
        return self.service(service.module, service.args)


OFF = Variant("off", "telemetry off")


class Telemetry:
    """The variants of one run; the OTLP sink and the other commit's files live as long as it."""

    def __init__(self, baseline_ref: str = "main") -> None:
        self.baseline_ref = baseline_ref
        self.variants: list[Variant] = []
        self.spans_received = 0
        self.scrapes = 0
        self._server: grpc.Server | None = None
        self._tree: tempfile.TemporaryDirectory[str] | None = None

    async def __aenter__(self) -> Telemetry:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc

        outer = self

        class Sink(otlp_grpc.TraceServiceServicer):
            def Export(
                self, request: otlp.ExportTraceServiceRequest, context: grpc.ServicerContext
            ) -> otlp.ExportTraceServiceResponse:
                outer.spans_received += sum(len(scope.spans) for resource in request.resource_spans
                                            for scope in resource.scope_spans)
                return otlp.ExportTraceServiceResponse()

        # On threads of its own: the harness blocks its loop while it waits for a service to stop,
        # which is when a service sends its last spans.
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        otlp_grpc.add_TraceServiceServicer_to_server(Sink(), self._server)  # type: ignore[no-untyped-call]
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self._tree = tempfile.TemporaryDirectory(prefix="stepstream-baseline-")
        tree = Path(self._tree.name)
        try:
            commit = await asyncio.to_thread(_extract, self.baseline_ref, tree)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        self.variants = [
            OFF,
            Variant("metrics", "metrics on, scraped every 1 s", ("--metrics-listen", "127.0.0.1:0"), scraped=True),
            Variant("tracing", "tracing on (OTLP to a local sink)", env={
                "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_SERVICE_NAME": "stepstream-bench",
            }),
            Variant("main", f"{self.baseline_ref} ({commit}), telemetry off", cwd=tree,
                    env={**OFF_ENV, "PYTHONPATH": f"{tree / 'protos'}:{tree / 'client'}"}),
        ]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.stop(None)
        if self._tree is not None:
            self._tree.cleanup()

    @contextlib.asynccontextmanager
    async def scraping(self, variant: Variant, services: Sequence[Service]) -> AsyncIterator[None]:
        """While the block runs, scrape the services' metrics every SCRAPE_EVERY seconds, and once
        more after it (metrics variant only)."""
        if not variant.scraped:
            yield
            return
        addresses = [service.metrics_address for service in services]
        assert all(addresses), "a service printed no metrics address"

        async def scrape_all() -> None:
            for address in addresses:
                await asyncio.to_thread(_scrape, address)
                self.scrapes += 1

        async with repeating(scrape_all, SCRAPE_EVERY):
            yield


def _scrape(address: str) -> None:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        response.read()


def _extract(ref: str, into: Path) -> str:
    """The files of commit `ref` in `into`; returns its short hash."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit
