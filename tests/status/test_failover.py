"""Status replicas on one PostgreSQL database lose the ingest lease's holder
mid fan-out, and still nothing is lost or doubled, and every watcher sees
every revision once, in order.

Three `python -m status_svc --store postgresql://...` subprocesses follow one
orchestrator (in-process) on a fresh database, with quick lease timing
(LEASE_FLAGS). A watcher on each replica follows the job from revision 0 and,
when its replica dies, resumes on a live one with after_revision, as a client
would. The lease holder, found from the lease row, is interrupted: killed -9,
cut off from its lease connection while it ingests, or stopped (SIGSTOP)
with its connections open; each next interruption hits the new holder right
after its first commit. The times until the lease moved and until the new
holder's first commit (the committed cursor moving) are printed. At the end
the database is audited row by row against the orchestrator's whole log,
folded independently (tests/helpers/audit.py, the same audit as the SQLite
crash test), and each watcher's updates must be exactly the committed
`changes` rows, 1..N.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.states import TERMINAL_JOB_STATES
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc

from orchestrator_svc.app import Orchestrator
from status_svc.replication.lease import LEASE_TABLE, lease_holder
from stepstream_common.rpc import EXIT_FATAL
from tests.helpers import (
    DEADLINE,
    ServiceProcess,
    channel,
    ends_job,
    eventually,
    job_definition,
    read_whole_log,
    status_job_finished,
    status_process,
    update_of,
    wait_job_state,
    wait_status_job,
)
from tests.helpers.audit import assert_rows_match_the_log, crash_workload, postgres_rows, store_connection
from tests.helpers.postgres import PostgresDatabase

if TYPE_CHECKING:
    OrchStub = orch_grpc.OrchestratorServiceAsyncStub

COUNT = 400
# Quick lease timing, so that the tests do not wait out the production defaults (10 s, 1 s).
TTL, POLL = 2.0, 0.1
LEASE_FLAGS = ("--lease-ttl", str(TTL), "--poll-interval", str(POLL))


class Replica(ServiceProcess):
    """A status replica on the test's database."""

    def __init__(self, data_dir: Path, orchestrator: str, dsn: str) -> None:
        process = status_process(data_dir, orchestrator, "--store", dsn, *LEASE_FLAGS)
        super().__init__(process.module, process.args)
        self.killed = False

    def kill(self) -> None:
        self.killed = True
        super().kill()

    def signal(self, number: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(number)


class Watcher:
    """WatchJob from revision 0 until the job ends, on one replica and, each time
    that one dies (UNAVAILABLE), resumed on a live one with after_revision."""

    def __init__(self, replica: Replica, replicas: list[Replica], job_id: str) -> None:
        self.first = replica
        self.replicas = replicas
        self.job_id = job_id
        self.updates: list[Any] = []
        self.resumed = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        replica = self.first
        while not await self._watch(replica):
            self.resumed += 1
            replica = next(r for r in self.replicas if not r.killed)

    async def _watch(self, replica: Replica) -> bool:
        """Follow the job on `replica`; False if the replica went away first."""
        after = self.updates[-1].revision if self.updates else 0
        async with channel(replica.address) as ch:
            call = status_grpc.StatusServiceStub(ch).WatchJob(
                status_pb.WatchJobRequest(job_id=self.job_id, after_revision=after))
            broken: grpc.aio.AioRpcError | None = None
            try:
                async for message in call:
                    if message.WhichOneof("event") != "updates":
                        continue
                    self.updates.extend(message.updates.updates)
                    if any(ends_job(update) for update in message.updates.updates):
                        return True
            except grpc.aio.AioRpcError as error:
                broken = error
        assert broken is not None, f"the watch on {replica.address} ended before the job"
        assert broken.code() == grpc.StatusCode.UNAVAILABLE and replica.killed, broken
        return False

    async def ended(self) -> Watcher:
        async with asyncio.timeout(DEADLINE):
            await self.task
        return self


async def lease_held(connection: asyncpg.Connection, replicas: list[Replica], after: int = 0) -> tuple[Replica, int]:
    """(the replica holding the unexpired lease under an epoch past `after`, that epoch), polled until
    one does. The row names its holder HOST:PID:ADDRESS."""

    async def probe() -> tuple[Replica, int] | None:
        held = await lease_holder(connection)
        if held is None or not held[2] or held[1] <= after:
            return None
        [named] = [replica for replica in replicas if held[0].endswith(f":{replica.address}")]
        return named, held[1]

    return await eventually(probe, f"a replica to hold the lease after epoch {after}")


async def committed_cursor(connection: asyncpg.Connection) -> int:
    return int(await connection.fetchval("SELECT COALESCE(MAX(cursor), 0) FROM sources"))


async def children_done(connection: asyncpg.Connection, job_id: str, count: int) -> None:
    async def probe() -> bool | None:
        done = await connection.fetchval(
            "SELECT count(*) FROM children WHERE job_id = $1 AND state >= $2", job_id, s.STEP_STATE_COMPLETED)
        return True if done >= count else None

    await eventually(probe, f"{count} children to be done")


# What the test does to the lease holder (given a connection to the database): returns what undoes it
# once another replica has taken over.
Interrupt = Callable[[Replica, asyncpg.Connection], Awaitable[Callable[[], Awaitable[None]]]]


async def failover(
    orchestrator: Orchestrator, stub: OrchStub, tmp_path: Path, dsn: str, interrupts: Sequence[Interrupt],
) -> None:
    """Interrupt the lease holder mid fan-out with each of `interrupts` in turn (each next one right
    after the previous takeover's first commit), then audit the database and every watcher."""
    release = tmp_path / "release"
    replicas = [Replica(tmp_path / f"status-{n}", orchestrator.address, dsn) for n in range(3)]
    watchers: list[Watcher] = []
    undo: list[Callable[[], Awaitable[None]]] = []
    connection = await store_connection(dsn)
    try:
        # Not on the loop: the orchestrator runs on it.
        await asyncio.gather(*(asyncio.to_thread(replica.start) for replica in replicas))
        workload = crash_workload(release, COUNT, concurrency=10, delay=0.05)
        job_id = (await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=workload))).job.id
        for replica in replicas:
            async with channel(replica.address) as ch:
                await wait_status_job(status_grpc.StatusServiceStub(ch), job_id, lambda _: True,
                                      f"the job on {replica.address}")
            watchers.append(Watcher(replica, replicas, job_id))

        await children_done(connection, job_id, COUNT // 4)  # mid fan-out
        holder, epoch = await lease_held(connection, replicas)
        for interrupt in interrupts:
            fan = (await stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))).steps[1]
            assert fan.step.state == s.STEP_STATE_WAITING, "the fan-out must still run when the holder is interrupted"
            undo.append(await interrupt(holder, connection))
            interrupted_at = time.monotonic()
            new_holder, new_epoch = await lease_held(connection, replicas, after=epoch)
            assert not new_holder.killed
            moved = time.monotonic() - interrupted_at
            # Once the lease has moved, the old holder can never commit again: the next move is the new one's.
            cursor = await committed_cursor(connection)
            while await committed_cursor(connection) == cursor:
                assert time.monotonic() - interrupted_at < DEADLINE, "the new holder never commits"
                await asyncio.sleep(0.002)
            takeover = time.monotonic() - interrupted_at
            print(f"\nthe lease holder interrupted; the lease moved after {moved:.3f} s, the new holder's first "
                  f"commit after {takeover:.3f} s (epoch {epoch} -> {new_epoch}; TTL {TTL:g} s, poll {POLL:g} s)")
            holder, epoch = new_holder, new_epoch
        for undone in undo:
            await undone()

        release.touch()
        await wait_job_state(stub, job_id, set(TERMINAL_JOB_STATES))
        for replica in replicas:
            if not replica.killed:
                async with channel(replica.address) as ch:
                    final = await wait_status_job(status_grpc.StatusServiceStub(ch), job_id, status_job_finished,
                                                  f"the job to end on {replica.address}")
                assert final.job.state == s.JOB_STATE_COMPLETED
        for watcher in watchers:
            await watcher.ended()
    finally:
        for watcher in watchers:
            watcher.task.cancel()
        for replica in replicas:
            if replica.process is not None and replica.process.poll() is None:
                replica.signal(signal.SIGCONT)
            replica.stop()
        await connection.close()

    events = await read_whole_log(stub)
    view = await stub.GetJob(orch_pb.GetJobRequest(job_id=job_id))
    rows = await postgres_rows(dsn)
    assert_rows_match_the_log(rows, orchestrator.address, job_id, events, view)
    committed = [update_of(revision, job_id, header, steps) for revision, _, _, _, header, steps, _ in rows.changes]
    for watcher in watchers:
        assert [u.revision for u in watcher.updates] == [u.revision for u in committed], watcher.first.address
        assert watcher.updates == committed, f"{watcher.first.address}: an update differs from what was committed"
    orphans = [watcher for watcher in watchers if watcher.first.killed]
    assert all(watcher.resumed for watcher in orphans), "a watcher on a killed replica never moved to another"
    print(f"{len(committed)} revisions; watchers resumed {[w.resumed for w in watchers]} times")


