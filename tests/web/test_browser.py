"""The page in a real browser (Debian's chromium via Playwright) against real
services and a real gateway, each a subprocess: the seed system's lies (a badge
behind the truth, a refresh that goes back, a view that silently stops) cannot
happen here.

Every drawn step is sampled by a MutationObserver installed before the page's
own scripts, so the test sees each state the page ever showed, not a poll of it.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, Request
from stepstream_client import Client, JobView

from stepstream_common.local.demo import DEMO_STEPS
from tests.client.services import DEADLINE, STEPSTREAM, Service, eventually, gate_step
from tests.web.conftest import WebGateway

# Records [step, revision, state] each time a step row is drawn (once per row per frame).
SAMPLER = """
window.__samples = [];
new MutationObserver((mutations) => {
  const rows = new Set(mutations.map((m) => m.target).filter((n) => n.classList && n.classList.contains("step")));
  for (const row of rows) window.__samples.push([row.dataset.name, Number(row.dataset.revision), row.dataset.state]);
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-state", "data-revision"]});
// What the rows show at the moment the page marks the job ended (the marker must not come before the last view).
new MutationObserver(() => {
  if (!window.__atEnd && document.body && document.body.dataset.ended === "true") {
    window.__atEnd = [...document.querySelectorAll("li.step")].map(
      (row) => [row.dataset.name, Number(row.dataset.revision), row.dataset.state]);
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-ended"]});
// The same for each output panel (by step name, "/child" for a step's child panel): its lines when it ended.
window.__outputAtEnd = {};
new MutationObserver((mutations) => {
  for (const panel of mutations.map((m) => m.target)) {
    if (!panel.classList || !panel.classList.contains("output") || panel.dataset.ended !== "true") continue;
    const key = panel.closest("li.step").dataset.name + (panel.classList.contains("child-output") ? "/child" : "");
    window.__outputAtEnd[key] = [...panel.querySelectorAll(".output-lines > div[data-line]")].map((n) => n.textContent);
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-ended"]});
"""

Shown = dict[str, tuple[int, str]]


async def open_page(browser: Browser, url: str, *, width: int = 1000) -> Page:
    page = await browser.new_page(viewport={"width": width, "height": 900})
    await page.add_init_script(SAMPLER)
    await page.goto(url)
    return page


async def open_job(browser: Browser, gateway: WebGateway, job_id: str) -> Page:
    return await open_page(browser, f"{gateway.url}/jobs/{job_id}")


async def shown(page: Page) -> Shown:
    """Each step row's (revision, state) as drawn now."""
    rows: list[list[Any]] = await page.eval_on_selector_all(
        "li.step", "rows => rows.map(r => [r.dataset.name, Number(r.dataset.revision), r.dataset.state])")
    return {name: (revision, state) for name, revision, state in rows if state}


async def samples(page: Page) -> dict[str, list[tuple[int, str]]]:
    by_step: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name, revision, state in await page.evaluate("window.__samples"):
        by_step[name].append((revision, state))
    return by_step


async def until_shown(page: Page, step: str, state: str) -> None:
    async def probe() -> bool | None:
        return True if (await shown(page)).get(step, (0, ""))[1] == state else None
    await eventually(probe, f"the page to show {step} {state}")


async def until_ended(page: Page) -> Shown:
    """Each step row's (revision, state) as drawn when the page marked the job ended."""
    await page.wait_for_selector("body[data-ended=true]", state="attached", timeout=DEADLINE * 1000)
    rows: list[list[Any]] = await page.evaluate("window.__atEnd")
    return {name: (revision, state) for name, revision, state in rows if state}


def truth(view: JobView) -> Shown:
    return {step.name: (step.revision, step.state) for step in view.steps}


async def banner(page: Page, which: str) -> str | None:
    node = page.locator(f"#{which}")
    return await node.text_content() if await node.is_visible() else None


async def test_the_demo_job_never_goes_backwards_live_or_on_reload(browser: Browser) -> None:
    """`stepstream demo --web`: one page watches the demo job start to end; another is reloaded
    throughout. Each step's shown states follow the status service's own history of it, in order;
    the page stays up after the job until Ctrl-C."""
    demo = await asyncio.create_subprocess_exec(
        str(STEPSTREAM), "demo", "--web", stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    assert demo.stdout is not None
    lines: asyncio.Queue[str] = asyncio.Queue()

    async def read() -> None:
        assert demo.stdout is not None
        while line := (await demo.stdout.readline()).decode():
            if line.startswith("demo: "):
                lines.put_nowait(line.strip())

    reading = asyncio.create_task(read())
    try:
        async with asyncio.timeout(DEADLINE):
            addresses, submitted, page_line = [await lines.get() for _ in range(3)]
        orchestrator, status = (word.rstrip(",") for word in addresses.split()[2:5:2])
        url = page_line.removeprefix("demo: live page ")
        job_id = submitted.rsplit(" ", 1)[1]
        assert url.endswith(f"/jobs/{job_id}")
        async with Client(orchestrator, status) as client:
            await _demo_in_two_pages(browser, client, job_id, url)
        async with asyncio.timeout(DEADLINE):
            stays = await lines.get()
        assert stays == f"demo: job completed; the page stays up at {url} until Ctrl-C"
        async with httpx.AsyncClient(timeout=DEADLINE) as http:
            assert (await http.get(url)).status_code == 200
        demo.send_signal(signal.SIGINT)
        async with asyncio.timeout(DEADLINE):
            assert await demo.wait() == 0
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()
        await reading


async def _demo_in_two_pages(browser: Browser, client: Client, job_id: str, url: str) -> None:
    history: dict[str, list[str]] = defaultdict(list)

    async def record() -> JobView:
        async with client.watch(job_id) as views:
            async for view in views:
                for step in view.steps:
                    if not history[step.name] or history[step.name][-1] != step.state:
                        history[step.name].append(step.state)
        return view

    watching = asyncio.create_task(record())
    await eventually(lambda: asyncio.sleep(0, history or None), "the watch's first view")
    live = await open_page(browser, url)
    reloaded = await open_page(browser, url, width=360)
    reloads = 0
    while not watching.done():
        before = await shown(reloaded)
        await reloaded.reload()
        await reloaded.wait_for_function("Number(document.querySelector('#revision').dataset.revision) > 0")
        after = await shown(reloaded)
        for step, (revision, _) in before.items():
            assert after[step][0] >= revision, (step, before, after)
        reloads += 1
        await asyncio.sleep(0.3)
    final = await watching
    assert await until_ended(live) == truth(final) == truth(await client.get(job_id))
    assert reloads >= 5
    assert final.state == "completed"
    seen_live = await samples(live)
    for step, seen in seen_live.items():
        revisions = [revision for revision, _ in seen]
        assert revisions == sorted(revisions), (step, seen)
        positions = [history[step].index(state) for _, state in seen]
        assert positions == sorted(positions), (step, seen, history[step])
    assert {step: history[step][-1] for step in DEMO_STEPS} == dict.fromkeys(DEMO_STEPS, "completed")
    # The steps that start seconds after the page opened were first drawn pending.
    assert {seen_live[step][0][1] for step in ("index", "report")} == {"pending"}


async def test_a_dead_status_service_shows_stale_and_the_page_catches_up(
    browser: Browser, gateway: WebGateway, orchestrator: Service, status: Service, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    async with Client(orchestrator.address, status.address) as client:
        job = await client.submit({"name": "gated", "steps": [gate_step("hold", first), gate_step("then", second)]})
        page = await open_job(browser, gateway, job.id)
        await until_shown(page, "hold", "running")
        assert await banner(page, "watch-stale") is None
        killed_at = datetime.now().strftime("%H:%M:%S")
        await status.kill()
        text = await eventually(lambda: banner(page, "watch-stale"), "the stale banner")
        assert "no word from the status service" in text
        since = text.split("stale since ")[1][:8]
        assert since <= killed_at  # the last time the gateway heard the status service, not a later one
        first.touch()  # the job moves on while nobody records it on the status service
        await status.start()
        await until_shown(page, "then", "running")
        assert await banner(page, "watch-stale") is None
        second.touch()
        at_end = await until_ended(page)
        final = await client.get(job.id)
        assert final.state == "completed"
        assert at_end == truth(final)
        for step, seen in (await samples(page)).items():
            assert [revision for revision, _ in seen] == sorted(revision for revision, _ in seen), (step, seen)
            states = [state for _, state in seen]
            left = [state for before, state in itertools.pairwise(states) if state != before]
            assert len(left) == len(set(left)), (step, states)  # no state shown again after it was left


async def test_a_restarted_gateway_is_rejoined_from_the_last_event_id(
    browser: Browser, gateway: WebGateway, orchestrator: Service, status: Service, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    async with Client(orchestrator.address, status.address) as client:
        job = await client.submit({"name": "gated", "steps": [gate_step("hold", first), gate_step("then", second)]})
        page = await open_job(browser, gateway, job.id)
        resumes: list[str] = []

        async def note(request: Request) -> None:
            if request.url.endswith("/stream"):
                resumes.append((await request.all_headers()).get("last-event-id", ""))

        page.on("request", note)
        await until_shown(page, "hold", "running")
        held = int(await page.locator("#revision").get_attribute("data-revision") or 0)
        await gateway.kill()
        await eventually(lambda: banner(page, "gateway-stale"), "the page to notice the gateway is gone")
        first.touch()
        await until_shown_by(client, job.id, "then", "running")
        await gateway.start()
        await until_shown(page, "then", "running")
        assert str(held) in resumes, resumes
        assert await banner(page, "gateway-stale") is None
        second.touch()
        assert await until_ended(page) == truth(await client.get(job.id))


async def until_shown_by(client: Client, job_id: str, step: str, state: str) -> None:
    async def probe() -> bool | None:
        return True if (await client.get(job_id)).step(step).state == state else None
    await eventually(probe, f"the status service to have {step} {state}")


@pytest.mark.slow
async def test_a_10000_child_fan_out_stays_responsive_and_ends_exact(
    browser: Browser, gateway: WebGateway, orchestrator: Service, status: Service
) -> None:
    children = 10_000
    quick = {"type": "python", "function": "tests.helpers.workers:returns_at_once"}
    async with Client(orchestrator.address, status.address) as client:
        job = await client.submit({"name": "wide", "steps": [
            {"name": "fan", "type": "fanout", "count": children, "concurrency": 100, "child": quick}]})
        page = await open_job(browser, gateway, job.id)
        await until_shown(page, "fan", "waiting")
        # While the counts pour in, the page still answers: the drill-down opens and lists a page of children.
        started = time.monotonic()
        await page.click("li.step .open-children")
        await page.wait_for_selector("li.step .drill tbody tr", timeout=DEADLINE * 1000)
        assert (await shown(page))["fan"][1] in ("waiting", "completed")
        print(f"drill-down answered {time.monotonic() - started:.2f}s after the click, mid-fan-out")
        await until_ended(page)
        final = (await client.get(job.id)).step("fan")
        counts = await page.locator("li.step .counts").evaluate("n => ({...n.dataset})")
        assert {key: int(value) for key, value in counts.items()} == {
            "total": children, "completed": children, "failed": 0, "cancelled": 0, "running": 0, "pending": 0}
        assert final.children.completed == children
        drawn = len((await samples(page))["fan"])
        updates = final.revision
        print(f"{drawn} draws of the fan-out row for {updates} revisions")
        assert drawn < updates


async def test_the_jobs_list_is_live_and_filters_by_state_and_name(
    browser: Browser, gateway: WebGateway, orchestrator: Service, status: Service, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    bound = DEADLINE * 1000
    async with Client(orchestrator.address, status.address) as client:
        every = await open_page(browser, f"{gateway.url}/")
        running = await open_page(browser, f"{gateway.url}/", width=360)
        await running.select_option("#state", "running")
        named = await open_page(browser, f"{gateway.url}/")
        await named.fill("#name", "quick")
        await named.dispatch_event("#name", "change")
        job = await client.submit({"name": "gated", "steps": [gate_step("gate", gate)]})
        quick = await client.submit({"name": "quick", "steps": [{"name": "one", "type": "sleep", "seconds": 0}]})
        await every.wait_for_selector(f'li.job[data-id="{job.id}"][data-state="running"]', timeout=bound)
        await every.wait_for_selector(f'li.job[data-id="{quick.id}"][data-state="completed"]', timeout=bound)
        await running.wait_for_selector(f'li.job[data-id="{job.id}"]', timeout=bound)
        await named.wait_for_selector(f'li.job[data-id="{quick.id}"]', timeout=bound)
        assert await running.locator(f'li.job[data-id="{quick.id}"]').count() == 0
        assert await named.locator("li.job").count() == 1
        assert await every.locator("li.job").evaluate_all("rows => rows.map(r => r.dataset.id)") == [quick.id, job.id]
        gate.touch()
        await every.wait_for_selector(f'li.job[data-id="{job.id}"][data-state="completed"]', timeout=bound)
        await running.wait_for_selector(f'li.job[data-id="{job.id}"]', state="detached", timeout=bound)
        assert await every.locator("#list-stale").is_hidden()
