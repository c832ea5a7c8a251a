"""How far each followed orchestrator log has been applied, and waiting for a
position in it: what lets a client read its own write.

A client that has just submitted a job holds the orchestrator's (log_id, seq)
for it. A read that says "not older than" that position waits here until the
ingest writer has *committed* the log up to it (advance() runs after each
commit), so the answer that follows includes the job. Kubernetes'
resourceVersion with resourceVersionMatch=NotOlderThan is the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from status_svc.storage.base import Source
from stepstream_common.errors import FailedPreconditionError, FieldViolation, InvalidArgumentError, UnavailableError

NOT_YET_APPLIED = "NOT_YET_APPLIED"


class AppliedPositions:
    def __init__(self, sources: Iterable[Source], addresses: Iterable[str]) -> None:
        # address -> (log_id, committed cursor); a source not heard from yet has log_id "".
        self._applied: dict[str, tuple[str, int]] = dict.fromkeys(addresses, ("", 0))
        self._waiters: set[asyncio.Future[None]] = set()
        self.advance(sources)

    def advance(self, committed: Iterable[Source]) -> None:
        """Record committed cursors and wake every waiter to check again."""
        for source in committed:
            self._applied[source.address] = (source.log_id, source.cursor)
        for waiter in self._waiters:
            _wake(waiter)

    def committed_seq(self, address: str) -> int:
        """The cursor committed for `address` (0 before anything is)."""
        return self._applied.get(address, ("", 0))[1]

    async def wait(self, log_id: str, seq: int, seconds: float) -> None:
        """Return once `seq` of `log_id` is committed; UnavailableError after `seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self._reached(log_id, seq):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise UnavailableError(
                    f"not yet applied: seq {seq} of log {log_id or '(the only one)'} "
                    f"(applied: {self._describe()}); retry",
                    NOT_YET_APPLIED, {"applied": self._describe()},
                )
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            timer = loop.call_later(remaining, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiters.discard(waiter)

    def _reached(self, log_id: str, seq: int) -> bool:
        if not log_id:
            if len(self._applied) != 1:
                raise InvalidArgumentError(
                    "not_older_than.log_id is required: this service follows several orchestrators",
                    [FieldViolation("not_older_than.log_id", f"required with {len(self._applied)} orchestrators")],
                )
            ((_, cursor),) = self._applied.values()
            return cursor >= seq
        for known_log, cursor in self._applied.values():
            if known_log == log_id:
                return cursor >= seq
        if any(not known_log for known_log, _ in self._applied.values()):
            return False  # a source not heard from yet may be that log: wait for it
        raise FailedPreconditionError(
            f"this service does not follow log {log_id[:64]!r} (it follows {self._describe()})"
        )

    def _describe(self) -> str:
        return ", ".join(f"{address} log {log or '?'} seq {cursor}" for address, (log, cursor) in self._applied.items())


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
