"""A step's output on the job page: real services, a real gateway (a subprocess,
killed and restarted mid-output) and Debian's chromium. The step is a real
command that prints, waits for a gate file the test opens, and prints more, so
the page is seen following it live."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
from playwright.async_api import Browser, Page
from stepstream_client import Client

from tests.client.services import DEADLINE, Service, eventually
from tests.web.conftest import WebGateway
from tests.web.test_browser import open_page
from tests.web.test_gateway import Event, events

# Prints a batch of lines per gate (argv[1:]): a batch, then it waits for the next gate before the next batch.
# The first batch has colours, a tag and bytes that are not UTF-8; the last prints slowly, a line at a time.
PRINTER = r"""
import os, sys, time
def wait(gate):
    while not os.path.exists(gate):
        time.sleep(0.02)
for n in range(3):
    print(f"first {n}", flush=True)
sys.stdout.buffer.write(b"\x1b[1;31mred\x1b[0m <b>not bold</b> \xff end\n"); sys.stdout.flush()
wait(sys.argv[1])
for n in range(40):
    print(f"second {n}", flush=True)
wait(sys.argv[2])
for n in range(5):
    print(f"third {n}", flush=True)
    time.sleep(0.05)
"""
EXPECTED = [*(f"first {n}" for n in range(3)), "red <b>not bold</b> \ufffd end",
            *(f"second {n}" for n in range(40)), *(f"third {n}" for n in range(5))]


def printer_job(gates: tuple[Path, Path]) -> dict[str, object]:
    return {"name": "printer", "steps": [
        {"name": "print", "type": "command", "command": [sys.executable, "-c", PRINTER, *map(str, gates)]},
    ]}


@contextlib.contextmanager
def opened_afterwards(*gates: Path) -> Iterator[None]:
    """Whatever happens in the test, the step's gates open, so its command ends with the test."""
    try:
        yield
    finally:
        for gate in gates:
            gate.touch()


@contextlib.asynccontextmanager
async def printing_behind_a_gateway(
    tmp_path: Path, status: Service, orchestrator: Service, *gateway_args: str,
) -> AsyncIterator[tuple[WebGateway, tuple[Path, Path], str]]:
    """A gateway of the test's own (a subprocess started with `gateway_args`) and the printer job
    submitted: (gateway, the job's gates, its id). Afterwards the gateway is killed and the gates opened."""
    web = WebGateway(tmp_path / "web.log", status, orchestrator, *gateway_args)
    gates = (tmp_path / "second", tmp_path / "third")
    with opened_afterwards(*gates):
        await web.start()
        try:
            async with Client(orchestrator.address, status.address) as client:
                job = await client.submit(printer_job(gates))
            yield web, gates, job.id
        finally:
            await web.kill()


async def panel_lines(page: Page) -> list[str]:
    lines: list[str] = await page.eval_on_selector_all(
        "li.step[data-name=print] .output-lines > div[data-line]", "nodes => nodes.map(n => n.textContent)")
    return lines


async def until_lines(page: Page, count: int) -> list[str]:
    async def probe() -> list[str] | None:
        lines = await panel_lines(page)
        return lines if len(lines) >= count else None
    return await eventually(probe, f"{count} lines in the output panel")


async def test_the_output_panel_follows_a_step_live_across_a_gateway_restart(
    browser: Browser, gateway: WebGateway, orchestrator: Service, status: Service, tmp_path: Path
) -> None:
    """At 360 px: the panel shows the first batch as plain text (colours stripped, the tag as text,
    the bad byte as U+FFFD); the gateway is killed, the step prints its second batch, the gateway
    starts again: the browser reconnects with its Last-Event-ID and the panel ends with every line
    once, in order."""
    gates = (tmp_path / "second", tmp_path / "third")
    with opened_afterwards(*gates):
        async with Client(orchestrator.address, status.address) as client:
            job = await client.submit(printer_job(gates))
        page = await open_page(browser, f"{gateway.url}/jobs/{job.id}", width=360)
        await page.wait_for_selector("li.step[data-name=print] .open-output")
        await page.click("li.step[data-name=print] .open-output")
        assert await until_lines(page, 4) == EXPECTED[:4]
        assert await page.locator("li.step[data-name=print] .output-lines b").count() == 0, "output is never HTML"
        await gateway.kill()
        gates[0].touch()
        await gateway.start()
        assert await until_lines(page, 44) == EXPECTED[:44]
        gates[1].touch()
        await page.wait_for_selector("li.step[data-name=print] .output[data-ended=true]", state="attached",
                                     timeout=DEADLINE * 1000)
        assert await page.evaluate("window.__outputAtEnd.print") == EXPECTED, "the panel ended before its last lines"
        note = page.locator("li.step[data-name=print] .step-output .output-note")
        assert await note.is_hidden(), "no earlier line hidden"
        assert await page.evaluate("document.documentElement.scrollWidth") <= 360


async def _ended(client: Client, job_id: str) -> bool | None:
    return True if (await client.get(job_id)).terminal else None


