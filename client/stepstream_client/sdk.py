"""The async client: submits and cancels through the orchestrator, reads and
watches through the status service, and raises the typed errors of
stepstream_client.errors for every failure.

    async with Client() as client:
        job = await client.submit("examples/nightly-ingest.toml")
        async with client.watch(job.id) as views:
            async for view in views:
                print(view.revision, view.state, [(s.name, s.state) for s in view.steps])

Lists are async iterators that fetch page after page as they are consumed
(`page_size` per request); stop iterating to stop fetching.

Every unary call has a timeout, and the idempotent ones are retried on
UNAVAILABLE and DEADLINE_EXCEEDED under an overall deadline: the per-method
table, and how to override it, is in stepstream_client._policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from stepstream.backoff import DEFAULT_BACKOFF, Backoff
from stepstream.channel import (
    DEFAULT_ORCHESTRATOR,
    DEFAULT_STATUS,
    ClientTLS,
    bearer_metadata,
    channel_options,
    client_tls,
    open_channel,
)
from stepstream.common.v1 import records_pb2, states_pb2
from stepstream.orchestrator.v1 import definition_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.states import TERMINAL_STEP_STATES, job_state_from_word, step_state_from_word
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from stepstream_client import _policy as policy
from stepstream_client._policy import DEFAULT, CallPolicy, MethodPolicy, Retry
from stepstream_client.definitions import definition_from_mapping, load_definition
from stepstream_client.errors import NotFoundError, RpcError
from stepstream_client.logs import AttemptLines
from stepstream_client.models import (
    OUTPUT_STREAM_WORDS,
    ChildView,
    JobRecord,
    JobSummary,
    JobView,
    LogLine,
    LogPosition,
    OutputSummary,
    SubmittedJob,
    child_view,
    job_record,
    job_summary,
    job_view,
    output_summary,
    submitted_job,
)
from stepstream_client.watch import Applied, IngestGrace, JobsWatch, JobsWatchLoop, JobWatch, WatchLoop

# Reconnect quickly once a restarted service is back (gRPC's own default backs off to 2 minutes).
_CHANNEL_OPTIONS = [
    *channel_options(),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

# How often logs() asks, following a step, whether its next attempt has begun (or the step ended).
_STEP_POLL = Backoff(initial=0.05, cap=1.0)
MAX_INT32 = 2**31 - 1  # the most an int32 field of a request holds (a child, an attempt, a tail)

Definition = str | Path | Mapping[str, Any] | definition_pb2.JobDefinition
T = TypeVar("T")


def read_token(token: str | None, token_file: str | Path | None) -> str:
    """The token to present: `token`, else what `token_file` holds (surrounding
    whitespace aside), else "" (none). ValueError if both are given, the file
    cannot be read, or the token is not one gRPC metadata can carry (printable
    ASCII without spaces)."""
    if token is not None and token_file is not None:
        raise ValueError("give either a token or a token file, not both")
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the token file {token_file}: {getattr(error, 'strerror', None) or error}"
                             ) from error
        if not token:
            raise ValueError(f"the token file {token_file} is empty")
    if token and not (token.isascii() and token.isprintable() and " " not in token):
        raise ValueError("a token is printable ASCII without spaces")
    return token or ""


class _BearerToken:
    """Presents a token on every call: as metadata, which works over plaintext too,
    unlike gRPC's call credentials."""

    def __init__(self, token: str) -> None:
        self._metadata = bearer_metadata(token)

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


# One interceptor per kind of call the SDK makes: a channel files an interceptor under
# the first kind it implements only.
class _BearerTokenUnary(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails, request: Any,
    ) -> Any:
        return await continuation(self._with_token(client_call_details), request)


class _BearerTokenStream(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails, request: Any,
    ) -> Any:
        return await continuation(self._with_token(client_call_details), request)


