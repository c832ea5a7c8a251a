"""The gateway against hostile or careless browsers: numbers of any length, Last-Event-IDs that
cannot be, browsers that leave in the middle of a burst of output, and more output panels than
the gateway's one connection to the orchestrator may carry. Real services and a real gateway
(subprocesses); every answer is a clear HTTP status with a JSON reason, and the gateway's log
holds no traceback and no line per write to a browser that left."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from stepstream_client import Client

from tests.client import services
from tests.client.services import DEADLINE, QUICK_ORCHESTRATOR, Service, eventually, gate_step
from tests.web.conftest import WebGateway
from tests.web.test_gateway import Event, events

# A finished step with many lines: a browser reading it from its start gets bursts of hundreds of events.
LINES = 20_000
PRINTER = f"import sys\nsys.stdout.write(''.join(f'line {{n}} ' + 'x' * 60 + '\\n' for n in range({LINES})))"


# Prints a line, then waits for its gate (argv[1]) as services.gate_step's command does.
STARTED_THEN_GATE = ("import os, sys, time\nprint('started', flush=True)\n"
                     "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.02)\nprint('gate open')")


async def _finished_printer(client: Client) -> str:
    job = await client.submit({"name": "printer", "steps": [
        {"name": "print", "type": "command", "command": [sys.executable, "-c", PRINTER]}]})

    async def ended() -> bool | None:
        return True if (await client.get(job.id)).terminal else None

    await eventually(ended, "the printer to end")
    return job.id


def _no_trouble_in(log: Path) -> None:
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "socket.send() raised exception" not in text, f"{text.count('socket.send()')} such lines"


async def test_numbers_of_any_length_are_a_400_with_the_reason(
    gateway: WebGateway, orchestrator: Service, status: Service
) -> None:
    """Python converts no string of more than 4,300 digits to an int (ValueError): such a parameter
    was a 500 with a traceback. And an output Last-Event-ID's attempt past int32 (StreamOutput's
    field) was a 200 whose stream broke at once, silently, for the browser to retry forever."""
    huge = "9" * 5000
    async with Client(orchestrator.address, status.address) as client:
        job_id = await _finished_printer(client)
    output = f"/api/jobs/{job_id}/steps/print/output/stream"
    async with httpx.AsyncClient(base_url=gateway.url, timeout=DEADLINE) as http:
        for path, params, headers in [
            ("/api/jobs", {"limit": huge}, {}),
            ("/api/jobs/stream", {"limit": huge}, {}),
            (f"/api/jobs/{job_id}/steps/print/children", {"offset": huge}, {}),
            (output, {"child": huge}, {}),
            (output, {}, {"last-event-id": f"{2**31}-0"}),
            (output, {"after": f"1-{2**63 - 1}"}, {}),
            (output, {}, {"last-event-id": f"1-{huge}"}),
            (f"/api/jobs/{job_id}/stream", {}, {"last-event-id": huge}),
            (f"/api/jobs/{job_id}/stream", {}, {"last-event-id": str(2**63)}),
        ]:
            response = await http.get(path, params=params, headers=headers)
            assert response.status_code == 400, (path, params, headers, response.text[:300])
            assert response.json()["error"]
        # The largest of each is still taken: attempt 2**31 - 1 is simply not there.
        async with http.stream("GET", output, headers={"last-event-id": f"{2**31 - 1}-0"}) as response:
            assert response.status_code == 200
            got = [(kind, data) async for _, kind, data in events(response)]
        assert got == [("problem", {"error": f"job {job_id} step 'print' has no attempt {2**31 - 1}"})]
    _no_trouble_in(gateway.log)


async def test_a_last_event_id_ahead_of_the_job_gets_the_whole_view(
    gateway: WebGateway, orchestrator: Service, status: Service, tmp_path: Path
) -> None:
    """A browser whose Last-Event-ID is past anything the job has (made up, or a revision of a status
    database since replaced) waited for revisions that never came, shown nothing: it gets every step."""
    gate = tmp_path / "gate"
    async with Client(orchestrator.address, status.address) as client, \
            httpx.AsyncClient(base_url=gateway.url, timeout=DEADLINE) as http:
        job = await client.submit({"name": "held", "steps": [gate_step("hold", gate), gate_step("then", gate)]})
        for _ in range(2):  # running, then ended
            async with http.stream("GET", f"/api/jobs/{job.id}/stream",
                                   headers={"last-event-id": str(10**15)}) as response:
                assert response.status_code == 200
                ident, kind, data = await _first_of(events(response), ("view", "end"))
            assert kind == "view" and data["snapshot"], (kind, data)
            assert {step["name"] for step in data["steps"]} == {"hold", "then"}
            assert ident == str(data["revision"])
            gate.touch()

            async def ended() -> bool | None:
                return True if (await client.get(job.id)).terminal else None

            await eventually(ended, "the job to end")
    _no_trouble_in(gateway.log)


async def _first_of(items: AsyncIterator[Event], kinds: tuple[str, ...]) -> Event:
    async for item in items:
        if item[1] in kinds:
            return item
    raise AssertionError(f"the stream ended without any of {kinds}")


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a browser tab that is killed."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_browsers_that_leave_in_a_burst_of_output_leave_no_line_per_write_in_the_log(
    gateway: WebGateway, orchestrator: Service, status: Service
) -> None:
    """The gateway wrote an output chunk's lines (hundreds of events) without letting the loop run, so
    to a browser that had left it went on writing to the dead socket, asyncio logging a warning for
    each write from the fifth on: hundreds of log lines per browser that leaves mid-burst."""
    async with Client(orchestrator.address, status.address) as client:
        job_id = await _finished_printer(client)
    host, port = gateway.address.rsplit(":", 1)
    request = (f"GET /api/jobs/{job_id}/steps/print/output/stream?after=1-0 HTTP/1.1\r\n"
               f"Host: {gateway.address}\r\nAccept: text/event-stream\r\n\r\n").encode()
    for taken in (1, 2_000, 20_000, 200_000, 1_000_000) * 4:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        got = 0
        while got < taken:
            chunk = await asyncio.wait_for(reader.read(65536), DEADLINE)
            assert chunk, "the gateway closed the stream"
            got += len(chunk)
        _reset(writer)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=DEADLINE) as http:
        assert (await http.get(f"/api/jobs/{job_id}")).status_code == 200, "the gateway still answers"
    _no_trouble_in(gateway.log)


async def test_output_streams_past_what_the_orchestrator_takes_are_retried_not_given_up(
    tmp_path: Path,
) -> None:
    """The gateway's output streams all go over its one connection to the orchestrator, which takes at
    most --max-streams-per-connection streams on it: past that, a panel got `problem` and stopped for
    good. Now the gateway answers 503 (Retry-After; the page retries) past --max-output-streams, and a
    refusal by the orchestrator is `unavailable`, after which the browser reconnects."""
    orchestrator = services.orchestrator(tmp_path / "orchestrator", *QUICK_ORCHESTRATOR,
                                         "--max-streams-per-connection", "1")
    await orchestrator.start()
    status = services.status(tmp_path / "status", orchestrator.address)
    await status.start()
    web = WebGateway(tmp_path / "web.log", status, orchestrator, "--max-output-streams", "2")
    await web.start()
    try:
        gate = tmp_path / "gate"
        async with Client(orchestrator.address, status.address) as client, \
                httpx.AsyncClient(base_url=web.url, timeout=DEADLINE) as http:
            held = {**gate_step("hold", gate), "command": [sys.executable, "-c", STARTED_THEN_GATE, str(gate)]}
            job = await client.submit({"name": "held", "steps": [held, gate_step("then", gate)]})

            async def running() -> bool | None:
                return True if (await client.get(job.id)).step("hold").state == "running" else None

            await eventually(running, "hold to run")
            hold, then = (f"/api/jobs/{job.id}/steps/{step}/output/stream" for step in ("hold", "then"))
            async with http.stream("GET", hold) as first, contextlib.aclosing(events(first)) as first_events:  # type: ignore[type-var]
                assert first.status_code == 200
                _, kind, data = await anext(first_events)  # (kept open: closing it would close the stream)
                assert (kind, data["text"]) == ("line", "started")  # its call to the orchestrator is open
                async with http.stream("GET", hold) as refused:
                    assert refused.status_code == 200
                    got = [(kind, data) async for _, kind, data in events(refused)]
                assert got == [("unavailable", got[0][1])] and "limit of 1" in got[0][1]["error"], got
                # `then` has not started: its stream waits at the gateway (no call to the orchestrator yet).
                async with http.stream("GET", then) as second:
                    assert second.status_code == 200
                    third = await http.get(hold)
                    assert third.status_code == 503 and third.headers["retry-after"] == "5", third.text
                    assert "most output streams (2)" in third.json()["error"]
            gate.touch()

            async def ended() -> bool | None:
                return True if (await client.get(job.id)).terminal else None

            await eventually(ended, "the job to end")
            for url in (hold, then):
                async with http.stream("GET", url) as response:
                    texts = [(kind, data.get("text")) async for _, kind, data in events(response)]
                assert texts == [*([("line", "started")] if url == hold else []), ("line", "gate open"), ("end", None)]
    finally:
        await web.kill()
        await status.kill()
        await orchestrator.kill()
    _no_trouble_in(web.log)

