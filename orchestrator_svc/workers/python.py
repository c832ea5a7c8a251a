"""Calls a Python function inside the orchestrator process.

`function` is either "package.module:attribute" (imported on first use) or a
name registered under the `stepstream.functions` entry point group. `args` is a
table of keyword arguments; in fan-out children `{item}` and `{index}` are
substituted in its strings. Async functions are awaited (and cancelled on
timeout or CancelJob); plain functions run in a thread, which Python cannot
interrupt: on timeout or cancel the step ends at once but the thread finishes
in the background. Code run this way is trusted: it runs with the
orchestrator's rights.

What the function prints (stdout, stderr) and logs through the
`stepstream.step` logger (logging.getLogger("stepstream.step"), or a child of
it) is the attempt's output, as a command's is; other threads and tasks the
function starts write there too, as they inherit its context. A plain
function's prints after a timeout or cancel (its thread still running) are
not kept.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from orchestrator_svc.workers import (
    Field,
    FieldViolation,
    Params,
    WorkContext,
    Worker,
    WorkerCatalog,
    WorkFailed,
    check_fields,
)

FUNCTION_GROUP = "stepstream.functions"
FIELDS = (Field("function", "string", required=True), Field("args", "table"))


class FunctionNotFound(LookupError):
    pass


def resolve(reference: str) -> Callable[..., Any]:
    """The callable named by `reference`; FunctionNotFound with the reason otherwise."""
    module_name, sep, attribute = reference.partition(":")
    if not sep:
        for point in entry_points(group=FUNCTION_GROUP, name=reference):
            found = point.load()
            if callable(found):
                return found  # type: ignore[no-any-return]
        raise FunctionNotFound(
            f"{reference!r} is neither 'module:function' nor registered in {FUNCTION_GROUP!r}"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:
        raise FunctionNotFound(f"cannot import {module_name!r}: {error}") from error
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as error:
            raise FunctionNotFound(f"{module_name!r} has no attribute {attribute!r}") from error
    if not callable(target):
        raise FunctionNotFound(f"{reference!r} is not callable")
    return target  # type: ignore[no-any-return]


class PythonWorker(Worker):
    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> list[FieldViolation]:
        violations = check_fields(params, path, FIELDS)
        reference = params.get("function")
        if isinstance(reference, str) and "{" not in reference:
            try:
                resolve(reference)
            except FunctionNotFound as error:
                violations.append(FieldViolation(f"{path}.function", str(error)))
        return violations

    async def run(self, params: Params, context: WorkContext) -> str:
        try:
            function = resolve(params["function"])
        except FunctionNotFound as error:
            raise WorkFailed(str(error)) from error
        kwargs = dict(params.get("args", {}))
        try:
            if inspect.iscoroutinefunction(function):
                result = await function(**kwargs)
            else:
                result = await asyncio.to_thread(function, **kwargs)
        except WorkFailed:
            raise
        except Exception as error:
            raise WorkFailed(f"{type(error).__name__}: {error}") from error
        return result if isinstance(result, str) else "returned"
