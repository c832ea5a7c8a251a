"""How the CLI shows jobs: a live rich tree on a terminal, one grep-able
`key=value` line per change otherwise, and JSON with stable field names.

Everything shown is a server field or a clock reading (elapsed time, how long
ago the last message came); nothing is derived from states or counts here.

JSON fields (states and reasons are lower-case words, times ISO 8601 UTC or null):

- job (get, watch): id, name, state, reason, message, revision, live, stale,
  stale_since, stale_detail, source, created_at, started_at, finished_at,
  cancel_requested_at, submitted_by, cancelled_by (token names, "" without
  auth), step_counts {total, pending, running, waiting, completed, failed,
  cancelled, skipped}, steps [...]
- step: name, index, type, state, reason, message, attempt, max_attempts,
  started_at, finished_at, duration_seconds, revision, children {total,
  pending, running, completed, failed, cancelled}
- list: an array of jobs without `steps` and `live` (`revision` is then the
  header's last change)
- children: an array of {index, item, state, reason, message, attempt,
  started_at, finished_at, duration_seconds, revision}
- submit: {id, name, state, created_at, seq, submitted_by}
- logs: one object per line: {step, child (null for a step's own output),
  attempt, number, stream ("stdout", "stderr", "notice"), time, continued,
  text (UTF-8, a replacement character for each invalid byte sequence)}, and
  data_base64 (the exact bytes) only when they are not valid UTF-8

Names, messages, items and reasons come from the server (and from whoever named
a job or wrote a step's output), so nothing here sends them to a terminal raw:
the tree and tables show them as plain text (never as rich markup) with control
characters as visible escapes (`\\x1b`, `\\n`); key=value lines JSON-quote any
value holding a control character; JSON escapes them as `\\u001b`. What a step
printed (logs) is shown as text with its colours (ANSI SGR sequences) on a
terminal and every other control character but tab as an escape; without
colour (--no-color, NO_COLOR, not a terminal) every ANSI sequence is stripped
(and on a terminal the other control characters escaped).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from stepstream_client.errors import StepstreamError
from stepstream_client.models import ChildView, JobSummary, JobView, LogLine, StepView, SubmittedJob

FRAME_SECONDS = 0.1  # at most ~10 redraws a second

STYLES = {
    "pending": ("○", "dim"),
    "running": ("◐", "cyan"),
    "waiting": ("◑", "blue"),
    "completed": ("✔", "green"),
    "failed": ("✘", "red"),
    "cancelled": ("⊘", "yellow"),
    "skipped": ("↷", "dim"),
}


# --- values -----------------------------------------------------------------

# C0 controls, DEL and C1 controls: the characters a terminal acts on instead of showing.
CONTROL_CHARACTERS = frozenset(chr(code) for code in (*range(0x20), *range(0x7F, 0xA0)))
_VISIBLE = str.maketrans(
    {ord(c): f"\\x{ord(c):02x}" for c in CONTROL_CHARACTERS} | {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
)
# json.dumps escapes C0 controls itself but, with ensure_ascii=False, writes DEL and C1 raw.
_JSON_ESCAPES = str.maketrans({code: f"\\u{code:04x}" for code in range(0x7F, 0xA0)})


def printable(text: str) -> str:
    """`text` with every control character shown as an escape (`\\x1b`, `\\n`), so a job name
    or message cannot clear the screen, move the cursor, retitle the window, ring the bell
    or hide a link in a terminal; all other unicode is kept as it is."""
    return text.translate(_VISIBLE)


# Every ANSI escape sequence: CSI (ESC [ ... final byte), OSC and the other string
# commands (ESC ] P X ^ _ ... BEL or ESC \), and the two-byte escapes.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?|[ -Z\\-~])")
# The colour and style sequences (SGR), the only ones a log line keeps on a terminal.
_SGR = re.compile(r"\x1b\[[0-9;:]*m")
_RESET = "\x1b[0m"
_VISIBLE_BUT_TAB = str.maketrans({code: escaped for code, escaped in _VISIBLE.items() if code != ord("\t")})


def log_text(text: str, *, color: bool, terminal: bool) -> str:
    """A line a step printed: with `color` (on a terminal) its colours kept and reset at its
    end, else every ANSI sequence stripped; on a `terminal`, every other control character
    but tab shown as an escape, so output cannot clear the screen or retitle the window."""
    if not color:
        plain = _ANSI.sub("", text)
        return plain.translate(_VISIBLE_BUT_TAB) if terminal else plain
    parts = _SGR.split(text)
    colours = _SGR.findall(text)
    shown = "".join(part.translate(_VISIBLE_BUT_TAB) + colour
                    for part, colour in zip(parts, [*colours, ""], strict=True))
    return shown + _RESET if colours else shown


def log_prefix(line: LogLine) -> str:
    """`step › ` or `step/INDEX › `: whose output a line is, when several are shown."""
    unit = line.step if line.child is None else f"{line.step}/{line.child}"
    return f"{printable(unit)} › "


def log_json(line: LogLine) -> dict[str, Any]:
    data: dict[str, Any] = {
        "step": line.step, "child": line.child, "attempt": line.attempt, "number": line.number,
        "stream": line.stream, "time": iso(line.time), "continued": line.continued, "text": line.text,
    }
    if line.text.encode() != line.data:
        data["data_base64"] = base64.b64encode(line.data).decode()
    return data


class LogPrinter:
    """Log lines as `stepstream logs` shows them: JSON objects, or text (after `step › `
    when `prefixed`), the pieces of a line cut for length (`continued`) joined again."""

    def __init__(self, out: TextIO, output: str, *, prefixed: bool, color: bool) -> None:
        self._out = out
        self._json = output == "json"
        self._prefixed = prefixed
        self._color = color
        self._terminal = out.isatty()
        self._midline = False

    def show(self, line: LogLine) -> None:
        if self._json:
            print(dumps(log_json(line)), file=self._out)
            return
        prefix = log_prefix(line) if self._prefixed and not self._midline else ""
        text = log_text(line.text, color=self._color, terminal=self._terminal)
        self._out.write(f"{prefix}{text}{'' if line.continued else chr(10)}")
        self._midline = line.continued


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z, or None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def wall_clock(moment: datetime) -> str:
    """HH:MM:SS in local time, for "stale since"."""
    return moment.astimezone().strftime("%H:%M:%S")


def span(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _since(start: datetime | None, end: datetime | None, now: datetime) -> float | None:
    if start is None:
        return None
    return max(0.0, ((end or now) - start).total_seconds())


# --- JSON -------------------------------------------------------------------

def summary_json(job: JobSummary) -> dict[str, Any]:
    return {
        "id": job.id, "name": job.name, "state": job.state, "reason": job.reason, "message": job.message,
        "revision": job.revision, "stale": job.stale, "stale_since": iso(job.stale_since),
        "stale_detail": job.stale_detail, "source": job.source, "created_at": iso(job.created_at),
        "started_at": iso(job.started_at), "finished_at": iso(job.finished_at),
        "cancel_requested_at": iso(job.cancel_requested_at), "submitted_by": job.submitted_by,
        "cancelled_by": job.cancelled_by, "step_counts": dataclasses.asdict(job.step_counts),
    }


def step_json(step: StepView) -> dict[str, Any]:
    return {
        "name": step.name, "index": step.index, "type": step.type, "state": step.state, "reason": step.reason,
        "message": step.message, "attempt": step.attempt, "max_attempts": step.max_attempts,
        "started_at": iso(step.started_at), "finished_at": iso(step.finished_at),
        "duration_seconds": step.duration, "revision": step.revision, "children": dataclasses.asdict(step.children),
    }


def view_json(view: JobView) -> dict[str, Any]:
    return {**summary_json(view), "live": view.live, "steps": [step_json(step) for step in view.steps]}


def child_json(child: ChildView) -> dict[str, Any]:
    return {
        "index": child.index, "item": child.item, "state": child.state, "reason": child.reason,
        "message": child.message, "attempt": child.attempt, "started_at": iso(child.started_at),
        "finished_at": iso(child.finished_at), "duration_seconds": child.duration, "revision": child.revision,
    }


def submitted_json(job: SubmittedJob) -> dict[str, Any]:
    return {"id": job.id, "name": job.name, "state": job.state, "created_at": iso(job.created_at), "seq": job.seq,
            "submitted_by": job.submitted_by}


def dumps(data: Any) -> str:
    """Exact JSON with readable unicode, but no raw control character a terminal would act on."""
    return json.dumps(data, ensure_ascii=False).translate(_JSON_ESCAPES)


# --- key=value lines ----------------------------------------------------------

def _value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    quote = any(c.isspace() or c in "\"'=" or c in CONTROL_CHARACTERS for c in text)
    return dumps(text) if quote else text


def kv_line(**fields: object) -> str:
    """`key=value ...`; values with spaces, quotes, '=' or control characters are JSON-quoted."""
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


def header_line(view: JobSummary) -> str:
    counts = view.step_counts
    return kv_line(
        rev=view.revision, job=view.id, name=view.name, state=view.state, reason=view.reason,
        steps=f"{counts.completed}/{counts.total}", pending=counts.pending, running=counts.running,
        waiting=counts.waiting, failed=counts.failed, cancelled=counts.cancelled, skipped=counts.skipped,
        stale=view.stale, stale_since=_clock_or_none(view.stale_since),
        submitted_by=view.submitted_by, cancelled_by=view.cancelled_by, message=view.message,
    )


def step_line(view: JobView, step: StepView) -> str:
    children: dict[str, object] = {}
    if step.children.total:
        c = step.children
        children = {"children": f"{c.completed}/{c.total}", "pending": c.pending, "running": c.running,
                    "completed": c.completed, "failed": c.failed, "cancelled": c.cancelled}
    return kv_line(
        rev=view.revision, job=view.id, step=step.name, state=step.state, attempt=f"{step.attempt}/{step.max_attempts}",
        **children, duration=step.duration, reason=step.reason, message=step.message,
    )


def child_line(child: ChildView) -> str:
    return kv_line(index=child.index, item=child.item, state=child.state, attempt=child.attempt,
                   duration=child.duration, reason=child.reason, message=child.message)


def _clock_or_none(moment: datetime | None) -> str | None:
    return wall_clock(moment) if moment is not None else None


class LineWriter:
    """One line per change: the header when it changed, each step that changed,
    and the watch's connection going down or coming back."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._previous: JobView | None = None

    def show(self, view: JobView) -> None:
        before = self._previous
        lines: list[str] = []
        if before is not None and before.live != view.live:
            lines.append(kv_line(rev=view.revision, job=view.id, live=view.live,
                                 last_heard=_clock_or_none(view.last_heard)))
        if before is None or _header(before) != _header(view):
            lines.append(header_line(view))
        old_steps = {step.name: step for step in before.steps} if before is not None else {}
        lines.extend(step_line(view, step) for step in view.steps if old_steps.get(step.name) != step)
        self._previous = view
        for line in lines:
            print(line, file=self._out, flush=True)


