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
# What a step's params (a google.protobuf.Struct) may hold, beyond protobuf's own
# limit (100 levels of messages, about 32 of tables): tables and lists nested at
# most DefinitionLimits.max_params_depth deep; finite numbers (JSON has no NaN or
# Infinity) within ±2^53, the range where a double still holds every whole number
# exactly (as I-JSON, RFC 7493).
MAX_PARAMS_DEPTH = 16
MAX_NUMBER = 2**53
# The range of google.protobuf.Duration (10,000 years), in which every duration
# the API reports must fit.
MAX_DURATION_SECONDS = 315_576_000_000

# A unit of work's parameters: a step's `params`, or a fan-out child's table.
Params = Mapping[str, Any]

# A string under a `secret` key, in any table of a step's params, is a secret
# value (as in a command's `env = { API_KEY = { secret = "..." } }`). Only the
# run gets it: workers validate params with it replaced by SECRET_MARKER, so no
# violation can quote it, and the definition is stored (and echoed by GetJob)
# with it replaced too, so no RPC, log line or database file holds it.
SECRET_KEY = "secret"
SECRET_MARKER = "<secret>"


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
    # Bytes of output kept per attempt (each child's, for a fan-out); None: the service's limit.
    output_limit: int | None = None


@dataclass(frozen=True)
class JobSpec:
    name: str
    timeout: float | None
    steps: tuple[StepSpec, ...]


@dataclass(frozen=True)
class DefinitionLimits:
    """How large a definition the orchestrator takes: OrchestratorConfig's
    settings of the same names (flags --max-steps, ...), whose defaults these are.

    They bound what one submission makes the orchestrator hold and run (each
    step and child is rows, events and watchers' updates; params become Python
    values, several times their encoded size), so that a hostile or clumsy
    definition is refused whole, before any of it is converted. Over any limit:
    INVALID_ARGUMENT, a field violation per field over, and a google.rpc.ErrorInfo
    (reason LIMIT_EXCEEDED) naming each setting exceeded and its value.
    """

    max_steps: int = 200
    max_dependencies: int = 200  # depends_on entries of one step
    max_name_chars: int = 200  # the job's name (step names: NAME_PATTERN)
    max_string_chars: int = 65_536  # any string in params, keys too (command args, env values, items...)
    max_fanout_children: int = 100_000  # a fan-out's `items`, or its `count`
    max_fanout_concurrency: int = 1_000  # a fan-out's `concurrency`
    max_params_depth: int = MAX_PARAMS_DEPTH  # tables and lists nested in one step's params
    max_params_bytes: int = 2 * 1024 * 1024  # every step's params together, encoded
    max_output_limit: int = 1024 * 1024 * 1024  # one step's output_limit, bytes per attempt


class _OverLimits:
    """What a definition has over its limits: the violations, and each setting exceeded with its value."""

    def __init__(self, limits: DefinitionLimits) -> None:
        self.limits = limits
        self.violations: list[FieldViolation] = []
        self.settings: dict[str, str] = {}
        # Steps whose params are not to be converted nor handed to their worker.
        self.steps_over: set[int] = set()

    def add(self, path: str, description: str, setting: str, value: int) -> None:
        self.violations.append(FieldViolation(path, description))
        self.settings[setting] = str(value)


def check_limits(definition: definition_pb2.JobDefinition, workers: WorkerCatalog, limits: DefinitionLimits) -> None:
    """Nothing, if `definition` is within `limits`; else InvalidArgumentError
    naming every problem it has, the limits first (see validate_job).

    Cheap: it reads the protobuf message as it is (sizes, counts, lengths),
    without converting any of it, so that an oversized definition costs no
    more than reading it. An orchestrator calls it before submitting, and then
    validates without limits (validate_job's default).
    """
    if _over_limits(definition, workers, limits).violations:
        validate_job(definition, workers, limits)  # raises: it finds the same problems, and the rest


