"""A blocking client for scripts and notebooks: the async Client, run on a private
event loop in a background thread (grpc.aio objects must stay on the loop that
made them, so every call is handed to that one loop)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable
from types import TracebackType
from typing import Any, TypeVar

from stepstream.channel import DEFAULT_ORCHESTRATOR, DEFAULT_STATUS

from stepstream_client._policy import DEFAULT, Retry
from stepstream_client.models import (
    ChildView,
    JobRecord,
    JobSummary,
    JobsView,
    JobView,
    LogLine,
    LogPosition,
    OutputSummary,
    SubmittedJob,
)
from stepstream_client.sdk import Client, Definition
from stepstream_client.watch import Applied

T = TypeVar("T")


class SyncClient:
    """The same methods as Client, blocking; list/children/watch return plain iterators.

    Use as `with SyncClient(...) as client:` or call close(). `options` are
    Client's (e.g. `retry=RetryPolicy(deadline=60)`, TLS: `tls_ca="ca.pem"`, a
    token: `token_file="ci.token"`),
    and so are the timeouts, retries and errors of every call.
    """

    def __init__(
        self, orchestrator: str = DEFAULT_ORCHESTRATOR, status: str = DEFAULT_STATUS, **options: Any
    ) -> None:
        self._client = Client(orchestrator, status, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stepstream-client", daemon=True)
        self._thread.start()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            # e.g. KeyboardInterrupt while waiting: stop the work on the loop too.
            future.cancel()
            raise

    def _iterate(self, make: Callable[[], AsyncIterator[T]]) -> Generator[T, None, None]:
        """Pull items one at a time; closing the iterator (or dropping it) closes the async one."""
        iterator = self._run(_on_loop(make))
        try:
            while True:
                try:
                    yield self._run(_next(iterator))
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None and not self._loop.is_closed():
                self._run(aclose())

    def submit(
        self, definition: Definition, *, request_id: str = "", attempt_timeout: float | None = None,
        retry: Retry = DEFAULT,
    ) -> SubmittedJob:
        return self._run(
            self._client.submit(definition, request_id=request_id, attempt_timeout=attempt_timeout, retry=retry)
        )

    def cancel(self, job_id: str, *, attempt_timeout: float | None = None, retry: Retry = DEFAULT) -> JobRecord:
        return self._run(self._client.cancel(job_id, attempt_timeout=attempt_timeout, retry=retry))

    def get(
        self, job_id: str, *, not_older_than: LogPosition | None = None, attempt_timeout: float | None = None,
        retry: Retry = DEFAULT,
    ) -> JobView:
        return self._run(
            self._client.get(job_id, not_older_than=not_older_than, attempt_timeout=attempt_timeout, retry=retry)
        )

    def list(
        self, *, states: Iterable[str] = (), name: str = "", page_size: int = 100,
        attempt_timeout: float | None = None, retry: Retry = DEFAULT,
    ) -> Generator[JobSummary, None, None]:
        return self._iterate(lambda: self._client.list(
            states=states, name=name, page_size=page_size, attempt_timeout=attempt_timeout, retry=retry
        ))

    def children(
        self, job_id: str, step: str, *, states: Iterable[str] = (), page_size: int = 100,
        attempt_timeout: float | None = None, retry: Retry = DEFAULT,
    ) -> Generator[ChildView, None, None]:
        return self._iterate(lambda: self._client.children(
            job_id, step, states=states, page_size=page_size, attempt_timeout=attempt_timeout, retry=retry
        ))

    def watch(
        self, job_id: str, *, since: JobView | None = None, on_apply: Callable[[Applied], None] | None = None,
        not_older_than: LogPosition | None = None,
    ) -> Generator[JobView, None, None]:
        return self._iterate(
            lambda: self._client.watch(job_id, since=since, on_apply=on_apply, not_older_than=not_older_than)
        )

    def watch_jobs(self, *, states: Iterable[str] = (), name: str = "") -> Generator[JobsView, None, None]:
        """Never ends by itself: close the iterator (or break out of the loop) to stop watching."""
        return self._iterate(lambda: self._client.watch_jobs(states=states, name=name))

    def logs(
        self, job_id: str, step: str | None = None, child: int | None = None, attempt: int | None = None, *,
        follow: bool = True, tail: int | None = None, streams: Iterable[str] = (),
    ) -> Generator[LogLine, None, None]:
        return self._iterate(lambda: self._client.logs(
            job_id, step, child, attempt, follow=follow, tail=tail, streams=streams
        ))

    def output(
        self, job_id: str, step: str | None = None, *, page_size: int = 100,
    ) -> Generator[OutputSummary, None, None]:
        return self._iterate(lambda: self._client.output(job_id, step, page_size=page_size))


async def _on_loop(make: Callable[[], T]) -> T:
    """Build an object on the loop's thread (async iterators bind to the loop that runs them)."""
    return make()


async def _next(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()
