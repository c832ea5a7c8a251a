"""The web page's latency and the gateway's cost (`python -m bench web`).

One orchestrator, one status service and one web gateway (`stepstream web`),
each a subprocess with a fresh data directory. Each job runs a fan-out step
`load` (children of `sleep 0.05`, 25 at a time: about 1,000 child transitions
a second) beside a chain of `sleep 0.1` steps, whose transitions are measured.

1. transition -> DOM: headless Chromium (Debian's, as in tests/web) shows the
   job page; a MutationObserver notes Date.now() whenever a chain step's row
   is drawn in a new state. In the same run, the baseline: an SDK watcher
   (Client.watch, in this harness) notes time.time() when it first holds that
   state. Latency = that moment - the step's started_at (running) or
   finished_at (completed): the orchestrator's clock when it decided, the same
   machine clock. Only transitions within the window count; `missed` counts
   window transitions a side never showed because a newer state of that step
   came first (the gateway sends a slow page the latest view, and a page
   draws once per animation frame; the SDK applies a message's updates at once).
2. SSE clients held: 100, then 1,000 light clients (raw asyncio sockets in this
   harness, not browsers) streaming the page's events of one loaded job. Over
   the window: view events delivered, the gateway's CPU seconds per delivered
   event, and its RSS per client; baseline in the same window: the status
   service's CPU per revision it applied and served to the gateway's one watch.

JSON keys: dom_p50_ms, dom_p99_ms, dom_samples, dom_missed, sdk_p50_ms,
sdk_p99_ms, sdk_samples, sdk_missed, transitions_per_second, and for N in 100,
1000: clients_N_connected, clients_N_events_per_second,
clients_N_gateway_cpu_us_per_event, clients_N_gateway_cpu_percent,
clients_N_gateway_rss_kb_per_client, clients_N_status_cpu_us_per_revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from playwright.async_api import async_playwright
from stepstream_client import Client, FailedPreconditionError, JobView

from bench.common import cpu_seconds, orchestrator, pct_ms, status
from bench.latency import latency_text
from bench.processes import Service
from bench.report import Report
from tests.web.chromium import CHROMIUM, CHROMIUM_ARGS

CHAIN_STEP = 0.1
CHILD_SECONDS = 0.05
CONCURRENCY = 25
# Seconds the clients have to connect and get their first event (the job outlasts it and the window).
CONNECT_BOUND = 60
OBSERVER = """
window.__drawn = [];
new MutationObserver((mutations) => {
  const now = Date.now() / 1000;
  for (const row of new Set(mutations.map((m) => m.target).filter((n) => n.classList && n.classList.contains("step"))))
    window.__drawn.push([row.dataset.name, row.dataset.state, now]);
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-state"]});
"""


@dataclass
class Side:
    latencies: list[float]
    missed: int


def definition(window: float) -> dict[str, Any]:
    seconds = window + 6
    chain = [{"name": f"c{k:03d}", "type": "sleep", "seconds": CHAIN_STEP, **({"depends_on": []} if k == 0 else {})}
             for k in range(min(150, int(seconds / CHAIN_STEP)))]
    children = int(seconds * CONCURRENCY / CHILD_SECONDS)
    load = {"name": "load", "type": "fanout", "count": children, "concurrency": CONCURRENCY, "depends_on": [],
            "child": {"type": "sleep", "seconds": CHILD_SECONDS}}
    return {"name": "web-bench", "steps": [load, *chain]}


def decided(view: JobView, start: float, end: float) -> Iterator[tuple[str, str, float]]:
    """(step, state, when the orchestrator decided it) of each chain transition in [start, end)."""
    for step in view.steps:
        for state, moment in (("running", step.started_at), ("completed", step.finished_at)):
            if step.name != "load" and moment is not None and start <= moment.timestamp() < end:
                yield step.name, state, moment.timestamp()


def measured(shown: Sequence[tuple[str, str, float]], truth: list[tuple[str, str, float]]) -> Side:
    first: dict[tuple[str, str], float] = {}
    for name, state, moment in shown:
        first.setdefault((name, state), moment)
    latencies = [first[(name, state)] - at for name, state, at in truth if (name, state) in first]
    return Side(latencies, len(truth) - len(latencies))


async def dom_latency(client: Client, web: str, window: float) -> tuple[Side, Side, float]:
    job = await client.submit(definition(window))
    sdk: list[tuple[str, str, float]] = []

    async def watch() -> None:
        held: dict[str, str] = {}
        async with client.watch(job.id) as views:
            async for view in views:
                now = time.time()
                for step in view.steps:
                    if held.get(step.name) != step.state:
                        held[step.name] = step.state
                        sdk.append((step.name, step.state, now))

    watching = asyncio.create_task(watch())
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.add_init_script(OBSERVER)
            await page.goto(f"http://{web}/jobs/{job.id}")
            await page.wait_for_selector("li.step[data-state]")
            await asyncio.sleep(1)
            start = time.time()
            children_before = (await client.get(job.id)).step("load").children.completed
            await asyncio.sleep(window)
            children = (await client.get(job.id)).step("load").children.completed - children_before
            await asyncio.sleep(1)
            drawn = [(name, state, at) for name, state, at in await page.evaluate("window.__drawn")]
        finally:
            await browser.close()
    with contextlib.suppress(FailedPreconditionError):  # it may have ended
        await client.cancel(job.id)
    await watching
    truth = list(decided(await client.get(job.id), start, start + window))
    # Each child that completed also started: two transitions (a close estimate within the window).
    return measured(drawn, truth), measured(sdk, truth), (len(truth) + 2 * children) / window


async def sse_client(address: str, path: str, counts: list[int], index: int, ready: asyncio.Event) -> None:
    """Read the page's stream as a browser would, counting view events."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        while line := await reader.readline():
            if line.startswith(b"event: view"):
                counts[index] += 1
                ready.set()
    finally:
        writer.close()


async def held_clients(client: Client, gateway: Service, status_service: Service, web: str, clients: int,
                       window: float) -> dict[str, float]:
    job = await client.submit(definition(window + CONNECT_BOUND))
    counts = [0] * clients
    events = [asyncio.Event() for _ in range(clients)]
    assert gateway.process is not None
    rss_before = psutil.Process(gateway.process.pid).memory_info().rss
    tasks = [asyncio.create_task(sse_client(web, f"/api/jobs/{job.id}/stream", counts, i, events[i]))
             for i in range(clients)]
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONNECT_BOUND):
                await asyncio.gather(*(event.wait() for event in events))
        connected = sum(event.is_set() for event in events)
        rss = psutil.Process(gateway.process.pid).memory_info().rss
        before, gateway_cpu, status_cpu = sum(counts), cpu_seconds(gateway), cpu_seconds(status_service)
        revision = (await client.get(job.id)).revision
        started = time.monotonic()
        await asyncio.sleep(window)
        elapsed = time.monotonic() - started
        delivered = sum(counts) - before
        gateway_cpu = cpu_seconds(gateway) - gateway_cpu
        status_cpu = cpu_seconds(status_service) - status_cpu
        revisions = (await client.get(job.id)).revision - revision
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(FailedPreconditionError):  # it may have ended
        await client.cancel(job.id)
    return {
        "connected": connected, "events_per_second": round(delivered / elapsed, 1),
        "gateway_cpu_us_per_event": round(gateway_cpu / max(1, delivered) * 1e6, 1),
        "gateway_cpu_percent": round(gateway_cpu / elapsed * 100, 1),
        "gateway_rss_kb_per_client": round((rss - rss_before) / clients / 1024, 1),
        "status_cpu_us_per_revision": round(status_cpu / max(1, revisions) * 1e6, 1),
    }


async def run(quick: bool) -> Report:
    window = 1.0 if quick else 8.0
    sizes = (10, 50) if quick else (100, 1000)
    report = Report("web")
    with tempfile.TemporaryDirectory(prefix="stepstream-bench-web-") as tmp:
        orch = orchestrator(Path(tmp) / "orchestrator")
        orch_address = orch.start()
        stat = status(Path(tmp) / "status", orch_address)
        gateway = Service("stepstream_web", [])
        try:
            status_address = stat.start()
            gateway.args = ["--listen", "127.0.0.1:0", "--status", status_address, "--orchestrator", orch_address,
                            "--max-streams", "5000"]
            web = gateway.start()
            async with Client(orch_address, status_address) as client:
                dom, sdk, rate = await dom_latency(client, web, window)
                held = {n: await held_clients(client, gateway, stat, web, n, window) for n in sizes}
        finally:
            gateway.stop()
            stat.stop()
            orch.stop()
    report.add("transition -> DOM, headless Chromium", latency_text(dom.latencies),
               f"p50 / p95 / p99 / max; n={len(dom.latencies)}, {dom.missed} coalesced (never drawn)")
    report.add("  baseline: SDK watcher, same run", latency_text(sdk.latencies),
               f"n={len(sdk.latencies)}, {sdk.missed} coalesced (never held)")
    report.add("  load on the job", f"{rate:,.0f} transitions/s", "chain steps and fan-out children, in the window")
    for n, figures in held.items():
        report.add(f"{n:,} SSE clients on one job", f"{figures['events_per_second']:,.0f} events/s",
                   f"{figures['connected']:.0f} connected; gateway CPU {figures['gateway_cpu_us_per_event']:,.0f} "
                   f"µs per event ({figures['gateway_cpu_percent']:.0f}% of a core), "
                   f"{figures['gateway_rss_kb_per_client']:,.0f} KB RSS per client")
        report.add("  baseline: status service, same window", f"{figures['status_cpu_us_per_revision']:,.0f} µs",
                   "CPU per revision it applied and sent to the gateway's one watch")
    report.notes.append(f"window {window:g} s; services, gateway, browser and clients share {os.cpu_count()} cores; "
                        f"run at {datetime.now().isoformat(timespec='seconds')}")
    report.figures.update({
        "dom_p50_ms": pct_ms(dom.latencies, 0.5), "dom_p99_ms": pct_ms(dom.latencies, 0.99),
        "dom_samples": len(dom.latencies), "dom_missed": dom.missed,
        "sdk_p50_ms": pct_ms(sdk.latencies, 0.5), "sdk_p99_ms": pct_ms(sdk.latencies, 0.99),
        "sdk_samples": len(sdk.latencies), "sdk_missed": sdk.missed, "transitions_per_second": round(rate, 1),
        **{f"clients_{n}_{key}": value for n, figures in held.items() for key, value in figures.items()},
    })
    return report
