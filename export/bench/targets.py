"""What a benchmark times: the engines of a build, plain ONNX files, and PyTorch eager."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.checking.results import Report, TaskResult
from export.onnx.flops import count_flops
from export.pipeline.speed import engine_set_bytes

Say = Callable[[str], None]

# Row statuses, from the build's report.json.
PASSED, FAILED_ACCURACY, FAILED_BUILD, NOT_CHECKED = (
    "built, passed", "built, failed accuracy", "failed to build", "built, not checked")
REFERENCE, UNCHECKED, FAILED_RUN = "the reference", "not checked", "failed to run"


@dataclass
class Target:
    """One row group of the benchmark: what to load, and what the build's report says about it."""

    name: str  # e.g. "openvino-int8", "pytorch-unmerged"
    kind: str  # engine | onnx | torch
    load: dict[str, Any]  # what the worker needs to load it
    backend: str
    precision: str  # requested
    status: str
    size_bytes: int | None = None
    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> summary from report.json
    precision_executed: str = ""
    flops_per_image: float | None = None  # None: the model's count
    batch_sizes: tuple[int, ...] | None = None  # None: BenchOptions.batch_sizes
    notes: list[str] = field(default_factory=list)


def task_summary(result: TaskResult) -> dict[str, Any]:
    """The accuracy of one task as the benchmark's JSON and tables show it."""
    summary: dict[str, Any] = {"passed": result.passed, "cosine": result.tensor.cosine}
    if result.agreement is not None:
        summary["agreement"] = result.agreement
    if result.angle_deg is not None:
        summary["angle_deg"] = result.angle_deg
    if result.metrics is not None:
        name = result.metrics.primary
        summary.update(metric=name, value=result.metrics.engine[name], reference=result.metrics.reference[name],
                       drop=result.metrics.drop, higher_is_better=result.metrics.higher_is_better)
    return summary


def engine_targets(build_dir: Path, report: Report | None, failures: dict[str, str] | None = None) -> list[Target]:
    """One target per engine in the build, with its status and accuracy from report.json."""
    from export.artifacts.engineset import list_engine_sets

    targets = []
    for entry in list_engine_sets(build_dir):
        engine = report.engine(entry.key) if report is not None else None
        status = NOT_CHECKED if engine is None else (PASSED if engine.passed else FAILED_ACCURACY)
        accuracy = {t: task_summary(r) for t, r in engine.tasks.items()} if engine is not None else {}
        executed = engine.engine.precision_executed if engine is not None else ""
        targets.append(Target(entry.key, "engine", {"directory": str(entry.directory)}, entry.backend,
                              entry.precision, status, engine_set_bytes(entry), accuracy, executed))
    for key, message in (failures or {}).items():
        backend, _, precision = key.partition("-")
        targets.append(Target(key, "engine", {}, backend, precision, FAILED_BUILD, notes=[message]))
    return targets


def torch_targets(checkpoint: Path, img_size: int | None = None) -> list[Target]:
    """PyTorch eager in fp32, as trained (unmerged) and with the task-agnostic adapters merged."""
    weights = checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint
    size = weights.stat().st_size if weights.is_file() else None
    return [Target(f"pytorch-{form}", "torch", {"checkpoint": str(checkpoint), "img_size": img_size,
                                                "merged": form == "merged"},
                   "pytorch", "fp32", REFERENCE if form == "unmerged" else UNCHECKED, size,
                   precision_executed="fp32")
            for form in ("unmerged", "merged")]


def onnx_target(name: str, path: Path, status: str = UNCHECKED, count: bool = True) -> Target:
    """A plain fp32 ONNX file on ONNX Runtime's CPU provider, with its own FLOP count."""
    flops = count_flops(path)["flops"] if count else None
    return Target(name, "onnx", {"path": str(path)}, "onnxruntime", "fp32", status, path.stat().st_size,
                  precision_executed="fp32", flops_per_image=flops)


# The application's view of an engine, timed beside its `infer` row: one task at run time, and a
# generated video end to end (decode -> preprocess -> infer -> overlay -> encode).
VIDEO_FRAMES = 48
VIDEO_FRAME_SIZE = (640, 480)  # (width, height): a camera's frame, resized by the preprocessing as on a device


def runtime_targets(build_dir: Path, precision: str = "fp32", *, all_tasks: bool = False,
                    video: bool = True) -> list[Target]:
    """For each engine set of `precision` in the build: one task at run time (with `all_tasks`, also the
    same engine asked for every task, when no other row of the benchmark times it), and a video end to end
    (with `video`, when OpenCV, the `video` extra, is installed). A split build's rows say `split`."""
    import importlib.util

    from export.artifacts.engineset import list_engine_sets

    video = video and importlib.util.find_spec("cv2") is not None
    targets = []
    for entry in list_engine_sets(build_dir):
        if entry.precision != precision or entry.interface is None:
            continue
        task = entry.interface.tasks[0]
        split = entry.layout == "split"
        name = f"{entry.key}{' split' if split else ''}"
        how = ("the backbone and its head run, the other heads do not" if split
               else "a single graph runs whole; only the output is dropped")
        base = {"directory": str(entry.directory)}
        if all_tasks:
            targets.append(Target(f"{name} [all tasks]", "engine", base, entry.backend, entry.precision, UNCHECKED,
                                  batch_sizes=(1,), notes=[f"{entry.layout} layout, every task"]))
        targets.append(Target(f"{name} [{task} only]", "engine", {**base, "tasks": [task]}, entry.backend,
                              entry.precision, UNCHECKED, batch_sizes=(1,),
                              notes=[f"{entry.layout} layout, one task of {len(entry.interface.tasks)} at run time: "
                                     f"{how}"]))
        if not video:
            continue
        targets.append(Target(f"{name} [video end to end]", "video",
                              {**base, "frames": VIDEO_FRAMES, "frame_size": list(VIDEO_FRAME_SIZE)},
                              entry.backend, entry.precision, UNCHECKED, batch_sizes=(1,),
                              notes=[f"a generated {VIDEO_FRAME_SIZE[0]}x{VIDEO_FRAME_SIZE[1]} clip of "
                                     f"{VIDEO_FRAMES} frames, decode to encoded overlay of every task, pipelined; "
                                     "images/s is frames over the whole run, p50 the time between frames written"]))
    return targets
