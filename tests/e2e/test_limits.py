"""Limits that hold against a hostile or clumsy client, against real services.

Each limit of the README's "Limits" table is exceeded here: the call over it
gets a clear error (RESOURCE_EXHAUSTED with google.rpc QuotaFailure and
ErrorInfo naming the setting; INVALID_ARGUMENT with the field violations and
an ErrorInfo naming the settings, for a definition), nothing already accepted
is lost, everyone else is still served, and health is SERVING afterwards.
Limits are set low through the services' own settings, so that reaching them
is cheap; the defaults are what the README states.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from stepstream.channel import bearer_metadata
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import definition_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from orchestrator_svc.api.servicer import ApiLimits, ByteBudget, OrchestratorServicer
from orchestrator_svc.app import Orchestrator
from orchestrator_svc.app import start as start_orchestrator
from orchestrator_svc.config import OrchestratorConfig
from orchestrator_svc.domain.spec import DefinitionLimits
from status_svc.app import StatusService
from status_svc.app import start as start_status
from stepstream_common.errors import ResourceExhaustedError
from stepstream_common.tokens import new_entry
from tests.conftest import orchestrator_config, status_config
from tests.helpers import DEADLINE, channel, eventually, job_definition, read_watch, wait_job_state, wait_status_job

if TYPE_CHECKING:
    OrchStub = orch_grpc.OrchestratorServiceAsyncStub
    StatusStub = status_grpc.StatusServiceAsyncStub
else:
    OrchStub = orch_grpc.OrchestratorServiceStub
    StatusStub = status_grpc.StatusServiceStub

# A client that reads nothing fills this little window at once: its streams stall.
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
SLEEP0 = {"type": "sleep", "seconds": 0}


# --- services with low limits ------------------------------------------------------------------------------------

@asynccontextmanager
async def orchestrator_with(tmp_path: Path, **settings: Any) -> AsyncIterator[Orchestrator]:
    running = await start_orchestrator(orchestrator_config(tmp_path / "orchestrator", **settings))
    try:
        yield running
    finally:
        await running.stop()


@asynccontextmanager
async def status_with(tmp_path: Path, orchestrator: Orchestrator, **settings: Any) -> AsyncIterator[StatusService]:
    running = await start_status(status_config(tmp_path / "status", orchestrator.address, **settings))
    try:
        yield running
    finally:
        await running.stop()


# --- what an error carries ----------------------------------------------------------------------------------------

def detail(error: grpc.aio.AioRpcError, kind: type[message.Message]) -> Any:
    """The google.rpc detail of type `kind` in the error's trailer."""
    status = rpc_status.from_call(error)
    assert status is not None, (error.code(), error.details())
    for packed in status.details:
        found = kind()
        if packed.Unpack(found):
            return found
    raise AssertionError(f"no {kind.__name__} in {status}")


def assert_exhausted(error: grpc.aio.AioRpcError, reason: str, setting: str, limit: str) -> None:
    """RESOURCE_EXHAUSTED, naming the limit (ErrorInfo) and what was counted (QuotaFailure)."""
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
    info = detail(error, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, dict(info.metadata)) == (reason, "stepstream",
                                                               {"setting": setting, "limit": limit})
    quota = detail(error, error_details_pb2.QuotaFailure)
    assert len(quota.violations) == 1 and quota.violations[0].subject
    assert setting in (error.details() or "")


async def failure(call: Any, received: Callable[[Any], object] = lambda _: None) -> grpc.aio.AioRpcError:
    """The error a unary call, or a stream read to its end (each message to `received`), finishes with."""
    error: grpc.aio.AioRpcError | None = None
    if isinstance(call, grpc.aio.UnaryStreamCall):
        _, error = await read_all(call, received)
    else:
        try:
            async with asyncio.timeout(DEADLINE):
                await call
        except grpc.aio.AioRpcError as refused:
            error = refused
    assert error is not None, "the call succeeded"
    return error


async def read_all(
    call: Any, received: Callable[[Any], object] = lambda _: None
) -> tuple[int, grpc.aio.AioRpcError | None]:
    """How many messages a stream sends before it ends (each to `received`), and the
    error it ends with (None: OK). With read(), so a stream read from before can be read on."""
    count = 0
    try:
        async with asyncio.timeout(DEADLINE):
            while (response := await call.read()) is not grpc.aio.EOF:
                received(response)
                count += 1
    except grpc.aio.AioRpcError as error:
        return count, error
    return count, None


