"""What a step runs, and how third parties add their own.

A worker type is looked up by the step's `type`. Built-in types and plugins are
registered the same way, through the `stepstream.workers` entry point group:

    [project.entry-points."stepstream.workers"]
    my-type = "mypkg.workers:MyWorker"

The entry point names a Worker (or FanoutWorker) subclass with a no-argument
constructor.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from orchestrator_svc.domain.spec import Execution, Params, Violations, WorkerCatalog
from orchestrator_svc.workers.processes import ProcessRegistry

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "stepstream.workers"


class WorkFailed(Exception):
    """The work ran and failed; the text becomes the step's message."""


@dataclass(frozen=True)
class WorkContext:
    job_id: str
    step_name: str
    attempt: int
    # Set for fan-out children.
    child_index: int | None
    # Seconds between the polite stop signal and the forced one.
    kill_grace: float
    # Where process groups are recorded (so a restart can stop leftovers).
    processes: ProcessRegistry | None = None


class Worker(ABC):
    """Runs one unit of work: a step, or one fan-out child.

    Cancellation (a timeout or CancelJob) arrives as asyncio.CancelledError at
    an await; the worker must stop everything it started before letting it
    propagate.
    """

    @abstractmethod
    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> Violations:
        """Every problem with `params`, as (field path under `path`, description)."""

    @abstractmethod
    async def run(self, params: Params, context: WorkContext) -> str:
        """Do the work; return a short message for the step, or raise WorkFailed."""


@dataclass(frozen=True)
class FanoutPlan:
    items: Sequence[str]
    concurrency: int
    max_child_failures: int
    # The child's execution with `{item}` / `{index}` still in its params.
    child: Execution

    def child_execution(self, index: int) -> Execution:
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
    """Spawns children, each a unit of work run by a leaf worker."""

    @abstractmethod
    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> Violations: ...

    @abstractmethod
    def plan(self, params: Params) -> FanoutPlan:
        """What to spawn; only called with params that passed validate()."""


AnyWorker = Worker | FanoutWorker


class WorkerRegistry:
    """The worker types this orchestrator can run."""

    def __init__(self, workers: Mapping[str, AnyWorker]) -> None:
        self._workers = dict(workers)

    @classmethod
    def from_entry_points(cls, extra: Mapping[str, AnyWorker] | None = None) -> WorkerRegistry:
        workers: dict[str, AnyWorker] = {}
        for point in entry_points(group=ENTRY_POINT_GROUP):
            try:
                factory = point.load()
                worker = factory()
            except Exception:
                log.exception("worker plugin %r (%s) failed to load; its type is unavailable",
                              point.name, point.value)
                continue
            if not isinstance(worker, Worker | FanoutWorker):
                log.error("worker plugin %r is not a Worker or FanoutWorker; ignored", point.name)
                continue
            workers[point.name] = worker
        workers.update(extra or {})
        return cls(workers)

    def get(self, worker_type: str) -> AnyWorker:
        return self._workers[worker_type]

    def is_fanout(self, worker_type: str) -> bool:
        return isinstance(self._workers.get(worker_type), FanoutWorker)

    def known_types(self) -> Sequence[str]:
        return sorted(self._workers)

    def validate_params(self, worker_type: str, params: Params, path: str) -> Violations | None:
        worker = self._workers.get(worker_type)
        if worker is None:
            return None
        return worker.validate(params, path, self)


@dataclass(frozen=True)
class Field:
    """One parameter a worker accepts."""

    name: str
    kind: str  # "string", "number", "integer", "boolean", "strings", "string_map", "list", "table"
    required: bool = False
    minimum: float | None = None


def _kind_problem(kind: str, value: Any) -> str | None:
    def is_number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    checks: dict[str, tuple[bool, str]] = {
        "string": (isinstance(value, str), "a string"),
        "number": (is_number(value), "a number"),
        "integer": (is_number(value) and int(value) == value, "a whole number"),
        "boolean": (isinstance(value, bool), "true or false"),
        "strings": (isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"),
        "string_map": (
            isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values()),
            "a table of strings",
        ),
        "list": (isinstance(value, list), "a list"),
        "table": (isinstance(value, Mapping), "a table"),
    }
    ok, wanted = checks[kind]
    return None if ok else f"must be {wanted}, got {value!r}"


def check_fields(params: Params, path: str, fields: Sequence[Field]) -> Violations:
    """Missing, unknown and mistyped parameters."""
    violations: Violations = []
    known = {f.name for f in fields}
    for name in params:
        if name not in known:
            violations.append((f"{path}.{name}", f"unknown field (expected: {', '.join(sorted(known))})"))
    for spec in fields:
        if spec.name not in params:
            if spec.required:
                violations.append((f"{path}.{spec.name}", "is required"))
            continue
        value = params[spec.name]
        problem = _kind_problem(spec.kind, value)
        if problem is None and spec.minimum is not None and value < spec.minimum:
            problem = f"must be at least {spec.minimum:g}, got {value!r}"
        if problem is not None:
            violations.append((f"{path}.{spec.name}", problem))
    return violations
