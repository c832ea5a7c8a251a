"""The SDK's per-method retry policy against real service processes that are killed,
hung and restarted: idempotent calls ride over an outage, a submit without
request_id never repeats, answers (NOT_FOUND, INVALID_ARGUMENT) are never
retried, and the overall deadline ends a call to a service that never comes back.

This module imports only the client and the contract (the `orchestrator` and
`status` fixtures of conftest.py run the servers as subprocesses, see services.py),
so it also runs in a venv without the server packages.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest
from stepstream_client import (
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    JobView,
    NotFoundError,
    RetryPolicy,
    SyncClient,
    UnavailableError,
)

from tests.client import services
from tests.client.services import Service

T = TypeVar("T")

# Longer than any restart here takes: the calls below end by succeeding, never by this deadline.
PATIENT = RetryPolicy(deadline=120)
# Bounds so that a broken test fails instead of hanging; never speed checks.
BOUND = 60.0

SUBMIT = "OrchestratorService/SubmitJob"
CANCEL = "OrchestratorService/CancelJob"
ORCHESTRATOR_GET = "OrchestratorService/GetJob"
GET = "StatusService/GetJob"
LIST = "StatusService/ListJobs"
CHILDREN = "StatusService/ListChildren"


def quick(name: str) -> dict[str, Any]:
    return {"name": name, "steps": [{"name": "one", "type": "sleep", "seconds": 0}]}


class Sent(grpc.aio.UnaryUnaryClientInterceptor):
    """Counts every unary call the client sends (each attempt of a retried one), by
    "Service/Method"."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._counted = asyncio.Condition()

    async def intercept_unary_unary(
        self, continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails, request: Any,
    ) -> Any:
        method: str | bytes = client_call_details.method  # grpc.aio passes bytes
        name = method.decode() if isinstance(method, bytes) else method
        async with self._counted:
            self.calls[name.rsplit(".", 1)[-1]] += 1
            self._counted.notify_all()
        return await continuation(client_call_details, request)

    async def until(self, method: str, count: int) -> None:
        """Wait until `method` was sent `count` times in all: a retried call is repeating."""
        try:
            async with asyncio.timeout(BOUND), self._counted:
                await self._counted.wait_for(lambda: self.calls[method] >= count)
        except TimeoutError:
            raise AssertionError(f"{method} was sent {self.calls[method]} times, never {count}") from None


@pytest.fixture
def sent() -> Sent:
    return Sent()


@pytest.fixture
async def client(orchestrator: Service, status: Service, sent: Sent) -> AsyncIterator[Client]:
    async with Client(orchestrator.address, status.address, retry=PATIENT, interceptors=[sent]) as client:
        yield client


async def finished(client: Client, job_id: str) -> JobView:
    async with asyncio.timeout(BOUND):
        while True:
            view = await client.get(job_id)
            if view.terminal:
                return view
            await asyncio.sleep(0.02)


async def collect(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]


async def test_reads_retry_until_a_killed_status_service_is_back(
    client: Client, status: Service, sent: Sent
) -> None:
    job = await client.submit({"name": "fan", "steps": [
        {"name": "spread", "type": "fanout", "count": 3, "child": {"type": "sleep", "seconds": 0}},
    ]})
    await finished(client, job.id)
    await status.kill()

    get_sent = sent.calls[GET]
    get = asyncio.create_task(client.get(job.id))
    listed = asyncio.create_task(collect(client.list(name="fan")))
    children = asyncio.create_task(collect(client.children(job.id, "spread")))
    for method, count in ((GET, get_sent + 2), (LIST, 2), (CHILDREN, 2)):
        await sent.until(method, count)
    assert not (get.done() or listed.done() or children.done()), "a read gave up while the service was down"
    await status.start()

    view = await get
    assert (view.id, view.state) == (job.id, "completed")
    assert [summary.id for summary in await listed] == [job.id]
    assert [child.index for child in await children] == [0, 1, 2]


async def test_cancel_retries_until_a_killed_orchestrator_is_back_and_stays_a_no_op(
    client: Client, orchestrator: Service, sent: Sent
) -> None:
    job = await client.submit({"name": "long", "steps": [{"name": "wait", "type": "sleep", "seconds": 3600}]})
    await client.cancel(job.id)
    assert (await finished(client, job.id)).state == "cancelled"
    await orchestrator.kill()

    cancel = asyncio.create_task(client.cancel(job.id))
    await sent.until(CANCEL, 1 + 2)
    assert not cancel.done()
    await orchestrator.start()

    record = await cancel
    assert (record.id, record.state) == (job.id, "cancelled")


