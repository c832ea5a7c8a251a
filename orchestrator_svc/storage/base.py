"""What the orchestrator needs from durable storage.

One writer appends events and keeps, next to them, the latest record of every
job, step and child, so a snapshot and a restart never need the whole history.
A PostgreSQL implementation would keep the same tables and the same
transaction boundaries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from stepstream.common.v1 import records_pb2
from stepstream.orchestrator.v1 import definition_pb2

from stepstream_common.feed import Page
from stepstream_common.paging import PageTokens


class StoredEvent(NamedTuple):
    """A committed event as streamed: its seq and its serialized StepEvent."""

    position: int
    data: bytes


@dataclass(frozen=True)
class NewJob:
    """What is stored once, when a job is created."""

    job_id: str
    request_id: str
    definition: bytes


@dataclass(frozen=True)
class RequestedJob:
    """The job a request_id created: its current record, its first seq, and the
    definition it was created from (deterministically serialized)."""

    job: records_pb2.Job
    first_seq: int
    definition: bytes


@dataclass
class StoredJob:
    """One job as committed, and the seq it is valid at."""

    job: records_pb2.Job
    steps: list[records_pb2.Step]
    child_counts: dict[str, records_pb2.ChildCounts]
    definition: definition_pb2.JobDefinition
    seq: int


@dataclass
class UnfinishedJob:
    """A job that was in flight: its unfinished steps and children."""

    job: records_pb2.Job
    steps: list[records_pb2.Step]
    children: dict[str, list[records_pb2.Child]] = field(default_factory=dict)


@dataclass(frozen=True)
class LogInfo:
    log_id: str
    latest_seq: int


@dataclass(frozen=True)
class Snapshot:
    """Every retained record, as synthetic events, valid at `seq`."""

    seq: int
    pages: AsyncIterator[list[bytes]]


class EventStore(Protocol):
    async def open(self) -> LogInfo: ...

    @property
    def page_tokens(self) -> PageTokens:
        """Issues and checks this store's page tokens (valid across restarts: the secret is stored)."""

    async def close(self) -> None: ...

    async def append(self, events: Sequence[tuple[records_pb2.StepEvent, bytes]], new_jobs: Sequence[NewJob]) -> None:
        """Commit events (in seq order, with their encodings) and the records they
        carry, in one transaction."""

    async def read_events(self, after_seq: int, limit: int) -> Page[StoredEvent]:
        """Events with seq > after_seq in order, and the latest seq when read;
        CursorOutOfRangeError if some were pruned."""

    async def get_job(self, job_id: str) -> StoredJob | None: ...

    async def job_for_request(self, request_id: str) -> RequestedJob | None: ...

    async def list_jobs(
        self, states: Sequence[int], name: str, page_size: int, page_token: str
    ) -> tuple[list[records_pb2.Job], str]:
        """Newest first; InvalidArgumentError for a page token this store did not issue."""

    def snapshot(self) -> AbstractAsyncContextManager[Snapshot]:
        """A consistent Snapshot, readable while the context is open."""

    async def unfinished_jobs(self) -> list[UnfinishedJob]: ...

    async def prune(self, keep_events: int, job_age_seconds: float) -> None: ...