async def killed(replica: Replica, _: asyncpg.Connection) -> Callable[[], Awaitable[None]]:
    await asyncio.to_thread(replica.kill)

    async def nothing() -> None:
        """It stays dead: its watchers have moved on."""

    return nothing


async def hung(replica: Replica, _: asyncpg.Connection) -> Callable[[], Awaitable[None]]:
    """SIGSTOP: it keeps its connections (and whatever it holds on the database) but does nothing."""
    replica.signal(signal.SIGSTOP)

    async def wake() -> None:
        replica.signal(signal.SIGCONT)

    return wake


async def cut_off(replica: Replica, connection: asyncpg.Connection) -> Callable[[], Awaitable[None]]:
    """The holder's lease connection ended by the database (pg_terminate_backend, as an operator or a
    network cut would), again and again until another replica has taken the lease over (the holder
    lives on and may renew on a new connection first, which is its right while the lease is its own):
    meanwhile it goes on ingesting, believing it holds the lease until its next renewal or fenced
    commit says otherwise."""
    epoch = await connection.fetchval(f"SELECT epoch FROM {LEASE_TABLE}")

    async def cut() -> bool | None:
        if await connection.fetchval(f"SELECT epoch <> $1 FROM {LEASE_TABLE}", epoch):
            return True
        await connection.execute(f"SELECT pg_terminate_backend(holder_pid) FROM {LEASE_TABLE}")
        return None

    await eventually(cut, f"the lease to move from epoch {epoch}")

    async def nothing() -> None:
        """It steps down by itself and reads on."""

    return nothing