async def test_submit_with_a_request_id_retries_and_never_makes_a_second_job_but_without_one_fails_at_once(
    client: Client, orchestrator: Service, sent: Sent
) -> None:
    first = await client.submit(quick("nightly"), request_id="nightly-1")
    await orchestrator.kill()

    again = asyncio.create_task(client.submit(quick("nightly"), request_id="nightly-1"))
    new = asyncio.create_task(client.submit(quick("fresh"), request_id="fresh-1"))
    await sent.until(SUBMIT, 1 + 2 + 2)
    # Without a request_id, once, however patient the client: a retry could start a second job.
    before = sent.calls[SUBMIT]
    with pytest.raises(UnavailableError) as unavailable:
        await client.submit(quick("once"))
    assert unavailable.value.attempts == 1 and sent.calls[SUBMIT] == before + 1
    assert orchestrator.address in unavailable.value.message
    with pytest.raises(ValueError, match="without request_id is never retried"):
        await client.submit(quick("once"), retry=PATIENT)
    assert not again.done() and not new.done()
    await orchestrator.start()

    assert (await again).id == first.id
    created = await new
    assert (await client.submit(quick("fresh"), request_id="fresh-1")).id == created.id
    await finished(client, created.id)  # the status service has applied the log past both
    assert [job.id async for job in client.list(name="nightly")] == [first.id]
    assert [job.id async for job in client.list(name="fresh")] == [created.id]
    assert [job.id async for job in client.list(name="once")] == []


async def test_an_attempt_that_times_out_is_retried_and_makes_one_job(
    client: Client, orchestrator: Service, sent: Sent
) -> None:
    """A hung orchestrator (SIGSTOP, its connection open): each attempt ends with DEADLINE_EXCEEDED
    and is retried; once it runs again, whichever attempts it still serves are one job."""
    await client.submit(quick("warm-up"))  # connected before it hangs, so the attempts reach its socket
    orchestrator.pause()
    submit = asyncio.create_task(client.submit(quick("hung"), request_id="hung-1", attempt_timeout=1.0))
    await sent.until(SUBMIT, 1 + 2)  # the first attempt ended with DEADLINE_EXCEEDED and was retried
    assert not submit.done()
    orchestrator.resume()

    job = await submit
    await finished(client, job.id)
    assert [summary.id async for summary in client.list(name="hung")] == [job.id]


async def test_answers_are_never_retried(client: Client, sent: Sent) -> None:
    with pytest.raises(NotFoundError) as not_found:
        await client.cancel("no-such-job")
    assert not_found.value.attempts == 1 and sent.calls[CANCEL] == 1

    # The status service's NOT_FOUND is checked with the orchestrator, which says the same: no retry.
    with pytest.raises(NotFoundError):
        await client.get("no-such-job")
    assert (sent.calls[GET], sent.calls[ORCHESTRATOR_GET]) == (1, 1)

    with pytest.raises(InvalidArgumentError) as invalid:
        await client.get("")
    assert invalid.value.attempts == 1 and sent.calls[GET] == 2

    with pytest.raises(NotFoundError):
        await collect(client.children("no-such-job", "step"))
    assert sent.calls[CHILDREN] == 1

    bad = {"name": "bad", "steps": [{"name": "one", "type": "no-such-worker"}]}
    with pytest.raises(InvalidArgumentError) as rejected:
        await client.submit(bad, request_id="bad-1")
    assert rejected.value.violations and rejected.value.attempts == 1 and sent.calls[SUBMIT] == 1


async def test_the_overall_deadline_ends_a_call_to_a_service_that_never_comes_back(
    orchestrator: Service, sent: Sent
) -> None:
    nobody = services.nobody()
    brief = RetryPolicy(deadline=1.0)
    async with Client(nobody, nobody, retry=brief, interceptors=[sent]) as client:
        with pytest.raises(UnavailableError) as on_get:
            await client.get("any")
        with pytest.raises(UnavailableError) as on_cancel:
            await client.cancel("any")
        with pytest.raises(UnavailableError):
            await collect(client.list())
    assert on_get.value.attempts == sent.calls[GET] and nobody in on_get.value.message
    assert on_cancel.value.attempts == sent.calls[CANCEL]

    # A service that hangs with the connection open: every attempt times out, and so does the call.
    async with Client(orchestrator.address, nobody) as client:
        with pytest.raises(NotFoundError):
            await client.cancel("any")
        orchestrator.pause()
        with pytest.raises(DeadlineExceededError):
            await client.cancel("any", attempt_timeout=0.5, retry=RetryPolicy(deadline=1.5))

    with SyncClient(nobody, nobody, retry=brief) as blocking, pytest.raises(UnavailableError):
        await asyncio.to_thread(blocking.get, "any")
