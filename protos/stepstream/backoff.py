"""Reconnect delays for every long-lived stream: the status service following
an orchestrator, and clients following the status service."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter, so many clients do not reconnect in step."""

    initial: float = 0.1
    cap: float = 5.0

    def delay(self, failures: int) -> float:
        """The wait before the next attempt after `failures` failed ones in a row (0 for the first retry)."""
        return random.uniform(0.5, 1.0) * min(self.cap, self.initial * 2.0 ** min(failures, 30))


DEFAULT_BACKOFF = Backoff()
