"""The runner interface every backend implements: a context manager with a checked, timed `infer`."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from engines.artifact import TensorMeta
from engines.errors import EngineError


class Runner:
    """Base class of every backend runner: a context manager with a checked, timed `infer`.

    Subclasses implement `_activate`, `_deactivate`, `_infer` and fill `self.inputs` / `self.outputs`
    (lists of TensorMeta) in `_activate`.
    """

    def __init__(self, name: str):
        self.name = name
        self.inputs: list[TensorMeta] = []
        self.outputs: list[TensorMeta] = []
        self.timings: list[float] = []
        self.notes: list[str] = []
        self.precision_executed: str = ""
        self.is_active = False

    # lifecycle --------------------------------------------------------------------------
    def activate(self) -> Runner:
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc_info) -> None:
        self.deactivate()

    # inference --------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [m.name for m in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [m.name for m in self.outputs]

    def last_inference_time(self) -> float | None:
        """Seconds the last `infer` spent in the backend (checks excluded), or None before the first."""
        return self.timings[-1] if self.timings else None

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise EngineError(f"runner {self.name} is not active; use it as `with runner:` or call activate()")
        feed = self.check_feed(feed)
        start = time.perf_counter()
        outputs = self._infer(feed)
        self.timings.append(time.perf_counter() - start)
        return outputs

    def check_feed(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names, dtypes and shapes against the model's inputs; returns contiguous arrays."""
        if not isinstance(feed, Mapping):
            raise EngineError(f"feed must be a dict of input name -> numpy array, got {type(feed).__name__}")
        expected = {m.name: m for m in self.inputs}
        missing = [n for n in expected if n not in feed]
        unknown = [n for n in feed if n not in expected]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if unknown:
                parts.append(f"unexpected {unknown}")
            raise EngineError(
                f"{self.name}: feed names do not match the model ({'; '.join(parts)}); "
                f"expected {[m.describe() for m in self.inputs]}"
            )
        checked = {}
        for name, meta in expected.items():
            array = feed[name]
            if not isinstance(array, np.ndarray):
                raise EngineError(f"{self.name}: input '{name}' must be a numpy array, got {type(array).__name__}")
            if array.dtype != meta.dtype:
                raise EngineError(
                    f"{self.name}: input '{name}' has dtype {array.dtype}, the model expects "
                    f"{np.dtype(meta.dtype).name}; convert it with .astype(np.{np.dtype(meta.dtype).name})"
                )
            if not shape_matches(array.shape, meta.shape):
                raise EngineError(
                    f"{self.name}: input '{name}' has shape {tuple(array.shape)}, the model expects "
                    f"{meta.describe()} (? = any size)"
                )
            checked[name] = np.ascontiguousarray(array)
        return checked

    # to implement -----------------------------------------------------------------------
    def _activate(self) -> None:
        raise NotImplementedError

    def _deactivate(self) -> None:
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def shape_matches(actual: Sequence[int], expected: Sequence[int | None]) -> bool:
    return len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected, strict=True))
