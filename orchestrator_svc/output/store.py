"""The output store: per-attempt files written by sinks, read by the API (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from stepstream.common.v1 import states_pb2 as s

from orchestrator_svc.domain.spec import MAX_RETRIES, SECRET_MARKER
from orchestrator_svc.output.records import (
    CONTINUED,
    HEADER,
    INDEX_ENTRY,
    RECORD_OVERHEAD,
    AttemptOutput,
    OutputGone,
    OutputKey,
    OutputLine,
    OutputNotFound,
    OutputStream,
    frame,
    unframe,
)

if TYPE_CHECKING:
    from orchestrator_svc.config import OrchestratorConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

DATA, INDEX, END = ".out", ".idx", ".end"
# The key of the step itself (not a child) in a file name.
STEP_ITSELF = "-"
_MASKED = SECRET_MARKER.encode()
# Seconds between checks that the loop still runs, for a thread waiting on a sink.
THREAD_WAIT_CHECK = 1.0
INTERRUPTED_NOTICE = b"\xe2\x80\xa6 output ends here: the orchestrator stopped while this attempt ran \xe2\x80\xa6"


@dataclass(frozen=True)
class OutputSettings:
    """Where output lives and how much of it (OrchestratorConfig's output_* settings)."""

    directory: Path
    # Bytes kept per attempt, as stored (RECORD_OVERHEAD per record); the rest is dropped and counted.
    limit_bytes: int = 10 * 1024 * 1024
    # A line longer than this is kept as several records (continued=True but the last).
    chunk_bytes: int = 64 * 1024
    # Output of a finished job whose last write is older than this goes away.
    retention_seconds: float = 7 * 86400.0
    # Most bytes of line data one read() returns (always at least one line).
    read_bytes: int = 1024 * 1024
    # Bytes per second captured from commands' pipes, all attempts together (a second's worth may come at once).
    rate_bytes: int = 32 * 1024 * 1024
    # Bytes a sink holds unwritten before a writer that cannot wait (print() in an async function that
    # never awaits) has the rest of the attempt's output dropped, as past the limit.
    max_pending_bytes: int = 4 * 1024 * 1024

    @classmethod
    def of(cls, config: OrchestratorConfig, directory: Path) -> OutputSettings:
        """From an OrchestratorConfig (its output_* settings)."""
        return cls(directory, limit_bytes=config.output_limit, chunk_bytes=config.output_chunk_bytes,
                   retention_seconds=config.output_retention_days * 86400.0, rate_bytes=config.output_rate)


def _base(directory: Path, key: OutputKey) -> Path:
    child = STEP_ITSELF if key.child is None else str(key.child)
    return directory / key.job_id / f"{key.step}.{child}.{key.attempt}"


def _key_of(job_id: str, stem: str) -> OutputKey | None:
    step, _, rest = stem.rpartition(".")
    step, _, child = step.rpartition(".")
    if not step or not rest.isdigit() or not (child == STEP_ITSELF or child.isdigit()):
        return None
    return OutputKey(job_id, step, None if child == STEP_ITSELF else int(child), int(rest))


# What a sink queues for its framer, in order: output, a stream's end, the cut (OutputSink.emit_bounded), the end.
_EMIT, _END, _CUT, _FINISH = range(4)
_Operation = tuple[int, OutputStream, bytes, float]


class _Framer:
    """The thread side of a sink: splits output into lines, masks, frames,
    numbers and appends them, a batch at a time (never two at once for one
    sink), in the store's threads. The lines of one read go into one record
    (split, counted and joined by C code), so what a fast printer costs the
    process, and the GIL the loop needs, is a few operations per read, not per line."""

    def __init__(self, base: Path, limit: int, chunk: int) -> None:
        self.base = base
        self.limit = limit
        self.chunk = chunk
        # Replaced whole (OutputSink.hide), never changed in place: a batch sees one list.
        self.masks: list[bytes] = []
        self.partial: dict[OutputStream, bytes] = {}
        # Line data kept and dropped, newlines not counted (as AttemptOutput.bytes).
        self.lines = self.size = self.records = self.bytes = self.dropped = 0
        self.cut = False
        self.last = b""
        self._data = bytearray()
        self._index = bytearray()

    @property
    def written(self) -> tuple[int, int, int, int]:
        """(lines, data file bytes, records, line data bytes)."""
        return self.lines, self.size, self.records, self.bytes

    def apply(self, batch: list[_Operation]) -> tuple[int, int, int, int]:
        """Frame and append `batch`; `written` after it."""
        before = self.written
        for operation, stream, data, now in batch:
            if operation == _EMIT:
                self._emit(stream, data, now)
            elif operation == _END:
                self._end(stream, now)
            elif operation == _CUT:
                self.cut = True
            else:
                self._finish(now)
        data, index = bytes(self._data), bytes(self._index)
        self._data.clear()
        self._index.clear()
        if data:
            try:
                _append(self.base, data, index, before[1] == 0)
            except OSError as error:
                log.warning("output cut short (%s): %s", self.base.name, error)
                # Nothing of this batch is kept: it counts as dropped, and so does all that follows.
                self.dropped += self.bytes - before[3]
                (self.lines, self.size, self.records, self.bytes), self.cut = before, True
        return self.written

    def _emit(self, stream: OutputStream, data: bytes, now: float) -> None:
        buffered = self.partial.pop(stream, b"") + data
        for mask in self.masks:
            buffered = buffered.replace(mask, _MASKED)
        end = buffered.rfind(b"\n") + 1
        block, rest = buffered[:end], buffered[end:]
        if block:
            # (A block no longer than a chunk cannot hold a longer line: no need to split it.)
            if len(block) <= self.chunk + 1 or max(map(len, block.split(b"\n"))) <= self.chunk:
                self._block(stream, block, block.count(b"\n"), now)
            else:
                for line in block.split(b"\n")[:-1]:
                    self._block(stream, self._chunks(stream, line, now, 0) + b"\n", 1, now)
            self._last_of(block)
        # Masked already; but a secret may start here and end in what comes next: keep its possible beginning.
        rest = self._chunks(stream, rest, now, len(self.masks[0]) - 1 if self.masks else 0)
        if rest:
            self.partial[stream] = rest

    def _last_of(self, block: bytes) -> None:
        """Keep the last non-blank line of `block` (whole lines) as the last line."""
        end = len(block) - 1
        while end > 0:
            start = block.rfind(b"\n", 0, end) + 1
            if block[start:end].strip():
                self.last = block[max(start, end - 800) : end]
                return
            end = start - 1

    def _chunks(self, stream: OutputStream, line: bytes, now: float, keep: int) -> bytes:
        """Record `line` a chunk at a time (continued) while more than `keep`
        bytes would be left; what is left (at most a chunk plus `keep`)."""
        while len(line) > self.chunk + keep:
            self._record(stream, line[: self.chunk], now, 1, continued=True)
            line = line[self.chunk :]
        return line

    def _end(self, stream: OutputStream, now: float) -> None:
        rest = self.partial.pop(stream, b"")
        if rest:
            self._block(stream, rest + b"\n", 1, now)
            self._last_of(rest + b"\n")

    def _finish(self, now: float) -> None:
        for stream in list(self.partial):
            self._end(stream, now)
        if self.dropped:
            notice = f"\u2026 {self.dropped:,} bytes dropped (limit {self.limit:,} bytes per attempt) \u2026\n"
            self.cut = False  # the notice is kept whatever the limit
            self._record(OutputStream.NOTICE, notice.encode(), now, 1, continued=False)

    def _stored(self) -> int:
        """Bytes on disk: records and index."""
        return self.size + self.records * INDEX_ENTRY.size

    def _block(self, stream: OutputStream, block: bytes, lines: int, now: float) -> None:
        """Whole lines (`block` ends with a newline): as many as fit within the limit."""
        room = self.limit - self._stored() - RECORD_OVERHEAD
        if not self.cut and len(block) > room:
            fits = block.rfind(b"\n", 0, max(room, 0)) + 1
            if fits:
                self._record(stream, block[:fits], now, block.count(b"\n", 0, fits), continued=False)
            self.dropped += len(block) - fits - block.count(b"\n", fits)
            self.cut = True
            return
        self._record(stream, block, now, lines, continued=False)

    def _record(self, stream: OutputStream, data: bytes, now: float, lines: int, continued: bool) -> None:
        """`lines` whole lines (each with its newline), or a continued chunk (lines 1, no newline)."""
        data_bytes = len(data) - (0 if continued else lines)
        if self.cut and stream != OutputStream.NOTICE:
            self.dropped += data_bytes
            return
        if continued and self._stored() + RECORD_OVERHEAD + len(data) > self.limit:
            self.cut = True
            self.dropped += data_bytes
            return
        self.bytes += data_bytes
        self._data += frame(stream, data, now, lines, continued)
        self._index += INDEX_ENTRY.pack(self.lines, self.size)
        self.size += HEADER.size + len(data)
        self.lines += lines
        self.records += 1


class OutputSink:
    """Where one attempt's output goes while it runs: opened before the worker
    starts, closed with the attempt's final state.

    `emit` is synchronous and costs the loop next to nothing: it queues the
    bytes for the sink's flush, which frames and writes them in the store's
    threads (_Framer); readers see lines only once written. Producers that
    can wait await `drain()` after each emit (or use `write`), so at most one
    read's worth is ever held. Secrets are masked before anything is stored,
    line by line (as the command worker's message always was).
    """

    def __init__(self, store: OutputStore, key: OutputKey, limit: int, secrets: Iterable[str]) -> None:
        self.key = key
        self._store = store
        self._settings = store.settings
        self._framer = _Framer(_base(store.settings.directory, key), limit, store.settings.chunk_bytes)
        self.hide(secrets)
        self._inbox: list[_Operation] = []
        self._inbox_bytes = 0
        self._written: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._flusher: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._changed = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        # Bytes handed over by other threads, not yet taken on the loop (emit_from_thread).
        self._queued = 0
        self._queue_lock = threading.Lock()

    def hide(self, secrets: Iterable[str]) -> None:
        """Mask every line of each of `secrets` from now on (a secret known only
        once the worker runs, such as a secret_file's content)."""
        lines = {os.fsencode(line) for secret in secrets for line in secret.splitlines() if line.strip()}
        self._framer.masks = sorted(lines.union(self._framer.masks), key=len, reverse=True)

    @property
    def last_line(self) -> str:
        """The last non-blank line written (masked, stripped, at most 200 characters): a command's message."""
        return self._framer.last.decode(errors="replace").strip()[:200]

    @property
    def dropped(self) -> int:
        """Bytes of line data past the limit, not kept."""
        return self._framer.dropped

    def emit(self, stream: OutputStream, data: bytes) -> None:
        """Take `data` as printed on `stream`: complete lines become records; a
        line's unfinished end waits for the rest (or end_stream), a chunk at a
        time once it is longer than the chunk size."""
        if self._closing is None and data:
            self._queue(_EMIT, stream, data)

    def end_stream(self, stream: OutputStream) -> None:
        """`stream` is closed: an unfinished last line is a line."""
        if self._closing is None:
            self._queue(_END, stream, b"")

    def emit_bounded(self, stream: OutputStream, data: bytes) -> None:
        """emit() for a writer that cannot wait: once more than max_pending_bytes
        wait to be written, the attempt's output is cut there, as at its limit."""
        if self._inbox_bytes > self._settings.max_pending_bytes and self._closing is None:
            self._queue(_CUT, stream, b"")
        self.emit(stream, data)

    def emit_from_thread(self, stream: OutputStream, data: bytes) -> None:
        """emit() from a thread other than the loop's (print() in a plain python
        function): the writer waits while more than half max_pending_bytes are
        queued or unwritten, so a thread printing forever goes at the disk's
        pace and is never held in memory. All goes through the loop's queue, in order."""
        if self._closing is not None:
            return
        with self._queue_lock:
            self._queued += len(data)
            behind = self._queued + self._inbox_bytes > self._settings.max_pending_bytes // 2
        if not behind:
            self.loop.call_soon_threadsafe(self._take, stream, data)
            return
        taken = asyncio.run_coroutine_threadsafe(self._take_and_drain(stream, data), self.loop)
        # Never wait on a loop that has stopped (the service is exiting): it would never answer.
        while self.loop.is_running():
            with contextlib.suppress(TimeoutError):
                taken.result(THREAD_WAIT_CHECK)
                return
        taken.cancel()

    def _take(self, stream: OutputStream, data: bytes) -> None:
        with self._queue_lock:
            self._queued -= len(data)
        self.emit(stream, data)

    async def _take_and_drain(self, stream: OutputStream, data: bytes) -> None:
        self._take(stream, data)
        await self.drain()

    async def write(self, stream: OutputStream, data: bytes) -> None:
        """emit(), then wait until it is written: the plugin API for a worker's own lines."""
        self.emit(stream, data)
        await self.drain()

    async def pace(self, size: int) -> None:
        """Spend `size` bytes of the service's output budget (Pace), waiting if it is spent."""
        await self._store.pace.take(size)

    async def drain(self) -> None:
        """Return once everything emitted so far is written (readable)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def close(self, final_state: int, retried: bool = False) -> None:
        """End the attempt: unfinished lines, then "… N bytes dropped …" if any
        were, are written; then the attempt reads as finished with `final_state`
        (and `retried`: another attempt follows). Runs to its end even if the
        caller is cancelled meanwhile."""
        if self._closing is None and self._flusher is None:
            # Nothing was ever printed: nothing to write, nothing to wait for.
            self._closing = self.loop.create_future()
            self._closing.set_result(None)
            self._store.finished(self, final_state, retried)
        if self._closing is None:
            self._closing = asyncio.create_task(self._finish(final_state, retried), name=f"output-close-{self.key}")
        await asyncio.shield(self._closing)

    async def _finish(self, final_state: int, retried: bool) -> None:
        self._queue(_FINISH, OutputStream.NOTICE, b"")
        await self.drain()
        if self._written[0]:
            end = json.dumps({"state": final_state, "dropped": self.dropped, "bytes": self._written[3],
                              "retried": retried}).encode()
            try:
                await self._store.in_thread(_write_end, self._framer.base, end)
            except OSError as error:
                log.warning("could not finish the output of %s: %s", self.key, error)
        self._store.finished(self, final_state, retried)

    @property
    def closing(self) -> asyncio.Future[None] | None:
        """The close under way, once close() was called."""
        return self._closing

    def describe(self, final_state: int = 0) -> AttemptOutput:
        """What is written so far; finished if given its final state."""
        lines, _, _, data_bytes = self._written
        return AttemptOutput(self.key, lines, data_bytes, self.dropped, 0, bool(final_state), final_state)

    @property
    def readable(self) -> int:
        """Lines written so far: the ones readers may have."""
        return self._written[0]

    def changed(self) -> asyncio.Event:
        """Set at the next write or at the end (a fresh event each time)."""
        return self._changed

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _queue(self, operation: int, stream: OutputStream, data: bytes) -> None:
        self._inbox.append((operation, stream, data, time.time()))
        self._inbox_bytes += len(data)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"output-flush-{self.key}")

    async def _flush(self) -> None:
        while self._inbox:
            batch, self._inbox, self._inbox_bytes = self._inbox, [], 0
            self._written = await self._store.in_thread(self._framer.apply, batch)
            self.notify()


def _private(path: Path, flags: int) -> BinaryIO:
    """`path` opened for writing, made 0600 whatever the umask: output may hold what a step should not show others."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600), "wb")


def _append(base: Path, data: bytes, index: bytes, first: bool) -> None:
    """Data before index: an index entry never points past what is written."""
    if first:
        base.parent.mkdir(mode=0o700, exist_ok=True)
    with _private(base.with_suffix(base.suffix + DATA), os.O_APPEND) as file:
        file.write(data)
    with _private(base.with_suffix(base.suffix + INDEX), os.O_APPEND) as file:
        file.write(index)


def _write_end(base: Path, end: bytes) -> None:
    with _private(base.with_suffix(base.suffix + END), os.O_TRUNC) as file:
        file.write(end)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)