def own_channel(address: str, *options: tuple[str, Any]) -> grpc.aio.Channel:
    """A channel with a connection of its own (channels alike share one by default)."""
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1), *options])


async def assert_healthy(*addresses: str) -> None:
    for address in addresses:
        async with channel(address) as ch:
            answer = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def first_message(call: Any) -> Any:
    """The stream's first message: it was admitted."""
    return await read_watch(call)


async def admitted(open_stream: Callable[[], Any]) -> bool | None:
    """For `eventually`: True once a stream opened now is admitted (then it is
    cancelled), None while it is refused RESOURCE_EXHAUSTED."""
    call = open_stream()
    try:
        await first_message(call)
    except grpc.aio.AioRpcError as refused:
        if refused.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return None
    call.cancel()
    return True


# --- 1. request size, and the bytes of submissions in flight -------------------------------------------------------

async def test_a_request_over_max_request_bytes_is_refused_by_both_services(tmp_path: Path) -> None:
    limit = 64 * 1024
    async with orchestrator_with(tmp_path, max_request_bytes=limit) as orchestrator, \
            status_with(tmp_path, orchestrator, max_request_bytes=limit) as status, \
            channel(orchestrator.address) as och, channel(status.address) as sch:
        orch, stat = OrchStub(och), StatusStub(sch)
        big = job_definition([{"name": "a", **SLEEP0}], name="x" * limit)
        for call in (orch.SubmitJob(orch_pb.SubmitJobRequest(definition=big)),
                     stat.GetJob(status_pb.GetJobRequest(job_id="y" * limit))):
            error = await failure(call)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"vs. {limit})" in (error.details() or ""), error.details()
        # Nothing recorded; the same connections go on working.
        assert not (await orch.ListJobs(orch_pb.ListJobsRequest())).jobs
        job = (await orch.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition([{"name": "a", **SLEEP0}]))))
        await wait_job_state(orch, job.job.id, {s.JOB_STATE_COMPLETED})
        await wait_status_job(stat, job.job.id, lambda found: found.job.state == s.JOB_STATE_COMPLETED, "the job")
        await assert_healthy(orchestrator.address, status.address)


def test_the_submit_budget_takes_one_request_alone_whatever_its_size() -> None:
    budget = ByteBudget(100)
    budget.take(1_000)  # alone: taken, however large
    with pytest.raises(ResourceExhaustedError) as refused:
        budget.take(1)
    assert (refused.value.reason, refused.value.setting, refused.value.limit) == (
        "SUBMIT_BYTES", "--max-submit-bytes", 100)
    budget.give_back(1_000)
    budget.take(60)
    budget.take(40)
    with pytest.raises(ResourceExhaustedError):
        budget.take(1)
    budget.give_back(60)
    budget.give_back(40)
    assert budget.in_use == 0


class _Context:
    """The part of grpc.aio.ServicerContext SubmitJob uses (none)."""


async def test_a_submission_over_the_budget_is_refused_while_another_is_recorded(orchestrator: Orchestrator) -> None:
    """The orchestrator's own engine and store: one submission holds its bytes
    until it is recorded, so a second one meanwhile is RESOURCE_EXHAUSTED; both
    sides of it are real (no stand-ins), only the budget is tiny."""
    servicer = OrchestratorServicer(orchestrator.engine, orchestrator.store, orchestrator.feed,
                                    orchestrator.store.log_id, 0.2, output=orchestrator.output,
                                    limits=ApiLimits(max_submit_bytes=1))
    request = orch_pb.SubmitJobRequest(definition=job_definition([{"name": "a", **SLEEP0}]))
    context: Any = _Context()
    first = asyncio.ensure_future(servicer.SubmitJob(request, context))
    await asyncio.sleep(0)  # the first one starts: it holds its bytes while the engine records it
    assert servicer.submissions.in_use == request.ByteSize()
    with pytest.raises(ResourceExhaustedError) as refused:
        await servicer.SubmitJob(request, context)
    assert refused.value.reason == "SUBMIT_BYTES"
    recorded = await first
    assert servicer.submissions.in_use == 0
    assert (await servicer.SubmitJob(request, context)).job.id != recorded.job.id


