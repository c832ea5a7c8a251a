"""Spawns child units of work over `items` (or `count`), with bounded concurrency.

    type = "fanout"
    items = ["a", "b"]          # or: count = 1000 (items are then "0".."999")
    concurrency = 10            # children running at once (default 10)
    max_child_failures = 1      # default 0
    child = { type = "command", command = ["echo", "{item}"], timeout = "5s", retries = 1 }

`{item}` and `{index}` (0-based) are substituted in every string of `child`,
in one pass over that string: text an item brings in is never scanned again, so
an item may itself contain "{index}" or "{item}" (see FanoutPlan.child_execution).
How the step's outcome follows from its children is in domain/rules.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator_svc.workers import (
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

MAX_CHILDREN = 100_000
DEFAULT_CONCURRENCY = 10
FIELDS = (
    Field("items", "list"),
    Field("count", "integer", minimum=0),
    Field("concurrency", "integer", minimum=1),
    Field("max_child_failures", "integer", minimum=0),
    Field("child", "table", required=True),
)
# More than MAX_CHILDREN would mean nothing for either, so a larger value is a mistake.
BOUNDED_BY_MAX_CHILDREN = ("concurrency", "max_child_failures")


class ItemsFanoutWorker(FanoutWorker):
    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> list[FieldViolation]:
        violations = check_fields(params, path, FIELDS)
        if ("items" in params) == ("count" in params):
            violations.append(FieldViolation(f"{path}.items", "set exactly one of `items` or `count`"))
        size = len(params["items"]) if isinstance(params.get("items"), list) else params.get("count", 0)
        if isinstance(size, int | float) and size > MAX_CHILDREN:
            violations.append(FieldViolation(f"{path}.{'items' if 'items' in params else 'count'}",
                                             f"at most {MAX_CHILDREN} children, got {int(size)}"))
        for name in BOUNDED_BY_MAX_CHILDREN:
            value = params.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_CHILDREN:
                violations.append(FieldViolation(f"{path}.{name}", f"must be at most {MAX_CHILDREN}, got {value:.15g}"))
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
        if "items" in params:
            items = [_item_text(item) for item in params["items"]]
        else:
            items = [str(index) for index in range(int(params["count"]))]
        return FanoutPlan(
            items=items,
            concurrency=int(params.get("concurrency", DEFAULT_CONCURRENCY)),
            max_child_failures=int(params.get("max_child_failures", 0)),
            child=parse_child(params["child"]),
        )


def _item_text(item: Any) -> str:
    if isinstance(item, float) and item.is_integer():
        return str(int(item))
    return str(item)
