"""The timing cache and the plan cache of TensorRT builds, kept beside the calibration cache.

Both are only valid for one TensorRT version on one kind of GPU, so both are keyed by the TensorRT
version, the compute capability and the device name (two GPUs of one capability time kernels
differently; an Orin Nano's tactics are not an AGX Orin's)::

    <cache_dir>/timing-<trt>-sm<cc>-<device>.cache     TensorRT's serialized timing cache
    <cache_dir>/plans/<key>.plan                        finished plans, <key> = SHA-256 of what made them

A rebuild on the same device with the same graph and settings takes the plan from the cache; a
different graph or setting still starts from the device's timing cache, which makes tactic selection
fast. Nothing here imports TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engines.files import write_atomic

PLANS = "plans"


def device_tag(trt_version: str, device: Mapping[str, Any]) -> str:
    """'10.3.0-sm87-orin': TensorRT version, compute capability and device name, safe as a file name."""
    name = re.sub(r"[^a-z0-9]+", "-", str(device.get("gpu_name", "gpu")).lower()).strip("-") or "gpu"
    capability = str(device.get("compute_capability", "0.0")).replace(".", "")
    return f"{trt_version}-sm{capability}-{name}"


class BuildCaches:
    """Where one device's timing cache and plans live under `cache_dir`."""

    def __init__(self, cache_dir: str | os.PathLike, trt_version: str, device: Mapping[str, Any]):
        self.root = Path(cache_dir)
        self.tag = device_tag(trt_version, device)
        self.device = {"tensorrt_version": trt_version, "gpu_name": device.get("gpu_name"),
                       "compute_capability": device.get("compute_capability")}

    @property
    def timing_cache(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f"timing-{self.tag}.cache"

    @property
    def plans(self) -> Path:
        return self.root / PLANS

    def plan_key(self, graph_sha256: str, precision: str, plan: Mapping[str, Any], profile: Mapping[str, Any],
                 settings) -> str:
        """The SHA-256 of everything a plan depends on: graph, precision plan, profile, settings, device."""
        what = {"graph": graph_sha256, "precision": precision, "plan": dict(plan),
                "profile": {k: [list(s) for s in v] for k, v in profile.items()},
                "settings": settings.to_dict(), "device": self.device}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def cached_plan(self, key: str) -> bytes | None:
        path = self.plans / f"{key}.plan"
        return path.read_bytes() if path.is_file() else None

    def keep_plan(self, key: str, serialized: bytes) -> Path:
        return write_atomic(self.plans / f"{key}.plan", serialized)
