"""Job definition files (TOML or YAML) and dicts, turned into the JobDefinition message.

The file shape is the message's shape, with a step's worker fields written
next to its own fields instead of under `params`:

    [[steps]]
    name = "fetch"
    type = "command"
    command = ["sh", "-c", "echo hi"]   # -> params.command

Only the shape is checked here; what the fields mean is checked by the
orchestrator, which rejects a bad definition whole (INVALID_ARGUMENT, one
field violation per problem).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from stepstream.v1 import definition_pb2

from stepstream_client.errors import DefinitionError, Violation

JOB_FIELDS = ("name", "timeout", "steps")
STEP_FIELDS = ("name", "type", "depends_on", "timeout", "retries", "retry_backoff", "always_run")


def load_definition(path: Path) -> definition_pb2.JobDefinition:
    """Read a .toml, .yaml or .yml file; DefinitionError if it cannot be read as one."""
    try:
        text = path.read_text()
    except OSError as error:
        raise DefinitionError(f"cannot read {path}: {error.strerror or error}") from error
    try:
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise DefinitionError(f"{path} is not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {error}") from error
    if not isinstance(data, Mapping):
        raise DefinitionError(f"{path}: expected a table of job fields at the top level")
    return definition_from_mapping(data)


def definition_from_mapping(data: Mapping[str, Any]) -> definition_pb2.JobDefinition:
    violations: list[Violation] = []
    definition = definition_pb2.JobDefinition()
    for key in data:
        if key not in JOB_FIELDS:
            violations.append(Violation(key, f"unknown field (expected: {', '.join(JOB_FIELDS)})"))
    definition.name = _text(data, "name", "name", violations)
    definition.timeout = _duration(data, "timeout", "timeout", violations)
    steps = data.get("steps", [])
    if not isinstance(steps, list):
        violations.append(Violation("steps", "must be a list of tables ([[steps]])"))
        steps = []
    for index, step in enumerate(steps):
        path = f"steps[{index}]"
        if not isinstance(step, Mapping):
            violations.append(Violation(path, "must be a table"))
            continue
        definition.steps.append(_step(step, path, violations))
    if violations:
        raise DefinitionError("the job definition has the wrong shape", violations)
    return definition


def _step(data: Mapping[str, Any], path: str, violations: list[Violation]) -> definition_pb2.StepDefinition:
    step = definition_pb2.StepDefinition(
        name=_text(data, "name", f"{path}.name", violations),
        type=_text(data, "type", f"{path}.type", violations),
        timeout=_duration(data, "timeout", f"{path}.timeout", violations),
        retry_backoff=_duration(data, "retry_backoff", f"{path}.retry_backoff", violations),
    )
    retries = data.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int):
        violations.append(Violation(f"{path}.retries", f"must be a whole number, got {retries!r}"))
    elif not -(2**31) <= retries < 2**31:
        violations.append(Violation(f"{path}.retries", f"out of range: {retries}"))
    else:
        step.retries = retries
    always_run = data.get("always_run", False)
    if not isinstance(always_run, bool):
        violations.append(Violation(f"{path}.always_run", f"must be true or false, got {always_run!r}"))
    else:
        step.always_run = always_run
    if "depends_on" in data:
        depends_on = data["depends_on"]
        if isinstance(depends_on, str):
            depends_on = [depends_on]
        if not isinstance(depends_on, list) or not all(isinstance(name, str) for name in depends_on):
            violations.append(Violation(f"{path}.depends_on", "must be a step name or a list of step names"))
        else:
            step.depends_on.steps.extend(depends_on)
    params = {key: value for key, value in data.items() if key not in STEP_FIELDS}
    if params:
        try:
            step.params.update(params)
        except (ValueError, TypeError) as error:
            violations.append(Violation(f"{path}", f"a field cannot be sent: {error}"))
    return step


def _text(data: Mapping[str, Any], key: str, path: str, violations: list[Violation]) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        violations.append(Violation(path, f"must be a string, got {value!r}"))
        return ""
    return value


def _duration(data: Mapping[str, Any], key: str, path: str, violations: list[Violation]) -> str:
    """Durations travel as text; a bare number means seconds."""
    value = data.get(key, "")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        violations.append(Violation(path, f"must be a duration like '30s', got {value!r}"))
        return ""
    return value if isinstance(value, str) else f"{value}s"
