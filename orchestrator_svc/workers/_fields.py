"""A worker's parameter schema: its own fields, and a fan-out's child table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from orchestrator_svc.domain.spec import Execution, Params, WorkerCatalog, execution_options
from stepstream_common.errors import FieldViolation, quoted

FieldKind = Literal["string", "number", "integer", "boolean", "strings", "string_map", "list", "table"]


@dataclass(frozen=True)
class Field:
    """One parameter a worker accepts."""

    name: str
    kind: FieldKind
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None


def _kind_problem(kind: FieldKind, value: Any) -> str | None:
    def is_number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    checks: dict[FieldKind, tuple[bool, str]] = {
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


def check_fields(params: Params, path: str, fields: Sequence[Field]) -> list[FieldViolation]:
    """Missing, unknown and mistyped parameters (and numbers outside their minimum and maximum)."""
    violations: list[FieldViolation] = []
    known = {f.name for f in fields}
    for name in params:
        if name not in known:
            violations.append(FieldViolation(f"{path}.{name}", f"unknown field (expected: {', '.join(sorted(known))})"))
    for spec in fields:
        if spec.name not in params:
            if spec.required:
                violations.append(FieldViolation(f"{path}.{spec.name}", "is required"))
            continue
        value = params[spec.name]
        problem = _kind_problem(spec.kind, value)
        if problem is None and spec.minimum is not None and value < spec.minimum:
            problem = f"must be at least {spec.minimum:g}, got {value!r}"
        elif problem is None and spec.maximum is not None and value > spec.maximum:
            problem = f"must be at most {spec.maximum:.15g}, got {value:.15g}"
        if problem is not None:
            violations.append(FieldViolation(f"{path}.{spec.name}", problem))
    return violations


# A child table's own options; everything else in it is the child worker's params.
_CHILD_OPTIONS = ("type", "timeout", "retries", "retry_backoff")


def check_child(child: Params, path: str, catalog: WorkerCatalog) -> list[FieldViolation]:
    """Problems with a fan-out's child table (`type`, the child worker's fields,
    optional `timeout`, `retries`, `retry_backoff`); a child is never a fan-out."""
    violations: list[FieldViolation] = []
    execution_options(
        child.get("retries", 0), child.get("timeout", ""), child.get("retry_backoff", ""), path, violations
    )
    worker_type = child.get("type")
    known = ", ".join(catalog.known_types())
    if not isinstance(worker_type, str) or not worker_type:
        violations.append(FieldViolation(f"{path}.type", f"is required (one of: {known})"))
        return violations
    if catalog.is_fanout(worker_type):
        violations.append(FieldViolation(f"{path}.type", "a fan-out child cannot itself be a fan-out"))
        return violations
    params = {key: value for key, value in child.items() if key not in _CHILD_OPTIONS}
    problems = catalog.validate_params(worker_type, params, path)
    if problems is None:
        violations.append(
            FieldViolation(f"{path}.type", f"unknown worker type {quoted(worker_type)} (one of: {known})")
        )
    else:
        violations.extend(problems)
    return violations


def parse_child(child: Params) -> Execution:
    """The execution a child table that passed check_child describes, for FanoutPlan.child."""
    retries, timeout, backoff = execution_options(
        child.get("retries", 0), child.get("timeout", ""), child.get("retry_backoff", ""), "", []
    )
    params = {key: value for key, value in child.items() if key not in _CHILD_OPTIONS}
    return Execution(child["type"], params, timeout, retries, backoff)
