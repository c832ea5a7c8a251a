"""The output store on its own, on real files: what readers see and when,
bounds, masking, cancellation, retention, and recovery of a torn file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from stepstream.common.v1 import states_pb2 as s

from orchestrator_svc.output import (
    OutputKey,
    OutputNotFound,
    OutputSettings,
    OutputStore,
    OutputStream,
    capturing,
)
from orchestrator_svc.output.records import HEADER, INDEX_ENTRY
from orchestrator_svc.output.store import INTERRUPTED_NOTICE
from tests.orchestrator.test_output_capture import joined, read_all

OUT, NOTICE = OutputStream.STDOUT, OutputStream.NOTICE
KEY = OutputKey("job1", "step", None, 1)
DONE = s.STEP_STATE_COMPLETED


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[OutputStore]:
    opened = OutputStore(OutputSettings(tmp_path / "output", chunk_bytes=16, read_bytes=1000,
                                        max_pending_bytes=64 * 1024))
    await opened.open()
    yield opened
    await opened.close()


async def test_readers_see_only_written_lines_and_wait_wakes_on_them(store: OutputStore) -> None:
    sink = store.sink(KEY)
    (described,) = store.attempts("job1")
    assert (described.lines, described.finished) == (0, False)
    waiter = asyncio.create_task(store.wait(KEY, -1, 60))
    sink.emit(OUT, b"first\nsec")
    assert await store.read(KEY, 0, 10) == []  # numbered, not yet written: not served
    await waiter
    assert [line.data for line in await store.read(KEY, 0, 10)] == [b"first"]
    # Nothing new: wait returns after its timeout; an unfinished line is not a line yet.
    await store.wait(KEY, 0, 0.01)
    waiter = asyncio.create_task(store.wait(KEY, 0, 60))
    await sink.close(DONE)
    await waiter
    assert [line.data for line in await read_all(store, KEY)] == [b"first", b"sec"]
    (described,) = store.attempts("job1")
    assert (described.lines, described.bytes, described.finished, described.final_state) == (2, 8, True, DONE)
    await store.wait(KEY, 5, 60)  # finished: returns at once


async def test_reads_are_bounded_and_start_anywhere(store: OutputStore) -> None:
    sink = store.sink(KEY)
    await sink.write(OUT, b"".join(b"%015d\n" % i for i in range(1000)))
    page = await store.read(KEY, 500, 1000)
    assert [line.number for line in page] == list(range(500, 500 + len(page)))
    assert [line.data for line in page] == [b"%015d" % i for i in range(500, 500 + len(page))]
    assert 1 < len(page) < 1000 and sum(len(line.data) for line in page) <= 1000  # read_bytes
    assert await store.read(KEY, 1000, 10) == []
    with pytest.raises(ValueError, match="from_line"):
        await store.read(KEY, -1, 10)
    with pytest.raises(OutputNotFound):
        await store.read(OutputKey("job1", "step", None, 2), 0, 10)
    await sink.close(DONE)


async def test_a_secret_split_across_chunks_is_still_masked(store: OutputStore) -> None:
    sink = store.sink(KEY, secrets=["s3cr3t-value"])
    for piece in (b"0123456789ab", b"cs3cr3", b"t-val", b"ue and more text without end", b"\n"):
        await sink.write(OUT, piece)
    await sink.close(DONE)
    lines = await read_all(store, KEY)
    assert all(len(line.data) <= 16 for line in lines)
    assert joined(lines) == b"0123456789abc<secret> and more text without end\n"


async def test_close_completes_even_if_its_caller_is_cancelled(store: OutputStore) -> None:
    sink = store.sink(KEY)
    sink.emit(OUT, b"x" * 100 + b"\nunfinished")
    closing = asyncio.create_task(sink.close(s.STEP_STATE_CANCELLED))
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await store.wait(KEY, 10**9, 60)  # returns once finished
    (described,) = store.attempts("job1")
    assert (described.finished, described.final_state) == (True, s.STEP_STATE_CANCELLED)
    assert joined(await read_all(store, KEY)) == b"x" * 100 + b"\nunfinished\n"


async def test_a_cancelled_writer_leaves_the_sink_whole(store: OutputStore) -> None:
    sink = store.sink(KEY)
    for size in range(1, 200):
        writer = asyncio.create_task(sink.write(OUT, b"y" * size + b"\n"))
        await asyncio.sleep(0)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    await sink.close(DONE)
    assert joined(await read_all(store, KEY)) == b"".join(b"y" * size + b"\n" for size in range(1, 200))


LINES, WIDTH = 2000, 999  # 2 MB printed, 32 times what a sink may hold unwritten


def print_a_lot() -> None:
    for number in range(LINES):
        print(f"{number:0{WIDTH}d}")


PRINTED = b"".join(b"%0*d" % (WIDTH, number) for number in range(LINES))


async def test_a_thread_printing_fast_is_slowed_not_dropped(store: OutputStore) -> None:
    sink = store.sink(KEY, limit=10**9)
    with capturing(sink):
        await asyncio.to_thread(print_a_lot)
    await sink.close(DONE)
    lines = await read_all(store, KEY)
    assert sink.dropped == 0
    assert b"".join(line.data for line in lines) == PRINTED


async def test_an_async_function_printing_without_pause_is_cut_at_the_bound(store: OutputStore) -> None:
    sink = store.sink(KEY, limit=10**9)
    with capturing(sink):
        print_a_lot()  # on the loop, never yielding: nothing can be written meanwhile
        await asyncio.sleep(0)
        print("after a pause")
    await sink.close(DONE)
    lines = await read_all(store, KEY)
    *kept, notice = lines
    data = b"".join(line.data for line in kept)
    assert 0 < len(data) < len(PRINTED) and PRINTED.startswith(data)
    assert len(data) + sink.dropped == len(PRINTED) + len("after a pause")
    assert notice.stream == NOTICE and f"{sink.dropped:,} bytes dropped".encode() in notice.data


async def test_retention_removes_old_finished_jobs_and_never_a_running_one(store: OutputStore, tmp_path: Path) -> None:
    running = {"job2"}
    store.running = running.__contains__
    finished, live = store.sink(KEY), store.sink(OutputKey("job2", "step", None, 1))
    for sink in (finished, live):
        await sink.write(OUT, b"a line\n")
    await finished.close(DONE)
    await store.sink(OutputKey("job1", "quiet", None, 1)).close(DONE)  # printed nothing: no files
    later = time.time() + store.settings.retention_seconds + 1
    assert await store.prune(now=time.time()) == 0  # not old yet
    assert await store.prune(now=later) == 1
    assert store.attempts("job1") == [] and not (tmp_path / "output" / "job1").exists()
    with pytest.raises(OutputNotFound):
        await store.read(KEY, 0, 10)
    # A running job's output stays, while an attempt writes and between attempts.
    assert await store.prune(now=later) == 0
    await live.close(DONE)
    assert await store.prune(now=later) == 0
    assert [line.data for line in await store.read(live.key, 0, 10)] == [b"a line"]
    running.clear()
    assert await store.prune(now=later + 1) == 1 and store.attempts("job2") == []


async def test_a_torn_file_is_cut_after_its_last_whole_record_on_open(store: OutputStore, tmp_path: Path) -> None:
    sink = store.sink(KEY)
    await sink.write(OUT, b"kept 1\nkept 2\n")
    data, index = (tmp_path / "output" / "job1" / f"step.-.1.{ext}" for ext in ("out", "idx"))
    # A crash mid-write: a record's header with part of its data, and an index entry for it.
    size = data.stat().st_size
    with data.open("ab") as file:
        file.write(HEADER.pack(1, 0.0, 50, 1) + b"part")
    with index.open("ab") as file:
        file.write(INDEX_ENTRY.pack(2, size))
    reopened = OutputStore(store.settings)
    await reopened.open()
    try:
        (described,) = reopened.attempts("job1")
        lines = await read_all(reopened, KEY)
    finally:
        await reopened.close()
    assert [(line.stream, line.data) for line in lines] == [(OUT, b"kept 1"), (OUT, b"kept 2"),
                                                           (NOTICE, INTERRUPTED_NOTICE)]
    assert (described.lines, described.finished, described.final_state) == (3, True, s.STEP_STATE_FAILED)


async def test_whether_a_retry_follows_is_kept_in_memory_and_across_a_reopen(store: OutputStore) -> None:
    """Attempt 1 failed with a retry to follow (printed something: its end file says so), attempt 2
    failed as the last (printed nothing: only the catalogue knows); both read back so, also after the
    store is opened again from its directory."""
    first, second = KEY, OutputKey("job1", "step", None, 2)
    sink = store.sink(first)
    sink.emit(OUT, b"try 1\n")
    await sink.close(s.STEP_STATE_FAILED, retried=True)
    await store.sink(second).close(s.STEP_STATE_FAILED)
    assert [(a.key.attempt, a.final_state, a.retried) for a in store.attempts("job1")] == [
        (1, s.STEP_STATE_FAILED, True), (2, s.STEP_STATE_FAILED, False)]
    reopened = OutputStore(store.settings)
    await reopened.open()
    try:
        assert [(a.key.attempt, a.retried) for a in reopened.attempts("job1")] == [(1, True)]
    finally:
        await reopened.close()
