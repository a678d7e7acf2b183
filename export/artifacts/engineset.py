"""The engines of one build for one backend and precision, loaded as one runner (no torch).

A single-layout engine set has one engine; a split set has a backbone engine and
one head engine per task, which `SplitRunner` chains: the backbone runs once and
each head reads the backbone outputs it needs. `engine.json` in the set's
directory says which graph role became which engine file and what the model's
interface is; every engine's own sidecar is checked against it. A split set may
give its parts their own precisions (`backbone=int8,heads=fp16`): `engine.json`
then records each role's precision in `parts`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines.artifact import EngineArtifact, edited_fields, sidecar_field_digests, sidecar_path_for
from engines.errors import EngineError
from engines.registry import get_backend
from engines.runner import Runner
from export.artifacts.files import read_json, write_json_atomic
from export.artifacts.interface import ModelInterface
from export.errors import ExportError

ENGINE_INDEX = "engine.json"  # which graph file became which engine file, per engine directory


@dataclass
class EngineSet:
    """One built engine set: backend, precision, and its engine file per graph role."""

    backend: str
    precision: str
    directory: Path
    files: dict[str, str] = field(default_factory=dict)  # role ("model", "backbone", "head_<task>") -> engine file
    interface: ModelInterface | None = None  # what a caller feeds it and gets back
    parts: dict[str, str] = field(default_factory=dict)  # role -> precision, when the parts differ
    # role -> {sidecar field: SHA-256} as built: a sidecar's fields are trusted (precision_executed is
    # reported as what ran), so every one is covered, as the engine files are by the sidecar's own hashes.
    sidecars: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.precision}"

    @property
    def layout(self) -> str:
        return "single" if "model" in self.files else "split"

    def artifacts(self, verify: bool = True) -> dict[str, EngineArtifact]:
        """Each role's engine artifact. With `verify`, every file must match its sidecar, and every
        sidecar must describe this set: same backend and precision, and the model outputs the set's
        interface states (a sidecar copied in from another model is refused)."""
        if verify:
            self._check_sidecar_fields()
        artifacts = {role: EngineArtifact.load(self.directory / f, backend=self.backend, verify=verify)
                     for role, f in self.files.items()}
        if verify:
            for role, artifact in artifacts.items():
                self._check_sidecar(role, artifact)
        return artifacts

    def _check_sidecar_fields(self) -> None:
        for role, file in self.files.items():
            sidecar = sidecar_path_for(self.directory / file)
            recorded = self.sidecars.get(role)
            if not recorded:
                raise ExportError(f"{self.directory / ENGINE_INDEX}: records no digest of {sidecar.name} (built by "
                                  "an older version); rebuild the engine")
            if not sidecar_field_digests(sidecar):
                continue  # missing or not a JSON object: loading it says which
            edited = edited_fields(recorded, sidecar)
            if edited:
                raise ExportError(f"{sidecar}: field(s) {', '.join(edited)} differ from what the build recorded in "
                                  f"{ENGINE_INDEX} (the sidecar was edited); rebuild the engine")

    def _check_sidecar(self, role: str, artifact: EngineArtifact) -> None:
        where = f"{self.directory / self.files[role]}"
        expected = self.role_precision(role)
        if artifact.precision_requested != expected:
            raise ExportError(f"{where}: built for {artifact.precision_requested}, but {ENGINE_INDEX} says "
                              f"{expected}; rebuild the engine")
        if self.interface is None or role.startswith("backbone"):
            return
        tasks = [role[len("head_"):]] if role.startswith("head_") else list(self.interface.tasks)
        outputs = {m.name: m.shape for m in artifact.outputs}
        expected = self.interface.output_shapes
        for task in tasks:
            shape = outputs.get(task)
            if shape is None or tuple(shape[1:]) != expected[task]:
                raise ExportError(f"{where}: its outputs {outputs} do not match the model in {ENGINE_INDEX} "
                                  f"({task}: {expected[task]} per image); the engine belongs to another model: "
                                  "rebuild it")

    def role_precision(self, role: str) -> str:
        """The precision the engine of `role` was built in."""
        return self.parts.get(role, self.precision)

    def save(self) -> None:
        index = {"backend": self.backend, "precision": self.precision, "files": self.files,
                 "model": self.interface.to_dict() if self.interface else {}}
        if self.parts:
            index["parts"] = self.parts
        self.sidecars = {role: sidecar_field_digests(sidecar_path_for(self.directory / f))
                         for role, f in self.files.items()}
        index["sidecars"] = self.sidecars
        write_json_atomic(self.directory / ENGINE_INDEX, index)

    @classmethod
    def read(cls, directory: str | Path) -> EngineSet:
        directory = Path(directory)
        index = directory / ENGINE_INDEX
        data = read_json(index, corrupt=f"{index}: corrupt; rebuild the engine",
                         missing=f"{directory}: no {ENGINE_INDEX}; this engine build did not finish, rebuild it")
        try:
            entry = cls(str(data["backend"]), str(data["precision"]), directory, dict(data["files"]),
                        parts={str(r): str(p) for r, p in (data.get("parts") or {}).items()},
                        sidecars={str(r): {str(k): str(v) for k, v in dict(d).items()}
                                  for r, d in (data.get("sidecars") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ExportError(f"{index}: corrupt ({type(err).__name__}: {err}); rebuild the engine") from None
        if any(not isinstance(f, str) or Path(f).name != f for f in entry.files.values()) or not entry.files:
            raise ExportError(f"{index}: names files outside its directory; rebuild the engine")
        if data.get("model"):
            entry.interface = ModelInterface.from_dict(data["model"], str(index),
                                                       remedy="rebuild the engine (mtlora-export build)")
        return entry


def list_engine_sets(build_dir) -> list[EngineSet]:
    from export.artifacts.builddir import BuildDir

    build = build_dir if isinstance(build_dir, BuildDir) else BuildDir(build_dir)
    if not build.engines.is_dir():
        raise ExportError(f"{build.root}: has no engines/; run 'mtlora-export build' first")
    entries = [EngineSet.read(d) for d in build.engine_dirs()]
    if not entries:
        raise ExportError(f"{build.root}: engines/ is empty; run 'mtlora-export build' first")
    return entries


class SplitRunner(Runner):
    """Backbone once, then each task head on the backbone outputs it takes.

    A Runner like any backend's: activated as a whole (if a head fails to start, the
    ones already started are stopped again), its feed checked against the backbone's
    inputs, its time recorded per call.
    """

    def __init__(self, backbone: Runner, heads: Mapping[str, Runner], name: str = "split"):
        super().__init__(name)
        self.backbone = backbone
        self.heads = dict(heads)
        self.selected: tuple[str, ...] | None = None  # the heads the current call runs; None: all

    @property
    def parts(self) -> list[Runner]:
        return [self.backbone, *self.heads.values()]

    def _activate(self) -> None:
        started = []
        try:
            for runner in self.parts:
                runner.activate()
                started.append(runner)
        except BaseException:
            for runner in reversed(started):
                runner.deactivate()
            raise
        self.inputs = list(self.backbone.inputs)
        self.outputs = [m for head in self.heads.values() for m in head.outputs]
        ran = {r.precision_executed for r in self.parts}
        self.precision_executed = "/".join(sorted(r for r in ran if r)) or "?"
        self.notes = [n for r in self.parts for n in r.notes]

    def _deactivate(self) -> None:
        for runner in reversed(self.parts):
            runner.deactivate()

    def run_tasks(self, feed: Mapping[str, np.ndarray], tasks: Sequence[str]) -> dict[str, np.ndarray]:
        """`infer` that runs the backbone once and only the heads of `tasks`: an unchosen head costs nothing.

        Each head's runner records its own calls (`timings`), so what ran can be counted.
        """
        self.selected = tuple(tasks)
        try:
            return self.infer(feed)
        finally:
            self.selected = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shared = self.backbone.infer(feed)
        outputs = {}
        for task, head in self.heads.items():
            if self.selected is None or task in self.selected:
                outputs.update(head.infer({name: shared[name] for name in head.input_names}))
        return outputs


def load_runner(entry: EngineSet, threads: int | None = None) -> Runner:
    """A runner for the engine set: the backend's own runner, or a SplitRunner for split sets."""
    backend = get_backend(entry.backend)

    def load(role: str) -> Runner:
        return backend.load(entry.directory / entry.files[role], threads=threads)

    if entry.layout == "single":
        return load("model")
    heads = {role[len("head_"):]: load(role) for role in entry.files if role.startswith("head_")}
    return SplitRunner(load("backbone"), heads, name=f"{entry.key} (split)")