@dataclass(frozen=True)
class _Found:
    output: AttemptOutput
    mtime: float


def _scan(directory: Path) -> list[_Found]:
    """Every attempt on disk; an attempt a stopped process left unfinished is
    cut after its last whole record, given an "output ends here" notice and
    finished FAILED (as recovery ends its step)."""
    found: list[_Found] = []
    if not directory.is_dir():
        return found
    for job_dir in directory.iterdir():
        if not job_dir.is_dir():
            continue
        for index_file in job_dir.glob(f"*{INDEX}"):
            key = _key_of(job_dir.name, index_file.name.removesuffix(INDEX))
            if key is None:
                continue
            base = index_file.with_suffix("")
            output = _recover(base, key)
            found.append(_Found(output, base.with_suffix(base.suffix + DATA).stat().st_mtime))
    return found


def _recover(base: Path, key: OutputKey) -> AttemptOutput:
    data_file, index_file, end_file = (base.with_suffix(base.suffix + ext) for ext in (DATA, INDEX, END))
    if not data_file.exists():
        _private(data_file, os.O_APPEND).close()
    size = data_file.stat().st_size
    index = index_file.read_bytes()
    records = len(index) // INDEX_ENTRY.size
    lines = end = 0
    with open(data_file, "rb") as file:
        while records:
            first, offset = INDEX_ENTRY.unpack_from(index, (records - 1) * INDEX_ENTRY.size)
            header = os.pread(file.fileno(), HEADER.size, offset)
            if len(header) == HEADER.size:
                _, _, length, count = HEADER.unpack(header)
                if offset + HEADER.size + length <= size:
                    lines, end = first + count, offset + HEADER.size + length
                    break
            records -= 1
    state, dropped, data_bytes, retried = 0, 0, -1, False
    if end_file.exists():
        with contextlib.suppress(ValueError, OSError, KeyError):
            recorded = json.loads(end_file.read_bytes())
            state, dropped, data_bytes = int(recorded["state"]), int(recorded["dropped"]), int(recorded["bytes"])
            retried = recorded.get("retried") is True
    if not state:
        os.truncate(data_file, end)
        os.truncate(index_file, records * INDEX_ENTRY.size)
        notice = INTERRUPTED_NOTICE + b"\n"
        _append(base, frame(OutputStream.NOTICE, notice, time.time(), 1, False), INDEX_ENTRY.pack(lines, end), False)
        end, lines, records = end + HEADER.size + len(notice), lines + 1, records + 1
        state, data_bytes = s.STEP_STATE_FAILED, _data_bytes(data_file, end)
        _write_end(base, json.dumps({"state": state, "dropped": dropped, "bytes": data_bytes}).encode())
    return AttemptOutput(key, lines, data_bytes, dropped, 0, True, state, retried)


