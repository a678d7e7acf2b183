"""`mtlora-export`: merge MTLoRA adapters, export ONNX, build and check engines, bundle and benchmark.

The Python API for applications is `open_engine` (torch-free): load a built
engine set of any backend and layout and call it on images or batches.
"""

from __future__ import annotations


def open_engine(path, threads: int | None = None):
    """A built engine set (BUILD/engines/<backend>-<precision>) as an `Engine`; see
    `export.artifacts.engineset.Engine`."""
    from export.artifacts.engineset import open_engine as _open

    return _open(path, threads)


__all__ = ["open_engine"]
