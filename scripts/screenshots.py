"""Take the README's screenshots of the web page (docs/*.png) from a real `stepstream demo --web`,
in Debian's chromium: `.venv/bin/python scripts/screenshots.py`. Run it after changing the page."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from playwright.async_api import Page, async_playwright

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.web.chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

DOCS = REPO / "docs"
STEPSTREAM = Path(sys.executable).with_name("stepstream")


async def demo_page_url(demo: asyncio.subprocess.Process) -> str:
    assert demo.stdout is not None
    while line := (await demo.stdout.readline()).decode():
        if line.startswith("demo: live page "):
            return line.removeprefix("demo: live page ").strip()
    raise SystemExit("stepstream demo --web ended without a page")


async def shoot(page: Page, name: str) -> None:
    await page.screenshot(path=DOCS / name, full_page=True)
    print(f"wrote docs/{name}")


async def main() -> None:
    demo = await asyncio.create_subprocess_exec(
        str(STEPSTREAM), "demo", "--web", stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        url = await asyncio.wait_for(demo_page_url(demo), 60)
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            wide = await browser.new_page(viewport={"width": 760, "height": 600})
            await wide.goto(url)
            # Mid-run: the fan-out a third done, the retried command's output open.
            await wide.wait_for_function(
                "Number(document.querySelector('li.step[data-name=crawl] .counts')?.dataset.completed || 0) >= 100",
                timeout=120_000)
            await wide.click("li.step[data-name=prepare] .open-output")
            await wide.wait_for_selector("li.step[data-name=prepare] .step-output[data-ended=true]", state="attached")
            await shoot(wide, "web-job-running.png")
            await wide.wait_for_selector("body[data-ended=true]", state="attached", timeout=120_000)
            await wide.click("li.step[data-name=prepare] .open-output")
            await shoot(wide, "web-job-completed.png")
            narrow = await browser.new_page(viewport={"width": 360, "height": 740}, color_scheme="dark")
            await narrow.goto(url)
            await narrow.wait_for_selector("body[data-ended=true]", state="attached", timeout=60_000)
            await narrow.click("li.step[data-name=crawl] .open-children")
            await narrow.select_option("li.step[data-name=crawl] .child-state", "failed")
            await narrow.wait_for_selector("li.step[data-name=crawl] tbody tr")
            await shoot(narrow, "web-job-360px-dark.png")
            await browser.close()
    finally:
        demo.terminate()
        await demo.wait()


if __name__ == "__main__":
    asyncio.run(main())
