"""Pieces the latency, fan-out and watcher benchmarks share: the services as
subprocesses, memory sampling, unary round trips, and formatting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.processes import REPO, Service
from bench.report import percentile
from status_svc.storage.postgres import PG_SCHEMA

MB = 1024 * 1024


def free_port() -> int:
    """A loopback port that was free a moment ago (for a service restarted on the same address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def orchestrator(data_dir: Path, port: int = 0, heartbeat: float = 5.0, lag_log: Path | None = None,
                 prefix: Sequence[str] = ()) -> Service:
    """The orchestrator; with `lag_log`, its event loop's stalls are written there (bench/loop_lag.py);
    `prefix` runs it (pinned()'s taskset, for one)."""
    return _probed("orchestrator_svc", [
        "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
        "--heartbeat-interval", str(heartbeat), "--log-level", "warning",
    ], lag_log, prefix)


def status(data_dir: Path, orchestrator_address: str, heartbeat: float = 5.0, lag_log: Path | None = None,
           extra: Sequence[str] = (), prefix: Sequence[str] = ()) -> Service:
    """The status service, with the flags `extra` (e.g. --store) too; `lag_log` and `prefix` as for orchestrator()."""
    return _probed("status_svc", [
        "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--orchestrator", orchestrator_address,
        "--heartbeat-interval", str(heartbeat), "--log-level", "warning", *extra,
    ], lag_log, prefix)


def pinned(cpu: str | None) -> list[str]:
    """The command prefix that runs a process and all its threads on CPU `cpu` (taskset -c), or none."""
    return ["taskset", "-c", cpu] if cpu is not None else []


def _probed(module: str, args: list[str], lag_log: Path | None, prefix: Sequence[str] = ()) -> Service:
    if lag_log is None:
        return Service(module, args, prefix)
    return Service("bench.loop_lag", [str(lag_log), module, *args], prefix)


def loop_lag(lag_log: Path) -> dict[str, float]:
    """What bench/loop_lag.py last wrote: max_ms, max_busy_ms, over_20ms, over_100ms, samples."""
    figures: dict[str, float] = json.loads(lag_log.read_text())
    return figures


async def store_connection(dsn: str) -> asyncpg.Connection:
    """A connection to a status store's PostgreSQL database that finds its tables (close it)."""
    return await asyncpg.connect(dsn, server_settings={"search_path": PG_SCHEMA})


async def store_position(connection: asyncpg.Connection) -> tuple[int, int]:
    """(the committed cursor, the latest revision) of a status store on PostgreSQL; (0, 0) before its
    first replica has made the tables."""
    try:
        row = await connection.fetchrow("SELECT (SELECT COALESCE(MAX(cursor), 0) FROM sources), "
                                        "(SELECT COALESCE(MAX(revision), 0) FROM changes)")
    except asyncpg.UndefinedTableError:
        return 0, 0
    assert row is not None
    return int(row[0]), int(row[1])


def bare_unary() -> Service:
    return Service("bench.bare_unary", [])


@contextlib.asynccontextmanager
async def started(*services: Service) -> AsyncIterator[list[str]]:
    """Start the services in order (each must be listening before the next starts); stop them in reverse."""
    addresses: list[str] = []
    try:
        for service in services:
            addresses.append(service.start())
        yield addresses
    finally:
        for service in reversed(services):
            service.stop()


@contextlib.asynccontextmanager
async def repeating(action: Callable[[], Awaitable[None]], interval: float) -> AsyncIterator[None]:
    """`action` at once and every `interval` seconds while the block runs, and once more after it."""

    async def loop() -> None:
        while True:
            await action()
            await asyncio.sleep(interval)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await action()


def rss_sampled(services: Sequence[Service], interval: float = 0.05) -> AbstractAsyncContextManager[None]:
    """Sample every service's RSS every `interval` seconds while the block runs (peaks in Service.peak_rss)."""

    async def sample() -> None:
        for service in services:
            service.sample_rss()

    return repeating(sample, interval)


async def unary_round_trips(
    address: str, count: int, *, pause: float = 0.0, until: float | None = None
) -> list[float]:
    """Seconds per grpc.health.v1 Check round trip, one call at a time on one channel
    (after one warm-up call): `count` calls, or as many as fit before time.monotonic() reaches `until`."""
    samples: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        await stub.Check(request)
        while (time.monotonic() < until) if until is not None else (len(samples) < count):
            started = time.perf_counter()
            await stub.Check(request)
            samples.append(time.perf_counter() - started)
            if pause:
                await asyncio.sleep(pause)
    return samples


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.2f} ms"


def pct_ms(samples: Sequence[float], fraction: float) -> float:
    """The percentile of `samples` (seconds) in milliseconds, rounded for JSON."""
    return round(percentile(list(samples), fraction) * 1000, 3)


def mb(size: int) -> float:
    return round(size / MB, 1)


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


class WatchClient:
    """One `python -m bench.watch_client` process holding many watchers (see that module)."""

    def __init__(self, address: str, jobs: Sequence[str], mode: str, *, watchers_per_channel: int = 1,
                 sample_interval: float = 0.05, pin: str | None = None) -> None:
        self.config = {"address": address, "jobs": list(jobs), "mode": mode,
                       "watchers_per_channel": watchers_per_channel, "sample_interval": sample_interval}
        self.prefix = pinned(pin)
        self.process: asyncio.subprocess.Process | None = None

    @property
    def watchers(self) -> int:
        return len(self.config["jobs"])  # type: ignore[arg-type]

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.prefix, sys.executable, "-m", "bench.watch_client",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO, limit=1 << 28,
        )
        await self._send(self.config)

    async def ready(self) -> dict[str, Any]:
        """Wait until every watcher has its initial state."""
        async with asyncio.timeout(120):
            return await self._receive()

    async def finish(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send `stop` or `wait` and return the report."""
        await self._send(command)
        async with asyncio.timeout(float(command.get("timeout", 0)) + 120):
            report = await self._receive()
        assert self.process is not None
        await asyncio.wait_for(self.process.wait(), 30)
        return report

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        await self.process.stdin.drain()

    async def _receive(self) -> dict[str, Any]:
        assert self.process is not None
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError("bench.watch_client exited without answering")
        message: dict[str, Any] = json.loads(line)
        return message


@contextlib.asynccontextmanager
async def watch_clients(clients: Sequence[WatchClient]) -> AsyncIterator[list[dict[str, Any]]]:
    """Start the client processes and wait until all their watchers are ready; kill them on the way out."""
    try:
        for client in clients:
            await client.start()
        readiness = [await client.ready() for client in clients]
        failed = [message for message in readiness if message.get("failed")]
        if failed:
            raise RuntimeError(f"watchers could not start: {failed[0]['errors']}")
        yield readiness
    finally:
        for client in clients:
            client.kill()
            if client.process is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.process.wait(), 30)


def cpu_seconds(service: Service) -> float:
    """User + system CPU seconds the service's process has used so far."""
    assert service.process is not None
    try:
        times = psutil.Process(service.process.pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)
