"""The engines of one build, loaded as runners with the model's interface (no torch).

A single-layout build has one engine per backend and precision; a split build
has a backbone engine and one head engine per task, which `SplitRunner` chains:
the backbone runs once and each head reads the backbone outputs it needs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines.artifact import EngineArtifact
from engines.registry import get_backend
from export.errors import ExportError

ENGINES_DIR = "engines"
ENGINE_INDEX = "engine.json"  # which graph file became which engine file, per engine directory


@dataclass
class EngineEntry:
    """One built engine set: backend, precision, and its engine file per graph role."""

    backend: str
    precision: str
    directory: Path
    files: dict[str, str] = field(default_factory=dict)  # role ("model", "backbone", "head_<task>") -> engine file
    # What a caller needs to feed it: tasks, output channels, input size, mean, std.
    model: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.precision}"

    def artifacts(self, verify: bool = True) -> dict[str, EngineArtifact]:
        return {role: EngineArtifact.load(self.directory / f, backend=self.backend, verify=verify)
                for role, f in self.files.items()}

    def save(self) -> None:
        from engines.files import write_atomic

        write_atomic(self.directory / ENGINE_INDEX,
                     json.dumps({"backend": self.backend, "precision": self.precision, "files": self.files,
                                 "model": self.model},
                                indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, directory: Path) -> EngineEntry:
        try:
            data = json.loads((directory / ENGINE_INDEX).read_text())
            entry = cls(data["backend"], data["precision"], directory, dict(data["files"]), dict(data.get("model", {})))
        except FileNotFoundError:
            raise ExportError(f"{directory}: no {ENGINE_INDEX}; this engine build did not finish, rebuild it") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ExportError(f"{directory / ENGINE_INDEX}: corrupt ({err}); rebuild the engine") from None
        if any(not isinstance(f, str) or Path(f).name != f for f in entry.files.values()):
            raise ExportError(f"{directory / ENGINE_INDEX}: names files outside its directory; rebuild the engine")
        return entry


def list_engines(build_dir: Path) -> list[EngineEntry]:
    root = Path(build_dir) / ENGINES_DIR
    if not root.is_dir():
        raise ExportError(f"{build_dir}: has no engines/; run 'mtlora-export build' first")
    entries = [EngineEntry.read(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if not entries:
        raise ExportError(f"{build_dir}: engines/ is empty; run 'mtlora-export build' first")
    return entries


class SplitRunner:
    """Backbone once, then each task head on the backbone outputs it takes."""

    def __init__(self, backbone, heads: dict[str, object]):
        self.backbone = backbone
        self.heads = heads
        self.timings: list[float] = []

    def __enter__(self):
        self.backbone.activate()
        for head in self.heads.values():
            head.activate()
        return self

    def __exit__(self, *exc):
        for runner in (self.backbone, *self.heads.values()):
            runner.deactivate()

    @property
    def precision_executed(self) -> str:
        ran = {self.backbone.precision_executed, *(h.precision_executed for h in self.heads.values())}
        return "/".join(sorted(r for r in ran if r)) or "?"

    @property
    def notes(self) -> list[str]:
        return [n for r in (self.backbone, *self.heads.values()) for n in r.notes]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        shared = self.backbone.infer(feed)
        outputs = {}
        for head in self.heads.values():
            outputs.update(head.infer({name: shared[name] for name in head.input_names}))
        self.timings.append(time.perf_counter() - start)
        return outputs


def load_runner(entry: EngineEntry, threads: int | None = None):
    """A runner for the engine set: the backend's own runner, or a SplitRunner for split builds."""
    backend = get_backend(entry.backend)
    kwargs = {}
    if threads:
        kwargs = {"intra_op_threads": threads} if entry.backend == "onnxruntime" else (
            {"num_threads": threads} if entry.backend == "openvino" else {})

    def load(role: str):
        return backend.load(entry.directory / entry.files[role], **kwargs)

    if "model" in entry.files:
        return load("model")
    heads = {role[len("head_"):]: load(role) for role in entry.files if role.startswith("head_")}
    return SplitRunner(load("backbone"), heads)
