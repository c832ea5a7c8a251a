"""The StatusStore contract (status_svc/storage/base.py), written once and run
over every backend, after Flower's linkstate_test.py: what is committed reads
back as the same domain objects, pages and filters, revisions that only grow,
folds that reload after a reopen, re-commits that change nothing, and a store
that stays usable whatever await a caller is cancelled at.

The data is made as ingest makes it: real StepEvents through JobFold.apply and
the Projector (the `Ingest` below stands in for the writer's loop). Every test
takes `store_factory`, parametrized over BACKENDS; a new backend is one more
entry there (how to make a store on a test's own storage, and how to wait for
the work a cancelled caller left behind).

Times are whole seconds: exact in every backend's time type.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.status.v1 import status_service_pb2 as status_pb

from status_svc.domain.fold import JobFold
from status_svc.domain.projection import Staleness, child_status
from status_svc.domain.projector import (
    ChangeEntry,
    ChildVersion,
    HeldJob,
    Projector,
    StoredChild,
    StoredHeader,
    StoredStep,
    restore,
)
from status_svc.storage.base import (
    ChangeFilter,
    JobSnapshot,
    OpenedStore,
    Source,
    StatusStore,
    StoredChange,
    WriteBatch,
)
from status_svc.storage.postgres import PostgresStatusStore
from status_svc.storage.sqlite import SqliteStatusStore
from stepstream_common.errors import CursorOutOfRangeError, InvalidArgumentError, ServiceError
from tests.e2e.test_cancellation import MAX_AWAITS, cancel_at
from tests.helpers import DEADLINE, WatchedJob, update_of
from tests.helpers.postgres import fresh_database

SOURCE, OTHER = "orch-a:1", "orch-b:2"
BASE = 1_700_000_000.0
STEP_99 = 99  # a state no version of states.proto has


# --- the backends -------------------------------------------------------------------------------------------


Storage = Callable[[Path], AbstractAsyncContextManager[Callable[[], StatusStore]]]


@dataclass(frozen=True)
class Backend:
    name: str
    # Storage of a test's own (`root`: a directory only it uses), for as long as the
    # context lasts: it gives a function making stores on it, each another handle on the same data.
    storage: Storage
    # Returns once no work a cancelled caller left behind is still running in `store`.
    settled: Callable[[StatusStore], Awaitable[None]]


async def _until_idle(store: StatusStore) -> None:
    assert isinstance(store, SqliteStatusStore | PostgresStatusStore)
    end = time.monotonic() + DEADLINE
    while not store.idle():
        assert time.monotonic() < end, "a database unit never finished"
        await asyncio.sleep(0.001)


@asynccontextmanager
async def _sqlite_file(root: Path) -> AsyncIterator[Callable[[], StatusStore]]:
    yield lambda: SqliteStatusStore(root / "status.sqlite3")


@asynccontextmanager
async def _postgres_database(root: Path) -> AsyncIterator[Callable[[], StatusStore]]:
    async with fresh_database() as database:
        yield lambda: PostgresStatusStore(database.dsn)


BACKENDS = [
    Backend("sqlite", _sqlite_file, _until_idle),
    Backend("postgres", _postgres_database, _until_idle),
]


@dataclass(frozen=True)
class Stores:
    """Stores of one backend on this test's storage."""

    backend: Backend
    root: Path
    resources: AsyncExitStack
    storages: dict[str, Callable[[], StatusStore]] = dataclasses.field(default_factory=dict)

    @asynccontextmanager
    async def opened(self, where: str = "") -> AsyncIterator[StatusStore]:
        """An open store on this test's storage (`where`: on other storage of its own)."""
        if where not in self.storages:
            self.storages[where] = await self.resources.enter_async_context(
                self.backend.storage(self.root / where if where else self.root)
            )
        store = self.storages[where]()
        await store.open()
        try:
            yield store
        finally:
            await store.close()

    async def reopened(self) -> OpenedStore:
        """What a store on this test's storage finds when it is opened anew."""
        async with self.opened() as store:
            return await store.open()

    async def settled(self, store: StatusStore) -> None:
        await self.backend.settled(store)


