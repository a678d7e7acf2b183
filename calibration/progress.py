"""Progress lines with a time estimate for long passes over calibration data (hashing, calibrating).

A pass over 100,000 calibration images takes minutes; without a word it looks hung. A pass that
ends within `every_s` stays quiet, so small sets print nothing extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")
EVERY_S = 5.0  # seconds between two progress lines


def duration(seconds: float) -> str:
    """A duration as people read it: 42 s, 3 min 5 s, 1 h 20 min."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def with_progress(items: Iterable[Item], *, total: int | None, what: str, say: Callable[[str], None] | None,
                  per_unit: int = 1, every_s: float | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Iterator[Item]:
    """`items`, saying every `every_s` seconds how many of `total` units (`per_unit` items each, e.g. the
    chunks of one sample) are done and about how long is left."""
    if say is None:
        yield from items
        return
    every_s = EVERY_S if every_s is None else every_s
    start = last = clock()
    done = 0
    for item in items:
        yield item
        done += 1
        now = clock()
        if now - last < every_s:
            continue
        last = now
        elapsed, units = now - start, done / per_unit
        if total:
            left = elapsed / units * max(total - units, 0)
            say(f"[calibrate] {what}: {int(units):,}/{total:,} ({100 * units / total:.0f}%), "
                f"{duration(elapsed)} so far, about {duration(left)} left")
        else:
            say(f"[calibrate] {what}: {int(units):,} done in {duration(elapsed)}")