def _data_bytes(data_file: Path, end: int) -> int:
    """Line data in the records before `end` (newlines not counted): a walk over their headers."""
    total, offset = 0, 0
    with open(data_file, "rb") as file:
        while offset < end:
            flags, _, length, lines = HEADER.unpack(os.pread(file.fileno(), HEADER.size, offset))
            total += length - (0 if flags & CONTINUED else lines)
            offset += HEADER.size + length
    return total


def _read(base: Path, from_line: int, count: int, budget: int) -> list[OutputLine]:
    """Up to `count` lines from `from_line` (which exists): the record holding
    it is found by a binary search of the index, then records are read in turn."""
    with open(base.with_suffix(base.suffix + INDEX), "rb") as index, \
            open(base.with_suffix(base.suffix + DATA), "rb") as data:

        def entry(position: int) -> tuple[int, int]:
            first, offset = INDEX_ENTRY.unpack(os.pread(index.fileno(), INDEX_ENTRY.size, position * INDEX_ENTRY.size))
            return first, offset

        low, high = 0, os.fstat(index.fileno()).st_size // INDEX_ENTRY.size
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if entry(middle)[0] <= from_line else (low, middle)
        first, offset = entry(low)
        result: list[OutputLine] = []
        taken = 0
        while True:
            header = os.pread(data.fileno(), HEADER.size, offset)
            length = HEADER.unpack(header)[2]
            block = os.pread(data.fileno(), length, offset + HEADER.size)
            for line in unframe(header, block, first):
                if line.number < from_line:
                    continue
                taken += len(line.data)
                if result and taken > budget:
                    return result
                result.append(line)
                if len(result) == count:
                    return result
            first, offset = first + HEADER.unpack(header)[3], offset + HEADER.size + length