async def test_kill_9_of_the_lease_holder_twice_mid_fanout_loses_nothing_and_watchers_see_every_revision_once(
    orchestrator: Orchestrator, orchestrator_stub: OrchStub, tmp_path: Path, postgres: PostgresDatabase
) -> None:
    """The holder killed -9, then the new holder killed right after its first commit (mid catch-up)."""
    await failover(orchestrator, orchestrator_stub, tmp_path, postgres.dsn, [killed, killed])


async def test_a_holder_cut_off_or_hung_never_commits_after_the_takeover(
    orchestrator: Orchestrator, orchestrator_stub: OrchStub, tmp_path: Path, postgres: PostgresDatabase
) -> None:
    """First the holder's lease connection is ended while it ingests: for a moment two replicas
    believe they hold the lease, and only the new epoch may commit. Then the new holder is stopped
    (SIGSTOP) with its connections open: taken over once its lease expires; woken, it may still hold
    events it read before, which it must never commit. The fence is all that stops either; the audit
    finds any commit it let through."""
    await failover(orchestrator, orchestrator_stub, tmp_path, postgres.dsn, [cut_off, hung])



async def test_a_replica_whose_database_went_back_in_time_exits_and_one_started_afresh_serves_it(
    orchestrator_stub: OrchStub, orchestrator: Orchestrator, tmp_path: Path, postgres: PostgresDatabase
) -> None:
    """The database is restored from a backup older than what a running replica already published
    (here: its newest changes deleted): waiting would hand out those revisions again, with other
    contents, to watchers that already had them. The replica exits (EXIT_FATAL) instead, and one
    started afterwards serves the database as it now is."""
    replica = Replica(tmp_path / "status", orchestrator.address, postgres.dsn)
    fresh = Replica(tmp_path / "fresh", orchestrator.address, postgres.dsn)
    connection = await store_connection(postgres.dsn)
    try:
        await asyncio.to_thread(replica.start)
        job = await orchestrator_stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition([
            {"name": "fan", "type": "fanout", "count": 3, "child": {"type": "sleep", "seconds": 0}}])))
        async with channel(replica.address) as ch:
            await wait_status_job(status_grpc.StatusServiceStub(ch), job.job.id, status_job_finished, "the job to end")
        latest = int(await connection.fetchval("SELECT MAX(revision) FROM changes"))
        await connection.execute("DELETE FROM changes WHERE revision > $1", latest - 2)
        assert replica.process is not None
        assert await asyncio.to_thread(replica.process.wait, DEADLINE) == EXIT_FATAL
        await asyncio.to_thread(fresh.start)
        async with channel(fresh.address) as ch:
            view = await status_grpc.StatusServiceStub(ch).GetJob(status_pb.GetJobRequest(job_id=job.job.id))
        assert view.revision <= latest - 2 and view.job.state == s.JOB_STATE_COMPLETED
    finally:
        replica.stop()
        fresh.stop()
        await connection.close()
