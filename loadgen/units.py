"""Durations as scenario files and flags write them ("500ms", "30s", "2m", "1h", or bare seconds).

The lowest layer: imports nothing of loadgen, so the scenario model, the protocols' own options models
and the command line all read durations the same way.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator

__all__ = ["Duration", "parse_duration"]

_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as "500ms", "30s", "2m", "1h" (bare number: seconds).

    >>> parse_duration("1.5m")
    90.0
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 500ms, 2m")  # noqa: TRY004 (pydantic)
    seconds = None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds is None:
        raise ValueError("expected a duration such as 30s, 500ms, 2m")
    if not math.isfinite(seconds):  # inf and nan (TOML has both; "9" * 400 seconds overflows to inf)
        raise ValueError("not a finite duration")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A pydantic field type: seconds, given as a number or a duration string."""
