"""What a worker implements, and what it is given and may raise while it runs."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator_svc.domain.spec import Execution, Params, WorkerCatalog
from orchestrator_svc.output import OutputSink
from orchestrator_svc.workers.processes import ProcessRegistry
from stepstream_common.errors import FieldViolation


class WorkFailed(Exception):
    """The work ran and failed; the text becomes the step's (or child's) message."""


@dataclass(frozen=True)
class WorkContext:
    """Which attempt of which unit of work is running, and how to stop what it starts."""

    job_id: str
    step_name: str
    attempt: int
    # Set for fan-out children.
    child_index: int | None
    # Where this attempt's output goes: `await context.output.write(OutputStream.STDOUT, b"...\n")`.
    # (python steps' print() and the "stepstream.step" logger land there too.)
    output: OutputSink
    # Seconds between the polite stop signal and the forced one.
    kill_grace: float
    # Where process groups are recorded (so a restart can stop leftovers).
    processes: ProcessRegistry | None = None


class Worker(ABC):
    """Runs one unit of work: a step, or one fan-out child.

    One instance serves every step of its type, concurrently, inside the
    orchestrator's event loop: keep no per-run state on it, and never block
    (run blocking calls with asyncio.to_thread). Cancellation (a timeout or
    CancelJob) arrives as asyncio.CancelledError at an await; the worker must
    stop everything it started before letting it propagate.
    """

    @abstractmethod
    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> list[FieldViolation]:
        """Every problem with `params`, each named by its field's path under `path`.
        A definition with any problem is rejected whole, before anything runs.
        Called in a worker thread, possibly for several submissions at once: a pure check."""

    @abstractmethod
    async def run(self, params: Params, context: WorkContext) -> str:
        """Do the work (`params` passed validate()); return a short message for
        the step, or raise WorkFailed."""


@dataclass(frozen=True)
class FanoutPlan:
    """The children a fan-out step spawns: one per item, run by `child`'s worker."""

    items: Sequence[str]
    concurrency: int
    max_child_failures: int
    # The child's execution with `{item}` / `{index}` still in its params.
    child: Execution

    def child_execution(self, index: int) -> Execution:
        """The `index`-th child's execution, its item and index substituted."""
        # One pass over each template string: an item's own text is never scanned again.
        values = {"{item}": self.items[index], "{index}": str(index)}
        params = _substitute(self.child.params, lambda text: _PLACEHOLDER.sub(lambda m: values[m[0]], text))
        return Execution(self.child.type, params, self.child.timeout, self.child.retries, self.child.retry_backoff)


_PLACEHOLDER = re.compile(r"\{item\}|\{index\}")


def _substitute(value: Any, replace: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return replace(value)
    if isinstance(value, Mapping):
        return {key: _substitute(item, replace) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, replace) for item in value]
    return value


class FanoutWorker(ABC):
    """Spawns children, each a unit of work run by a leaf worker. The
    orchestrator runs them and decides the step's outcome (domain/rules.py)."""

    @abstractmethod
    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> list[FieldViolation]:
        """As Worker.validate; check the child table with check_child."""

    @abstractmethod
    def plan(self, params: Params) -> FanoutPlan:
        """What to spawn; only called with params that passed validate()."""
