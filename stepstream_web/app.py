"""The web gateway's HTTP face: the two pages, their JSON reads and their live
streams, all read through the SDK (it decides nothing: every state, count and
freshness flag shown is one the status service sent, mapped by the SDK).

A job page's stream is Server-Sent Events whose `id:` is the revision of the
view it carries. Every browser showing a job shares one feed of it (Feed): the
first one starts it with GetJob and a watch from that snapshot's revision
(WatchJob after_revision, through Client.watch(since=)). Each stream sends the
steps of the feed's latest view changed after the browser's Last-Event-ID (all
of them without one), then each newer view's changes: a reconnecting browser
misses nothing and gets nothing twice. Between the watch and the browser sits
that one latest view, never a queue: a browser that reads slowly gets fewer,
larger deltas (every step changed since what it was sent), and one that reads
nothing for --send-timeout is dropped, to come back with its Last-Event-ID. So
a stream holds nothing of its own but the revision it sent, whatever the
browser does.

The jobs list's stream is the same over WatchJobs (Client.watch_jobs): one watch
per filter, its newest jobs sent whenever the listing changes.

A step's output stream is the orchestrator's StreamOutput through Client.logs,
one call per browser (nothing shared: each follows its own line). Each event is
one line whose `id:` is ATTEMPT-LINE: a reconnecting browser's Last-Event-ID
resumes that attempt from the next line (from_line), so nothing is missed or
repeated. The line goes as plain text (invalid UTF-8 replaced, every ANSI
sequence stripped); the SDK reads a line only when the browser took the one
before, under the same send timeout as the other streams. Every output stream
is a StreamOutput call on the gateway's one connection to the orchestrator,
which takes at most its --max-streams-per-connection of them: past
--max-output-streams the gateway answers 503 (the page retries), and a call the
orchestrator refuses or cannot take (out of reach) ends the stream with
`unavailable`, from which the browser reconnects, never with `problem`, which
stops the page's panel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any, Generic, TypeVar

import grpc
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from stepstream_client import Applied, Client, JobsView, JobView
from stepstream_client.cli import CHILD_STATE_WORDS, JOB_STATE_WORDS
from stepstream_client.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RpcError,
    UnauthenticatedError,
)
from stepstream_client.models import LogLine
from stepstream_client.render import child_json, iso, log_text, step_json, summary_json, view_json
from stepstream_client.watch import Watch

from stepstream_web.config import WebConfig

log = logging.getLogger(__name__)
V = TypeVar("V")

COOKIE = "stepstream_web_token"
MAX_PAGE = 500
MAX_OFFSET = 100_000
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1
# Digits a number in a parameter or header may have (leading zeros included): more is a bad request.
MAX_DIGITS = 40
# How long the browser waits before reconnecting a stream that ended (EventSource's `retry:`).
RECONNECT_MS = 1_000
# Encoded view events a job's feed keeps for the browsers following it (a handful of starting points).
ENCODED_KEPT = 16
# The last lines of a step's output a panel starts with (the page keeps no more than these either).
OUTPUT_TAIL = 500
STATIC = files("stepstream_web") / "static"
# The orchestrator's answers to a step output stream that may not hold a moment later: the browser retries.
PASSING = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})


class BadRequest(Exception):
    """A query parameter or header that cannot be what it claims; answered 400 with the reason."""


def sse(event: str, data: Any, revision: int | str | None = None) -> bytes:
    """One Server-Sent Event; `revision` becomes its id, the browser's Last-Event-ID on reconnect."""
    head = f"id: {revision}\n" if revision is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def view_event(view: JobView, after: int | None, snapshot: bool) -> bytes:
    """The job at view.revision: its header, whether the watch is live, and every step changed after
    `after` (every step for a snapshot)."""
    steps = [step_json(step) for step in view.steps if snapshot or after is None or step.revision > after]
    data = {"revision": view.revision, "snapshot": snapshot or after is None, "job": summary_json(view),
            "live": view.live, "last_heard": iso(view.last_heard), "steps": steps}
    return sse("view", data, view.revision)


