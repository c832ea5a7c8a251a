"""Spawns child units of work over `items` (or `count`), with bounded concurrency.

    type = "fanout"
    items = ["a", "b"]          # or: count = 1000 (items are then "0".."999")
    concurrency = 10            # children running at once (default 10)
    max_child_failures = 1      # default 0
    child = { type = "command", command = ["echo", "{item}"], timeout = "5s", retries = 1 }

`{item}` and `{index}` (0-based) are substituted in every string of `child`,
in one pass over that string: text an item brings in is never scanned again, so
an item may itself contain "{index}" or "{item}" (see FanoutPlan.child_execution).
Substituted is not quoted: spliced into a shell script (`["sh", "-c", "echo
{item}"]`) an item is code. So a command child also finds its item and index
in its environment, STEPSTREAM_ITEM and STEPSTREAM_INDEX, which a script
reads as data: `["sh", "-c", "echo \"$STEPSTREAM_ITEM\""]`.
How the step's outcome follows from its children is in domain/rules.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, overload

from orchestrator_svc.workers import (
    Execution,
    FanoutPlan,
    FanoutWorker,
    Field,
    FieldViolation,
    Params,
    WorkerCatalog,
    check_child,
    check_fields,
    parse_child,
    quoted,
)
from orchestrator_svc.workers.command import FANOUT_CHILD_ENV

MAX_CHILDREN = 100_000
DEFAULT_CONCURRENCY = 10
FIELDS = (
    Field("items", "list"),
    Field("count", "integer", minimum=0),
    # More than MAX_CHILDREN would mean nothing for either, so a larger value is a mistake.
    Field("concurrency", "integer", minimum=1, maximum=MAX_CHILDREN),
    Field("max_child_failures", "integer", minimum=0, maximum=MAX_CHILDREN),
    Field("child", "table", required=True),
)


class ItemsFanoutWorker(FanoutWorker):
    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> list[FieldViolation]:
        violations = check_fields(params, path, FIELDS)
        if ("items" in params) == ("count" in params):
            violations.append(FieldViolation(f"{path}.items", "set exactly one of `items` or `count`"))
        size = len(params["items"]) if isinstance(params.get("items"), list) else params.get("count", 0)
        if isinstance(size, int | float) and size > MAX_CHILDREN:
            violations.append(FieldViolation(f"{path}.{'items' if 'items' in params else 'count'}",
                                             f"at most {MAX_CHILDREN} children, got {int(size)}"))
        for position, item in enumerate(params.get("items", []) if isinstance(params.get("items"), list) else []):
            if not isinstance(item, str | int | float) or isinstance(item, bool):
                violations.append(
                    FieldViolation(f"{path}.items[{position}]", f"must be a string or number, got {quoted(item)}")
                )
        child = params.get("child")
        if isinstance(child, Mapping):
            violations.extend(check_child(child, f"{path}.child", catalog))
        return violations

    def plan(self, params: Params) -> FanoutPlan:
        # Read an item at a time as its child starts: a plan of MAX_CHILDREN costs nothing per child.
        return FanoutPlan(
            items=_ItemTexts(params["items"] if "items" in params else range(int(params["count"]))),
            concurrency=int(params.get("concurrency", DEFAULT_CONCURRENCY)),
            max_child_failures=int(params.get("max_child_failures", 0)),
            child=_child(params["child"]),
        )


def _child(table: Params) -> Execution:
    """The child's execution; a command child's `env` gains FANOUT_CHILD_ENV
    ("command" as the built-in worker is registered), over its own names."""
    child = parse_child(table)
    if child.type != "command":
        return child
    return replace(child, params={**child.params, "env": {**child.params.get("env", {}), **FANOUT_CHILD_ENV}})


def _item_text(item: Any) -> str:
    if isinstance(item, float) and item.is_integer():
        return str(int(item))
    return str(item)


class _ItemTexts(Sequence[str]):
    """The definition's `items` (or `count`'s range) as the children's item
    texts, each converted when read rather than all copied up front."""

    def __init__(self, items: Sequence[Any]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return _ItemTexts(self._items[index])
        return _item_text(self._items[index])
