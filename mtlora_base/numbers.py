"""Counting what is not a number in an array, for the one-line refusals of every command that reads
arrays (evaluation sets, calibration data, `mtlora predict`'s inputs)."""

from __future__ import annotations


def count_non_finite(a) -> str:
    """'' when every value of a numpy array is finite (or it holds no floats), else how many are not:
    '2 NaN, 1 +Inf'."""
    import numpy as np

    if a.dtype.kind != "f":
        return ""
    counts = {"NaN": int(np.isnan(a).sum()), "+Inf": int(np.isposinf(a).sum()), "-Inf": int(np.isneginf(a).sum())}
    return ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
