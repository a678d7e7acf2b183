"""What counts as a number in a file a user hands us, and counting what is not a number in an array,
for the one-line refusals of every command that reads configs, records or arrays."""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any) -> bool:
    """An int or a float as JSON gives them: true and false are bools, not numbers, though Python's bool is an int."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A number that is neither NaN nor an infinity (Python's JSON reader takes NaN and Infinity)."""
    return is_number(value) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    """An int that is not a bool: 64.0 and true are not counts."""
    return isinstance(value, int) and not isinstance(value, bool)


def count_non_finite(a) -> str:
    """'' when every value of a numpy array is finite (or it holds no floats), else how many are not:
    '2 NaN, 1 +Inf'."""
    import numpy as np

    if a.dtype.kind != "f":
        return ""
    counts = {"NaN": int(np.isnan(a).sum()), "+Inf": int(np.isposinf(a).sum()), "-Inf": int(np.isneginf(a).sum())}
    return ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