def _header(view: JobView) -> JobView:
    """The parts of a view the header line shows (a new revision alone is not a change)."""
    return dataclasses.replace(view, steps=(), revision=0)


# --- rich ---------------------------------------------------------------------

def _state(word: str) -> Text:
    icon, style = STYLES.get(word, ("?", ""))
    return Text(f"{icon} {printable(word)}", style=style)


def _plain(text: str, style: str = "") -> Text:
    """A server string for rich: a Text (never parsed as markup or emoji codes), controls escaped."""
    return Text(printable(text), style=style)


def job_tree(view: JobView, now: datetime) -> RenderableType:
    """The job as a tree: a header line, one row per step, and a stale line when it applies."""
    counts = view.step_counts
    header = Text.assemble(
        _plain(view.name or "(unnamed)", "bold"), "  ", _plain(view.id, "dim"), "  ", _state(view.state),
        f"   steps {counts.completed}/{counts.total} completed",
        f"   elapsed {span(_since(view.started_at, view.finished_at, now)) or '-'}",
        (f"   rev {view.revision}", "dim"),
    )
    who = "; ".join(f"{what} by {name}" for what, name in (("submitted", view.submitted_by),
                                                             ("cancelled", view.cancelled_by)) if name)
    if who:
        header.append("\n  ")
        header.append(_plain(who, "dim"))
    if view.reason or view.message:
        header.append("\n  ")
        header.append(_plain(" — ".join(part for part in (view.reason, view.message) if part), "italic"))
    rows = Table.grid(padding=(0, 2))
    for column in ("tree", "name", "state", "duration", "attempt", "detail"):
        rows.add_column(column, no_wrap=column != "detail", overflow="fold")
    for position, step in enumerate(view.steps):
        branch = "└─" if position == len(view.steps) - 1 else "├─"
        rows.add_row(
            Text(branch, style="dim"), _plain(step.name, "bold"), _state(step.state),
            span(step.duration if step.duration is not None else _since(step.started_at, None, now)),
            f"{step.attempt}/{step.max_attempts}" if step.attempt else "", _step_detail(step),
        )
    parts: list[RenderableType] = [header, rows]
    parts.extend(_stale_lines(view))
    return Group(*parts)


