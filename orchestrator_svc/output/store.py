"""The output store: per-attempt files written by sinks, read by the API (see the package docstring)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from stepstream.common.v1 import states_pb2 as s

from orchestrator_svc.output.records import (
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

log = logging.getLogger(__name__)
T = TypeVar("T")

DATA, INDEX, END = ".out", ".idx", ".end"
# The key of the step itself (not a child) in a file name.
STEP_ITSELF = "-"
SECRET_MARKER = b"<secret>"
INTERRUPTED_NOTICE = b"\xe2\x80\xa6 output ends here: the orchestrator stopped while this attempt ran \xe2\x80\xa6"


@dataclass(frozen=True)
class OutputSettings:
    """Where output lives and how much of it (OrchestratorConfig's output_* settings)."""

    directory: Path
    # Bytes kept per attempt, framing included (RECORD_OVERHEAD per line); the rest is dropped and counted.
    limit_bytes: int = 10 * 1024 * 1024
    # A line longer than this is kept as several records (continued=True but the last).
    chunk_bytes: int = 64 * 1024
    # Output of a finished job whose last write is older than this goes away.
    retention_seconds: float = 7 * 86400.0
    # Most bytes of line data one read() returns (always at least one line).
    read_bytes: int = 1024 * 1024
    # Bytes a sink holds unwritten before a writer that cannot wait (print in an async function) loses lines.
    max_pending_bytes: int = 4 * 1024 * 1024


def _base(directory: Path, key: OutputKey) -> Path:
    child = STEP_ITSELF if key.child is None else str(key.child)
    return directory / key.job_id / f"{key.step}.{child}.{key.attempt}"


def _key_of(job_id: str, stem: str) -> OutputKey | None:
    step, _, rest = stem.rpartition(".")
    step, _, child = step.rpartition(".")
    if not step or not rest.isdigit() or not (child == STEP_ITSELF or child.isdigit()):
        return None
    return OutputKey(job_id, step, None if child == STEP_ITSELF else int(child), int(rest))


class OutputSink:
    """Where one attempt's output goes while it runs: opened before the worker
    starts, closed with the attempt's final state.

    `emit` is synchronous and cheap (it frames and numbers lines on the loop);
    a background flush writes them in the store's own threads, and readers see
    lines only once written. Producers that can wait await `drain()` after
    each emit (or use `write`), so at most one read's worth is ever held.
    Secrets are masked before anything is stored, line by line (as the
    command worker's message always was).
    """

    def __init__(self, store: OutputStore, key: OutputKey, limit: int, secrets: Iterable[str]) -> None:
        self.key = key
        self._store = store
        self._settings = store.settings
        self._base = _base(store.settings.directory, key)
        self._limit = limit
        self._masks: list[bytes] = []
        self.hide(secrets)
        self._partial: dict[OutputStream, bytes] = {}
        self._pending = bytearray()
        self._pending_index = bytearray()
        self._lines = self._size = self._bytes = self._stored = 0
        self._written_lines = self._written_size = 0
        self._dropped = 0
        self._cut = False
        self._last = b""
        self._flusher: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def hide(self, secrets: Iterable[str]) -> None:
        """Mask every line of each of `secrets` from now on (a secret known only
        once the worker runs, such as a secret_file's content)."""
        lines = {os.fsencode(line) for secret in secrets for line in secret.splitlines() if line.strip()}
        self._masks = sorted(lines.union(self._masks), key=len, reverse=True)

    @property
    def last_line(self) -> str:
        """The last non-blank line printed (masked, stripped, at most 200 characters): a command's message."""
        return self._last.decode(errors="replace").strip()[:200]

    @property
    def dropped(self) -> int:
        """Bytes of line data past the limit, not kept."""
        return self._dropped

    @property
    def backlog(self) -> int:
        """Bytes framed but not yet written."""
        return len(self._pending)

    def emit(self, stream: OutputStream, data: bytes) -> None:
        """Take `data` as printed on `stream`: complete lines become records; a
        line's unfinished end waits for the rest (or end_stream), a chunk at a
        time once it is longer than the chunk size."""
        if self._closing is not None or not data:
            return
        buffered = self._partial.pop(stream, b"") + data
        for mask in self._masks:
            buffered = buffered.replace(mask, SECRET_MARKER)
        *complete, rest = buffered.split(b"\n")
        now = time.time()
        for line in complete:
            self._record(stream, line, now, continued=False)
        for line in reversed(complete):
            if line.strip():
                self._last = line[-800:]
                break
        chunk = self._settings.chunk_bytes
        # A secret may start in a chunk and end in the next: keep its possible beginning.
        keep = len(self._masks[0]) - 1 if self._masks else 0
        while len(rest) > chunk:
            cut = max(1, min(chunk, len(rest) - keep))
            self._record(stream, rest[:cut], now, continued=True)
            rest = rest[cut:]
        if rest:
            self._partial[stream] = rest
        self._kick()

    @property
    def high_water(self) -> int:
        """Unwritten bytes past which a writer in another thread waits (output.capture)."""
        return self._settings.max_pending_bytes // 2

    def emit_bounded(self, stream: OutputStream, data: bytes) -> None:
        """emit() for a writer that cannot wait: past max_pending_bytes unwritten, `data` is dropped (counted)."""
        if len(self._pending) > self._settings.max_pending_bytes:
            if self._closing is None:
                self._dropped += len(data)
            return
        self.emit(stream, data)

    def end_stream(self, stream: OutputStream) -> None:
        """`stream` is closed: an unfinished last line is a line."""
        rest = self._partial.pop(stream, b"")
        if rest and self._closing is None:
            self._record(stream, rest, time.time(), continued=False)
            if rest.strip():
                self._last = rest[-800:]
            self._kick()

    async def write(self, stream: OutputStream, data: bytes) -> None:
        """emit(), then wait until it is written: the plugin API for a worker's own lines."""
        self.emit(stream, data)
        await self.drain()

    async def drain(self) -> None:
        """Return once everything emitted so far is written (readable)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def close(self, final_state: int) -> None:
        """End the attempt: unfinished lines, then "… N bytes dropped …" if any
        were, are written; then the attempt reads as finished with `final_state`.
        Runs to its end even if the caller is cancelled meanwhile."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._finish(final_state), name=f"output-close-{self.key}")
        await asyncio.shield(self._closing)

    async def _finish(self, final_state: int) -> None:
        now = time.time()
        for stream in list(self._partial):
            self._record(stream, self._partial.pop(stream), now, continued=False)
        if self._dropped:
            self._cut = False  # the notice is written whatever the limit
            notice = f"\u2026 {self._dropped:,} bytes dropped (limit {self._limit:,} bytes per attempt) \u2026"
            self._record(OutputStream.NOTICE, notice.encode(), now, continued=False)
        self._kick()
        await self.drain()
        if self._written_lines:
            end = json.dumps({"state": final_state, "dropped": self._dropped}).encode()
            try:
                await self._store.in_thread(_write_end, self._base, end)
            except OSError as error:
                log.warning("could not finish the output of %s: %s", self.key, error)
        self._store.finished(self, final_state)

    def describe(self) -> AttemptOutput:
        written_data = self._written_size - self._written_lines * HEADER.size
        return AttemptOutput(self.key, self._written_lines, written_data, self._dropped, 0, False, 0)

    @property
    def readable(self) -> tuple[int, int]:
        """(lines, data file bytes) written so far."""
        return self._written_lines, self._written_size

    def changed(self) -> asyncio.Event:
        return self._changed

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _record(self, stream: OutputStream, data: bytes, now: float, continued: bool) -> None:
        cost = len(data) + RECORD_OVERHEAD
        if self._cut or (self._stored + cost > self._limit and stream != OutputStream.NOTICE):
            self._cut = True
            self._dropped += len(data)
            return
        self._pending += frame(stream, data, now, continued)
        self._pending_index += INDEX_ENTRY.pack(self._size)
        self._size += HEADER.size + len(data)
        self._lines += 1
        self._stored += cost
        self._bytes += len(data)

    def _kick(self) -> None:
        if self._pending and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush(), name=f"output-flush-{self.key}")

    async def _flush(self) -> None:
        while self._pending:
            data, index = bytes(self._pending), bytes(self._pending_index)
            lines, size = self._lines, self._size
            self._pending.clear()
            self._pending_index.clear()
            try:
                await self._store.in_thread(_append, self._base, data, index, self._written_lines == 0)
            except OSError as error:
                log.warning("output of %s cut short: %s", self.key, error)
                # Nothing after what was written is kept; the rest counts as dropped.
                self._dropped += len(data) - (lines - self._written_lines) * HEADER.size
                self._lines, self._size, self._cut = self._written_lines, self._written_size, True
                self._pending.clear()
                self._pending_index.clear()
                break
            self._written_lines, self._written_size = lines, size
            self._notify()


