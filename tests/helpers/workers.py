"""Small functions the orchestrator's python worker imports by reference
("tests.helpers.workers:NAME") in the tests."""

from __future__ import annotations

import asyncio
from pathlib import Path


async def async_greet(name: str, path: str) -> str:
    """Awaited on the event loop: writes a greeting and returns it."""
    await asyncio.sleep(0)
    text = f"hello {name}"
    Path(path).write_text(text)
    return text


def sync_write(path: str, text: str) -> str:
    """Run in a thread: writes `text` to `path`."""
    Path(path).write_text(text)
    return f"wrote {len(text)} characters"


def sync_echo(text: object) -> str:
    """Returns what it was given, as a careless function might report its input."""
    return str(text)


def sync_returns_number() -> int:
    """A result that is not a string: the step's message is 'returned'."""
    return 42


def raises_value_error(detail: str) -> str:
    raise ValueError(f"boom: {detail}")


async def async_raises(detail: str) -> str:
    await asyncio.sleep(0)
    raise RuntimeError(f"async boom: {detail}")


NOT_CALLABLE = "just a string"


async def fail_odd(index: str) -> str:
    """Completes for even indexes, fails for odd ones, after a tiny pause."""
    await asyncio.sleep(0.001)
    if int(index) % 2:
        raise RuntimeError(f"odd {index}")
    return f"even {index}"


async def gated_marker(directory: str, name: str) -> str:
    """A unit of work that shows how many units run at once: while it runs it
    leaves the file `running-NAME` in `directory`; on starting it writes to
    `seen-NAME` how many such files it saw (itself included), which over all
    starts is the most that ever ran at once (that number only grows when one
    starts); it runs until the file `open` appears in `directory`."""
    folder = Path(directory)
    marker, gate = folder / f"running-{name}", folder / "open"
    marker.touch()
    try:
        seen = sum(1 for _ in folder.glob("running-*"))
        (folder / f"seen-{name}").write_text(str(seen))
        while True:
            if gate.exists():
                break
            await asyncio.sleep(0.01)
    finally:
        marker.unlink()
    return f"saw {seen} running"


async def returns_at_once() -> str:
    """Work that never suspends: a fan-out of these must still let the loop run."""
    return "done"
