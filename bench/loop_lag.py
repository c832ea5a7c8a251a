"""`python -m bench.loop_lag OUT MODULE [ARGS...]`: run a service (`orchestrator_svc`
or `status_svc`) exactly as `python -m MODULE ARGS` would, plus one task on its
event loop that measures how late the loop wakes it.

Why here and not in the services: a stall is only visible from inside the
process whose loop stalls, but measuring it is a benchmark's business; this
wrapper adds the probe without a line of production code or a setting.

The probe sleeps PERIOD seconds in a loop; whatever it wakes later than that is
time the loop spent running something else without yielding (a callback that
blocks for 40 ms shows as ~40 ms of lag). On a machine whose cores other
processes share, lag also includes time the process was not scheduled at all
or waited for the GIL; so each wake-up also notes how much CPU the loop's own
thread used since the last one (`max_busy_ms`): a real stall is busy, a
starved process is not. It rewrites OUT (JSON: `max_ms`, `max_busy_ms`,
`over_20ms`, `over_100ms`, `samples`) whenever a maximum grows and every
second, so the figures survive however the service is stopped. Its own cost
is a few hundred wake-ups a second.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from stepstream_common.rpc import run_main

PERIOD = 0.005
WRITE_EVERY = 1.0


class LagProbe:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.max = 0.0
        self.max_busy = 0.0
        self.over_20ms = 0
        self.over_100ms = 0
        self.samples = 0

    def save(self) -> None:
        figures = {"max_ms": round(self.max * 1000, 3), "max_busy_ms": round(self.max_busy * 1000, 3),
                   "over_20ms": self.over_20ms,
                   "over_100ms": self.over_100ms, "samples": self.samples}
        self.out.write_text(json.dumps(figures) + "\n")

    async def run(self) -> None:
        last_write = time.monotonic()
        self.save()
        while True:
            before, cpu_before = time.monotonic(), time.thread_time()
            await asyncio.sleep(PERIOD)
            now = time.monotonic()
            lag = max(0.0, now - before - PERIOD)
            busy = time.thread_time() - cpu_before
            self.samples += 1
            self.over_20ms += lag > 0.020
            self.over_100ms += lag > 0.100
            if lag > self.max or busy > self.max_busy or now - last_write >= WRITE_EVERY:
                self.max, self.max_busy = max(self.max, lag), max(self.max_busy, busy)
                self.save()
                last_write = now


def with_probe(start: Callable[[Any], Awaitable[Any]], out: Path) -> Callable[[Any], Awaitable[Any]]:
    """`start`, with the probe started first on the same loop (and kept alive)."""
    probe = LagProbe(out)
    tasks: list[asyncio.Task[None]] = []

    async def start_probed(config: Any) -> Any:
        tasks.append(asyncio.create_task(probe.run(), name="bench-loop-lag"))
        return await start(config)

    return start_probed


def main() -> None:
    out, module, *argv = sys.argv[1:]
    if module == "orchestrator_svc":
        from orchestrator_svc.app import LABEL, start
        from orchestrator_svc.config import OrchestratorConfig

        run_main(LABEL, OrchestratorConfig.from_args, with_probe(start, Path(out)), argv)
    elif module == "status_svc":
        from status_svc.app import LABEL as STATUS_LABEL
        from status_svc.app import start as start_status
        from status_svc.config import StatusConfig

        run_main(STATUS_LABEL, StatusConfig.from_args, with_probe(start_status, Path(out)), argv)
    else:
        raise SystemExit(f"bench.loop_lag: unknown service {module!r} (orchestrator_svc or status_svc)")


if __name__ == "__main__":
    main()
