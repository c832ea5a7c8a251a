"""Output of code running inside the orchestrator process (python steps, plugins).

sys.stdout is one object for the whole process, while many steps run at once
in its loop and threads: so rather than redirecting it, it is wrapped once by
a router that looks up, per write, the sink of the attempt whose code is
writing (a ContextVar, which asyncio tasks and asyncio.to_thread copy into the
code they run). Writes from anywhere else go where they always went.

The `stepstream.step` logger (STEP_LOGGER) is routed the same way, to the
attempt's stderr, and does not reach the service's own log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, TextIO

from orchestrator_svc.output.records import OutputStream
from orchestrator_svc.output.store import OutputSink

STEP_LOGGER = "stepstream.step"
_current: ContextVar[OutputSink | None] = ContextVar("stepstream_output_sink", default=None)
_install_lock = threading.Lock()
_step_handler_added = threading.Event()


def _send(sink: OutputSink, stream: OutputStream, data: bytes) -> None:
    """Hand `data` to `sink` from whichever thread writes it: on the loop's own
    thread nothing can wait (OutputSink.emit_bounded); another thread waits
    while the sink is behind (OutputSink.emit_from_thread)."""
    try:
        on_loop = asyncio.get_running_loop() is sink.loop
    except RuntimeError:
        on_loop = False
    if on_loop:
        sink.emit_bounded(stream, data)
        return
    with contextlib.suppress(RuntimeError):  # the loop is closed: the attempt is long over
        sink.emit_from_thread(stream, data)


class _Router:
    """Stands in for sys.stdout or sys.stderr: text written inside an attempt goes to its sink."""

    def __init__(self, original: TextIO, stream: OutputStream) -> None:
        self._original = original
        self._stream = stream

    def write(self, text: str) -> int:
        sink = _current.get()
        if sink is None:
            return self._original.write(text)
        _send(sink, self._stream, text.encode(errors="surrogateescape"))
        return len(text)

    def flush(self) -> None:
        if _current.get() is None:
            self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


def _install() -> None:
    """Wrap sys.stdout and sys.stderr, unless they are wrapped already (idempotent; test runners swap them)."""
    if isinstance(sys.stdout, _Router) and isinstance(sys.stderr, _Router) and _step_handler_added.is_set():
        return  # every python attempt comes here: the common case takes no lock
    with _install_lock:
        if not isinstance(sys.stdout, _Router):
            sys.stdout = _Router(sys.stdout, OutputStream.STDOUT)
        if not isinstance(sys.stderr, _Router):
            sys.stderr = _Router(sys.stderr, OutputStream.STDERR)
        if not _step_handler_added.is_set():
            step_logger = logging.getLogger(STEP_LOGGER)
            step_logger.addHandler(_StepHandler())
            step_logger.propagate = False
            step_logger.setLevel(logging.DEBUG)
            _step_handler_added.set()


class _StepHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        sink = _current.get()
        if sink is not None:
            _send(sink, OutputStream.STDERR, (self.format(record) + "\n").encode(errors="surrogateescape"))


@contextlib.contextmanager
def capturing(sink: OutputSink) -> Iterator[None]:
    """Within this block (and the tasks and to_thread calls it starts), print()
    and the STEP_LOGGER logger write to `sink`."""
    _install()
    token = _current.set(sink)
    try:
        yield
    finally:
        _current.reset(token)