def _append(base: Path, data: bytes, index: bytes, first: bool) -> None:
    """Data before index: an index entry never points past what is written."""
    if first:
        base.parent.mkdir(parents=True, exist_ok=True)
    with open(base.with_suffix(base.suffix + DATA), "ab") as file:
        file.write(data)
    with open(base.with_suffix(base.suffix + INDEX), "ab") as file:
        file.write(index)


def _write_end(base: Path, end: bytes) -> None:
    base.with_suffix(base.suffix + END).write_bytes(end)


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
        data_file.touch()
    size = data_file.stat().st_size
    with open(index_file, "rb") as file:
        index = file.read()
    lines = len(index) // INDEX_ENTRY.size
    end = 0
    with open(data_file, "rb") as file:
        while lines:
            (offset,) = INDEX_ENTRY.unpack_from(index, (lines - 1) * INDEX_ENTRY.size)
            file.seek(offset)
            header = file.read(HEADER.size)
            if len(header) == HEADER.size and offset + HEADER.size + HEADER.unpack(header)[2] <= size:
                end = offset + HEADER.size + HEADER.unpack(header)[2]
                break
            lines -= 1
    state, dropped = 0, 0
    if end_file.exists():
        with contextlib.suppress(ValueError, OSError):
            recorded = json.loads(end_file.read_bytes())
            state, dropped = int(recorded["state"]), int(recorded["dropped"])
    if not state:
        os.truncate(data_file, end)
        os.truncate(index_file, lines * INDEX_ENTRY.size)
        _append(base, frame(OutputStream.NOTICE, INTERRUPTED_NOTICE, time.time(), False), INDEX_ENTRY.pack(end), False)
        end += HEADER.size + len(INTERRUPTED_NOTICE)
        lines += 1
        state = s.STEP_STATE_FAILED
        _write_end(base, json.dumps({"state": state, "dropped": dropped}).encode())
    return AttemptOutput(key, lines, end - lines * HEADER.size, dropped, 0, True, state)