class Engine:
    """A built engine set as an application uses it: images or batches in, per-task outputs out.

    Torch-free. Use it as a context manager (the runtime is loaded on entry and released on exit)::

        with open_engine("build/engines/onnxruntime-fp16") as engine:
            outputs = engine.predict(image)      # (H, W, 3) uint8 RGB -> {task: (C, size, size)}
            batch = engine.infer(normalised)     # (N, 3, size, size) float32 -> {task: (N, C, size, size)}
    """

    def __init__(self, entry: EngineSet, threads: int | None = None):
        if entry.interface is None:
            raise ExportError(f"{entry.directory}: {ENGINE_INDEX} lacks the model's interface; rebuild the engine")
        self.entry = entry
        self.interface = entry.interface
        self.threads = threads
        self.runner: Runner | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.interface.tasks

    @property
    def precision_executed(self) -> str:
        return self.runner.precision_executed if self.runner is not None else ""

    def __enter__(self) -> Engine:
        self.entry.artifacts(verify=True)
        self.runner = load_runner(self.entry, self.threads)
        try:
            self.runner.activate()
        except EngineError:
            self.runner = None
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.runner is not None:
            self.runner.deactivate()
            self.runner = None

    @property
    def runs_chosen_tasks_only(self) -> bool:
        """Whether `tasks=` skips the other tasks' work: a split set runs only their heads; a single
        graph always runs whole (choose its tasks at build time, `build --tasks`)."""
        return self.entry.layout == "split"

    def choose_tasks(self, tasks: Sequence[str] | str | None) -> tuple[str, ...]:
        """The chosen tasks in the engine's output order; None means all. A name the engine lacks is an error."""
        return choose_tasks(self.tasks, tasks)

    def infer(self, batch: np.ndarray, tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """A normalised (N, 3, size, size) float32 batch -> {task: (N, C, size, size)}, in task order.

        `tasks` keeps only those outputs; a split engine set then runs only their heads.
        """
        if self.runner is None:
            raise ExportError("the engine is not open; use it as `with open_engine(...) as engine:`")
        chosen = self.choose_tasks(tasks)
        feed = {"image": batch}
        if isinstance(self.runner, SplitRunner) and chosen != self.tasks:
            outputs = self.runner.run_tasks(feed, chosen)
        else:
            outputs = self.runner.infer(feed)
        return {t: np.asarray(outputs[t]) for t in chosen}

    def predict(self, image: np.ndarray, tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One (H, W, 3) uint8 RGB image, preprocessed as at inference -> {task: (C, size, size)}."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ExportError(f"predict takes one (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}; "
                              "for a normalised batch use infer()")
        outputs = self.infer(self.interface.preprocess(image)[None], tasks)
        return {t: v[0] for t, v in outputs.items()}

    @property
    def last_seconds(self) -> float | None:
        return self.runner.last_inference_time() if self.runner is not None else None


def choose_tasks(available: Sequence[str], tasks: Sequence[str] | str | None) -> tuple[str, ...]:
    """`tasks` (names, or one comma-separated string) checked against `available`, in its order."""
    if tasks is None:
        return tuple(available)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    if any(not t.strip() for t in names):  # the words of `build --tasks`, so both commands say it alike
        given = tasks if isinstance(tasks, str) else ",".join(names)
        raise ExportError(f"'{given}' has an empty task name; give a comma-separated list like semseg,sal "
                          f"(this engine has: {', '.join(available)})")
    unknown = [t for t in names if t not in available]
    if not names or unknown:
        what = f"unknown task(s) {', '.join(unknown)}" if unknown else "no task chosen"
        raise ExportError(f"{what}; this engine has: {', '.join(available)}")
    return tuple(t for t in available if t in names)


def open_engine(path: str | Path, threads: int | None = None) -> Engine:
    """An engine set directory (BUILD/engines/<backend>-<precision>), or a file in it, as an `Engine`."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    if not (directory / ENGINE_INDEX).is_file():
        raise ExportError(f"{path}: not an engine directory (expected BUILD/engines/<backend>-<precision>)")
    return Engine(EngineSet.read(directory), threads)
