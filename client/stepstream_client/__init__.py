"""stepstream's Python SDK and CLI.

`Client` (async) and `SyncClient` (blocking) submit and cancel jobs through the
orchestrator and read and watch them through the status service; what steps
printed (`logs`, `output`) comes from the orchestrator. Everything
they return is a frozen dataclass mapped from server data (see models.py);
every failure is a StepstreamError (see errors.py). Idempotent calls are retried
on UNAVAILABLE and DEADLINE_EXCEEDED under an overall deadline; `RetryPolicy`
changes how (the per-method table is in _policy.py).
"""

from stepstream.backoff import Backoff
from stepstream.channel import DEFAULT_ORCHESTRATOR, DEFAULT_STATUS

from stepstream_client._policy import RetryPolicy
from stepstream_client.errors import (
    DeadlineExceededError,
    DefinitionError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    RpcError,
    StepstreamError,
    UnavailableError,
    Violation,
)
from stepstream_client.models import (
    ChildCounts,
    ChildView,
    JobRecord,
    JobSummary,
    JobsView,
    JobView,
    LogLine,
    LogPosition,
    OutputSummary,
    StepCounts,
    StepView,
    SubmittedJob,
)
from stepstream_client.sdk import Client
from stepstream_client.sync import SyncClient
from stepstream_client.watch import Applied, JobsWatch, JobWatch

__all__ = [
    "DEFAULT_ORCHESTRATOR",
    "DEFAULT_STATUS",
    "Applied",
    "Backoff",
    "ChildCounts",
    "ChildView",
    "Client",
    "DeadlineExceededError",
    "DefinitionError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "JobRecord",
    "JobSummary",
    "JobView",
    "JobWatch",
    "JobsView",
    "JobsWatch",
    "LogLine",
    "LogPosition",
    "NotFoundError",
    "OutOfRangeError",
    "OutputSummary",
    "RetryPolicy",
    "RpcError",
    "StepCounts",
    "StepView",
    "StepstreamError",
    "SubmittedJob",
    "SyncClient",
    "UnavailableError",
    "Violation",
]