def _read(base: Path, from_line: int, count: int, lines: int, size: int, budget: int) -> list[OutputLine]:
    with open(base.with_suffix(base.suffix + INDEX), "rb") as file:
        file.seek(from_line * INDEX_ENTRY.size)
        raw = file.read((count + (from_line + count < lines)) * INDEX_ENTRY.size)
    offsets = [offset for (offset,) in INDEX_ENTRY.iter_unpack(raw)]
    ends = [*offsets[1:], size] if len(offsets) == count else offsets[1:]
    start = offsets[0]
    # The most whole records within the budget, at least one.
    count = max(1, bisect.bisect_right(ends, start + budget + count * HEADER.size))
    with open(base.with_suffix(base.suffix + DATA), "rb") as file:
        file.seek(start)
        buffer = file.read(ends[count - 1] - start)
    result, offset = [], 0
    for number in range(from_line, from_line + count):
        line, offset = unframe(buffer, offset, number)
        result.append(line)
    return result


class OutputStore:
    """Every attempt's output in the data directory; the API's only way to it.

    Attempts are listed while they run and, once finished, if they printed
    anything. The catalogue of finished attempts (a few hundred bytes each)
    lives in memory until retention removes their job.
    """

    def __init__(self, settings: OutputSettings, running: Callable[[str], bool] = lambda job_id: False) -> None:
        self.settings = settings
        self._running = running
        self._jobs: dict[str, dict[OutputKey, OutputSink | AttemptOutput]] = {}
        self._last_write: dict[str, float] = {}
        # Files are written and read here, never on the loop nor through the event log's connection.
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="output")

    async def open(self) -> None:
        """Load what a previous process left (finishing its interrupted attempts)."""
        for found in await self.in_thread(_scan, self.settings.directory):
            key = found.output.key
            self._jobs.setdefault(key.job_id, {})[key] = found.output
            self._last_write[key.job_id] = max(self._last_write.get(key.job_id, 0.0), found.mtime)

    async def close(self) -> None:
        """After every sink is closed: let the last writes end."""
        await asyncio.to_thread(self._executor.shutdown)

    async def in_thread(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in the store's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def sink(self, key: OutputKey, limit: int | None = None, secrets: Sequence[str] = ()) -> OutputSink:
        """A new sink for `key` (an attempt that starts now): listed at once, with no lines."""
        sink = OutputSink(self, key, limit or self.settings.limit_bytes, secrets)
        self._jobs.setdefault(key.job_id, {})[key] = sink
        return sink

    def finished(self, sink: OutputSink, final_state: int) -> None:
        """Called by the sink as it closes."""
        lines, size = sink.readable
        self._jobs[sink.key.job_id][sink.key] = AttemptOutput(
            sink.key, lines, size - lines * HEADER.size, sink.dropped, 0, True, final_state,
        )
        self._last_write[sink.key.job_id] = time.time()
        sink._notify()

    def attempts(self, job_id: str, step: str | None = None, child: int | None = None) -> list[AttemptOutput]:
        """What exists for `job_id` (every step), or `step` (itself and its children), or one `child` of `step`;
        ordered by step name, then the step's own before its children by index, then attempt. [] if none."""
        entries = self._jobs.get(job_id, {})
        found = [
            entry.describe() if isinstance(entry, OutputSink) else entry
            for key, entry in entries.items()
            if (step is None or key.step == step) and (child is None or key.child == child)
        ]
        return sorted(found, key=lambda out: (out.key.step, -1 if out.key.child is None else out.key.child,
                                              out.key.attempt))

    def latest_attempt(self, job_id: str, step: str, child: int | None) -> AttemptOutput | None:
        """The newest attempt of the step itself (child None) or of one child; None if none."""
        own = [out for out in self.attempts(job_id, step, child) if out.key.child == child]
        return own[-1] if own else None

    def _entry(self, key: OutputKey) -> OutputSink | AttemptOutput:
        entry = self._jobs.get(key.job_id, {}).get(key)
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
        lines, size = entry.readable if isinstance(entry, OutputSink) else (
            entry.lines, entry.bytes + entry.lines * HEADER.size)
        count = min(limit, lines - from_line)
        if count <= 0:
            return []
        try:
            return await self.in_thread(_read, _base(self.settings.directory, key), from_line, count, lines, size,
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
            if not isinstance(entry, OutputSink) or entry.readable[0] > beyond_line + 1:
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
            job_id for job_id, entries in self._jobs.items()
            if self._last_write.get(job_id, 0.0) < cutoff and not self._running(job_id)
            and not any(isinstance(entry, OutputSink) for entry in entries.values())
        ]
        for job_id in old:
            del self._jobs[job_id]
            self._last_write.pop(job_id, None)
            await self.in_thread(shutil.rmtree, self.settings.directory / job_id, True)
        return len(old)

    async def prune_forever(self, every: float) -> None:
        """prune() every `every` seconds, until cancelled."""
        while True:
            await asyncio.sleep(every)
            try:
                removed = await self.prune()
            except OSError as error:
                log.warning("output retention: %s", error)
            else:
                if removed:
                    log.info("output retention removed %d job(s)", removed)
