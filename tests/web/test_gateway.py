"""The gateway over HTTP, without a browser: who may open it, what a bad request
gets, what a stream resumed from a Last-Event-ID sends, and that a browser that
leaves (at any moment) leaves no watch behind on the status service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
from stepstream_client import Client

from stepstream_web.app import EventStream
from tests.client import services
from tests.client.services import (
    DEADLINE,
    REPO,
    STEPSTREAM,
    Service,
    eventually,
    free_port,
    gate_step,
    run_cli,
)
from tests.helpers.certs import Certificates
from tests.web.conftest import WebGateway

Event = tuple[str | None, str, dict[str, Any]]


async def events(response: httpx.Response) -> AsyncIterator[Event]:
    """(id, event, data) of each Server-Sent Event."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
        elif "event" in fields:
            yield fields.get("id"), fields["event"], json.loads(fields["data"])
            fields = {}
        else:
            fields = {}


async def first_view(http: httpx.AsyncClient, url: str, **headers: str) -> Event:
    async with http.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        async for event in events(response):
            if event[1] in ("view", "end"):
                return event
    raise AssertionError("the stream ended without a view")


def test_the_gateway_imports_no_service_and_no_store() -> None:
    """A client like any other: the SDK only, nothing of the services or their storage."""
    code = ("import sys, stepstream_web.app, stepstream_web.command, stepstream_web.__main__; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('status_svc', 'orchestrator_svc') "
            "or m in ('stepstream_common.sqlite', 'stepstream_common.feed', 'stepstream_common.streaming', "
            "'aiosqlite')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO)


def test_a_reachable_address_is_refused_without_https_and_an_access_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    for extra in ([], ["--access-token-file", str(token)]):
        result = subprocess.run([str(STEPSTREAM), "web", "--listen", "0.0.0.0:0", *extra], capture_output=True,
                                text=True, timeout=DEADLINE, cwd=REPO)
        assert result.returncode == 2, result
        assert "refusing to serve 0.0.0.0:0" in result.stderr
        assert "--insecure (env STEPSTREAM_WEB_INSECURE=1)" in result.stderr
        assert ("--access-token-file" in result.stderr) == (not extra)
        assert "--https-cert" in result.stderr
        assert "s3cret" not in result.stderr


async def test_with_an_access_token_every_request_needs_it(
    tmp_path: Path, status: Service, orchestrator: Service
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o644)
    unsafe = await run_cli("web", "--access-token-file", str(token))
    assert unsafe.code == 2 and "chmod 600" in unsafe.stderr, unsafe
    token.chmod(0o600)
    web = WebGateway(tmp_path / "web.log", status, orchestrator, "--access-token-file", str(token))
    await web.start()
    try:
        async with httpx.AsyncClient(base_url=web.url) as http:
            for path in ("/", "/jobs/x", "/static/job.js", "/api/jobs", "/api/jobs/stream", "/api/jobs/x/stream"):
                refused = await http.get(path)
                assert refused.status_code == 401, path
                assert "s3cret" not in refused.text
            assert (await http.get("/login?token=wrong")).status_code == 401
            assert (await http.get("/api/jobs", headers={"authorization": "Bearer s3cret-token"})).status_code == 200
            login = await http.get("/login", params={"token": "s3cret-token", "next": "/jobs/abc"})
            assert login.status_code == 303
            assert login.headers["location"] == "/jobs/abc"
            cookie = login.headers["set-cookie"].lower()
            assert "httponly" in cookie and "samesite=strict" in cookie
            assert (await http.get("/api/jobs")).status_code == 200  # the cookie, from now on
            assert (await http.get("/login", params={"token": "s3cret-token", "next": "//elsewhere.example"})
                    ).headers["location"] == "/"
    finally:
        await web.kill()
    assert "s3cret" not in web.log.read_text()


async def test_over_https_the_login_cookie_is_secure_and_a_bad_certificate_is_one_line(
    tmp_path: Path, status: Service, orchestrator: Service
) -> None:
    certs = Certificates.make(tmp_path / "certs")
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    broken = await run_cli("web", "--https-cert", str(tmp_path / "missing.pem"), "--https-key", str(certs.server.key))
    assert broken.code == 2 and len(broken.stderr.splitlines()) == 1, broken
    web = WebGateway(tmp_path / "web.log", status, orchestrator, "--access-token-file", str(token),
                     "--https-cert", str(certs.server.cert), "--https-key", str(certs.server.key))
    await web.start()
    try:
        trusted = ssl.create_default_context(cafile=str(certs.ca.cert))
        async with httpx.AsyncClient(base_url=f"https://{web.address}", verify=trusted) as https:
            assert (await https.get("/")).status_code == 401
            login = await https.get("/login", params={"token": "s3cret-token"})
            assert login.status_code == 303 and "secure" in login.headers["set-cookie"].lower()
            assert "stepstream jobs" in (await https.get("/")).text
    finally:
        await web.kill()


async def test_bad_requests_say_why_and_unknown_jobs_are_404(gateway: WebGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        for path, params, headers in [
            ("/api/jobs", {"state": "bogus"}, {}), ("/api/jobs", {"limit": "0"}, {}),
            ("/api/jobs", {"limit": "9" * 30}, {}), ("/api/jobs/stream", {"state": "waiting"}, {}),
            ("/api/jobs/x/stream", {}, {"last-event-id": "abc"}), ("/api/jobs/x/stream", {"after": "-1"}, {}),
            ("/api/jobs/x/stream", {"after": "²"}, {}), ("/api/jobs", {"limit": "١٠"}, {}),
            ("/api/jobs/x/steps/s/children", {"state": "waiting"}, {}),
            ("/api/jobs/x/steps/s/children", {"offset": "1e9"}, {}),
        ]:
            response = await http.get(path, params=params, headers=headers)
            assert response.status_code == 400, (path, params, headers)
            assert response.json()["error"]
        for path in ("/api/jobs/nope", "/api/jobs/nope/stream", "/api/jobs/nope/steps/s/children"):
            response = await http.get(path)
            assert response.status_code == 404, path
            assert "nope" in response.json()["error"]


async def test_a_stream_resumed_from_its_last_event_id_sends_only_what_is_newer(
    gateway: WebGateway, orchestrator: Service, status: Service, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    async with Client(orchestrator.address, status.address) as client, \
            httpx.AsyncClient(base_url=gateway.url, timeout=DEADLINE) as http:
        job = await client.submit({"name": "gated", "steps": [gate_step("hold", first), gate_step("then", second)]})
        url = f"/api/jobs/{job.id}/stream"
        await eventually(lambda: _state(client, job.id, "hold", "running"), "hold to run")
        snapshot_id, _, snapshot = await first_view(http, url)
        assert snapshot["snapshot"] and {step["name"] for step in snapshot["steps"]} == {"hold", "then"}
        assert snapshot_id == str(snapshot["revision"])
        held = snapshot["revision"]
        first.touch()
        await eventually(lambda: _state(client, job.id, "then", "running"), "then to run")
        resumed_id, _, resumed = await first_view(http, url, **{"last-event-id": str(held)})
        assert not resumed["snapshot"]
        assert int(resumed_id or 0) > held
        assert resumed["steps"] and all(step["revision"] > held for step in resumed["steps"])
        assert {step["name"]: step["state"] for step in resumed["steps"]} == {"hold": "completed", "then": "running"}
        second.touch()
        final = await eventually(lambda: _ended(client, job.id), "the job to end")
        _, kind, data = await first_view(http, url, **{"last-event-id": str(final)})
        assert (kind, data) == ("end", {"revision": final}), "nothing twice: the browser already has it all"


async def _state(client: Client, job_id: str, step: str, state: str) -> bool | None:
    return True if (await client.get(job_id)).step(step).state == state else None


async def _ended(client: Client, job_id: str) -> int | None:
    view = await client.get(job_id)
    return view.revision if view.terminal else None


async def test_a_browser_that_leaves_at_any_moment_leaves_no_watch_behind(
    orchestrator: Service, tmp_path: Path
) -> None:
    """Browsers of one job share one watch; streams closed at moments spread over their start (before,
    during and after the GetJob and the watch it starts) close every watch the gateway opened."""
    metrics = f"127.0.0.1:{free_port()}"
    # Default heartbeats: on a starved machine quick ones (QUICK_STATUS) make watches reconnect for silence,
    # and the count of watches would flicker for a reason that is not the gateway's.
    status = services.status(tmp_path / "status", orchestrator.address, "--metrics-listen", metrics)
    await status.start()
    web = WebGateway(tmp_path / "web.log", status, orchestrator)
    await web.start()
    try:
        async with Client(orchestrator.address, status.address) as client, \
                httpx.AsyncClient(base_url=web.url, timeout=DEADLINE) as http:
            job = await client.submit({"name": "held", "steps": [gate_step("hold", tmp_path / "never")]})
            await eventually(lambda: _state(client, job.id, "hold", "running"), "hold to run")

            async with contextlib.AsyncExitStack() as held:
                for _ in range(5):
                    response = await held.enter_async_context(http.stream("GET", f"/api/jobs/{job.id}/stream"))
                    await anext(aiter(events(response)))
                await eventually(lambda: _watchers(http, metrics, 1), "one watch shared by the browsers of a job")

            async def leave(after: float) -> None:
                async with http.stream("GET", f"/api/jobs/{job.id}/stream"):
                    await asyncio.sleep(after)

            await asyncio.gather(*(leave(after) for after in (0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3) * 3))
            await eventually(lambda: _watchers(http, metrics, 0), "every watch to be let go")
            await client.cancel(job.id)
    finally:
        await web.kill()
        await status.kill()


async def _watchers(http: httpx.AsyncClient, metrics: str, wanted: int) -> bool | None:
    text = (await http.get(f"http://{metrics}/metrics")).text
    lines = [line for line in text.splitlines() if line.startswith("stepstream_watchers_attached")]
    return True if lines and all(float(line.rsplit(" ", 1)[1]) == wanted for line in lines) else None


async def test_a_browser_that_reads_nothing_is_dropped_and_its_stream_let_go() -> None:
    """EventStream under an ASGI server whose socket never drains (a browser that reads nothing):
    after send_timeout the response ends, the events generator is closed, and its release runs once."""
    closed: list[str] = []
    released: list[bool] = []

    async def forever() -> AsyncGenerator[bytes, None]:
        try:
            while True:
                yield b"event: beat\ndata: {}\n\n"
        finally:
            closed.append("closed")

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the browser never leaves
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))
        if message["type"] == "http.response.body" and len(sent) > 3:
            await asyncio.Event().wait()  # its socket buffer is full: this write never completes

    stream = EventStream(forever(), 0.2, lambda: released.append(True))
    async with asyncio.timeout(DEADLINE):
        await stream({"type": "http"}, receive, send)
    assert closed == ["closed"] and released == [True]
    assert sent[0]["status"] == 200 and all(m.get("more_body") for m in sent[1:])