def _step_detail(step: StepView) -> Text:
    detail = Text()
    c = step.children
    if c.total:
        detail.append(f"children {c.completed}/{c.total} ")
        for word, count in (("pending", c.pending), ("running", c.running), ("completed", c.completed),
                            ("failed", c.failed), ("cancelled", c.cancelled)):
            if count:
                detail.append(f" {word} {count}", style=STYLES[word][1])
        detail.append("  ")
    words = " — ".join(part for part in (step.reason, step.message) if part)
    if words:
        detail.append(_plain(words, "red" if step.state == "failed" else "dim"))
    return detail


def _stale_lines(view: JobView) -> list[Text]:
    lines = []
    if not view.live and view.last_heard is not None:
        lines.append(Text(f"⚠ stale since {wall_clock(view.last_heard)}: no word from the status service, "
                          "reconnecting", style="bold yellow"))
    if view.stale and view.stale_since is not None:
        detail = f" ({printable(view.stale_detail)})" if view.stale_detail else ""
        lines.append(Text(f"⚠ stale since {wall_clock(view.stale_since)}: the status service cannot follow "
                          f"the job's orchestrator{detail}", style="bold yellow"))
    return lines


def _clock_tick(view: JobView) -> int | None:
    """Which second the elapsed clock shows while it moves (until the job ends)."""
    return None if view.terminal else int(time.time())


