"""A job definition, validated whole into an immutable spec before anything runs."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf import json_format, struct_pb2
from stepstream.orchestrator.v1 import definition_pb2

from orchestrator_svc.domain.durations import parse_duration
from stepstream_common.errors import FieldViolation, InvalidArgumentError, quoted

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
MAX_RETRIES = 100
DEFAULT_RETRY_BACKOFF = 1.0
MAX_STEPS = 200
# What a step's params (a google.protobuf.Struct) may hold, beyond protobuf's own
# limit (100 levels of messages, about 32 of tables): tables and lists nested at
# most this deep; finite numbers (JSON has no NaN or Infinity) within ±2^53, the
# range where a double still holds every whole number exactly (as I-JSON, RFC 7493).
MAX_PARAMS_DEPTH = 16
_TOO_DEEP = f"nested too deeply: at most {MAX_PARAMS_DEPTH} levels of tables and lists"
MAX_NUMBER = 2**53
# The range of google.protobuf.Duration (10,000 years), in which every duration
# the API reports must fit.
MAX_DURATION_SECONDS = 315_576_000_000

# A unit of work's parameters: a step's `params`, or a fan-out child's table.
Params = Mapping[str, Any]


class WorkerCatalog(Protocol):
    """What validation needs to know about the registered workers."""

    def validate_params(self, worker_type: str, params: Params, path: str) -> list[FieldViolation] | None:
        """Problems with `params` for `worker_type` (paths under `path`), or None if
        no such worker is registered."""

    def known_types(self) -> Sequence[str]: ...

    def is_fanout(self, worker_type: str) -> bool: ...


@dataclass(frozen=True)
class Execution:
    """How one unit of work (a step, or one fan-out child) runs."""

    type: str
    params: Params
    timeout: float | None
    retries: int
    retry_backoff: float

    @property
    def max_attempts(self) -> int:
        return 1 + self.retries


@dataclass(frozen=True)
class StepSpec:
    name: str
    index: int
    depends_on: tuple[str, ...]
    always_run: bool
    execution: Execution


@dataclass(frozen=True)
class JobSpec:
    name: str
    timeout: float | None
    steps: tuple[StepSpec, ...]


def _duration(text: str, path: str, violations: list[FieldViolation]) -> float | None:
    if not text:
        return None
    try:
        value = parse_duration(text)
    except ValueError as error:
        violations.append(FieldViolation(path, str(error)))
        return None
    if value <= 0:
        violations.append(FieldViolation(path, f"must be greater than zero, got {quoted(text)}"))
    elif value > MAX_DURATION_SECONDS:
        violations.append(
            FieldViolation(path, f"must be at most {MAX_DURATION_SECONDS}s (10,000 years), got {quoted(text)}")
        )
        return None
    return value


def execution_options(
    retries: Any, timeout: Any, retry_backoff: Any, path: str, violations: list[FieldViolation]
) -> tuple[int, float | None, float]:
    """Validate the fields every unit of work has: retries, timeout, retry_backoff."""
    retry_count = 0
    if isinstance(retries, bool) or not isinstance(retries, int | float) or int(retries) != retries:
        violations.append(FieldViolation(f"{path}.retries", f"must be a whole number, got {quoted(retries)}"))
    elif not 0 <= retries <= MAX_RETRIES:
        violations.append(FieldViolation(f"{path}.retries", f"must be between 0 and {MAX_RETRIES}, got {int(retries)}"))
    else:
        retry_count = int(retries)
    limits: list[float | None] = []
    for name, value in (("timeout", timeout), ("retry_backoff", retry_backoff)):
        if not isinstance(value, str):
            violations.append(
                FieldViolation(f"{path}.{name}", f"must be a duration string like '30s', got {quoted(value)}")
            )
            limits.append(None)
        else:
            limits.append(_duration(value, f"{path}.{name}", violations))
    backoff = limits[1] if limits[1] is not None else DEFAULT_RETRY_BACKOFF
    return retry_count, limits[0], backoff


def validate_job(definition: definition_pb2.JobDefinition, workers: WorkerCatalog) -> JobSpec:
    """The spec of a valid definition; InvalidArgumentError naming every problem otherwise."""
    violations: list[FieldViolation] = []
    root = "definition"
    if not definition.name.strip():
        violations.append(FieldViolation(f"{root}.name", "is required"))
    elif len(definition.name) > 200:
        violations.append(FieldViolation(f"{root}.name", "must be at most 200 characters"))
    job_timeout = _duration(definition.timeout, f"{root}.timeout", violations)
    if not definition.steps:
        violations.append(FieldViolation(f"{root}.steps", "at least one step is required"))
    elif len(definition.steps) > MAX_STEPS:
        violations.append(FieldViolation(f"{root}.steps", f"at most {MAX_STEPS} steps"))

    names = [step.name for step in definition.steps]
    first_index: dict[str, int] = {}
    for index, name in enumerate(names):
        path = f"{root}.steps[{index}].name"
        if not name:
            violations.append(FieldViolation(path, "is required"))
        elif not NAME_PATTERN.match(name):
            violations.append(FieldViolation(
                path, f"{quoted(name)} must be 1-100 letters, digits, '_', '.' or '-', starting with a letter or digit"
            ))
        elif name in first_index:
            violations.append(
                FieldViolation(path, f"duplicate step name {quoted(name)} (also steps[{first_index[name]}])")
            )
        else:
            first_index[name] = index

    steps: list[StepSpec] = []
    graph: dict[str, tuple[int, tuple[str, ...]]] = {}
    for index, step in enumerate(definition.steps):
        path = f"{root}.steps[{index}]"
        depends_on = _dependencies(step, index, names, first_index, path, violations)
        if first_index.get(step.name) == index:
            graph[step.name] = (index, depends_on)
        params = _params(step, f"{path}.params", violations)
        execution = _execution(step, params, path, workers, violations)
        if execution is not None:
            steps.append(StepSpec(step.name, index, depends_on, step.always_run, execution))

    violations.extend(_cycles(graph, root))
    if violations:
        raise InvalidArgumentError(
            f"invalid job definition ({len(violations)} problem{'s' if len(violations) > 1 else ''})", violations
        )
    return JobSpec(definition.name, job_timeout, tuple(steps))


def _dependencies(
    step: definition_pb2.StepDefinition,
    index: int,
    names: list[str],
    first_index: Mapping[str, int],
    path: str,
    violations: list[FieldViolation],
) -> tuple[str, ...]:
    if not step.HasField("depends_on"):
        return (names[index - 1],) if index > 0 else ()
    deps: list[str] = []
    for position, dep in enumerate(step.depends_on.steps):
        dep_path = f"{path}.depends_on.steps[{position}]"
        if dep == step.name:
            violations.append(FieldViolation(dep_path, f"step {quoted(step.name)} cannot depend on itself"))
        elif dep not in first_index:
            violations.append(FieldViolation(dep_path, f"unknown step {quoted(dep)}"))
        elif dep in deps:
            violations.append(FieldViolation(dep_path, f"{quoted(dep)} is listed twice"))
        else:
            deps.append(dep)
    return tuple(deps)


def _params(step: definition_pb2.StepDefinition, path: str, violations: list[FieldViolation]) -> Params | None:
    """The step's params as plain values; None (with the problems added) when they
    hold what no worker should be handed (see MAX_PARAMS_DEPTH)."""
    if not step.HasField("params"):
        return {}
    problems: list[FieldViolation] = []
    _check_struct(step.params, path, 1, problems)
    if problems:
        violations.extend(problems)
        return None
    params: dict[str, Any] = json_format.MessageToDict(step.params)
    return params


def _check_struct(struct: struct_pb2.Struct, path: str, depth: int, problems: list[FieldViolation]) -> None:
    if depth > MAX_PARAMS_DEPTH:
        problems.append(FieldViolation(path, _TOO_DEEP))
        return
    for key, value in struct.fields.items():
        _check_value(value, f"{path}.{key}", depth, problems)


def _check_value(value: struct_pb2.Value, path: str, depth: int, problems: list[FieldViolation]) -> None:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            problems.append(FieldViolation(path, f"must be a finite number, got {number}"))
        elif abs(number) > MAX_NUMBER:
            problems.append(FieldViolation(path, f"must be between -2^53 and 2^53, got {number:g}"))
    elif kind == "struct_value":
        _check_struct(value.struct_value, path, depth + 1, problems)
    elif kind == "list_value":
        if depth + 1 > MAX_PARAMS_DEPTH:
            problems.append(FieldViolation(path, _TOO_DEEP))
            return
        for position, item in enumerate(value.list_value.values):
            _check_value(item, f"{path}[{position}]", depth + 1, problems)


def _execution(
    step: definition_pb2.StepDefinition,
    params: Params | None,
    path: str,
    workers: WorkerCatalog,
    violations: list[FieldViolation],
) -> Execution | None:
    """The step's execution; None when it has problems. `params` is None when
    they were rejected already: then only the step's own fields are checked."""
    retries, timeout, backoff = execution_options(
        step.retries, step.timeout, step.retry_backoff, path, violations
    )
    if not step.type:
        violations.append(FieldViolation(f"{path}.type", f"is required (one of: {', '.join(workers.known_types())})"))
        return None
    if step.type not in workers.known_types():
        violations.append(FieldViolation(
            f"{path}.type", f"unknown worker type {quoted(step.type)} (one of: {', '.join(workers.known_types())})"
        ))
        return None
    if retries and workers.is_fanout(step.type):
        violations.append(
            FieldViolation(f"{path}.retries", "a fan-out step is not retried; set `child.retries` instead")
        )
    if params is None:
        return None
    violations.extend(workers.validate_params(step.type, params, f"{path}.params") or [])
    return Execution(step.type, params, timeout, retries, backoff)


def _cycles(graph: Mapping[str, tuple[int, tuple[str, ...]]], root: str) -> list[FieldViolation]:
    """One violation per dependency cycle among the (index, dependencies) of each step."""
    done: set[str] = set()
    violations: list[FieldViolation] = []

    def visit(name: str, trail: list[str]) -> None:
        if name in done:
            return
        if name in trail:
            cycle = [*trail[trail.index(name) :], name]
            violations.append(FieldViolation(
                f"{root}.steps[{graph[cycle[0]][0]}].depends_on", "dependency cycle: " + " -> ".join(cycle)
            ))
            done.update(cycle)
            return
        for dep in graph[name][1]:
            if dep in graph:
                visit(dep, [*trail, name])
        done.add(name)

    for name in graph:
        visit(name, [])
    return violations
