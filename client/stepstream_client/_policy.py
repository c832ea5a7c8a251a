"""What each RPC of the SDK does when it fails: its timeout, and whether and how it is retried.

A call is retried only if sending it twice cannot do anything twice. A retried
call repeats on UNAVAILABLE (the service is down or restarting, or has not yet
applied the position a read asked for) and on DEADLINE_EXCEEDED of one attempt
(e.g. a hung connection), after a capped, jittered exponential backoff, until
its overall deadline; any other code (NOT_FOUND, INVALID_ARGUMENT, ...) is the
answer and is raised at once. UNAUTHENTICATED and PERMISSION_DENIED are never
retried, whatever a policy says (a RetryPolicy naming them is a ValueError):
the same token would be refused again, and a retry loop would only hide it.
Each attempt's timeout is cut to what is left of the overall deadline, so a
call never outlives it; when it runs out, the last failure is raised (its
`attempts` says how many were made).

| RPC                                  | Idempotent | Attempt timeout | Retry by default          |
|--------------------------------------|------------|-----------------|---------------------------|
| orchestrator SubmitJob, request_id   | yes [1]    | 20 s            | DEFAULT_RETRY [2]         |
| orchestrator SubmitJob, no request_id| no [3]     | 20 s            | never                     |
| orchestrator CancelJob               | yes [4]    | 10 s            | DEFAULT_RETRY             |
| orchestrator GetJob                  | yes        | 10 s            | never [5]                 |
| status GetJob, ListJobs, ListChildren| yes        | 10 s            | DEFAULT_RETRY (per page)  |
| status WatchJob                      | yes [6]    | none (a stream) | by the watch loop [6]     |
| orchestrator ListOutput              | yes        | 10 s            | DEFAULT_RETRY (per page)  |
| orchestrator GetJob, for logs        | yes        | 10 s            | DEFAULT_RETRY [7]         |
| orchestrator StreamOutput            | yes [8]    | none (a stream) | by the logs loop [8]      |

[1] the orchestrator answers a repeated request_id with the job it created.
[2] UNAVAILABLE and DEADLINE_EXCEEDED; backoff 0.1 s doubling to 5 s, each
    wait jittered to 50-100 %; 20 s overall deadline.
[3] a retry could start a second job: sent once, UnavailableError at once.
[4] cancelling a cancelled job is a no-op.
[5] it only tells the NOT_FOUND grace of a status read whether to keep
    waiting (an error counts as "maybe"), and that loop retries.
[6] resumed by revision: watch.py reconnects after any disconnect once the job
    was shown, with the client's reconnect_backoff, for as long as it is read.
[7] logs() asks it, between attempts of a step it follows, whether another
    attempt has begun or the step has ended.
[8] resumed by line number: logs.py reconnects after any disconnect once the
    attempt was found, with the client's reconnect_backoff.

`Client(attempt_timeout=..., retry=...)` replaces the attempt timeout and the
retry policy of every call above that has one; every method takes the same
two arguments for one call. `retry=None` turns retries off. A submit without a
request_id is never retried (ValueError if asked to): give it a request_id.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import grpc
from stepstream.backoff import DEFAULT_BACKOFF, Backoff

from stepstream_client.errors import from_rpc_error

T = TypeVar("T")

RETRYABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
NEVER_RETRIED: Final = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


@dataclass(frozen=True)
class RetryPolicy:
    """How an idempotent call is retried.

    `deadline`: seconds from the call's start within which every attempt and
    every wait must end; then the last failure is raised. `backoff`: the wait
    before each retry. `codes`: the gRPC codes that mean "try again" (never
    one of NEVER_RETRIED).
    """

    deadline: float = 20.0
    backoff: Backoff = DEFAULT_BACKOFF
    codes: frozenset[grpc.StatusCode] = RETRYABLE

    def __post_init__(self) -> None:
        if self.deadline <= 0:
            raise ValueError(f"a retry deadline must be positive, not {self.deadline}")
        refused = sorted(code.name for code in self.codes & NEVER_RETRIED)
        if refused:
            raise ValueError(f"{', '.join(refused)} cannot be retried: the same token would be refused again")


class Default(enum.Enum):
    """The type of DEFAULT: an argument left out, so the client's or the table's choice applies."""

    DEFAULT = enum.auto()


DEFAULT: Final = Default.DEFAULT
DEFAULT_RETRY: Final = RetryPolicy()

# What a `retry=` argument may be: a policy, None (never retry) or DEFAULT.
Retry = RetryPolicy | Default | None


@dataclass(frozen=True)
class MethodPolicy:
    """One row of the table above; `retry` None: never retried."""

    name: str
    idempotent: bool
    timeout: float
    retry: RetryPolicy | None

    def __post_init__(self) -> None:
        assert self.idempotent or self.retry is None, f"{self.name} is not idempotent and cannot be retried"


SUBMIT_JOB: Final = MethodPolicy(
    "OrchestratorService.SubmitJob without request_id", idempotent=False, timeout=20.0, retry=None
)
SUBMIT_JOB_WITH_REQUEST_ID: Final = MethodPolicy(
    "OrchestratorService.SubmitJob with request_id", idempotent=True, timeout=20.0, retry=DEFAULT_RETRY
)
CANCEL_JOB: Final = MethodPolicy("OrchestratorService.CancelJob", idempotent=True, timeout=10.0, retry=DEFAULT_RETRY)
ORCHESTRATOR_GET_JOB: Final = MethodPolicy("OrchestratorService.GetJob", idempotent=True, timeout=10.0, retry=None)
GET_JOB: Final = MethodPolicy("StatusService.GetJob", idempotent=True, timeout=10.0, retry=DEFAULT_RETRY)
LIST_JOBS: Final = MethodPolicy("StatusService.ListJobs", idempotent=True, timeout=10.0, retry=DEFAULT_RETRY)
LIST_CHILDREN: Final = MethodPolicy(
    "StatusService.ListChildren", idempotent=True, timeout=10.0, retry=DEFAULT_RETRY
)
LIST_OUTPUT: Final = MethodPolicy("OrchestratorService.ListOutput", idempotent=True, timeout=10.0, retry=DEFAULT_RETRY)
STEP_PROGRESS: Final = MethodPolicy(
    "OrchestratorService.GetJob for logs", idempotent=True, timeout=10.0, retry=DEFAULT_RETRY
)


@dataclass(frozen=True)
class CallPolicy:
    """A client's overrides of the table (`attempt_timeout` None, `retry` DEFAULT: the table's)."""

    attempt_timeout: float | None = None
    retry: Retry = DEFAULT

    def resolve(
        self, method: MethodPolicy, attempt_timeout: float | None, retry: Retry
    ) -> tuple[float, RetryPolicy | None]:
        """The attempt timeout and the retry policy of one call: its own arguments,
        else the client's, else the table's; never a retry for a call that is not safe to repeat."""
        if method.retry is None:
            if isinstance(retry, RetryPolicy):
                why = "" if method.idempotent else ": it is not idempotent"
                raise ValueError(f"{method.name} is never retried{why}")
            chosen = None
        else:
            chosen = next((r for r in (retry, self.retry) if not isinstance(r, Default)), method.retry)
        timeout = next(t for t in (attempt_timeout, self.attempt_timeout, method.timeout) if t is not None)
        return timeout, chosen


async def call(
    invoke: Callable[[float], Awaitable[T]], *, target: str, attempt_timeout: float, retry: RetryPolicy | None
) -> T:
    """`invoke(timeout)` (one attempt) until it succeeds or fails for good; the failure
    becomes the typed error, which counts the attempts and names `target`."""
    if retry is None:
        try:
            return await invoke(attempt_timeout)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, target=target) from None
    loop = asyncio.get_running_loop()
    end = loop.time() + retry.deadline
    attempts = 0
    cause: grpc.aio.AioRpcError | None = None
    while True:
        attempts += 1
        timeout = min(attempt_timeout, end - loop.time())
        try:
            return await invoke(timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() not in retry.codes:
                raise from_rpc_error(error, target=target, attempts=attempts) from None
            cut_short = error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout < attempt_timeout
            # When the overall deadline ran out, not this attempt's, why the earlier attempts failed says more.
            cause = cause if cut_short and cause is not None else error
            if cut_short:
                raise from_rpc_error(cause, target=target, attempts=attempts) from None
        delay = retry.backoff.delay(attempts - 1)
        if loop.time() + delay >= end:
            raise from_rpc_error(cause, target=target, attempts=attempts) from None
        await asyncio.sleep(delay)