def _over_limits(
    definition: definition_pb2.JobDefinition, workers: WorkerCatalog, limits: DefinitionLimits
) -> _OverLimits:
    over = _OverLimits(limits)
    root = "definition"
    if len(definition.name) > limits.max_name_chars:
        over.add(f"{root}.name", f"must be at most {limits.max_name_chars} characters", "max-name-chars",
                 limits.max_name_chars)
    if len(definition.steps) > limits.max_steps:
        over.add(f"{root}.steps", f"at most {limits.max_steps} steps", "max-steps", limits.max_steps)
    params_bytes = sum(step.params.ByteSize() for step in definition.steps if step.HasField("params"))
    if params_bytes > limits.max_params_bytes:
        # Their sizes are all this reads of them: converting them is what the limit spares.
        over.add(f"{root}.steps", f"params of at most {limits.max_params_bytes} bytes (all steps together, encoded), "
                 f"got {params_bytes}", "max-params-bytes", limits.max_params_bytes)
        over.steps_over.update(range(len(definition.steps)))
    for index, step in enumerate(definition.steps):
        path = f"{root}.steps[{index}]"
        found = len(over.violations)
        dependencies = len(step.depends_on.steps)
        if dependencies > limits.max_dependencies:
            over.add(f"{path}.depends_on.steps", f"at most {limits.max_dependencies} dependencies, got {dependencies}",
                     "max-dependencies", limits.max_dependencies)
        if step.output_limit > limits.max_output_limit:
            over.add(f"{path}.output_limit", f"at most {limits.max_output_limit} bytes, got {step.output_limit}",
                     "max-output-limit", limits.max_output_limit)
        if step.HasField("params") and index not in over.steps_over:
            _params_over(step.params, f"{path}.params", 1, over)
            if workers.is_fanout(step.type):
                _fanout_over(step.params, f"{path}.params", over)
        if len(over.violations) > found:
            over.steps_over.add(index)
    return over


def _params_over(struct: struct_pb2.Struct, path: str, depth: int, over: _OverLimits) -> None:
    limits = over.limits
    if depth > limits.max_params_depth:
        over.add(path, _too_deep(limits), "max-params-depth", limits.max_params_depth)
        return
    for key, value in struct.fields.items():
        if len(key) > limits.max_string_chars:
            over.add(f"{path}.{key}", f"a key of at most {limits.max_string_chars} characters, got {len(key)}",
                     "max-string-chars", limits.max_string_chars)
        _value_over(value, f"{path}.{key}", depth, over)


def _value_over(value: struct_pb2.Value, path: str, depth: int, over: _OverLimits) -> None:
    limits = over.limits
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        length = len(value.string_value)
        if length > limits.max_string_chars:
            over.add(path, f"at most {limits.max_string_chars} characters, got {length}", "max-string-chars",
                     limits.max_string_chars)
    elif kind == "struct_value":
        _params_over(value.struct_value, path, depth + 1, over)
    elif kind == "list_value":
        if depth + 1 > limits.max_params_depth:
            over.add(path, _too_deep(limits), "max-params-depth", limits.max_params_depth)
            return
        for position, item in enumerate(value.list_value.values):
            _value_over(item, f"{path}[{position}]", depth + 1, over)


def _too_deep(limits: DefinitionLimits) -> str:
    return f"nested too deeply: at most {limits.max_params_depth} levels of tables and lists"


def _fanout_over(params: struct_pb2.Struct, path: str, over: _OverLimits) -> None:
    """A fan-out's size: its `items` or `count`, and its `concurrency`. (Numbers
    that are no finite number within ±2^53 are the number checks' to report.)"""
    limits = over.limits
    fields = params.fields
    if "items" in fields and fields["items"].WhichOneof("kind") == "list_value":
        items = len(fields["items"].list_value.values)
        if items > limits.max_fanout_children:
            over.add(f"{path}.items", f"at most {limits.max_fanout_children} items, got {items}",
                     "max-fanout-children", limits.max_fanout_children)
    for name, most, setting, what in (
        ("count", limits.max_fanout_children, "max-fanout-children", "children"),
        ("concurrency", limits.max_fanout_concurrency, "max-fanout-concurrency", "children at once"),
    ):
        number = fields[name].number_value if name in fields else 0.0
        if most < number <= MAX_NUMBER:
            over.add(f"{path}.{name}", f"must be at most {most} {what}, got {number:.15g}", setting, most)


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