def as_definition(definition: Definition) -> definition_pb2.JobDefinition:
    """A file path (.toml, .yaml, .yml, .json), a mapping of the file's shape, or the message itself."""
    if isinstance(definition, definition_pb2.JobDefinition):
        return definition
    if isinstance(definition, str | Path):
        return load_definition(Path(definition))
    return definition_from_mapping(definition)


class Client:
    """Async client for both services; use `async with Client(...) as client`.

    Channels are opened on first use, inside the running event loop.
    `stale_after_heartbeats`: a watch with no message for that many of the
    server's heartbeat intervals shows `live=False` and reconnects.
    `ingest_grace`: seconds a NOT_FOUND from the status service is retried
    while the orchestrator knows the job (it was just submitted).
    `attempt_timeout`: seconds each attempt of every unary call may take, and `retry`:
    how every idempotent call is retried (None: never), instead of the
    per-method defaults of stepstream_client._policy; each method takes both
    for one call too. `reconnect_backoff`: the waits between a watch's reconnects.
    `interceptors`: grpc.aio client interceptors for both channels (e.g. to add
    metadata, trace, or count calls).

    TLS, for both services: `tls=True` verifies their certificates against the
    system's trusted CAs, `tls_ca` (a PEM file) against that CA instead;
    `tls_server_name` is the name their certificates must carry when it is not
    the host dialed; `tls_cert` and `tls_key` (PEM files) are the client
    certificate for services that require one (mTLS). Any of these turns TLS
    on; or pass `tls=ClientTLS(...)` (stepstream.channel) with the PEM in
    memory. The files are read here: ValueError if one cannot be.

    A token, for services that require one (their --tokens-file): `token`, or
    `token_file`, a file holding it (read here: ValueError if it cannot be).
    It is sent as `authorization: Bearer TOKEN` metadata on every call, after
    any of `interceptors` has seen the call: an interceptor that logs metadata
    never sees it. A refused token raises UnauthenticatedError, a role not
    allowed PermissionDeniedError; neither is retried.
    """

    def __init__(
        self,
        orchestrator: str = DEFAULT_ORCHESTRATOR,
        status: str = DEFAULT_STATUS,
        *,
        stale_after_heartbeats: float = 3,
        ingest_grace: float = 10.0,
        attempt_timeout: float | None = None,
        retry: Retry = DEFAULT,
        reconnect_backoff: Backoff = DEFAULT_BACKOFF,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        tls: bool | ClientTLS | None = None,
        tls_ca: str | Path | None = None,
        tls_server_name: str | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
    ) -> None:
        self.orchestrator_address = orchestrator
        self.status_address = status
        self._stale_after_heartbeats = stale_after_heartbeats
        self._ingest_grace = ingest_grace
        self._overrides = CallPolicy(attempt_timeout, retry)
        self._backoff = reconnect_backoff
        presented = read_token(token, token_file)
        with_token: list[grpc.aio.ClientInterceptor] = (
            [_BearerTokenUnary(presented), _BearerTokenStream(presented)] if presented else [])
        self._interceptors = [*interceptors, *with_token]
        self._tls = client_tls(tls, ca=tls_ca, cert=tls_cert, key=tls_key, server_name=tls_server_name)
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Jobs this client submitted, and where: reads of them wait until the status
        # service has applied that far, so a job just submitted is never NOT_FOUND.
        self._positions: dict[str, LogPosition] = {}

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close both channels. Close watches first: one left open fails on its next read."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = open_channel(
                address, tls=self._tls, options=_CHANNEL_OPTIONS, interceptors=self._interceptors
            )
        return self._channels[address]

    @property
    def _orchestrator(self) -> orch_grpc.OrchestratorServiceAsyncStub:
        return orch_grpc.OrchestratorServiceStub(self._channel(self.orchestrator_address))

    @property
    def _status(self) -> status_grpc.StatusServiceAsyncStub:
        return status_grpc.StatusServiceStub(self._channel(self.status_address))

    @property
    def _orchestrator_target(self) -> str:
        return f"the orchestrator at {self.orchestrator_address}"

    @property
    def _status_target(self) -> str:
        return f"the status service at {self.status_address}"

    async def _call(
        self, method: MethodPolicy, target: str, invoke: Callable[[float], Awaitable[T]],
        attempt_timeout: float | None = None, retry: Retry = DEFAULT,
    ) -> T:
        """`invoke(timeout)` under `method`'s policy (as overridden); failures become typed errors naming `target`."""
        timeout, retry_policy = self._overrides.resolve(method, attempt_timeout, retry)
        return await policy.call(invoke, target=target, attempt_timeout=timeout, retry=retry_policy)

    async def submit(
        self, definition: Definition, *, request_id: str = "", attempt_timeout: float | None = None,
        retry: Retry = DEFAULT,
    ) -> SubmittedJob:
        """Start a job. InvalidArgumentError (with `violations`) if the server rejects
        the definition; DefinitionError if it cannot even be read.

        With a `request_id`, a repeated submit returns the job that id created, so
        it is retried like a read; without one it is sent once (ValueError if
        `retry` asks otherwise), since a retry could start a second job.
        """
        request = orch_pb.SubmitJobRequest(definition=as_definition(definition), request_id=request_id)
        method = policy.SUBMIT_JOB_WITH_REQUEST_ID if request_id else policy.SUBMIT_JOB
        response = await self._call(
            method, self._orchestrator_target, lambda t: self._orchestrator.SubmitJob(request, timeout=t),
            attempt_timeout, retry,
        )
        submitted = submitted_job(response)
        self._positions[submitted.id] = submitted.position
        return submitted

    async def cancel(
        self, job_id: str, *, attempt_timeout: float | None = None, retry: Retry = DEFAULT
    ) -> JobRecord:
        """Request cancellation (a no-op for a cancelled job; FailedPreconditionError
        for a completed or failed one). Returns the job as recorded right after."""
        request = orch_pb.CancelJobRequest(job_id=job_id)
        response = await self._call(
            policy.CANCEL_JOB, self._orchestrator_target, lambda t: self._orchestrator.CancelJob(request, timeout=t),
            attempt_timeout, retry,
        )
        return job_record(response.job)

    async def get(
        self, job_id: str, *, not_older_than: LogPosition | None = None, attempt_timeout: float | None = None,
        retry: Retry = DEFAULT,
    ) -> JobView:
        """The job and its steps from the status service, valid at `revision`.

        `not_older_than` (e.g. SubmittedJob.position from another process): the
        answer includes everything the orchestrator had logged up to there. Jobs
        this client submitted get that by themselves.
        """
        grace = self._grace()
        failures = 0
        request = status_pb.GetJobRequest(job_id=job_id)
        self._position_of(job_id, not_older_than, request)
        while True:
            try:
                response = await self._call(
                    policy.GET_JOB, self._status_target, lambda t: self._status.GetJob(request, timeout=t),
                    attempt_timeout, retry,
                )
            except NotFoundError:
                if not await grace.keep_waiting(job_id):
                    raise
                await self._sleep_backoff(failures)
                failures += 1
                continue
            return job_view(response.job, list(response.steps), response.revision)

    def list(
        self, *, states: Iterable[str] = (), name: str = "", page_size: int = 100,
        attempt_timeout: float | None = None, retry: Retry = DEFAULT,
    ) -> AsyncIterator[JobSummary]:
        """Job headers, newest first, filtered by state words ("running", ...) and exact name."""
        wanted = [states_pb2.JobState.ValueType(job_state_from_word(word)) for word in states]
        job_filter = status_pb.JobFilter(states=wanted, name=name)

        async def page(token: str) -> tuple[list[JobSummary], str]:
            request = status_pb.ListJobsRequest(filter=job_filter, page_size=page_size, page_token=token)
            response = await self._call(
                policy.LIST_JOBS, self._status_target, lambda t: self._status.ListJobs(request, timeout=t),
                attempt_timeout, retry,
            )
            return [job_summary(job) for job in response.jobs], response.next_page_token

        return _paged(page)

    def children(
        self, job_id: str, step: str, *, states: Iterable[str] = (), page_size: int = 100,
        attempt_timeout: float | None = None, retry: Retry = DEFAULT,
    ) -> AsyncIterator[ChildView]:
        """The children of a fan-out step in index order, optionally only those in `states`."""
        wanted = [states_pb2.StepState.ValueType(step_state_from_word(word)) for word in states]

        async def page(token: str) -> tuple[list[ChildView], str]:
            request = status_pb.ListChildrenRequest(
                job_id=job_id, step_name=step, states=wanted, page_size=page_size, page_token=token
            )
            self._position_of(job_id, None, request)
            response = await self._call(
                policy.LIST_CHILDREN, self._status_target, lambda t: self._status.ListChildren(request, timeout=t),
                attempt_timeout, retry,
            )
            return [child_view(child) for child in response.children], response.next_page_token

        return _paged(page)

    def watch(
        self,
        job_id: str,
        *,
        since: JobView | None = None,
        on_apply: Callable[[Applied], None] | None = None,
        not_older_than: LogPosition | None = None,
    ) -> JobWatch:
        """Live views of one job until it ends (see stepstream_client.watch).

        `since`: a view you already hold (e.g. from get()): continue after its
        revision instead of starting with a new snapshot. `on_apply` is called
        with every update applied, in order (for audits and tests). `not_older_than`:
        as for get().
        """
        request = status_pb.WatchJobRequest(job_id=job_id)
        self._position_of(job_id, not_older_than, request)
        return JobWatch(WatchLoop(
            self._status, self._status_target, job_id, since=since,
            not_older_than=request.not_older_than if request.HasField("not_older_than") else None,
            stale_after_heartbeats=self._stale_after_heartbeats, grace=self._grace(), backoff=self._backoff,
            on_apply=on_apply,
        ))

    def logs(
        self, job_id: str, step: str | None = None, child: int | None = None, attempt: int | None = None, *,
        follow: bool = True, tail: int | None = None, streams: Iterable[str] = (), from_line: int | None = None,
    ) -> AsyncGenerator[LogLine, None]:
        """What steps printed, line by line, from the orchestrator (resumed after any
        disconnect with nothing missed or repeated: stepstream_client.logs).

        `step`: that step's own output, or with `child` that fan-out child's. No
        step: every step's in step order, each one's own and then its children's
        by index. `attempt`: that one (1 the first); None: the latest, and when
        following a step or child, each later attempt's after it as its retries begin.
        `follow`: go on until the attempt ends (without a step, each step's in
        turn); else stop at the lines there are now. `tail`: only the last so
        many lines of each attempt. `from_line`: from that line of the given
        `attempt` on, and following, each later attempt's from its start
        (a reader resuming after the last line it has; not with `tail`). `streams`: only "stdout" or "stderr" lines
        ("notice" lines, the orchestrator's own, always come). Close the
        iterator (aclose, contextlib.aclosing) to end the call early.
        NotFoundError names an unknown job, step, child or attempt, or one that
        has not started (following a step, that is waited for instead).
        """
        if step is None and (child is not None or attempt is not None):
            raise ValueError("give a step with a child or an attempt")
        for name, value, least, most in (("child", child, 0, MAX_INT32), ("attempt", attempt, 1, MAX_INT32),
                                         ("tail", tail, 1, MAX_INT32), ("from_line", from_line, 0, 2**63 - 1)):
            if value is not None and not least <= value <= most:
                raise ValueError(f"{name} must be {least} to {most}, got {value}")
        if from_line is not None and (attempt is None or tail is not None):
            raise ValueError("from_line goes with an attempt and without a tail")
        unknown = [word for word in streams if word not in OUTPUT_STREAM_WORDS]
        if unknown:
            raise ValueError(f"unknown output stream {unknown[0]!r}: stdout, stderr or notice")
        request = orch_pb.StreamOutputRequest(
            job_id=job_id, follow=follow,
            streams=[orch_pb.OutputStream.ValueType(OUTPUT_STREAM_WORDS[word]) for word in streams],
        )
        if tail is not None:
            request.tail = tail
        if from_line is not None:
            request.from_line = from_line
        if step is not None:
            return self._unit_logs(request, step, child, attempt)
        return self._all_logs(request)

    def output(self, job_id: str, step: str | None = None, *, page_size: int = 100) -> AsyncIterator[OutputSummary]:
        """What output a job has (one step's and its children's with `step`), per attempt, in step,
        child, attempt order, with sizes: nothing of it is read."""

        async def page(token: str) -> tuple[list[OutputSummary], str]:
            request = orch_pb.ListOutputRequest(job_id=job_id, step=step or "", page_size=page_size,
                                                page_token=token)
            response = await self._call(
                policy.LIST_OUTPUT, self._orchestrator_target,
                lambda t: self._orchestrator.ListOutput(request, timeout=t),
            )
            return [output_summary(each) for each in response.output], response.next_page_token

        return _paged(page)

    async def _all_logs(self, request: orch_pb.StreamOutputRequest) -> AsyncGenerator[LogLine, None]:
        """Every step's output in step order, each step's own then its children's."""
        for progress in (await self._step_progress(request.job_id)).steps:
            name = progress.step.name
            async for line in self._unit_logs(request, name, None, None, quiet=True):
                yield line
            children = sorted({each.child async for each in self.output(request.job_id, name)
                               if each.child is not None})
            for child in children:
                async for line in self._unit_logs(request, name, child, None):
                    yield line

    async def _unit_logs(
        self, request: orch_pb.StreamOutputRequest, step: str, child: int | None, attempt: int | None,
        *, quiet: bool = False,
    ) -> AsyncGenerator[LogLine, None]:
        """One step's (or child's) lines: `attempt`'s or the latest's; following a step's latest,
        each later attempt's too. `quiet`: a step that never ran has no lines, rather than NotFoundError."""
        unit = orch_pb.StreamOutputRequest()
        unit.CopyFrom(request)
        unit.step = step
        if child is not None:
            unit.child = child
        resuming = request.HasField("from_line")
        if (attempt is not None and not resuming) or not request.follow:
            unit.attempt = attempt or 0
            try:
                async for line in self._attempt_lines(unit).lines():
                    yield line
            except NotFoundError:
                if not quiet:
                    raise
            return
        if child is not None:
            unit.attempt = attempt or 0
            async for line in self._child_lines(unit):
                yield line
            return
        done = 0
        # Resuming: the given attempt first (from its line), then each later one from its start.
        while (number := attempt if resuming and not done
               else await self._next_attempt(request.job_id, step, done)) is not None:
            unit.attempt = number
            if done:
                unit.ClearField("from_line")
            reader = self._attempt_lines(unit)
            try:
                async for line in reader.lines():
                    yield line
            except NotFoundError:
                # The attempt has begun, its output not yet; or the step ended and it has none.
                if not await self._step_ended(request.job_id, step):
                    await asyncio.sleep(_STEP_POLL.delay(0))
                    continue
                if quiet:
                    return
                raise
            done = reader.attempt

    async def _child_lines(self, unit: orch_pb.StreamOutputRequest) -> AsyncGenerator[LogLine, None]:
        """A fan-out child's attempt (`unit.attempt`; 0: its latest), then each retry of it from its start:
        an attempt's end says whether one follows, and it is waited for until it begins or the step ends."""
        retry, polls = False, 0
        while True:
            reader = self._attempt_lines(unit)
            try:
                async for line in reader.lines():
                    yield line
            except NotFoundError:
                if not retry:
                    raise
                if await self._step_ended(unit.job_id, unit.step):
                    return
                await asyncio.sleep(_STEP_POLL.delay(polls))
                polls += 1
                continue
            if reader.end is None or not reader.end.retried:
                return
            unit.attempt, retry, polls = reader.attempt + 1, True, 0
            unit.ClearField("from_line")

    def _attempt_lines(self, request: orch_pb.StreamOutputRequest) -> AttemptLines:
        return AttemptLines(lambda: self._orchestrator, self._orchestrator_target, request,
                            backoff=self._backoff, stale_after_heartbeats=self._stale_after_heartbeats)

    async def _step_progress(self, job_id: str) -> orch_pb.GetJobResponse:
        request = orch_pb.GetJobRequest(job_id=job_id)
        return await self._call(
            policy.STEP_PROGRESS, self._orchestrator_target, lambda t: self._orchestrator.GetJob(request, timeout=t)
        )

    async def _step_record(self, job_id: str, step: str) -> records_pb2.Step:
        for progress in (await self._step_progress(job_id)).steps:
            if progress.step.name == step:
                return progress.step
        raise NotFoundError(f"job {job_id} has no step {step!r}")

    async def _step_ended(self, job_id: str, step: str) -> bool:
        return (await self._step_record(job_id, step)).state in TERMINAL_STEP_STATES

    async def _next_attempt(self, job_id: str, step: str, done: int) -> int | None:
        """The attempt of `step` to follow after attempt `done` (0: none yet, then its latest),
        once it has begun; None once the step has ended without another."""
        polls = 0
        while True:
            record = await self._step_record(job_id, step)
            if record.attempt > done:
                return done + 1 if done else record.attempt
            if record.state in TERMINAL_STEP_STATES:
                return None
            await asyncio.sleep(_STEP_POLL.delay(polls))
            polls += 1

    def watch_jobs(self, *, states: Iterable[str] = (), name: str = "") -> JobsWatch:
        """Live views of every job in `states` (state words; none: all) with exactly `name`
        (none: any), newest first; never ends by itself (see stepstream_client.watch).
        It holds every matching job's header: filter by state or name on a large service."""
        wanted = [states_pb2.JobState.ValueType(job_state_from_word(word)) for word in states]
        return JobsWatch(JobsWatchLoop(
            self._status, self._status_target, status_pb.JobFilter(states=wanted, name=name),
            stale_after_heartbeats=self._stale_after_heartbeats, backoff=self._backoff,
        ))

    def _position_of(
        self, job_id: str, given: LogPosition | None,
        request: status_pb.GetJobRequest | status_pb.ListChildrenRequest | status_pb.WatchJobRequest,
    ) -> None:
        position = given or self._positions.get(job_id)
        if position is not None:
            request.not_older_than.CopyFrom(position.message())

    def _grace(self) -> IngestGrace:
        return IngestGrace(self._ingest_grace, self._orchestrator_may_know)

    async def _orchestrator_may_know(self, job_id: str) -> bool:
        """False only when the orchestrator answers that it has no such job."""
        request = orch_pb.GetJobRequest(job_id=job_id)
        try:
            await self._call(
                policy.ORCHESTRATOR_GET_JOB, self._orchestrator_target,
                lambda t: self._orchestrator.GetJob(request, timeout=t),
            )
        except RpcError as error:
            return not isinstance(error, NotFoundError)
        return True

    async def _sleep_backoff(self, failures: int) -> None:
        await asyncio.sleep(self._backoff.delay(failures))


async def _paged(page: Callable[[str], Awaitable[tuple[list[T], str]]]) -> AsyncIterator[T]:
    token = ""
    while True:
        items, token = await page(token)
        for item in items:
            yield item
        if not token:
            return
