"""The worker plugin API: everything a worker needs, from this one module.

A step's `type` names a worker. Built-in types (command, python, sleep, fanout,
in this package) and plugins register the same way, under the
`stepstream.workers` entry point group of their distribution:

    [project.entry-points."stepstream.workers"]
    shout = "example_worker:ShoutWorker"

The entry point names a Worker (or FanoutWorker) subclass with a no-argument
constructor. Import only the names below: they are the stable face, and the
modules behind them may move. Workers run inside the orchestrator process,
with its rights: a plugin is trusted code.
"""

from orchestrator_svc.domain.spec import Execution, Params, WorkerCatalog
from orchestrator_svc.output import OutputSink, OutputStream
from orchestrator_svc.workers._fields import Field, FieldKind, check_child, check_fields, parse_child
from orchestrator_svc.workers._worker import FanoutPlan, FanoutWorker, WorkContext, Worker, WorkFailed
from stepstream_common.errors import FieldViolation, quoted

__all__ = [  # noqa: RUF022 (grouped by role, not sorted)
    # Writing a worker: a Worker subclass with validate() and run().
    "Worker",
    "WorkContext",
    "WorkFailed",
    "Params",
    # Writing output lines: `await context.output.write(OutputStream.STDOUT, b"...\n")`.
    "OutputSink",
    "OutputStream",
    # Validating parameters: a definition with any violation is rejected whole.
    "Field",
    "FieldKind",
    "FieldViolation",
    "WorkerCatalog",
    "check_fields",
    "quoted",
    # Writing a fan-out: validate() and plan(); the orchestrator runs the children.
    "Execution",
    "FanoutPlan",
    "FanoutWorker",
    "check_child",
    "parse_child",
]