def validate_job(
    definition: definition_pb2.JobDefinition, workers: WorkerCatalog, limits: DefinitionLimits | None = None
) -> JobSpec:
    """The spec of a valid definition; InvalidArgumentError naming every problem otherwise.

    With `limits`, what is over them is among the problems (and the params of a
    step over a limit are neither converted nor checked further); without, the
    caller has checked them already (check_limits).
    """
    over = _over_limits(definition, workers, limits) if limits is not None else None
    violations: list[FieldViolation] = [] if over is None else list(over.violations)
    root = "definition"
    if not definition.name.strip():
        violations.append(FieldViolation(f"{root}.name", "is required"))
    job_timeout = _duration(definition.timeout, f"{root}.timeout", violations)
    if not definition.steps:
        violations.append(FieldViolation(f"{root}.steps", "at least one step is required"))

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
        params = None if over is not None and index in over.steps_over else _params(step, f"{path}.params", violations)
        execution = _execution(step, params, path, workers, violations)
        if step.output_limit < 0:
            violations.append(FieldViolation(
                f"{path}.output_limit", f"must be 0 (the orchestrator's limit) or more bytes, got {step.output_limit}",
            ))
        if execution is not None:
            steps.append(StepSpec(step.name, index, depends_on, step.always_run, execution, step.output_limit or None))

    violations.extend(_cycles(graph, root))
    if violations:
        raise InvalidArgumentError(
            f"invalid job definition ({len(violations)} problem{'s' if len(violations) > 1 else ''})", violations,
            limits=None if over is None else over.settings,
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
    hold what no worker should be handed (see MAX_NUMBER)."""
    if not step.HasField("params"):
        return {}
    problems: list[FieldViolation] = []
    _check_struct(step.params, path, problems)
    if problems:
        violations.extend(problems)
        return None
    params: dict[str, Any] = json_format.MessageToDict(step.params)
    return params


def _check_struct(struct: struct_pb2.Struct, path: str, problems: list[FieldViolation]) -> None:
    for key, value in struct.fields.items():
        _check_value(value, f"{path}.{key}", problems)


def _check_value(value: struct_pb2.Value, path: str, problems: list[FieldViolation]) -> None:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            problems.append(FieldViolation(path, f"must be a finite number, got {number}"))
        elif abs(number) > MAX_NUMBER:
            problems.append(FieldViolation(path, f"must be between -2^53 and 2^53, got {number:g}"))
    elif kind == "struct_value":
        _check_struct(value.struct_value, path, problems)
    elif kind == "list_value":
        for position, item in enumerate(value.list_value.values):
            _check_value(item, f"{path}[{position}]", problems)


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
    violations.extend(workers.validate_params(step.type, redacted(params), f"{path}.params") or [])
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


def redacted(value: Any) -> Any:
    """`value` (params, or anything in them) with every secret value replaced by SECRET_MARKER."""
    if isinstance(value, Mapping):
        return {
            key: SECRET_MARKER if key == SECRET_KEY and isinstance(item, str) else redacted(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redacted(item) for item in value]
    return value


def secret_values(value: Any) -> list[str]:
    """Every secret value in `value` (params, or anything in them)."""
    if isinstance(value, Mapping):
        return [found for key, item in value.items()
                for found in ([item] if key == SECRET_KEY and isinstance(item, str) else secret_values(item))]
    if isinstance(value, list):
        return [found for item in value for found in secret_values(item)]
    return []


def masked(text: str, secrets: list[str]) -> str:
    """`text` with every line of every secret replaced by SECRET_MARKER, longest
    first (so a secret holding another is hidden whole): what any worker says
    about a step (a message, an exception quoting its input) may echo a secret."""
    lines = sorted({line for secret in secrets for line in secret.splitlines() if line.strip()}, key=len, reverse=True)
    for line in lines:
        text = text.replace(line, SECRET_MARKER)
    return text


def stored_definition(definition: definition_pb2.JobDefinition) -> bytes:
    """The definition as the orchestrator keeps and echoes it: deterministically
    serialized, every secret value replaced by SECRET_MARKER. (So a resubmission
    under the same request_id that differs only in a secret is the same request.)"""
    encoded = definition.SerializeToString(deterministic=True)
    if SECRET_KEY.encode() not in encoded:  # a table's keys are encoded as written: no secret anywhere
        return encoded
    copy = definition_pb2.JobDefinition()
    copy.CopyFrom(definition)
    for step in copy.steps:
        if step.HasField("params"):
            _redact_struct(step.params)
    return copy.SerializeToString(deterministic=True)


def _redact_struct(struct: struct_pb2.Struct) -> None:
    for key, value in struct.fields.items():
        if key == SECRET_KEY and value.WhichOneof("kind") == "string_value":
            value.string_value = SECRET_MARKER
        else:
            _redact_value(value)


def _redact_value(value: struct_pb2.Value) -> None:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        _redact_struct(value.struct_value)
    elif kind == "list_value":
        for item in value.list_value.values:
            _redact_value(item)