async def test_a_burst_of_submissions_is_recorded_or_refused_whole(tmp_path: Path) -> None:
    """Over the wire: many submissions at once, with a budget of one at a time:
    each is recorded, or refused RESOURCE_EXHAUSTED naming --max-submit-bytes
    and recorded by nobody; afterwards a submission goes through."""
    async with orchestrator_with(tmp_path, max_submit_bytes=1) as orchestrator, \
            channel(orchestrator.address) as ch:
        stub = OrchStub(ch)
        requests = [orch_pb.SubmitJobRequest(definition=job_definition([{"name": "a", **SLEEP0}], name=f"burst-{i}"))
                    for i in range(20)]
        answers = await asyncio.gather(*(stub.SubmitJob(r) for r in requests), return_exceptions=True)
        accepted = {a.job.name for a in answers if isinstance(a, orch_pb.SubmitJobResponse)}
        for answer in answers:
            if not isinstance(answer, orch_pb.SubmitJobResponse):
                assert isinstance(answer, grpc.aio.AioRpcError), answer
                assert_exhausted(answer, "SUBMIT_BYTES", "--max-submit-bytes", "1")
        assert accepted
        listed = await stub.ListJobs(orch_pb.ListJobsRequest(page_size=100))
        assert {job.name for job in listed.jobs} == accepted
        later = await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition([{"name": "a", **SLEEP0}])))
        await wait_job_state(stub, later.job.id, {s.JOB_STATE_COMPLETED})
        await assert_healthy(orchestrator.address)


# --- 2. definition size ------------------------------------------------------------------------------------------

LOW = DefinitionLimits(max_steps=4, max_dependencies=2, max_name_chars=10, max_string_chars=50,
                       max_fanout_children=5, max_fanout_concurrency=2, max_params_depth=3, max_params_bytes=300)


Steps = list[Mapping[str, Any]]


def steps(count: int) -> Steps:
    return [{"name": f"s{i}", **SLEEP0} for i in range(count)]


def fan(**params: Any) -> Steps:
    return [{"name": "fan", "type": "fanout", "child": SLEEP0, **params}]


def python(detail: Any) -> Steps:
    """A python step (it fails by design when it runs: being taken is what counts here)."""
    return [{"name": "py", "type": "python", "function": "tests.helpers.workers:raises_value_error",
             "args": {"detail": detail}}]


def last_depending_on(count: int) -> Steps:
    return [*steps(count), {"name": "last", **SLEEP0, "depends_on": [f"s{i}" for i in range(count)]}]


# limit -> (a definition just over it, the field at fault, a part of its description, the same just within it)
OVER: dict[str, tuple[dict[str, Any], str, str, dict[str, Any]]] = {
    "max-steps": ({"steps": steps(5)}, "definition.steps", "at most 4 steps", {"steps": steps(4)}),
    "max-dependencies": ({"steps": last_depending_on(3)}, "definition.steps[3].depends_on.steps",
                         "at most 2 dependencies, got 3", {"steps": last_depending_on(2)}),
    "max-name-chars": ({"steps": steps(1), "name": "n" * 11}, "definition.name", "at most 10 characters",
                       {"steps": steps(1), "name": "n" * 10}),
    "max-string-chars": ({"steps": python("t" * 51)}, "definition.steps[0].params.args.detail",
                         "at most 50 characters, got 51", {"steps": python("t" * 50)}),
    "max-fanout-children": ({"steps": fan(items=list("abcdef"))}, "definition.steps[0].params.items",
                            "at most 5 items, got 6", {"steps": fan(items=list("abcde"))}),
    "max-fanout-concurrency": ({"steps": fan(count=1, concurrency=3)}, "definition.steps[0].params.concurrency",
                               "at most 2 children at once, got 3", {"steps": fan(count=1, concurrency=2)}),
    "max-params-depth": ({"steps": python({"a": {"a": 1}})}, "definition.steps[0].params.args.detail.a",
                         "at most 3 levels", {"steps": python({"a": 1})}),
    "max-params-bytes": ({"steps": python("a" * 300)}, "definition.steps", "params of at most 300 bytes",
                         {"steps": python("a" * 20)}),
}
TERMINAL: set[int] = {s.JOB_STATE_COMPLETED, s.JOB_STATE_FAILED}


