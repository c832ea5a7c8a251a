"""Printing and saving benchmark figures, always next to their baselines."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "python": platform.python_version(), "system": platform.platform()}


@dataclass
class Report:
    name: str
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, label: str, value: str, comment: str = "") -> None:
        self.rows.append((label, value, comment))

    def print(self) -> None:
        width = max(len(label) for label, _, _ in self.rows) if self.rows else 10
        value_width = max(len(value) for _, value, _ in self.rows) if self.rows else 10
        info = machine()
        print(f"\n== {self.name} ==  ({info['cpus']} cpus, {info['cpu']}, Python {info['python']})")
        for label, value, comment in self.rows:
            print(f"  {label:<{width}}  {value:>{value_width}}  {comment}")
        for note in self.notes:
            print(f"  note: {note}")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"benchmark": self.name, "machine": machine(), **self.figures}, indent=2) + "\n")


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def fmt_rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}/s"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]