async def _first(items: AsyncIterator[Event], count: int) -> AsyncIterator[Event]:
    async for item in items:
        yield item
        count -= 1
        if not count:
            return


async def test_the_output_stream_resumes_by_line_refuses_without_the_token_and_names_unknown_steps(
    tmp_path: Path, orchestrator: Service, status: Service
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    async with printing_behind_a_gateway(tmp_path, status, orchestrator,
                                         "--access-token-file", str(token)) as (web, gates, job_id):
        url = f"/api/jobs/{job_id}/steps/print/output/stream"
        async with httpx.AsyncClient(base_url=web.url, timeout=DEADLINE) as http:
            assert (await http.get(url)).status_code == 401
            http.headers["authorization"] = "Bearer s3cret-token"
            unknown = await http.get(f"/api/jobs/{job_id}/steps/nope/output/stream")
            assert unknown.status_code == 404 and "no step 'nope'" in unknown.json()["error"]
            bad = await http.get(url, headers={"last-event-id": "x"})
            assert bad.status_code == 400 and "ATTEMPT-LINE" in bad.json()["error"]
            async with http.stream("GET", url) as response:
                assert response.status_code == 200
                first = [(ident, data["text"]) async for ident, kind, data in _first(events(response), 4)]
            assert first == [(f"1-{n}", EXPECTED[n]) for n in range(4)]
            for gate in gates:
                gate.touch()
            async with Client(orchestrator.address, status.address) as client:
                await eventually(lambda: _ended(client, job_id), "the job to end")
            async with http.stream("GET", url, headers={"last-event-id": "1-41"}) as response:
                assert response.status_code == 200
                got = [(ident, kind, data.get("text")) async for ident, kind, data in events(response)]
        assert got == [*((f"1-{n}", "line", EXPECTED[n]) for n in range(42, len(EXPECTED))), (None, "end", None)]


async def test_a_browser_that_leaves_the_output_at_any_moment_gives_its_stream_back(
    tmp_path: Path, orchestrator: Service, status: Service
) -> None:
    """With room for one stream, output streams closed at moments spread over their start (before,
    during and after the GetJob and the StreamOutput behind them) each leave the room free again."""
    async with printing_behind_a_gateway(tmp_path, status, orchestrator, "--max-streams", "1") as (web, _, job_id):
        url = f"/api/jobs/{job_id}/steps/print/output/stream"
        async with httpx.AsyncClient(base_url=web.url, timeout=DEADLINE) as http:
            for after in (0, 0.001, 0.005, 0.02, 0.1, 0.3):
                async def room() -> bool | None:
                    async with http.stream("GET", url) as response:
                        if response.status_code == 503:
                            return None
                        assert response.status_code == 200
                        await asyncio.sleep(after)  # noqa: B023 (used before the loop moves on)
                        return True
                await eventually(room, f"the stream left after {after}s to be given back")


CHILD_PRINTER = "import sys\nfor n in range(5):\n    print(f'child {sys.argv[1]} line {n}')"


async def child_panel_lines(page: Page) -> list[str]:
    """The lines of the fan step's child panel when it last ended."""
    lines: list[str] = await page.evaluate("window.__outputAtEnd['fan/child'] || []")
    return lines


async def test_a_fan_out_childs_output_opens_from_its_row_and_switches_to_another_child(
    browser: Browser, gateway: WebGateway, orchestrator: Service, status: Service
) -> None:
    """The children table has an output button per child: it opens that child's output under the
    table (only that child's lines), another child's button switches the panel to that child, and
    the same button again closes it. The step's own panel is another one, left closed."""
    async with Client(orchestrator.address, status.address) as client:
        job = await client.submit({"name": "fan", "steps": [{"name": "fan", "type": "fanout", "count": 3, "child": {
            "type": "command", "command": [sys.executable, "-c", CHILD_PRINTER, "{index}"]}}]})
        await eventually(lambda: _ended(client, job.id), "the job to end")
    page = await open_page(browser, f"{gateway.url}/jobs/{job.id}")
    await page.click("li.step[data-name=fan] .open-children")
    for index in (1, 2):
        await page.click(f"li.step[data-name=fan] button.open-child-output[data-child='{index}']")

        async def shown(index: int = index) -> list[str] | None:
            lines = await child_panel_lines(page)
            return lines if lines and lines[0].startswith(f"child {index} ") else None
        assert await eventually(shown, f"child {index}'s output") == [f"child {index} line {n}" for n in range(5)]
        title = await page.text_content("li.step[data-name=fan] .child-output-title")
        assert title == f"child {index} output"
        expanded = await page.eval_on_selector_all(
            "li.step[data-name=fan] button.open-child-output[aria-expanded=true]",
            "nodes => nodes.map(n => n.dataset.child)")
        assert expanded == [str(index)]
    await page.click("li.step[data-name=fan] button.open-child-output[data-child='2']")
    assert await page.locator("li.step[data-name=fan] .child-output").is_hidden()
    assert await page.locator("li.step[data-name=fan] .step-output").is_hidden()