def definition_of(fields: Mapping[str, Any]) -> definition_pb2.JobDefinition:
    return job_definition(fields["steps"], name=fields.get("name", "limits"))


@pytest.fixture
async def low_limits(tmp_path: Path) -> AsyncIterator[OrchStub]:
    settings = {field: getattr(LOW, field) for field in LOW.__dataclass_fields__}
    async with orchestrator_with(tmp_path, **settings) as orchestrator, channel(orchestrator.address) as ch:
        yield OrchStub(ch)


@pytest.mark.parametrize("setting", list(OVER))
async def test_a_definition_over_a_limit_is_invalid_argument_naming_the_field_and_the_setting(
    low_limits: OrchStub, setting: str
) -> None:
    over, field, description, within = OVER[setting]
    error = await failure(low_limits.SubmitJob(orch_pb.SubmitJobRequest(definition=definition_of(over))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    violations = [(v.field, v.description) for v in detail(error, error_details_pb2.BadRequest).field_violations]
    assert any(f == field and description in d for f, d in violations), violations
    info = detail(error, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("LIMIT_EXCEEDED", "stepstream")
    assert dict(info.metadata) == {setting: str(getattr(LOW, setting.replace("-", "_")))}
    assert not (await low_limits.ListJobs(orch_pb.ListJobsRequest())).jobs
    # Just within the limit, the same definition is taken.
    accepted = await low_limits.SubmitJob(orch_pb.SubmitJobRequest(definition=definition_of(within)))
    await wait_job_state(low_limits, accepted.job.id, TERMINAL)


async def test_a_definition_over_several_limits_names_them_all_with_its_other_problems(low_limits: OrchStub) -> None:
    definition = job_definition([*steps(4), {"name": "bad", "type": "nope"}], name="n" * 11)
    error = await failure(low_limits.SubmitJob(orch_pb.SubmitJobRequest(definition=definition)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = {v.field for v in detail(error, error_details_pb2.BadRequest).field_violations}
    assert violations == {"definition.name", "definition.steps", "definition.steps[4].type"}
    assert dict(detail(error, error_details_pb2.ErrorInfo).metadata) == {"max-name-chars": "10", "max-steps": "4"}


async def test_concurrency_has_a_documented_maximum(orchestrator_stub: OrchStub) -> None:
    most = OrchestratorConfig.max_fanout_concurrency
    assert most == DefinitionLimits().max_fanout_concurrency == 1_000
    error = await failure(orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(
        definition=job_definition(fan(count=1, concurrency=most + 1)))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(detail(error, error_details_pb2.ErrorInfo).metadata) == {"max-fanout-concurrency": str(most)}
    accepted = await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(
        definition=job_definition(fan(count=1, concurrency=most))))
    await wait_job_state(orchestrator_stub, accepted.job.id, {s.JOB_STATE_COMPLETED})


# --- 3. streams ------------------------------------------------------------------------------------------------

def events(stub: OrchStub) -> Any:
    return stub.StreamStepEvents(orch_pb.StreamStepEventsRequest())


async def test_streams_per_connection(tmp_path: Path) -> None:
    """The third stream on one connection is refused; the connection's unary calls,
    other connections' streams and a new stream once one ended are served."""
    async with orchestrator_with(tmp_path, max_streams_per_connection=2) as orchestrator, \
            status_with(tmp_path, orchestrator, max_streams_per_connection=2) as status:
        await three_streams_on_a_connection(orchestrator.address, lambda ch: events(OrchStub(ch)))
        await three_streams_on_a_connection(
            status.address, lambda ch: StatusStub(ch).WatchJobs(status_pb.WatchJobsRequest()))
        await assert_healthy(orchestrator.address, status.address)


async def three_streams_on_a_connection(address: str, open_stream: Callable[[grpc.aio.Channel], Any]) -> None:
    async with own_channel(address) as mine, own_channel(address) as other:
        held = [open_stream(mine) for _ in range(2)]
        for call in held:
            await first_message(call)
        error = await failure(open_stream(mine))
        assert_exhausted(error, "STREAMS_PER_CONNECTION", "--max-streams-per-connection", "2")
        subject = detail(error, error_details_pb2.QuotaFailure).violations[0].subject
        assert subject.startswith("connection ipv4:127.0.0.1:"), subject
        await first_message(open_stream(other))
        await health_pb2_grpc.HealthStub(mine).Check(health_pb2.HealthCheckRequest())  # a unary call: served
        held[0].cancel()
        await eventually(lambda: admitted(lambda: open_stream(mine)), "a stream once one on the connection ended")


async def test_streams_in_the_whole_service(tmp_path: Path) -> None:
    async with orchestrator_with(tmp_path, max_streams=2) as orchestrator, \
            own_channel(orchestrator.address) as a, own_channel(orchestrator.address) as b, \
            own_channel(orchestrator.address) as c:
        for ch in (a, b):
            await first_message(events(OrchStub(ch)))
        error = await failure(events(OrchStub(c)))
        assert_exhausted(error, "STREAMS", "--max-streams", "2")
        # Unary calls are not streams: served.
        assert not (await OrchStub(c).ListJobs(orch_pb.ListJobsRequest())).jobs
        await assert_healthy(orchestrator.address)


def tokens_file(path: Path, *names: str) -> dict[str, str]:
    """A tokens file of one follower token per name (mode 0600); name -> token."""
    tokens: dict[str, str] = {}
    lines = []
    for name in names:
        entry, tokens[name] = new_entry(name, "follower")
        lines.append(entry.line())
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return tokens


async def test_streams_per_token(tmp_path: Path) -> None:
    """One token's streams are counted across connections; another token's are not."""
    tokens = tokens_file(tmp_path / "tokens", "fern", "flo")
    async with orchestrator_with(tmp_path, tokens_file=tmp_path / "tokens", max_streams_per_token=1) as orchestrator, \
            own_channel(orchestrator.address) as one, own_channel(orchestrator.address) as two:
        def stream(ch: grpc.aio.Channel, name: str) -> Any:
            return OrchStub(ch).StreamStepEvents(orch_pb.StreamStepEventsRequest(),
                                                 metadata=bearer_metadata(tokens[name]))

        await first_message(stream(one, "fern"))
        error = await failure(stream(two, "fern"))
        assert_exhausted(error, "STREAMS_PER_TOKEN", "--max-streams-per-token", "1")
        assert detail(error, error_details_pb2.QuotaFailure).violations[0].subject == "token 'fern'"
        await first_message(stream(two, "flo"))
        await assert_healthy(orchestrator.address)


async def big_job(stub: OrchStub, children: int) -> str:
    """A finished job with `children` children: a snapshot of it fills a small window many times over."""
    definition = job_definition(fan(count=children, concurrency=100))
    job_id = (await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))).job.id
    await wait_job_state(stub, job_id, {s.JOB_STATE_COMPLETED})
    return job_id


async def test_snapshots_in_flight(tmp_path: Path) -> None:
    """While a snapshot is being sent (to a client reading nothing), a second is
    refused; once the first is cancelled, snapshots are served again."""
    async with orchestrator_with(tmp_path, max_snapshots=1) as orchestrator, \
            channel(orchestrator.address) as ch, own_channel(orchestrator.address, *SMALL_WINDOW) as slow:
        stub = OrchStub(ch)
        await big_job(stub, 1200)
        stalled = OrchStub(slow).StreamSnapshot(orch_pb.StreamSnapshotRequest())
        await first_message(stalled)
        error = await failure(stub.StreamSnapshot(orch_pb.StreamSnapshotRequest()))
        assert_exhausted(error, "SNAPSHOTS", "--max-snapshots", "1")
        await first_message(events(stub))  # other streams are served meanwhile
        stalled.cancel()

        async def snapshot_again() -> bool | None:
            count, ended = await read_all(stub.StreamSnapshot(orch_pb.StreamSnapshotRequest()))
            if ended is not None:
                assert ended.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return None
            return count > 2

        await eventually(snapshot_again, "a whole snapshot once the first was cancelled")
        await assert_healthy(orchestrator.address)


async def test_a_stalled_snapshot_lets_go_of_its_read_and_ends_resource_exhausted(tmp_path: Path) -> None:
    """A client that stops reading a snapshot does not hold the database read (nor
    the snapshot's slot) beyond --stream-stall-timeout: another snapshot is then
    served, and the stalled client, reading again, gets what was on its way
    and RESOURCE_EXHAUSTED STREAM_STALLED."""
    async with orchestrator_with(tmp_path, max_snapshots=1, stream_stall_timeout=0.5) as orchestrator, \
            channel(orchestrator.address) as ch, own_channel(orchestrator.address, *SMALL_WINDOW) as slow:
        stub = OrchStub(ch)
        await big_job(stub, 1200)
        whole, ended = await read_all(stub.StreamSnapshot(orch_pb.StreamSnapshotRequest()))
        assert ended is None
        stalled = OrchStub(slow).StreamSnapshot(orch_pb.StreamSnapshotRequest())
        await first_message(stalled)

        async def snapshot_again() -> bool | None:
            count, refused = await read_all(stub.StreamSnapshot(orch_pb.StreamSnapshotRequest()))
            if refused is not None:
                assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return None
            return count == whole

        await eventually(snapshot_again, "the stalled snapshot to let go of its slot")
        count, error = await read_all(stalled)
        assert error is not None and 0 < count < whole - 1
        assert_exhausted(error, "STREAM_STALLED", "--stream-stall-timeout", "0.5")
        await assert_healthy(orchestrator.address)


async def test_a_stalled_event_stream_lets_go_of_its_subscription(tmp_path: Path) -> None:
    """A StreamStepEvents client that stops reading while events flow: past
    --stream-stall-timeout its subscription is gone (the feed holds nothing for
    it); reading again, it gets what was on its way, then RESOURCE_EXHAUSTED,
    and resumes from its last seq with nothing lost."""
    async with orchestrator_with(tmp_path, stream_stall_timeout=0.5) as orchestrator, \
            channel(orchestrator.address) as ch, own_channel(orchestrator.address, *SMALL_WINDOW) as slow:
        stub = OrchStub(ch)
        stalled = OrchStub(slow).StreamStepEvents(orch_pb.StreamStepEventsRequest())
        await first_message(stalled)  # a heartbeat: subscribed
        assert orchestrator.feed.subscriber_count == 1
        await big_job(stub, 1200)

        async def unsubscribed() -> bool | None:
            return orchestrator.feed.subscriber_count == 0 or None

        await eventually(unsubscribed, "the stalled stream to let go of its subscription")
        seqs: list[int] = []
        error = await failure(stalled, lambda response: seqs.extend(event.seq for event in response.batch.events))
        assert_exhausted(error, "STREAM_STALLED", "--stream-stall-timeout", "0.5")
        assert seqs == list(range(1, len(seqs) + 1))
        latest = orchestrator.feed.latest
        assert len(seqs) < latest
        resumed: list[int] = []
        call = stub.StreamStepEvents(orch_pb.StreamStepEventsRequest(after_seq=seqs[-1] if seqs else 0))
        async with asyncio.timeout(DEADLINE):
            async for response in call:
                resumed.extend(event.seq for event in response.batch.events)
                if resumed and resumed[-1] == latest:
                    break
        call.cancel()
        assert seqs + resumed == list(range(1, latest + 1))
        await assert_healthy(orchestrator.address)


async def test_watchers_per_job(tmp_path: Path) -> None:
    async with orchestrator_with(tmp_path) as orchestrator, \
            status_with(tmp_path, orchestrator, max_watchers_per_job=2) as status, \
            channel(orchestrator.address) as och, channel(status.address) as sch:
        orch, stat = OrchStub(och), StatusStub(sch)
        ids = [(await orch.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(steps(1))))).job.id
               for _ in range(2)]
        for job_id in ids:
            await wait_status_job(stat, job_id, lambda found: True, "the job to reach the status service")
        watches = [stat.WatchJob(status_pb.WatchJobRequest(job_id=ids[0])) for _ in range(2)]
        for call in watches:
            await first_message(call)
        error = await failure(stat.WatchJob(status_pb.WatchJobRequest(job_id=ids[0])))
        assert_exhausted(error, "WATCHERS_PER_JOB", "--max-watchers-per-job", "2")
        assert detail(error, error_details_pb2.QuotaFailure).violations[0].subject == f"job '{ids[0]}'"
        await first_message(stat.WatchJob(status_pb.WatchJobRequest(job_id=ids[1])))
        await first_message(stat.WatchJobs(status_pb.WatchJobsRequest()))
        watches[0].cancel()
        await eventually(lambda: admitted(lambda: stat.WatchJob(status_pb.WatchJobRequest(job_id=ids[0]))),
                         "a watcher of the job once one ended")
        await assert_healthy(orchestrator.address, status.address)

