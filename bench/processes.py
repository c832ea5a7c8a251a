"""Services as real subprocesses, with their resident memory sampled."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


class Service:
    """`python -m MODULE ARGS`, started and waited for its 'listening on' line;
    with a `prefix` (e.g. taskset -c 0), that command runs it; `env` added to the environment,
    run from `cwd` (another checkout's code, see bench/telemetry.py)."""

    def __init__(self, module: str, args: list[str], prefix: Sequence[str] = (), *,
                 env: Mapping[str, str] | None = None, cwd: Path = REPO) -> None:
        self.module = module
        self.args = args
        self.prefix = list(prefix)
        self.env = dict(env or {})
        self.cwd = cwd
        self.address = ""
        self.process: subprocess.Popen[str] | None = None
        self.peak_rss = 0
        # From its "… metrics on HOST:PORT" line (--metrics-listen), if it printed one.
        self.metrics_address = ""

    def start(self, deadline: float = 60.0) -> str:
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", self.module, *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=self.cwd,
            env={**os.environ, **self.env},
        )
        assert self.process.stdout is not None
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            line = self.process.stdout.readline()
            if " metrics on " in line:
                self.metrics_address = line.strip().rsplit(" ", 1)[1]
            if " listening on " in line:
                self.address = line.strip().rsplit(" ", 1)[1]
                return self.address
            if not line and self.process.poll() is not None:
                break
        raise RuntimeError(f"{self.module} did not start")

    def kill(self) -> None:
        """kill -9, and reap it: no cleanup of any kind."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def sample_rss(self) -> int:
        """Resident set size now (and keep the peak)."""
        assert self.process is not None
        try:
            rss = int(psutil.Process(self.process.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            return 0
        self.peak_rss = max(self.peak_rss, rss)
        return rss

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
