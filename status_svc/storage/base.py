"""What the status service needs from durable storage.

The single writer commits WriteBatches (state rows, their change-log rows and
the ingest cursors, in one transaction); readers take consistent snapshots
and replay the change log by revision. A PostgreSQL implementation would keep
the same tables and transaction boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from stepstream.status.v1 import status_service_pb2

from status_svc.domain.fold import JobFold
from stepstream_common.feed import Page


class SourceRow(NamedTuple):
    """An orchestrator followed by ingest."""

    address: str
    log_id: str
    cursor: int
    stale_since: float | None
    detail: str


class StoredChange(NamedTuple):
    """One revision of one job: the encoded JobStatus if the header changed, the
    encoded StepStats entries (repeated field 4 of JobUpdate) that changed, and
    how many child events it folds (0 for a job or step transition)."""

    revision: int
    job_id: str
    name: str
    state_before: int
    state_after: int
    header: bytes | None
    steps: bytes | None
    child_events: int

    @property
    def position(self) -> int:
        return self.revision


@dataclass(frozen=True)
class ChangeFilter:
    """Header changes of jobs with this name (if set) entering or leaving these states (if any)."""

    states: frozenset[int] = frozenset()
    name: str = ""

    def matches(self, change: StoredChange) -> bool:
        if change.header is None:
            return False
        if self.name and change.name != self.name:
            return False
        return not self.states or change.state_before in self.states or change.state_after in self.states


@dataclass
class JobSnapshot:
    job: status_service_pb2.JobStatus
    steps: list[status_service_pb2.StepStats]
    revision: int


@dataclass
class WriteBatch:
    jobs: list[tuple[Any, ...]] = field(default_factory=list)
    steps: list[tuple[Any, ...]] = field(default_factory=list)
    children: list[tuple[Any, ...]] = field(default_factory=list)
    changes: list[tuple[Any, ...]] = field(default_factory=list)
    sources: list[tuple[Any, ...]] = field(default_factory=list)


class StatusStore(Protocol):
    async def open(self) -> tuple[int, dict[str, SourceRow]]: ...

    async def close(self) -> None: ...

    async def commit(self, batch: WriteBatch) -> None: ...

    async def load_folds(
        self, job_ids: Sequence[str]
    ) -> dict[str, tuple[JobFold, str, tuple[float | None, str]]]: ...

    async def unfinished_jobs(self, source: str) -> list[str]: ...

    async def get_job(self, job_id: str) -> JobSnapshot | None: ...

    async def list_jobs(
        self, states: Sequence[int], name: str, page_size: int, page_token: str
    ) -> tuple[list[status_service_pb2.JobStatus], str, int]: ...

    async def all_jobs(self, states: Sequence[int], name: str) -> tuple[list[status_service_pb2.JobStatus], int]: ...

    async def list_children(
        self, job_id: str, step: str, states: Sequence[int], page_size: int, page_token: str
    ) -> tuple[list[status_service_pb2.ChildStatus], str, int] | None: ...

    async def job_exists(self, job_id: str) -> bool: ...

    async def read_changes(
        self, after: int, limit: int, job_id: str | None = None, matching: ChangeFilter | None = None
    ) -> Page[StoredChange]: ...

    async def check_retained(self, after: int) -> None: ...

    async def prune(self, keep_changes: int) -> None: ...
