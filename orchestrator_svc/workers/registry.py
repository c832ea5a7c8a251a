"""Which worker types this orchestrator can run: built-ins and plugins alike,
loaded from the `stepstream.workers` entry point group (see the package's
docstring for how a plugin registers)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points

from orchestrator_svc.workers import FanoutWorker, FieldViolation, Params, Worker

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "stepstream.workers"

AnyWorker = Worker | FanoutWorker


class WorkerRegistry:
    """The worker types this orchestrator can run; the WorkerCatalog validation consults."""

    def __init__(self, workers: Mapping[str, AnyWorker]) -> None:
        self._workers = dict(workers)

    @classmethod
    def from_entry_points(cls) -> WorkerRegistry:
        """Every registered type; a plugin that fails to load is logged and left
        out, so one broken package cannot stop the orchestrator."""
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
        return cls(workers)

    def get(self, worker_type: str) -> AnyWorker:
        return self._workers[worker_type]

    def is_fanout(self, worker_type: str) -> bool:
        return isinstance(self._workers.get(worker_type), FanoutWorker)

    def known_types(self) -> Sequence[str]:
        return sorted(self._workers)

    def validate_params(self, worker_type: str, params: Params, path: str) -> list[FieldViolation] | None:
        worker = self._workers.get(worker_type)
        if worker is None:
            return None
        return worker.validate(params, path, self)