class LogTails:
    """The last `keep` lines each running step printed, for `watch --logs`: a step is
    followed (`follow(step)`, from its last `keep` lines) from the first view that
    shows it running until its attempts end; each line also goes to `on_line`."""

    def __init__(
        self, follow: Callable[[str], AsyncGenerator[LogLine, None]], keep: int = 5,
        on_line: Callable[[LogLine], None] = lambda line: None,
    ) -> None:
        self._follow = follow
        self._keep = keep
        self._on_line = on_line
        self._tails: dict[str, collections.deque[str]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Set whenever a line arrived (a frame to redraw).
        self.changed = asyncio.Event()

    def track(self, view: JobView) -> None:
        for step in view.steps:
            if step.state == "running" and step.name not in self._tasks:
                self._tails[step.name] = collections.deque(maxlen=self._keep)
                self._tasks[step.name] = asyncio.create_task(self._tail(step.name), name=f"logs-{step.name}")

    async def _tail(self, step: str) -> None:
        tail = self._tails[step]
        try:
            async with contextlib.aclosing(self._follow(step)) as lines:
                async for line in lines:
                    tail.append(log_text(line.text, color=False, terminal=True))
                    self._on_line(line)
                    self.changed.set()
        except StepstreamError as error:
            tail.append(f"(no output: {printable(error.message)})")
            self.changed.set()

    def lines(self, view: JobView) -> list[Text]:
        """The tails of the steps the view shows running, each line after its step's name."""
        shown: list[Text] = []
        for step in view.steps:
            if step.state == "running":
                shown.extend(Text.assemble((f"{printable(step.name)} › ", "dim"), line)
                             for line in self._tails.get(step.name, ()))
        return shown

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _show_live(views: AsyncIterator[JobView], console: Console, tails: LogTails | None) -> JobView | None:
    """Redraw when the view changed, a line arrived or the clock ticked, at most every FRAME_SECONDS."""
    latest: JobView | None = None
    arrived = tails.changed if tails is not None else asyncio.Event()

    async def pump() -> None:
        nonlocal latest
        try:
            async for view in views:
                latest = view
                if tails is not None:
                    tails.track(view)
                arrived.set()
        finally:
            arrived.set()

    pumping = asyncio.create_task(pump())
    shown: tuple[JobView | None, int | None, bool] = (None, None, False)
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                finished = pumping.done()
                if latest is not None:
                    frame = (latest, _clock_tick(latest), arrived.is_set())
                    if frame[0] is not shown[0] or frame[1] != shown[1] or frame[2]:
                        tree = job_tree(latest, datetime.now(UTC))
                        live.update(Group(tree, *tails.lines(latest)) if tails is not None else tree, refresh=True)
                        shown = frame
                if finished:
                    break
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0 - time.time() % 1.0):
                        await arrived.wait()
                await asyncio.sleep(FRAME_SECONDS)
        pumping.result()
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping
    return latest


