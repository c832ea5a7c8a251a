"""OpenTelemetry traces: one trace per job, from the client's SubmitJob through
the orchestrator's steps and attempts to the status service applying the job's
records; the context kept with the job; OTEL_* as the only switch; and, with
tracing off, not one opentelemetry module loaded.

The services run in this process (each with its own tracer provider, as two
processes would have) so that one in-memory exporter sees all the spans;
the OTEL_* path runs the real service as a subprocess with the console exporter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.tracing import client_interceptors, configured
from stepstream_client import Client

from orchestrator_svc.app import Orchestrator
from orchestrator_svc.app import start as start_orchestrator
from status_svc.app import StatusService
from status_svc.app import start as start_status
from stepstream_common.tracing import Tracing
from tests.conftest import orchestrator_config, status_config
from tests.helpers import REPO, channel, eventually, job_definition, orchestrator_process, wait_job_state

SUBMIT = "/stepstream.orchestrator.v1.OrchestratorService/SubmitJob"
CHILDREN = 3


def provider(exporter: InMemorySpanExporter, name: str) -> TracerProvider:
    made = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    made.add_span_processor(SimpleSpanProcessor(exporter))
    return made


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def services(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> AsyncIterator[tuple[Orchestrator, StatusService]]:
    orchestrator = await start_orchestrator(orchestrator_config(tmp_path / "orchestrator"),
                                            tracing=Tracing(provider(exporter, "stepstream-orchestrator")))
    try:
        status = await start_status(status_config(tmp_path / "status", orchestrator.address),
                                    tracing=Tracing(provider(exporter, "stepstream-status")))
        try:
            yield orchestrator, status
        finally:
            await status.stop()
    finally:
        await orchestrator.stop()


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def one(spans: Sequence[ReadableSpan], name: str, kind: SpanKind = SpanKind.INTERNAL) -> ReadableSpan:
    found = [span for span in named(spans, name) if span.kind == kind]
    assert len(found) == 1, f"{len(found)} spans {name!r} ({kind}) in {[s.name for s in spans]}"
    return found[0]


def parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, f"{span.name} has no parent"
    return int(span.parent.span_id)


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def service_of(span: ReadableSpan) -> object:
    return span.resource.attributes[SERVICE_NAME]


async def test_one_trace_from_submit_through_steps_to_the_status_service(
    services: tuple[Orchestrator, StatusService], exporter: InMemorySpanExporter
) -> None:
    orchestrator, status = services
    definition = job_definition([
        {"name": "prepare", "type": "sleep", "seconds": 0},
        {"name": "fan", "type": "fanout", "count": CHILDREN, "child": {"type": "sleep", "seconds": 0}},
    ])
    client_provider = provider(exporter, "test-client")
    async with Client(orchestrator.address, status.address,
                      interceptors=client_interceptors(client_provider)) as client:
        submitted = await client.submit(definition)
        view = await client.get(submitted.id)

        async def ended() -> bool | None:
            return True if named(exporter.get_finished_spans(), "apply job completed") else None

        await eventually(ended, "the status service to apply the job's end")
        view = await client.get(submitted.id)
    assert view.state == "completed"
    spans = exporter.get_finished_spans()

    # The client's call, the orchestrator's serving of it: the root of the job's trace.
    sent = one(spans, SUBMIT, SpanKind.CLIENT)
    served = one(spans, SUBMIT, SpanKind.SERVER)
    assert sent.parent is None and parent_of(served) == span_id(sent)
    assert service_of(sent) == "test-client" and service_of(served) == "stepstream-orchestrator"
    assert sent.context is not None
    trace_id = sent.context.trace_id
    job = [span for span in spans if span.attributes and span.attributes.get("stepstream.job_id") == submitted.id]
    assert all(span.context is not None and span.context.trace_id == trace_id for span in job)

    # Steps under the submit call; a step's attempts under it; a fan-out's children's attempts under it.
    prepare, fan = one(spans, "step prepare"), one(spans, "step fan")
    assert parent_of(prepare) == parent_of(fan) == span_id(served)
    assert prepare.attributes is not None and prepare.attributes["stepstream.state"] == "completed"
    attempt = one(spans, "attempt 1")
    assert parent_of(attempt) == span_id(prepare)
    for index in range(CHILDREN):
        child = one(spans, f"child {index} attempt 1")
        assert parent_of(child) == span_id(fan)
        assert child.attributes is not None and child.attributes["stepstream.child"] == index
    assert all(span.status.status_code != StatusCode.ERROR for span in job)

    # The status service applying the job's records (created, running, ended): same trace, same root.
    applied = [span for span in job if span.name.startswith("apply job ")]
    assert {span.name for span in applied} >= {"apply job pending", "apply job running", "apply job completed"}
    assert all(parent_of(span) == span_id(served) and service_of(span) == "stepstream-status" for span in applied)
    # The status service's calls have theirs too, with the client's as parent.
    read = [span for span in named(spans, "/stepstream.status.v1.StatusService/GetJob") if span.kind == SpanKind.SERVER]
    assert read and all(service_of(span) == "stepstream-status" and span.parent is not None for span in read)


async def test_a_failed_attempt_is_an_error_span_and_the_context_outlives_a_restart(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    config = orchestrator_config(tmp_path / "orchestrator")
    orchestrator = await start_orchestrator(config, tracing=Tracing(provider(exporter, "stepstream-orchestrator")))
    try:
        async with channel(orchestrator.address) as ch:
            stub = orch_grpc.OrchestratorServiceStub(ch)
            definition = job_definition([{"name": "broken", "type": "command", "command": ["false"], "retries": 1,
                                         "retry_backoff": "10ms"}])
            job_id = (await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))).job.id

            async def failed() -> bool | None:
                return True if named(exporter.get_finished_spans(), "step broken") else None

            await eventually(failed, "the step to fail")
    finally:
        await orchestrator.stop()
    spans = exporter.get_finished_spans()
    step = one(spans, "step broken")
    assert step.status.status_code == StatusCode.ERROR
    assert [parent_of(one(spans, f"attempt {n}")) for n in (1, 2)] == [span_id(step)] * 2
    assert one(spans, "attempt 2").status.status_code == StatusCode.ERROR

    # Restarted on the same data: the job record still carries the submit call's context.
    served = one(spans, SUBMIT, SpanKind.SERVER)
    assert served.context is not None
    again = await start_orchestrator(config)
    try:
        async with channel(again.address) as ch:
            job = (await orch_grpc.OrchestratorServiceStub(ch).GetJob(orch_pb.GetJobRequest(job_id=job_id))).job
    finally:
        await again.stop()
    submit = served.context
    assert job.trace_context["traceparent"].startswith(f"00-{submit.trace_id:032x}-{submit.span_id:016x}-")


async def test_a_cancelled_step_ends_its_spans_and_health_checks_make_none(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    """CancelJob reaches a running attempt at its await: its span and its step's end
    there, marked cancelled; probes are not traced by default."""
    orchestrator = await start_orchestrator(orchestrator_config(tmp_path / "orchestrator"),
                                            tracing=Tracing(provider(exporter, "stepstream-orchestrator")))
    try:
        async with channel(orchestrator.address) as ch:
            stub = orch_grpc.OrchestratorServiceStub(ch)
            definition = job_definition([{"name": "slow", "type": "command", "command": ["sleep", "30"]}])
            job_id = (await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))).job.id
            await wait_job_state(stub, job_id, {s.JOB_STATE_RUNNING})

            async def attempt_running() -> bool | None:
                job = await stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))
                return True if job.steps[0].step.state == s.STEP_STATE_RUNNING else None

            await eventually(attempt_running, "the attempt to start")
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            await stub.CancelJob(orch_pb.CancelJobRequest(job_id=job_id))

            async def ended() -> bool | None:
                return True if named(exporter.get_finished_spans(), "step slow") else None

            await eventually(ended, "the step's span to end")
    finally:
        await orchestrator.stop()
    spans = exporter.get_finished_spans()
    step, attempt = one(spans, "step slow"), one(spans, "attempt 1")
    assert parent_of(attempt) == span_id(step)
    for span in (step, attempt):
        assert span.attributes is not None and span.attributes["stepstream.state"] == "cancelled", span.name
        assert span.status.status_code != StatusCode.ERROR, "a cancellation is not an error"
    assert not [span for span in spans if span.name.startswith("/grpc.health.v1.Health/")]
    assert named(spans, "/stepstream.orchestrator.v1.OrchestratorService/CancelJob")


def test_otel_variables_are_the_only_switch() -> None:
    assert not configured({})
    assert not configured({"OTEL_SERVICE_NAME": "x", "OTEL_PROPAGATORS": "tracecontext"})
    assert not configured({"OTEL_TRACES_EXPORTER": "none"})
    assert not configured({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"})
    assert configured({"OTEL_TRACES_EXPORTER": "console"})
    assert configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"})


async def test_the_service_traces_as_otel_variables_say(tmp_path: Path) -> None:
    """The orchestrator as a subprocess, configured by OTEL_* alone (console exporter):
    its spans, with its service name, are on stdout once it stops."""
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "orchestrator-east"}
    service = orchestrator_process(tmp_path / "orchestrator", 0)
    service.env.update(env)
    service.start()
    try:
        async with channel(service.address) as ch:
            definition = job_definition([{"name": "only", "type": "sleep", "seconds": 0}])
            await orch_grpc.OrchestratorServiceStub(ch).SubmitJob(orch_pb.SubmitJobRequest(definition=definition))
        assert service.terminate() == 0
        assert service.process is not None and service.process.stdout is not None
        printed = service.process.stdout.read()
    finally:
        service.stop()
    decoder = json.JSONDecoder()
    spans, at = [], printed.find("{")
    while at != -1:
        span, end = decoder.raw_decode(printed, at)
        spans.append(span)
        at = printed.find("{", end)
    names = {span["name"] for span in spans}
    assert {SUBMIT, "step only", "attempt 1"} <= names
    assert {span["resource"]["attributes"]["service.name"] for span in spans} == {"orchestrator-east"}


NO_OTEL = """
import asyncio, sys, threading
from pathlib import Path
from stepstream_client import Client
from stepstream_client.cli import main
from orchestrator_svc.app import start as start_orchestrator
from status_svc.app import start as start_status
from tests.conftest import orchestrator_config, status_config
from tests.helpers import job_definition

data, addresses, ready, done = Path(sys.argv[1]), [], threading.Event(), threading.Event()

async def serve() -> None:
    orchestrator = await start_orchestrator(orchestrator_config(data / "orchestrator"))
    status = await start_status(status_config(data / "status", orchestrator.address))
    addresses.extend([orchestrator.address, status.address])
    ready.set()
    await asyncio.to_thread(done.wait)
    await status.stop()
    await orchestrator.stop()

async def use() -> str:
    async with Client(*addresses) as client:
        job = await client.submit(job_definition([{"name": "only", "type": "sleep", "seconds": 0}]))
        await client.get(job.id)
        return job.id

services = threading.Thread(target=lambda: asyncio.run(serve()))
services.start()
try:
    assert ready.wait(60)
    job_id = asyncio.run(use())
    try:
        main(["get", job_id, "--orchestrator", addresses[0], "--status", addresses[1]])
    except SystemExit as exit:
        assert exit.code == 0, exit.code
finally:
    done.set()
    services.join()
print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
"""


def test_tracing_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    """Both services and the client, a job run through them, OTEL_* unset: no opentelemetry module is loaded."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    ran = subprocess.run([sys.executable, "-c", NO_OTEL, str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120, check=False)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().splitlines()[-1] == "[]"