class Pace:
    """The output budget of the whole orchestrator, in bytes per second (a
    token bucket holding at most one second's worth). Capturing output costs
    this process CPU, which the event log and the status stream need too: past
    the budget, readers of commands' pipes wait, the pipes fill and the
    commands printing the most are slowed, instead of the service."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = float(rate)
        self._stamp = time.monotonic()

    async def take(self, size: int) -> None:
        """Spend `size` bytes, waiting first if the budget is overdrawn. Holds nothing while it waits."""
        now = time.monotonic()
        self._tokens = min(float(self.rate), self._tokens + (now - self._stamp) * self.rate) - size
        self._stamp = now
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


# A finished attempt, as the catalogue keeps it: (lines, bytes, dropped bytes, final state, retried).
_Done = tuple[int, int, int, int, bool]
# An attempt in the catalogue: (step, child, attempt).
_Place = tuple[str, int | None, int]
@functools.cache
def _silent(state: int, retried: bool) -> _Done:
    """An attempt that printed nothing, one tuple per ending for them all: they cost the catalogue a key."""
    return 0, 0, 0, state, retried


# Attempts of one unit a lookup tries: a unit has at most 1 + MAX_RETRIES.
_MOST_ATTEMPTS = 1 + MAX_RETRIES


def _described(job_id: str, place: _Place, entry: OutputSink | _Done) -> AttemptOutput:
    if isinstance(entry, OutputSink):
        return entry.describe()
    lines, data_bytes, dropped, state, retried = entry
    return AttemptOutput(OutputKey(job_id, *place), lines, data_bytes, dropped, 0, True, state, retried)


class OutputStore:
    """Every attempt's output in the data directory; the API's only way to it.

    The catalogue of attempts lives in memory until retention removes their
    job: one dict per job, so that one child's attempts are a few lookups
    whatever how many siblings it has; a finished attempt costs it about 250
    bytes, one that printed nothing about 150 (it has no files, so a restart
    forgets it).
    """

    def __init__(self, settings: OutputSettings) -> None:
        self.settings = settings
        # Whether a job is in flight (the engine's answer): retention never touches such a job's output.
        self.running: Callable[[str], bool] = lambda job_id: False
        self._retention: asyncio.Task[None] | None = None
        self._jobs: dict[str, dict[_Place, OutputSink | _Done]] = {}
        # The sinks open, by job: retention skips their jobs; close() waits for the ones closing.
        self._open: dict[str, set[OutputSink]] = {}
        self._last_write: dict[str, float] = {}
        # Files are written and read here, never on the loop nor through the event log's connection.
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="output")
        self.pace = Pace(settings.rate_bytes)

    async def open(self) -> None:
        """Make the directory (0700, as the data directory), and load what a
        previous process left (finishing its interrupted attempts)."""
        await self.in_thread(_private_dir, self.settings.directory)
        for found in await self.in_thread(_scan, self.settings.directory):
            output = found.output
            self._put(output.key, (output.lines, output.bytes, output.dropped_bytes, output.final_state,
                                   output.retried))
            job_id = output.key.job_id
            self._last_write[job_id] = max(self._last_write.get(job_id, 0.0), found.mtime)

    def start_retention(self, every: float) -> None:
        """prune() every `every` seconds until close()."""
        self._retention = asyncio.create_task(self._prune_forever(every), name="output-retention")

    async def close(self) -> None:
        """Once the runs are stopped: stop retention, let the sinks still closing
        (shielded from their runs' cancellation) finish, then the last writes."""
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
        closing = [sink.closing for sinks in self._open.values() for sink in sinks if sink.closing is not None]
        await asyncio.gather(*closing, return_exceptions=True)
        await asyncio.to_thread(self._executor.shutdown)

    async def in_thread(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in the store's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def sink(self, key: OutputKey, limit: int | None = None, secrets: Sequence[str] = ()) -> OutputSink:
        """A new sink for `key` (an attempt that starts now): listed at once, with no lines."""
        sink = OutputSink(self, key, limit or self.settings.limit_bytes, secrets)
        self._put(key, sink)
        self._open.setdefault(key.job_id, set()).add(sink)
        return sink

    def finished(self, sink: OutputSink, final_state: int, retried: bool) -> None:
        """Called by the sink as it closes."""
        job_id, done = sink.key.job_id, sink.describe(final_state)
        self._put(sink.key, (done.lines, done.bytes, done.dropped_bytes, final_state, retried) if done.lines
                  else _silent(final_state, retried))
        self._open[job_id].discard(sink)
        if not self._open[job_id]:
            del self._open[job_id]
        self._last_write[job_id] = time.time()
        sink.notify()

    def _put(self, key: OutputKey, entry: OutputSink | _Done) -> None:
        self._jobs.setdefault(key.job_id, {})[key.step, key.child, key.attempt] = entry

    def attempts(self, job_id: str, step: str | None = None, child: int | None = None) -> list[AttemptOutput]:
        """What exists for `job_id` (every step), or `step` (itself and its children), or one `child` of `step`;
        ordered by step name, then the step's own before its children by index, then attempt. [] if none."""
        entries = self._jobs.get(job_id, {})
        if step is not None and child is not None:
            places: Iterable[_Place] = [
                (step, child, n) for n in range(1, _MOST_ATTEMPTS + 1) if (step, child, n) in entries
            ]
        else:
            places = [place for place in entries if step is None or place[0] == step]
        found = [_described(job_id, place, entries[place]) for place in places]
        return sorted(found, key=lambda out: (out.key.step, -1 if out.key.child is None else out.key.child,
                                              out.key.attempt))

    def latest_attempt(self, job_id: str, step: str, child: int | None) -> AttemptOutput | None:
        """The newest attempt of the step itself (child None) or of one child; None if none."""
        entries = self._jobs.get(job_id, {})
        for attempt in range(_MOST_ATTEMPTS, 0, -1):
            entry = entries.get((step, child, attempt))
            if entry is not None:
                return _described(job_id, (step, child, attempt), entry)
        return None

    def _entry(self, key: OutputKey) -> OutputSink | _Done:
        entry = self._jobs.get(key.job_id, {}).get((key.step, key.child, key.attempt))
        if entry is None:
            raise OutputNotFound(key)
        return entry

    async def read(self, key: OutputKey, from_line: int, limit: int) -> list[OutputLine]:
        """Up to `limit` lines from `from_line` on (fewer once they hold more than
        the read size, never none if any exist); [] at or past the end.
        OutputNotFound for an unknown key; OutputGone if its files were removed
        meanwhile; ValueError for a negative from_line or a limit below 1."""
        if from_line < 0 or limit < 1:
            raise ValueError("from_line must be >= 0 and limit >= 1")
        entry = self._entry(key)
        lines = entry.readable if isinstance(entry, OutputSink) else entry[0]
        count = min(limit, lines - from_line)
        if count <= 0:
            return []
        try:
            return await self.in_thread(_read, _base(self.settings.directory, key), from_line, count,
                                        self.settings.read_bytes)
        except FileNotFoundError:
            raise OutputGone(key, lines) from None

    # A timeout argument, not asyncio.timeout: running out of time is a normal return here (a heartbeat is due).
    async def wait(self, key: OutputKey, beyond_line: int, timeout: float) -> None:  # noqa: ASYNC109
        """Return once line `beyond_line + 1` exists (pass the last line number
        seen, -1 for none), or the attempt is finished, or after `timeout`
        seconds. OutputNotFound for an unknown key."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            entry = self._entry(key)
            if not isinstance(entry, OutputSink) or entry.readable > beyond_line + 1:
                return
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await entry.changed().wait()

    async def prune(self, now: float | None = None) -> int:
        """Remove the output of every job that is not running and whose last
        write is older than the retention; how many jobs it removed."""
        cutoff = (time.time() if now is None else now) - self.settings.retention_seconds
        old = [
            job_id for job_id in self._jobs
            if self._last_write.get(job_id, 0.0) < cutoff and job_id not in self._open and not self.running(job_id)
        ]
        for job_id in old:
            del self._jobs[job_id]
            self._last_write.pop(job_id, None)
            await self.in_thread(shutil.rmtree, self.settings.directory / job_id, True)
        return len(old)

    async def _prune_forever(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                removed = await self.prune()
            except OSError as error:
                log.warning("output retention: %s", error)
            else:
                if removed:
                    log.info("output retention removed %d job(s)", removed)