async def show_views(
    views: AsyncIterator[JobView], output: str, out: TextIO, tails: LogTails | None = None
) -> JobView | None:
    """Show a watch to its end (`output`: "json", "text"); returns the last view.

    Text is a live tree when `out` is a terminal (with `tails`, the last lines of
    the running steps under it), else one line per change (`tails` prints its
    lines itself, through its on_line).
    """
    if output == "text" and out.isatty():
        return await _show_live(views, Console(file=out), tails)
    latest: JobView | None = None
    lines = LineWriter(out)
    async for view in views:
        if tails is not None:
            tails.track(view)
        latest = view
        if output == "json":
            print(dumps(view_json(view)), file=out, flush=True)
        else:
            lines.show(view)
    return latest


def show_view(view: JobView, output: str, out: TextIO) -> None:
    """One view, once: JSON, the tree on a terminal, or its header and step lines."""
    if output == "json":
        print(dumps(view_json(view)), file=out)
    elif out.isatty():
        Console(file=out).print(job_tree(view, datetime.now(UTC)))
    else:
        LineWriter(out).show(view)


def show_table(rows: Iterable[dict[str, Any]], columns: list[str], out: TextIO) -> None:
    """A plain table for lists on a terminal."""
    table = Table(*columns, box=None, header_style="bold")
    for row in rows:
        table.add_row(*(_cell(column, row.get(column)) for column in columns))
    Console(file=out).print(table)


def _cell(column: str, value: object) -> Text:
    """A Text, not a str: rich would read a str as markup ("[bold red]x" would lose its brackets)."""
    if column == "state" and isinstance(value, str):
        return _state(value)
    return _plain("" if value is None else str(value))
