"""Human durations: "500ms", "30s", "10m", "1h30m", "2d", or a plain number of seconds."""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Seconds for `text`; ValueError with a readable message when it is not a duration."""
    cleaned = text.strip().lower().replace(" ", "")
    if not cleaned:
        raise ValueError("empty duration")
    try:
        value = float(cleaned)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError(f"invalid duration {text!r} (use e.g. 500ms, 30s, 10m, 1h30m)")
        if value < 0:
            raise ValueError(f"negative duration {text!r}")
        return value
    position = 0
    total = 0.0
    for match in _PART.finditer(cleaned):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(cleaned) or position == 0 or not math.isfinite(total):
        raise ValueError(f"invalid duration {text!r} (use e.g. 500ms, 30s, 10m, 1h30m)")
    return total