def jobs_event(view: JobsView, limit: int) -> bytes:
    """The newest `limit` jobs of a listing, with the watch's connection state."""
    return sse("jobs", {"revision": view.revision, "jobs": [summary_json(job) for job in view.jobs[:limit]],
                        "live": view.live, "last_heard": iso(view.last_heard)}, view.revision)


def link_event(view: JobView | JobsView) -> bytes:
    """The watch's connection state alone (no new revision): drives the page's "stale since"."""
    return sse("link", {"live": view.live, "last_heard": iso(view.last_heard)})


def error_response(error: RpcError | BadRequest) -> JSONResponse:
    """An SDK failure or a bad request as the HTTP status a browser understands, with the reason."""
    if isinstance(error, BadRequest):
        return JSONResponse({"error": str(error)}, 400)
    status = {NotFoundError: 404, InvalidArgumentError: 400, UnauthenticatedError: 502,
              PermissionDeniedError: 502}.get(type(error), 503)
    return JSONResponse({"error": str(error)}, status)


def _words(request: Request, allowed: list[str]) -> list[str]:
    words = request.query_params.getlist("state")
    unknown = [word for word in words if word not in allowed]
    if unknown:
        raise BadRequest(f"unknown state {unknown[0]!r}: expected one of {', '.join(allowed)}")
    return words


def _whole(text: str, low: int, high: int) -> int | None:
    """`text` as a whole number from `low` to `high` (ASCII digits only), else None. Its length is
    checked first: Python refuses to convert a string of more than 4,300 digits (a ValueError)."""
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_DIGITS:
        return None
    number = int(text)
    return number if low <= number <= high else None


def _number(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    number = _whole(text, low, high)
    if number is None:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}, got {text[:40]!r}")
    return number


def resume_point(request: Request) -> int | None:
    """The revision the browser already shows: its Last-Event-ID, else ?after= (a page that
    opens a new EventSource after the old one gave up), else None (it shows nothing yet)."""
    text = request.headers.get("last-event-id") or request.query_params.get("after")
    if not text:
        return None
    revision = _whole(text, 0, MAX_INT64)
    if revision is None:
        raise BadRequest(f"Last-Event-ID must be a revision (a whole number), got {text[:40]!r}")
    return revision


def output_resume_point(request: Request) -> tuple[int, int] | None:
    """The attempt and line the browser's output panel shows last: its Last-Event-ID, else ?after=
    (both ATTEMPT-LINE), else None (it shows nothing yet)."""
    text = request.headers.get("last-event-id") or request.query_params.get("after")
    if not text:
        return None
    attempt_text, _, line_text = text.partition("-")
    # What StreamOutput's fields hold: attempt an int32 (1 the first), from_line = line + 1 an int64.
    attempt, line = _whole(attempt_text, 1, MAX_INT32), _whole(line_text, 0, MAX_INT64 - 1)
    if attempt is None or line is None:
        raise BadRequest(f"Last-Event-ID must be ATTEMPT-LINE (attempt 1 to {MAX_INT32}, line 0 to {MAX_INT64 - 1}), "
                         f"got {text[:40]!r}")
    return attempt, line


def line_event(line: LogLine) -> bytes:
    """One output line as plain text (invalid UTF-8 replaced, ANSI sequences stripped); its id
    ATTEMPT-LINE is where a reconnect resumes."""
    data = {"attempt": line.attempt, "number": line.number, "stream": line.stream, "continued": line.continued,
            "text": log_text(line.text, color=False, terminal=False)}
    return sse("line", data, f"{line.attempt}-{line.number}")


