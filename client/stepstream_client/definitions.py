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

import json
import re
import reprlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from stepstream.orchestrator.v1 import definition_pb2

from stepstream_client.errors import DefinitionError, Violation

JOB_FIELDS = ("name", "timeout", "steps")
STEP_FIELDS = ("name", "type", "depends_on", "timeout", "retries", "retry_backoff", "always_run", "output_limit")

# A definition file is read as YAML or JSON by its suffix, anything else as TOML.
FORMATS = {".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}

# Limits on what a definition may be, so that no file (a huge one, /dev/zero, one
# nested 100,000 deep, a YAML "billion laughs") can exhaust memory or the stack:
# each gives one clear DefinitionError instead.
MAX_DEFINITION_BYTES = 16 * 1024 * 1024
"""The largest file read, and the most text YAML aliases may expand to: the services
refuse requests over 16 MiB, so a larger definition could never be submitted."""
MAX_DEPTH = 20
"""The deepest nesting of tables and lists (the top-level table is 1). Real definitions
use about 6; protobuf refuses worker fields nested about 30 deep, and parsers recurse
once per level."""
MAX_VALUES = 1_000_000
"""The most values (tables, lists, keys, scalars) a definition may hold once YAML
aliases are expanded: ten times the items of the largest fan-out the orchestrator takes
(100,000), and a tiny fraction of what a "billion laughs" expands to."""

# TOML's strings and comments (replaced by one character before keys are counted) and a
# run of more than MAX_DEPTH + 1 dotted key parts: tomllib builds a dotted key's tables in
# time and memory quadratic in its parts (100,000 parts exhaust 24 GiB), so such a key is
# refused before parsing. Anything shorter is parsed and then held to MAX_DEPTH as usual.
_TOML_STRING_OR_COMMENT = re.compile(r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*')
_TOML_DEEP_KEY = re.compile(rf"(?<![\w-])(?:[\w-]+[ \t]*\.[ \t]*){{{MAX_DEPTH + 1},}}[\w-]")

_shown = reprlib.Repr()
_shown.maxstring = _shown.maxother = 60  # a bad value is quoted in an error, never in full


def load_definition(path: Path) -> definition_pb2.JobDefinition:
    """Read a .toml, .yaml, .yml or .json file; DefinitionError if it cannot be read as one."""
    text = _read(path)
    kind = FORMATS.get(path.suffix.lower(), "TOML")
    try:
        data = _parse(text, kind)
    except _Refused as error:
        raise DefinitionError(f"{path} {error.problem}{_at(error.mark)}") from None
    except RecursionError:
        raise DefinitionError(f"{path} is nested more than {MAX_DEPTH} levels deep") from None
    except yaml.YAMLError as error:
        raise DefinitionError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
    except ValueError as error:  # TOMLDecodeError, JSONDecodeError, and too-long integers in any format
        raise DefinitionError(f"{path} is not valid {kind}: {_one_line(str(error))}") from None
    if not isinstance(data, Mapping):
        top = "an object" if kind == "JSON" else "a table"
        raise DefinitionError(f"{path}: expected {top} of job fields at the top level, got {_kind(data)}")
    problem = _out_of_bounds(data)
    if problem:
        raise DefinitionError(f"{path} {problem}")
    return _definition(data)


def _read(path: Path) -> str:
    """The file's text, reading at most MAX_DEFINITION_BYTES + 1 bytes whatever its size."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_DEFINITION_BYTES + 1)
    except OSError as error:
        raise DefinitionError(f"cannot read {path}: {error.strerror or error}") from None
    if len(raw) > MAX_DEFINITION_BYTES:
        raise DefinitionError(f"{path} is larger than {MAX_DEFINITION_BYTES // (1024 * 1024)} MiB, "
                              "the most a definition may be")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DefinitionError(
            f"{path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start})"
        ) from None


def _parse(text: str, kind: str) -> Any:
    if kind == "YAML":
        loader = _BoundedYamlLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    if kind == "JSON":
        return json.loads(text)
    if _TOML_DEEP_KEY.search(_TOML_STRING_OR_COMMENT.sub("s", text)):
        raise _Refused(f"is nested more than {MAX_DEPTH} levels deep", None)
    return tomllib.loads(text)


class _Mark(Protocol):
    """Where in a YAML text (PyYAML's and libyaml's marks alike)."""

    line: int
    column: int


class _Refused(Exception):
    """A document over the limits, found before anything is built (YAML: while composing it)."""

    def __init__(self, problem: str, mark: _Mark | None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.mark = mark


@dataclass(frozen=True)
class _Expanded:
    """What a YAML node amounts to with every alias in it expanded."""

    values: int
    text: int
    height: int  # tables and lists nested in it, itself included


class _BoundedYamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that counts every node as composed, aliases expanded, and stops at
    the limits: an alias bomb is refused after a few dozen nodes (SafeLoader alone would
    build it, and anything walking the result, a repr or protobuf, would expand it),
    and deep nesting is refused before it recurses far."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._outer = 0  # tables and lists around the node being composed
        self._expanded: dict[yaml.Node, _Expanded] = {}

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        if self._outer > MAX_DEPTH:
            raise _Refused(f"is nested more than {MAX_DEPTH} levels deep", event.start_mark)
        alias = isinstance(event, yaml.AliasEvent)
        self._outer += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._outer -= 1
        if node is None:
            return None
        if alias:
            expanded = self._expanded.get(node)
            if expanded is None:
                raise _Refused("has an alias inside the node it refers to", event.start_mark)
        else:
            expanded = self._expand(node)
            self._expanded[node] = expanded
        if self._outer + expanded.height > MAX_DEPTH:
            raise _Refused(f"is nested more than {MAX_DEPTH} levels deep", event.start_mark)
        if expanded.values > MAX_VALUES:
            raise _Refused(f"expands to more than {MAX_VALUES:,} values", event.start_mark)
        if expanded.text > MAX_DEFINITION_BYTES:
            raise _Refused(f"expands to more than {MAX_DEFINITION_BYTES // (1024 * 1024)} MiB of text",
                           event.start_mark)
        return node

    def _expand(self, node: yaml.Node) -> _Expanded:
        if isinstance(node, yaml.ScalarNode):
            return _Expanded(1, len(node.value), 0)
        if isinstance(node, yaml.MappingNode):
            children = [self._expanded[part] for pair in node.value for part in pair]
        else:
            children = [self._expanded[child] for child in node.value]
        return _Expanded(1 + sum(c.values for c in children), sum(c.text for c in children),
                         1 + max((c.height for c in children), default=0))


def _out_of_bounds(data: object) -> str:
    """What makes parsed data too deep or too big ('' if nothing): the same limits as
    the YAML loader's, for TOML, JSON and mappings built in code."""
    values = 0
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        value, outer = stack.pop()
        values += 1
        if values > MAX_VALUES:
            return f"holds more than {MAX_VALUES:,} values"
        if isinstance(value, Mapping | list | tuple):
            if outer + 1 > MAX_DEPTH:
                return f"is nested more than {MAX_DEPTH} levels deep"
            children = [*value.keys(), *value.values()] if isinstance(value, Mapping) else value
            stack.extend((child, outer + 1) for child in children)
    return ""


def _at(mark: _Mark | None) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's message on one line: the problem and where, without the quoted snippet."""
    if isinstance(error, yaml.MarkedYAMLError):
        return f"{error.problem or error.context or 'invalid YAML'}{_at(error.problem_mark or error.context_mark)}"
    return _one_line(str(error))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _kind(value: object) -> str:
    """What was found instead, briefly."""
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return _shown.repr(value)


def definition_from_mapping(data: Mapping[str, Any]) -> definition_pb2.JobDefinition:
    """The message for a mapping of the file's shape; DefinitionError naming every problem."""
    problem = _out_of_bounds(data)
    if problem:
        raise DefinitionError(f"the job definition {problem}")
    return _definition(data)


def _definition(data: Mapping[str, Any]) -> definition_pb2.JobDefinition:
    violations: list[Violation] = []
    definition = definition_pb2.JobDefinition()
    for key in data:
        if key not in JOB_FIELDS:
            violations.append(Violation(_field(key), f"unknown field (expected: {', '.join(JOB_FIELDS)})"))
    definition.name = _text(data, "name", "name", violations)
    definition.timeout = _duration(data, "timeout", "timeout", violations)
    steps = data.get("steps", [])
    if not isinstance(steps, list):
        violations.append(Violation("steps", f"must be a list of steps, got {_kind(steps)}"))
        steps = []
    for index, step in enumerate(steps):
        path = f"steps[{index}]"
        if not isinstance(step, Mapping):
            violations.append(Violation(path, f"must be a table of step fields, got {_kind(step)}"))
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
    step.retries = _whole_number(data, "retries", 32, f"{path}.retries", violations)
    step.output_limit = _whole_number(data, "output_limit", 64, f"{path}.output_limit", violations)
    always_run = data.get("always_run", False)
    if not isinstance(always_run, bool):
        violations.append(Violation(f"{path}.always_run", f"must be true or false, got {_shown.repr(always_run)}"))
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
    for key in [key for key in params if not isinstance(key, str)]:
        violations.append(Violation(f"{path}.{_field(key)}", "field names must be strings"))
        del params[key]
    if params:
        try:
            step.params.update(params)
        except (ValueError, TypeError) as error:
            violations.append(Violation(path, f"a field cannot be sent: {error}"))
    return step


def _whole_number(data: Mapping[str, Any], key: str, bits: int, path: str, violations: list[Violation]) -> int:
    """`data[key]` (0 when absent) if a whole number that fits a signed `bits`-bit field; else 0 and a violation."""
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        violations.append(Violation(path, f"must be a whole number, got {_shown.repr(value)}"))
    elif not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        violations.append(Violation(path, f"out of range (must fit in {bits} bits)"))
    else:
        return value
    return 0


def _field(key: object) -> str:
    """A key as a field path; YAML keys may be numbers or lists."""
    return key if isinstance(key, str) else _shown.repr(key)


def _text(data: Mapping[str, Any], key: str, path: str, violations: list[Violation]) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        violations.append(Violation(path, f"must be a string, got {_shown.repr(value)}"))
        return ""
    return value


def _duration(data: Mapping[str, Any], key: str, path: str, violations: list[Violation]) -> str:
    """Durations travel as text; a bare number means seconds."""
    value = data.get(key, "")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        violations.append(Violation(path, f"must be a duration like '30s', got {_shown.repr(value)}"))
        return ""
    return value if isinstance(value, str) else f"{value}s"