@pytest.fixture(params=BACKENDS, ids=[backend.name for backend in BACKENDS])
async def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    backend: Backend = request.param
    async with AsyncExitStack() as resources:
        yield Stores(backend, tmp_path, resources)


# --- data made as ingest makes it ---------------------------------------------------------------------------


def ts(after: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromSeconds(int(BASE) + after)
    return stamp


def job(job_id: str, state: int, name: str = "alpha", created: int = 0, **fields: Any) -> records_pb2.Job:
    record = records_pb2.Job(id=job_id, name=name, state=state, **fields)  # type: ignore[arg-type]
    record.created_at.CopyFrom(ts(created))
    return record


def step(job_id: str, name: str, index: int, state: int, **fields: Any) -> records_pb2.Step:
    return records_pb2.Step(job_id=job_id, name=name, index=index, type="fanout", state=state,  # type: ignore[arg-type]
                            max_attempts=2, **fields)


def child(job_id: str, index: int, state: int, step_name: str = "fan", **fields: Any) -> records_pb2.Child:
    return records_pb2.Child(job_id=job_id, step_name=step_name, index=index, item=f"item-{index}",
                             state=state, **fields)  # type: ignore[arg-type]


Record = records_pb2.Job | records_pb2.Step | records_pb2.Child


class Ingest:
    """Batches made the way the writer makes them: events folded by JobFold.apply,
    projected by the Projector, the change log encoded, the cursor moved."""

    def __init__(self) -> None:
        self.sources: dict[str, Source] = {}
        self.jobs: dict[str, HeldJob] = {}
        self.projector = Projector(0, lambda address: self.source(address).staleness)

    def source(self, address: str) -> Source:
        return self.sources.get(address) or Source(address)

    def events(self, *records: Record, source: str = SOURCE) -> WriteBatch:
        cursor = self.source(source).cursor
        for record in records:
            cursor += 1
            event, job_id = event_of(record, cursor)
            held = self.jobs.setdefault(job_id, HeldJob(JobFold(job_id), source))
            change = held.fold.apply(event)
            if change is not None:
                self.projector.project(held, change)
        self.sources[source] = dataclasses.replace(self.source(source), log_id=f"log-{source}", cursor=cursor)
        return self.finish(source)

    def stale(self, source: str, since: float | None, detail: str = "") -> WriteBatch:
        """The source goes stale (or fresh again, since None): every unfinished job of it shows it."""
        self.sources[source] = dataclasses.replace(self.source(source), stale_since=since, detail=detail)
        for held in self.jobs.values():
            if held.source == source and not held.fold.finished:
                self.projector.refresh(held)
        return self.finish(source)

    def lose(self, job_id: str, since: float, detail: str) -> WriteBatch:
        held = self.jobs[job_id]
        held.lost = Staleness(since, detail)
        self.projector.refresh(held)
        return self.finish(held.source)

    def finish(self, source: str) -> WriteBatch:
        projected = self.projector.finish()
        return WriteBatch(
            headers=list(projected.headers.values()), steps=list(projected.steps.values()),
            children=list(projected.children.values()), changes=[encoded(entry) for entry in projected.changes],
            sources=[self.sources[source]],
        )


def event_of(record: Record, seq: int) -> tuple[records_pb2.StepEvent, str]:
    """The event carrying `record`, and its job's id."""
    if isinstance(record, records_pb2.Job):
        return records_pb2.StepEvent(seq=seq, job=record), record.id
    if isinstance(record, records_pb2.Step):
        return records_pb2.StepEvent(seq=seq, step=record), record.job_id
    return records_pb2.StepEvent(seq=seq, child=record), record.job_id


def encoded(entry: ChangeEntry) -> StoredChange:
    """The change as stored (the steps as JobUpdate's field 4, encoded by protobuf itself)."""
    return StoredChange(
        entry.revision, entry.job_id, entry.name, entry.state_before, entry.state_after,
        entry.header.SerializeToString() if entry.header is not None else None,
        status_pb.JobUpdate(steps=entry.steps).SerializeToString() if entry.steps else None, entry.child_events,
    )


def a_busy_day(ingest: Ingest) -> list[WriteBatch]:
    """Two sources, four jobs: a fan-out (one child in a state nobody knows, one
    step known only by its child, a child retried), a job that failed, a job
    of another source, and a job its source lost."""
    started: dict[str, Any] = {"started_at": ts(8)}
    done: dict[str, Any] = {"started_at": ts(8), "finished_at": ts(13)}
    return [
        ingest.events(
            job("fan-job", s.JOB_STATE_PENDING, created=4), step("fan-job", "fan", 0, s.STEP_STATE_PENDING),
            job("fan-job", s.JOB_STATE_RUNNING, created=4, started_at=ts(5)),
            step("fan-job", "fan", 0, s.STEP_STATE_RUNNING, attempt=1, **started),
            child("fan-job", 0, s.STEP_STATE_PENDING), child("fan-job", 1, s.STEP_STATE_PENDING),
            child("fan-job", 2, s.STEP_STATE_PENDING), child("fan-job", 0, s.STEP_STATE_RUNNING, attempt=1, **started),
            step("fan-job", "fan", 0, s.STEP_STATE_WAITING, attempt=1, **started),
            child("fan-job", 1, STEP_99, attempt=1, reason=77, **started),
            child("fan-job", 0, s.STEP_STATE_COMPLETED, attempt=1, **done),
            child("fan-job", 0, s.STEP_STATE_RUNNING, step_name="later", attempt=1, **started),
            job("failed-job", s.JOB_STATE_PENDING, name="beta", created=6),
            step("failed-job", "only", 0, s.STEP_STATE_FAILED, attempt=2, message="exit 1", **done),
            job("failed-job", s.JOB_STATE_FAILED, name="beta", created=6, finished_at=ts(14),
                reason=s.REASON_STEP_FAILED, message="step only failed"),
        ),
        ingest.events(
            child("fan-job", 2, s.STEP_STATE_RUNNING, attempt=1, **started),
            child("fan-job", 2, s.STEP_STATE_RUNNING, attempt=2, reason=s.REASON_RETRYING, message="retrying",
                  **started),
            job("lost-job", s.JOB_STATE_RUNNING, name="beta", created=6),
        ),
        ingest.events(job("other-job", s.JOB_STATE_RUNNING, name="alpha", created=9), source=OTHER),
        ingest.lose("lost-job", BASE + 20.25, "unknown to orch-a:1 (log x): its data was replaced or pruned"),
        ingest.stale(OTHER, BASE + 30.5, "no message for 10s"),
    ]


async def commit_all(store: StatusStore, batches: Sequence[WriteBatch]) -> None:
    for batch in batches:
        await store.commit(batch)


def last_stored(batches: Sequence[WriteBatch]) -> tuple[
    dict[str, StoredHeader], dict[tuple[str, str], StoredStep], dict[tuple[str, str, int], StoredChild]
]:
    """Each entity as the batches last stored it."""
    headers = {h.status.id: h for batch in batches for h in batch.headers}
    steps = {(st.job_id, st.stats.name): st for batch in batches for st in batch.steps}
    children = {(c.record.job_id, c.record.step_name, c.record.index): c for batch in batches for c in batch.children}
    return headers, steps, children


async def everything(store: StatusStore, job_ids: Sequence[str]) -> dict[str, Any]:
    """Every read the store offers, comparable with ==."""
    return {
        "jobs": {job_id: await store.get_job(job_id) for job_id in job_ids},
        "list": await store.list_jobs([], "", 100, ""),
        "all": await store.all_jobs([], ""),
        "children": {job_id: await store.list_children(job_id, "fan", [], 100, "") for job_id in job_ids},
        "changes": await store.read_changes(0, 10_000),
        "loaded": await store.load_jobs(job_ids),
        "unfinished": sorted(await store.unfinished_jobs(SOURCE)),
        "sources": await store.sources(),  # the cursors, committed with the state they produced
        "latest": await store.latest_revision(),
    }


# --- commit, then read back ---------------------------------------------------------------------------------


async def test_a_new_store_holds_nothing(store_factory: Stores) -> None:
    async with store_factory.opened() as store:
        assert await store.get_job("nope") is None
        assert (await store.list_jobs([], "", 10, "")).jobs == []
        assert (await store.all_jobs([], "")).jobs == []
        assert await store.list_children("nope", "fan", [], 10, "") is None
        page = await store.read_changes(0, 10)
        assert (page.items, page.horizon) == ([], 0)
        assert await store.load_jobs(["nope"]) == {}
        assert await store.load_jobs([]) == {}
        assert await store.unfinished_jobs(SOURCE) == []
    opened = await store_factory.reopened()
    assert (opened.revision, opened.sources) == (0, {})


async def test_what_is_committed_reads_back_as_committed(store_factory: Stores) -> None:
    ingest = Ingest()
    batches = a_busy_day(ingest)
    headers, steps, children = last_stored(batches)
    changes = [change for batch in batches for change in batch.changes]
    latest = changes[-1].revision
    async with store_factory.opened() as store:
        await commit_all(store, batches)

        for job_id, header in headers.items():
            snapshot = await store.get_job(job_id)
            assert snapshot is not None and snapshot.revision == latest
            assert snapshot.job == header.status, job_id
            mine = sorted((st.stats for (owner, _), st in steps.items() if owner == job_id),
                          key=lambda stats: (stats.index, stats.name))
            assert snapshot.steps == mine, job_id
        # Freshness as each header was made: the lost job and the stale source's job show why.
        lost, other = headers["lost-job"].status.freshness, headers["other-job"].status.freshness
        assert lost.stale and "replaced or pruned" in lost.detail and lost.source == SOURCE
        assert other.stale and other.detail == "no message for 10s" and other.source == OTHER
        assert not headers["failed-job"].status.freshness.stale

        page = await store.list_children("fan-job", "fan", [], 100, "")
        assert page is not None and page.revision == latest and page.next_page_token == ""
        expected = [child_status(c.record, c.revision) for key, c in sorted(children.items()) if key[1] == "fan"]
        assert page.children == expected
        assert [c.state for c in page.children] == [s.STEP_STATE_COMPLETED, STEP_99, s.STEP_STATE_RUNNING]
        assert page.children[0].duration.ToSeconds() == 5
        later = await store.list_children("fan-job", "later", [], 100, "")
        assert later is not None and [c.index for c in later.children] == [0]
        empty = await store.list_children("failed-job", "only", [], 100, "")
        assert empty is not None and empty.children == []
        assert await store.list_children("fan-job", "nope", [], 100, "") is None

        assert (await store.read_changes(0, 10_000)).items == changes
        assert (await store.read_changes(0, 10_000, job_id="lost-job")).items == [
            c for c in changes if c.job_id == "lost-job"]
        matching = ChangeFilter(frozenset({s.JOB_STATE_FAILED}), "beta")
        assert (await store.read_changes(0, 10_000, matching=matching)).items == [
            c for c in changes if matching.matches(c)] != []

        loaded = await store.load_jobs([*headers, "nope"])
        assert set(loaded) == set(headers)
        for job_id, found in loaded.items():
            assert found.header == headers[job_id], job_id
            assert sorted(found.steps, key=lambda st: st.stats.name) == sorted(
                (st for (owner, _), st in steps.items() if owner == job_id), key=lambda st: st.stats.name)
            assert sorted(found.children, key=lambda c: (c.step, c.index)) == [
                ChildVersion(c.record.step_name, c.record.index, c.record.state, c.seq)
                for key, c in sorted(children.items()) if key[0] == job_id]
        assert sorted(await store.unfinished_jobs(SOURCE)) == ["fan-job", "lost-job"]
        assert await store.unfinished_jobs(OTHER) == ["other-job"]

    opened = await store_factory.reopened()
    assert opened.revision == latest
    assert opened.sources == {address: ingest.sources[address] for address in (SOURCE, OTHER)}
    assert opened.sources[OTHER].staleness == Staleness(BASE + 30.5, "no message for 10s")


async def test_reads_show_the_sources_staleness_as_it_is_now(store_factory: Stores) -> None:
    """Freshness is not stored with a header: a source that recovers shows every
    one of its jobs fresh again, a finished job is never stale, and a lost job
    stays stale whatever its source does."""
    ingest = Ingest()
    async with store_factory.opened() as store:
        await commit_all(store, a_busy_day(ingest))
        await store.commit(ingest.stale(SOURCE, BASE + 40.0, "gone"))
        for job_id, stale in (("fan-job", True), ("failed-job", False), ("lost-job", True)):
            snapshot = await store.get_job(job_id)
            assert snapshot is not None and snapshot.job.freshness.stale == stale, job_id
        # The source comes back, committed alone (no header rewritten): the reads follow it.
        ingest.sources[SOURCE] = dataclasses.replace(ingest.source(SOURCE), stale_since=None, detail="")
        await store.commit(WriteBatch(sources=[ingest.source(SOURCE)]))
        fan = await store.get_job("fan-job")
        lost = await store.get_job("lost-job")
        assert fan is not None and not fan.job.freshness.stale
        assert lost is not None and lost.job.freshness.stale and "replaced" in lost.job.freshness.detail
        listed = {j.id: j.freshness.stale for j in (await store.all_jobs([], "")).jobs}
        assert listed == {"fan-job": False, "failed-job": False, "lost-job": True, "other-job": True}


# --- paging and filters -------------------------------------------------------------------------------------


def many_jobs(ingest: Ingest) -> WriteBatch:
    """Nine jobs; some created at the same time (the id breaks the tie)."""
    records: list[Record] = []
    for n, (name, state, created) in enumerate([
        ("alpha", s.JOB_STATE_COMPLETED, 1), ("beta", s.JOB_STATE_RUNNING, 2), ("alpha", s.JOB_STATE_RUNNING, 2),
        ("alpha", s.JOB_STATE_FAILED, 2), ("beta", s.JOB_STATE_COMPLETED, 3), ("gamma", s.JOB_STATE_PENDING, 5),
        ("alpha", s.JOB_STATE_COMPLETED, 6), ("beta", s.JOB_STATE_CANCELLED, 6), ("alpha", s.JOB_STATE_RUNNING, 7),
    ]):
        records.append(job(f"job-{n}", state, name=name, created=created))
    return ingest.events(*records)


async def all_pages(store: StatusStore, states: Sequence[int], name: str, size: int) -> tuple[list[str], int]:
    ids: list[str] = []
    token, pages = "", 0
    while True:
        page = await store.list_jobs(states, name, size, token)
        ids.extend(j.id for j in page.jobs)
        pages += 1
        token = page.next_page_token
        if not token:
            return ids, pages


async def test_jobs_page_newest_first_and_filter_by_state_and_name(store_factory: Stores) -> None:
    ingest = Ingest()
    batch = many_jobs(ingest)
    created = {h.status.id: (h.status.created_at.ToNanoseconds(), h.status.id) for h in batch.headers}
    async with store_factory.opened() as store:
        await store.commit(batch)
        for states, name in (([], ""), ([s.JOB_STATE_COMPLETED], ""), ([], "alpha"),
                             ([s.JOB_STATE_RUNNING, s.JOB_STATE_FAILED], "alpha"), ([s.JOB_STATE_RUNNING], "gamma")):
            expected = sorted((h.status.id for h in batch.headers
                               if (not states or h.status.state in states) and (not name or h.status.name == name)),
                              key=lambda job_id: created[job_id], reverse=True)
            listed = await store.all_jobs(states, name)
            assert [j.id for j in listed.jobs] == expected, (states, name)
            assert listed.revision == batch.changes[-1].revision
            for size in (1, 2, 3, 100):
                ids, pages = await all_pages(store, states, name, size)
                assert ids == expected, (states, name, size)
                assert pages == max(1, -(-len(expected) // size)), (states, name, size)


async def test_page_tokens_work_only_for_the_query_and_store_that_issued_them(store_factory: Stores) -> None:
    ingest = Ingest()
    jobs = many_jobs(ingest)
    children = ingest.events(*(child("job-0", index, s.STEP_STATE_PENDING) for index in range(5)),
                             child("job-0", 0, s.STEP_STATE_PENDING, step_name="other"))
    async with store_factory.opened() as store:
        await commit_all(store, [jobs, children])
        token = (await store.list_jobs([], "alpha", 2, "")).next_page_token
        children_page = await store.list_children("job-0", "fan", [], 2, "")
        assert children_page is not None
        child_token = children_page.next_page_token
        assert token and child_token
        for call in (
            lambda: store.list_jobs([], "beta", 2, token),
            lambda: store.list_jobs([s.JOB_STATE_RUNNING], "alpha", 2, token),
            lambda: store.list_jobs([], "alpha", 2, child_token),
            lambda: store.list_jobs([], "alpha", 2, token[:-2]),
            lambda: store.list_jobs([], "alpha", 2, "not a token"),
            lambda: store.list_children("job-0", "other", [], 2, child_token),
            lambda: store.list_children("job-0", "fan", [s.STEP_STATE_PENDING], 2, child_token),
            lambda: store.list_children("job-0", "fan", [], 2, token),
        ):
            with pytest.raises(InvalidArgumentError):
                await call()
        async with store_factory.opened("elsewhere") as other:
            await other.commit(jobs)
            with pytest.raises(InvalidArgumentError):
                await other.list_jobs([], "alpha", 2, token)
    async with store_factory.opened() as reopened:  # the same store, reopened: its tokens still work
        page = await reopened.list_jobs([], "alpha", 2, token)
        assert [j.id for j in page.jobs] == ["job-3", "job-2"]


async def test_children_page_by_index_and_filter_by_state(store_factory: Stores) -> None:
    ingest = Ingest()
    states = [s.STEP_STATE_PENDING, s.STEP_STATE_RUNNING, s.STEP_STATE_COMPLETED, s.STEP_STATE_FAILED, STEP_99]
    batch = ingest.events(job("job-0", s.JOB_STATE_RUNNING), *(
        child("job-0", index, states[index % len(states)]) for index in reversed(range(23))))
    async with store_factory.opened() as store:
        await store.commit(batch)
        for wanted in ([], [s.STEP_STATE_RUNNING], [s.STEP_STATE_FAILED, STEP_99]):
            expected = [index for index in range(23) if not wanted or states[index % len(states)] in wanted]
            for size in (1, 4, 100):
                indexes: list[int] = []
                token = ""
                while True:
                    page = await store.list_children("job-0", "fan", wanted, size, token)
                    assert page is not None and page.revision == batch.changes[-1].revision
                    indexes.extend(c.index for c in page.children)
                    token = page.next_page_token
                    if not token:
                        break
                assert indexes == expected, (wanted, size)


# --- revisions ----------------------------------------------------------------------------------------------


async def test_revisions_only_grow_and_pruned_ones_are_refused(store_factory: Stores) -> None:
    ingest = Ingest()
    async with store_factory.opened() as store:
        seen: list[int] = []
        for batch in a_busy_day(ingest):
            await store.commit(batch)
            latest = batch.changes[-1].revision
            page = await store.read_changes(0, 10_000)
            assert page.horizon == latest
            seen = [c.revision for c in page.items]
            assert seen == list(range(1, latest + 1))  # contiguous, strictly increasing, from 1
            snapshot = await store.get_job(batch.changes[-1].job_id)
            assert snapshot is not None and snapshot.revision == latest
            assert (await store.list_jobs([], "", 1, "")).revision == latest
            assert (await store.all_jobs([], "")).revision == latest
        latest = seen[-1]
        assert [c.revision for c in (await store.read_changes(3, 2)).items] == [4, 5]
        await store.check_retained(latest)
        with pytest.raises(CursorOutOfRangeError):
            await store.check_retained(latest + 1)
        with pytest.raises(CursorOutOfRangeError):
            await store.read_changes(latest + 1, 10)

        await store.prune(3)
        page = await store.read_changes(latest - 3, 10)
        assert [c.revision for c in page.items] == [latest - 2, latest - 1, latest] and page.horizon == latest
        for after in (0, latest - 4):
            with pytest.raises(CursorOutOfRangeError):
                await store.check_retained(after)
            with pytest.raises(CursorOutOfRangeError):
                await store.read_changes(after, 10)
        await store.prune(0)  # keeps the latest, which later revisions follow
        assert [c.revision for c in (await store.read_changes(latest - 1, 10)).items] == [latest]
    assert (await store_factory.reopened()).revision == latest
    async with store_factory.opened() as reopened:
        assert (await reopened.read_changes(latest, 10)).items == []


async def test_a_snapshot_at_each_revision_equals_the_changes_folded_to_it(store_factory: Stores) -> None:
    """What a watcher holds after folding the change log up to revision R (header
    replaced, steps by name) is the snapshot read when R was the latest, job by job
    (and no snapshot where no change of the job is at or before R)."""
    ingest = Ingest()
    batches = a_busy_day(ingest)
    snapshots: list[tuple[str, int, JobSnapshot | None]] = []
    async with store_factory.opened() as store:
        for batch in batches:
            await store.commit(batch)
            latest = await store.latest_revision()
            for job_id in ingest.jobs:
                snapshots.append((job_id, latest, await store.get_job(job_id)))
        changes = (await store.read_changes(0, 10_000)).items
    assert len({latest for _, latest, _ in snapshots}) == len(batches)
    for job_id, latest, snapshot in snapshots:
        watched = WatchedJob()
        for change in changes:
            if change.job_id == job_id and change.revision <= latest:
                assert watched.apply(update_of(change.revision, change.job_id, change.header, change.steps))
        if snapshot is None:
            assert watched.job is None and not watched.steps, (job_id, latest)
            continue
        assert snapshot.revision == latest
        assert watched.job == snapshot.job, (job_id, latest)
        assert watched.ordered_steps() == snapshot.steps, (job_id, latest)


# --- restart ------------------------------------------------------------------------------------------------


async def test_folds_reloaded_after_a_reopen_equal_those_before(store_factory: Stores) -> None:
    ingest = Ingest()
    batches = a_busy_day(ingest)
    async with store_factory.opened() as store:
        await commit_all(store, batches)
    async with store_factory.opened() as store:
        loaded = await store.load_jobs(list(ingest.jobs))
    assert set(loaded) == set(ingest.jobs)
    for job_id, held in ingest.jobs.items():
        assert restore(loaded[job_id]) == held, job_id
    # And they go on from there as the originals do.
    more = (child("fan-job", 1, s.STEP_STATE_FAILED, attempt=1), step("fan-job", "fan", 0, s.STEP_STATE_FAILED),
            job("fan-job", s.JOB_STATE_FAILED))
    reloaded = restore(loaded["fan-job"])
    for record in more:
        event, _ = event_of(record, 999)
        assert (reloaded.fold.apply(event) is None) == (ingest.jobs["fan-job"].fold.apply(event) is None)


async def test_committing_the_last_batch_again_changes_nothing(store_factory: Stores) -> None:
    """What a writer that cannot tell whether its commit landed may do."""
    ingest = Ingest()
    async with store_factory.opened() as store:
        for batch in a_busy_day(ingest):
            await store.commit(batch)
            once = await everything(store, list(ingest.jobs))
            await store.commit(batch)
            assert await everything(store, list(ingest.jobs)) == once


# --- cancellation -------------------------------------------------------------------------------------------


Work = Callable[[], Coroutine[Any, Any, Any]]


async def answer(work: Work) -> Any:
    """What `work` answers; a refusal is an answer too."""
    try:
        return await work()
    except ServiceError as refused:
        return type(refused), str(refused)


async def every_await(stores: Stores, store: StatusStore, work: Work, after: Callable[[int], Awaitable[None]]) -> int:
    """Cancel `work` at each of its awaits in turn (tests/e2e/test_cancellation.py's
    cancel_at), let what it left behind settle, then `after(n)`; the number of awaits."""
    for n in range(1, MAX_AWAITS):
        outcome = await cancel_at(answer(work), n)
        await stores.settled(store)
        await after(n)
        if outcome.completed:
            assert n > 1, "the work never awaited anything: nothing was tried"
            return n - 1
    raise AssertionError(f"still not done after {MAX_AWAITS} awaits")


async def test_a_read_cancelled_at_any_await_leaves_the_store_answering_the_same(store_factory: Stores) -> None:
    """Every read, and a prune that drops nothing, cancelled at each of its awaits in turn."""
    ingest = Ingest()
    async with store_factory.opened() as store:
        await commit_all(store, a_busy_day(ingest))
        token = (await store.list_jobs([], "", 1, "")).next_page_token
        reads: list[Work] = [
            lambda: store.get_job("fan-job"),
            lambda: store.list_jobs([], "", 1, token),
            lambda: store.all_jobs([s.JOB_STATE_RUNNING], ""),
            lambda: store.list_children("fan-job", "fan", [], 2, ""),
            lambda: store.read_changes(0, 100, job_id="fan-job"),
            lambda: store.read_changes(0, 100, matching=ChangeFilter(name="beta")),
            lambda: store.read_changes(10_000, 100),
            lambda: store.check_retained(0),
            lambda: store.unfinished_jobs(SOURCE),
            lambda: store.load_jobs(["fan-job", "lost-job"]),
            lambda: store.prune(1_000_000),
        ]
        for read in reads:
            expected = await answer(read)

            async def same_again(n: int, read: Work = read, expected: Any = expected) -> None:
                assert await answer(read) == expected, f"after a cancellation at await {n}"

            await every_await(store_factory, store, read, same_again)


async def test_a_commit_cancelled_at_any_await_is_all_or_nothing_and_the_store_goes_on(store_factory: Stores) -> None:
    ingest = Ingest()
    async with store_factory.opened() as store:
        await commit_all(store, a_busy_day(ingest))
        ids = list(ingest.jobs)
        before = await everything(store, ids)
        batch = ingest.events(child("fan-job", 1, s.STEP_STATE_COMPLETED, attempt=1),
                              step("fan-job", "fan", 0, s.STEP_STATE_COMPLETED), job("fan-job", s.JOB_STATE_COMPLETED))
        async with store_factory.opened("elsewhere") as other:
            await commit_all(other, [*a_busy_day(Ingest()), batch])
            after = await everything(other, ids)
        assert after != before

        async def all_or_nothing(n: int) -> None:
            assert await everything(store, ids) in (before, after), f"a commit cancelled at await {n} left a part"

        assert await every_await(store_factory, store, lambda: store.commit(batch), all_or_nothing) >= 1
        assert await everything(store, ids) == after
        # Committed again (what a restarted writer does): nothing changes, and the store goes on.
        await store.commit(batch)
        assert await everything(store, ids) == after
        await store.commit(ingest.events(job("next-job", s.JOB_STATE_RUNNING)))
        assert await store.get_job("next-job") is not None
