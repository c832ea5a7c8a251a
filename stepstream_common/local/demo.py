"""The built-in demo job (`stepstream demo`) and the functions its python steps call.

The orchestrator finds `crawl` and `index` as it would any user's functions: they
are registered as "demo.crawl" and "demo.index" under the `stepstream.functions`
entry point group (pyproject.toml), so this module imports nothing of the SDK,
the CLI or the launcher.
The job shows every kind of step and every interesting path: a command that
fails once and succeeds on retry, a fan-out whose few failing children stay
within its tolerance, a python step, and a final step that always runs.
"""

from __future__ import annotations

import asyncio
import sys
import time
import zlib
from pathlib import Path
from typing import Any

# Fails on its first run (leaving a marker file), succeeds on the next.
FLAKY_SCRIPT = """\
import pathlib, sys
marker = pathlib.Path(sys.argv[1])
if not marker.exists():
    marker.touch()
    sys.exit("mirror not warm yet (fails once on purpose)")
print("mirror warm")
"""

DEMO_STEPS = ("prepare", "crawl", "index", "report")
CHILDREN = 300


async def crawl(item: str) -> str:
    """A child: 0.1-0.6 s of pretend work; items ending in "13" fail, as a few pages would."""
    await asyncio.sleep(0.1 + (zlib.crc32(item.encode()) % 501) / 1000)
    if item.endswith("13"):
        raise RuntimeError(f"HTTP 503 for page {item}")
    return f"crawled {item}"


def index(source: str = "demo") -> str:
    """A python step run in a thread (a plain function)."""
    time.sleep(1.0)
    return f"indexed pages from {source}"


def demo_definition(work_dir: Path) -> dict[str, Any]:
    """The demo job, keeping its retry marker in `work_dir`."""
    return {
        "name": "stepstream-demo",
        "timeout": "5m",
        "steps": [
            {
                "name": "prepare", "type": "command", "timeout": "30s", "retries": 2, "retry_backoff": "1s",
                "command": [sys.executable, "-c", FLAKY_SCRIPT, str(work_dir / "prepare.marker")],
                "env": {"DEMO_STAGE": "prepare"},
            },
            {
                "name": "crawl", "type": "fanout", "count": CHILDREN, "concurrency": 25, "max_child_failures": 5,
                "child": {"type": "python", "function": "demo.crawl", "args": {"item": "{item}"},
                          "timeout": "10s"},
            },
            {"name": "index", "type": "python", "function": "demo.index",
             "args": {"source": "crawl"}},
            {"name": "report", "type": "sleep", "seconds": 1, "always_run": True},
        ],
    }