class EventStream:
    """An ASGI response sending `events` as SSE until they end or the browser leaves; a
    browser that takes nothing for `send_timeout` seconds is dropped (its connection
    closed) so that nothing waits on it. `done` runs however it ends."""

    def __init__(self, events: AsyncGenerator[bytes, None], send_timeout: float, done: Callable[[], None]) -> None:
        self._events = events
        self._send_timeout = send_timeout
        self._done = done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no")]})
            writer = asyncio.create_task(self._write(send))
            leaving = asyncio.create_task(_disconnect(receive))
            try:
                await asyncio.wait({writer, leaving}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (writer, leaving):
                    task.cancel()
                await asyncio.gather(writer, leaving, return_exceptions=True)
            failure = writer.exception() if writer.done() and not writer.cancelled() else None
            if isinstance(failure, TimeoutError):
                log.warning("dropped a browser that read nothing for %gs; it reconnects from its Last-Event-ID",
                            self._send_timeout)
            elif failure is not None:  # a bug: said once, rather than a connection cut with no word
                log.error("a page stream (%s) failed: %r", scope.get("path", "?"), failure, exc_info=failure)
        finally:
            self._done()

    async def _write(self, send: Send) -> None:
        async with contextlib.aclosing(self._events) as events:
            async for chunk in events:
                async with asyncio.timeout(self._send_timeout):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                # The server's send() returns at once while the socket takes bytes, so a burst of events
                # (an output chunk's lines) never lets the loop run: one to a browser that just left would
                # go on being written to its dead socket, each write logged by asyncio ("socket.send()
                # raised exception."). Yielding lets the server see the disconnect first.
                await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Feed(Generic[V]):
    """One SDK watch shared by every browser showing what it watches (a job, or the jobs a filter
    matches): the status service sees one watch per job or filter whatever the number of browsers
    (its per-connection stream limit would otherwise cap them), and each browser's stream reads
    `latest` at its own pace."""

    def __init__(self, key: str, latest: V) -> None:
        self.key = key
        self.latest = latest
        self.subscribers = 0
        self.ended = False
        self.failed = False
        self.tick = asyncio.Event()
        self._encoded: dict[tuple[Any, ...], bytes] = {}
        self._task: asyncio.Task[None] | None = None

    def follow(self, watch: Watch[V]) -> None:
        self._task = asyncio.create_task(self._follow(watch))

    async def _follow(self, watch: Watch[V]) -> None:
        try:
            async with watch as views:
                async for view in views:
                    self.latest = view
                    self._changed()
        except Exception as error:  # the watch gave up (e.g. refused credentials): browsers reconnect and see why
            log.warning("the watch behind %s ended: %s", self.key, error)
            self.failed = True
        finally:
            self.ended = True
            self._changed()

    def event(self, key: tuple[Any, ...], encode: Callable[[], bytes]) -> bytes:
        """`encode()`, once for every browser at the same point (most are: they follow the same feed)."""
        encoded = self._encoded.get(key)
        if encoded is None:
            if len(self._encoded) >= ENCODED_KEPT:
                self._encoded.clear()
            encoded = self._encoded[key] = encode()
        return encoded

    def _changed(self) -> None:
        """Wake every browser's stream (each waits on the tick it saw last)."""
        tick, self.tick = self.tick, asyncio.Event()
        tick.set()

    def close(self) -> None:
        """Stop the watch; a browser still reading (one that joined as it closed) reconnects."""
        self.failed = True
        if self._task is not None:
            self._task.cancel()


class JobFeed(Feed[JobView]):
    """A job's feed: from a GetJob snapshot, watched after its revision."""

    def __init__(self, client: Client, view: JobView) -> None:
        super().__init__(f"job {view.id}", view)
        # Full snapshots the watch took after OUT_OF_RANGE: every browser then gets every step again.
        self.snapshots = 0
        if view.terminal:
            self.ended = True
        else:
            self.follow(client.watch(view.id, since=view, on_apply=self._applied))

    def _applied(self, applied: Applied) -> None:
        if applied.snapshot:
            self.snapshots += 1


class Gateway:
    """The routes, over one SDK client (one channel to the status service for every browser)."""

    def __init__(self, client: Client, config: WebConfig, access_token: str = "") -> None:
        self._client = client
        self._config = config
        self._access_token = access_token
        self._feeds: dict[str, Feed[Any]] = {}
        self._starting_feeds: dict[str, asyncio.Future[Feed[Any]]] = {}
        self.streams = 0
        # Output streams open: each is a StreamOutput call on the SDK's one connection to the orchestrator.
        self.output_streams = 0

    def app(self) -> Starlette:
        routes = [
            Route("/", self._page("jobs.html")),
            Route("/jobs/{job_id}", self._page("job.html")),
            Route("/login", self._login),
            Route("/api/jobs", self._jobs),
            Route("/api/jobs/stream", self._jobs_stream),
            Route("/api/jobs/{job_id}", self._job),
            Route("/api/jobs/{job_id}/stream", self._job_stream),
            Route("/api/jobs/{job_id}/steps/{step}/children", self._children),
            Route("/api/jobs/{job_id}/steps/{step}/output/stream", self._output_stream),
            Mount("/static", StaticFiles(packages=[("stepstream_web", "static")]), name="static"),
        ]
        middleware = [Middleware(BaseHTTPMiddleware, dispatch=self._authorize)] if self._access_token else []
        return Starlette(routes=routes, middleware=middleware)

    # --- access --------------------------------------------------------------------------------------------

    def _granted(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self._access_token.encode())

    async def _authorize(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        """With an access token configured, every request but /login carries it (header or cookie)."""
        bearer = request.headers.get("authorization", "")
        presented = bearer[7:] if bearer.lower().startswith("bearer ") else request.cookies.get(COOKIE)
        if request.url.path == "/login" or self._granted(presented):
            return await call_next(request)
        return HTMLResponse("<!doctype html><title>stepstream</title><p>This page needs its access token: open "
                            "<code>/login?token=TOKEN</code> once (ask whoever runs the gateway).", 401)

    async def _login(self, request: Request) -> Response:
        """Trade ?token= for a cookie, then go to ?next= (a path here) without the token in the address."""
        if not self._access_token:
            return RedirectResponse("/", 303)
        if not self._granted(request.query_params.get("token")):
            return HTMLResponse("<!doctype html><title>stepstream</title><p>Wrong access token.", 401)
        target = request.query_params.get("next", "/")
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        response = RedirectResponse(target, 303)
        response.set_cookie(COOKIE, self._access_token, httponly=True, samesite="strict", path="/",
                            secure=self._config.https_cert is not None)
        return response

    # --- pages and reads -----------------------------------------------------------------------------------

    @staticmethod
    def _page(name: str) -> Callable[[Request], Awaitable[Response]]:
        async def page(request: Request) -> Response:
            return HTMLResponse((STATIC / name).read_text(), headers={"cache-control": "no-store"})
        return page

    async def _jobs(self, request: Request) -> Response:
        try:
            jobs = await self._listing(request)
        except (RpcError, BadRequest) as error:
            return error_response(error)
        return JSONResponse({"jobs": jobs})

    async def _listing(self, request: Request) -> list[dict[str, Any]]:
        states = _words(request, JOB_STATE_WORDS)
        limit = _number(request, "limit", 100, 1, MAX_PAGE)
        name = request.query_params.get("name", "")
        listed = self._client.list(states=states, name=name, page_size=limit)
        return [summary_json(job) async for job in _first(listed, limit)]

    async def _job(self, request: Request) -> Response:
        try:
            view = await self._client.get(request.path_params["job_id"])
        except RpcError as error:
            return error_response(error)
        return JSONResponse(view_json(view))

    async def _children(self, request: Request) -> Response:
        """One page of a fan-out step's children (in index order, optionally only some states)."""
        try:
            states = _words(request, CHILD_STATE_WORDS)
            offset = _number(request, "offset", 0, 0, MAX_OFFSET)
            limit = _number(request, "limit", 50, 1, MAX_PAGE)
            listed = self._client.children(request.path_params["job_id"], request.path_params["step"],
                                           states=states, page_size=min(MAX_PAGE, offset + limit + 1))
            page = [child_json(child) async for child in _first(listed, offset + limit + 1)][offset:]
        except (RpcError, BadRequest) as error:
            return error_response(error)
        return JSONResponse({"offset": offset, "children": page[:limit], "more": len(page) > limit})

    # --- live streams --------------------------------------------------------------------------------------

    def _full(self) -> Response | None:
        """503 when the gateway holds its most streams (the browser retries), else None."""
        if self.streams < self._config.max_streams:
            return None
        return JSONResponse({"error": f"the gateway holds its most streams ({self._config.max_streams})"}, 503,
                            headers={"retry-after": "5"})

    def _open_stream(self, events: AsyncGenerator[bytes, None], release: Callable[[], None] = lambda: None
                     ) -> EventStream:
        """`events` as the response; `release` runs when it ends, however it ends (even unstarted)."""
        self.streams += 1

        def done() -> None:
            self.streams -= 1
            release()

        return EventStream(events, self._config.send_timeout, done)

    async def _job_stream(self, request: Request) -> Response | EventStream:
        job_id = request.path_params["job_id"]
        if full := self._full():
            return full
        try:
            after = resume_point(request)
            feed = await self._feed(f"job {job_id}", lambda: self._start_job_feed(job_id))
        except (RpcError, BadRequest) as error:
            return error_response(error)
        assert isinstance(feed, JobFeed)
        feed.subscribers += 1
        return self._open_stream(self._job_events(feed, after), lambda: self._leave(feed))

    async def _feed(self, key: str, start: Callable[[], Awaitable[Feed[Any]]]) -> Feed[Any]:
        """The running feed called `key`, else a new one from `start()`: one start (one GetJob or first
        listing, one watch) however many browsers arrive meanwhile, shielded so that a browser that
        leaves does not cancel it for the others."""
        feed = self._feeds.get(key)
        if feed is not None and not feed.failed:
            return feed
        starting = self._starting_feeds.get(key)
        if starting is None:
            starting = self._starting_feeds[key] = asyncio.ensure_future(start())
            starting.add_done_callback(lambda done: self._started(key, done))
        return await asyncio.shield(starting)

    async def _start_job_feed(self, job_id: str) -> Feed[Any]:
        view = await self._client.get(job_id)
        # Heard from the status service just now: what "stale since" shows if the watch cannot follow.
        return JobFeed(self._client, dataclasses.replace(view, last_heard=datetime.now(UTC)))

    async def _start_jobs_feed(self, key: str, states: list[str], name: str) -> Feed[Any]:
        watch = self._client.watch_jobs(states=states, name=name)
        try:
            first = await anext(watch)
        except BaseException:
            await watch.aclose()
            raise
        feed: Feed[JobsView] = Feed(key, first)
        feed.follow(watch)
        return feed

    def _started(self, key: str, done: asyncio.Future[Feed[Any]]) -> None:
        del self._starting_feeds[key]
        if not done.cancelled() and done.exception() is None:
            self._feeds[key] = done.result()

    def _leave(self, feed: Feed[Any]) -> None:
        """A browser stopped showing it: the last one to go stops the watch."""
        feed.subscribers -= 1
        if feed.subscribers == 0:
            feed.close()
            if self._feeds.get(feed.key) is feed:
                del self._feeds[feed.key]

    async def _job_events(self, feed: JobFeed, after: int | None) -> AsyncGenerator[bytes, None]:
        """What changed after `after` in the feed's view, then each newer view as the browser takes
        them (the latest one at that moment: a slow browser gets fewer, larger deltas), heartbeats
        while nothing changes, and `end` once the job has ended."""
        yield f"retry: {RECONNECT_MS}\n\n".encode()
        # A Last-Event-ID ahead of the feed (made up, or a revision of another status database) would wait
        # for revisions that may never come, showing nothing: such a browser is sent the whole view.
        sent = after if after is None or after <= feed.latest.revision else None
        snapshots = feed.snapshots
        shown_live: bool | None = None
        while True:
            tick, ended, current = feed.tick, feed.ended, feed.latest  # `ended` first: then `current` is final
            resnapshot, snapshots = feed.snapshots != snapshots, feed.snapshots
            if sent is None or current.revision > sent or resnapshot:
                yield feed.event((current.revision, current.live, sent, resnapshot),
                                 functools.partial(view_event, current, sent, resnapshot))
                sent, shown_live = max(current.revision, sent or 0), current.live
            elif current.live != shown_live:
                yield link_event(current)
                shown_live = current.live
            if ended:
                break
            if beat := await self._beat_unless_changed(tick, sent):
                yield beat
        if not feed.failed:
            yield sse("end", {"revision": feed.latest.revision})

    async def _beat_unless_changed(self, tick: asyncio.Event, sent: int | None) -> bytes | None:
        """Wait for the feed's next change, at most one heartbeat interval: the `beat` event if none came."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._config.heartbeat_interval):
                await tick.wait()
        return None if tick.is_set() else sse("beat", {"interval": self._config.heartbeat_interval, "revision": sent})

    async def _output_stream(self, request: Request) -> Response | EventStream:
        """A step's (or with ?child= a fan-out child's) output, live until its attempt ends."""
        job_id, step = request.path_params["job_id"], request.path_params["step"]
        if full := self._full():
            return full
        if self.output_streams >= self._config.max_output_streams:
            # Past it the orchestrator would refuse the call (its --max-streams-per-connection): a 503 that
            # the page retries, rather than a `problem` that stops its panel.
            return JSONResponse({"error": f"the gateway holds its most output streams "
                                          f"({self._config.max_output_streams})"}, 503, headers={"retry-after": "5"})
        try:
            after = output_resume_point(request)
            child = _number(request, "child", -1, 0, MAX_INT32)
            view = await self._client.get(job_id)
            known = next((each for each in view.steps if each.name == step), None)
            if known is None:
                raise NotFoundError(f"job {job_id} has no step {step!r}")
            if child >= 0 and child >= known.children.total:
                raise NotFoundError(f"step {step!r} has no child {child} (it has {known.children.total})")
        except (RpcError, BadRequest) as error:
            return error_response(error)
        if after is None:
            lines = self._client.logs(job_id, step, child if child >= 0 else None, tail=OUTPUT_TAIL)
        else:
            lines = self._client.logs(job_id, step, child if child >= 0 else None, after[0], from_line=after[1] + 1)
        self.output_streams += 1
        return self._open_stream(self._output_events(lines), self._output_closed)

    def _output_closed(self) -> None:
        self.output_streams -= 1

    @staticmethod
    async def _output_events(lines: AsyncGenerator[LogLine, None]) -> AsyncGenerator[bytes, None]:
        """Each line as the browser takes it, then `end` once the attempt has ended. An error that is
        about what was asked for (an unknown attempt, a line no longer kept) is `problem` with the
        orchestrator's reason: the page says it and stops. One that passes (the orchestrator out of
        reach or at its limit of streams) is `unavailable` with the reason, and the stream ends: the
        browser reconnects from its Last-Event-ID."""
        yield f"retry: {RECONNECT_MS}\n\n".encode()
        try:
            async with contextlib.aclosing(lines) as each:
                async for line in each:
                    yield line_event(line)
        except RpcError as error:
            yield sse("unavailable" if error.code in PASSING else "problem", {"error": str(error)})
            return
        yield sse("end", {})

    async def _jobs_stream(self, request: Request) -> Response | EventStream:
        if full := self._full():
            return full
        try:
            states = _words(request, JOB_STATE_WORDS)
            limit = _number(request, "limit", 100, 1, MAX_PAGE)
            name = request.query_params.get("name", "")
            key = f"jobs {','.join(sorted(set(states)))} {name}"
            feed = await self._feed(key, lambda: self._start_jobs_feed(key, states, name))
        except (RpcError, BadRequest) as error:
            return error_response(error)
        feed.subscribers += 1
        return self._open_stream(self._jobs_events(feed, limit), lambda: self._leave(feed))

    async def _jobs_events(self, feed: Feed[JobsView], limit: int) -> AsyncGenerator[bytes, None]:
        """The newest `limit` jobs of the feed's listing (WatchJobs through the SDK), again whenever it
        changes (the latest listing when the browser is ready for it), heartbeats while nothing does."""
        yield f"retry: {RECONNECT_MS}\n\n".encode()
        sent: int | None = None
        shown_live: bool | None = None
        while True:
            tick, ended, current = feed.tick, feed.ended, feed.latest
            if sent is None or current.revision > sent:
                yield feed.event((current.revision, current.live, limit), functools.partial(jobs_event, current, limit))
                sent, shown_live = current.revision, current.live
            elif current.live != shown_live:
                yield link_event(current)
                shown_live = current.live
            if ended:
                return
            if beat := await self._beat_unless_changed(tick, sent):
                yield beat


async def _first(items: AsyncIterator[Any], count: int) -> AsyncIterator[Any]:
    """The first `count` of `items`, closing the iterator (no further page is fetched)."""
    async with contextlib.aclosing(items) as each:  # type: ignore[type-var]
        index = 0
        async for item in each:
            if index >= count:
                return
            index += 1
            yield item
