"""What the status service needs from durable storage, in its own terms.

The single writer commits WriteBatches: what the projector made of the folds
(status_svc.domain.projector: headers, steps and children with their seqs and
revisions), the change log, and the ingest cursors, in one transaction.
Readers take consistent snapshots and replay the change log by revision.
Every method takes and returns these domain objects; how they become rows is
each backend's own business (storage/sqlite.py, storage/postgres.py: their
shared SQL in storage/sql.py), and tests/status/test_store_conformance.py
holds every backend to the same behaviour. storage/open.py picks one (--store).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from stepstream.status.v1 import status_service_pb2

from status_svc.domain.projection import Staleness
from status_svc.domain.projector import LoadedJob, StoredChild, StoredHeader, StoredStep
from stepstream_common.errors import UnavailableError
from stepstream_common.feed import Page

STORE_UNAVAILABLE = "STORE_UNAVAILABLE"


class StoreUnavailableError(UnavailableError):
    """The database cannot be used right now (connection lost, server restarting or
    out of resources); the store reconnects by itself, so the same call may succeed
    later. Readers get it as UNAVAILABLE (reason STORE_UNAVAILABLE). A commit that
    raised it may or may not have landed: committing the same batch again is safe."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason=STORE_UNAVAILABLE)


@dataclass(frozen=True)
class Source:
    """An orchestrator followed by ingest: its log, how far it is applied, and
    since when (and why) it cannot be followed (stale_since None: it can)."""

    address: str
    log_id: str = ""
    cursor: int = 0
    stale_since: float | None = None
    detail: str = ""

    @property
    def staleness(self) -> Staleness | None:
        return Staleness(self.stale_since, self.detail) if self.stale_since is not None else None


class StoredChange(NamedTuple):
    """One revision of one job: the encoded JobStatus if the header changed, the
    encoded StepStats entries (repeated field 4 of JobUpdate) that changed, and
    how many child events it folds (0 for a job or step transition). Kept
    encoded: every watcher is sent these very bytes."""

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


@dataclass(frozen=True)
class WriteBatch:
    """One transaction: everything in it is committed, or none of it. Each
    entity is written as given (the projector gives its last state in the
    batch). Committing the last batch again changes nothing: a writer unsure
    whether its commit landed may."""

    headers: Sequence[StoredHeader] = ()
    steps: Sequence[StoredStep] = ()
    children: Sequence[StoredChild] = ()
    changes: Sequence[StoredChange] = ()
    sources: Sequence[Source] = ()


class OpenedStore(NamedTuple):
    """Where a reopened store stands: its latest revision and what each source had applied."""

    revision: int
    sources: dict[str, Source]


@dataclass(frozen=True)
class JobSnapshot:
    """A job and its steps (by index), as of `revision`."""

    job: status_service_pb2.JobStatus
    steps: list[status_service_pb2.StepStats]
    revision: int


@dataclass(frozen=True)
class JobList:
    """Jobs (newest first) as of `revision`."""

    jobs: list[status_service_pb2.JobStatus]
    revision: int


@dataclass(frozen=True)
class JobPage:
    """One page of jobs (newest first) as of `revision`; next_page_token "" on the last."""

    jobs: list[status_service_pb2.JobStatus]
    next_page_token: str
    revision: int


@dataclass(frozen=True)
class ChildPage:
    """One page of a step's children (by index) as of `revision`; next_page_token "" on the last."""

    children: list[status_service_pb2.ChildStatus]
    next_page_token: str
    revision: int


class StatusStore(Protocol):
    async def open(self) -> OpenedStore:
        """Create what is missing (or migrate it); where the store stands."""
        ...

    async def close(self) -> None: ...

    async def commit(self, batch: WriteBatch) -> None:
        """All of `batch` or nothing, even if the caller is cancelled meanwhile."""
        ...

    async def load_jobs(self, job_ids: Sequence[str]) -> dict[str, LoadedJob]:
        """The stored jobs among these ids (a missing id is a new job), to rebuild their folds."""
        ...

    async def unfinished_jobs(self, source: str) -> list[str]:
        """The ids of the source's jobs that are not in a terminal state."""
        ...

    async def get_job(self, job_id: str) -> JobSnapshot | None: ...

    async def list_jobs(self, states: Sequence[int], name: str, page_size: int, page_token: str) -> JobPage:
        """Jobs in these states (any if empty) with this name (any if ""), newest first
        (by created_at, then id); InvalidArgumentError for a token not issued for this query."""
        ...

    async def all_jobs(self, states: Sequence[int], name: str) -> JobList:
        """Every job list_jobs would page through, from one consistent read."""
        ...

    async def list_children(
        self, job_id: str, step: str, states: Sequence[int], page_size: int, page_token: str
    ) -> ChildPage | None:
        """The step's children in these states (any if empty), by index; None if the
        job or step is unknown; InvalidArgumentError for a token not issued for this query."""
        ...

    async def read_changes(
        self, after: int, limit: int, job_id: str | None = None, matching: ChangeFilter | None = None
    ) -> Page[StoredChange]:
        """Changes after revision `after`, in order, and the latest revision when read;
        CursorOutOfRangeError if some were pruned or `after` is ahead of the store."""
        ...

    async def check_retained(self, after: int) -> None:
        """CursorOutOfRangeError unless read_changes could resume after `after`."""
        ...

    async def prune(self, keep_changes: int) -> None:
        """Drop all but the latest `keep_changes` (at least one) changes."""
        ...

    async def latest_revision(self) -> int:
        """The newest committed revision (0 if none), read from the database: with
        several replicas on one PostgreSQL database, what any of them committed."""
        ...

    async def sources(self) -> dict[str, Source]:
        """Every source as committed (what open() returned, read again now)."""
        ...
