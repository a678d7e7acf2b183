"""Export a (merged) MultiTaskSwin to ONNX, as one graph or as a shared backbone plus per-task heads.

Layouts:

- `single`: `model.onnx`, input `image` (N, 3, H, W) float32 with a dynamic
  batch, one output per task named after it, in config order.
- `split`: `backbone.onnx` computes everything the tasks share, once;
  `head_<task>.onnx` turns the backbone outputs into that task's map. See
  `ExportModel.backbone_output_names` and docs/export.md for the interface.

Graphs come from the TorchScript-based exporter (`dynamo=False`), which
traces the merged, folded model (`export.onnx.fold.ExportModel`) at a fixed input
size; then onnxslim folds constants and removes dead nodes, the ONNX checker
runs with `full_check`, and the metadata goes into `metadata_props`. The same
checkpoint and settings give byte-identical files.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from engines.graph_purpose import EVERY_ENGINE, purpose_metadata
from export.artifacts.files import write_bytes_atomic
from export.errors import ExportError
from export.onnx.fold import ExportModel
from mtlora import __version__
from mtlora.config import check_input_size
from mtlora.errors import ConfigError
from mtlora.merge import is_merged, merge_model

LAYOUTS = ("single", "split")
MIN_OPSET = 17  # LayerNormalization is one node from opset 17 on
INPUT_NAME = "image"
BATCH_DIM = "batch"


# The modules whose code decides what an export contains: a change to any of them makes a new export,
# even from the same checkpoint with the same options (a build's cached export step keys on this).
EXPORTER_MODULES = ("export.onnx.fold", "export.onnx.exporter", "mtlora.merge", "export.onnx.reference_outputs",
                    "export.artifacts.manifest", "mtlora.model", "mtlora.adapters", "mtlora.attention", "mtlora.heads",
                    "mtlora.decoders", "mtlora.config", "mtlora.tasks")


def exporter_fingerprint() -> str:
    """SHA-256 of the exporting code and of the torch, onnx and onnxslim versions."""
    import hashlib
    import importlib
    import importlib.metadata

    digest = hashlib.sha256()
    for name in EXPORTER_MODULES:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    for package in ("torch", "onnx", "onnxslim"):
        try:
            digest.update(f"{package} {importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{package} absent".encode())
    return digest.hexdigest()


@dataclass
class ExportResult:
    """What `export_onnx` wrote: file names are relative to `out_dir`."""

    out_dir: Path
    layout: str
    tasks: tuple[str, ...]
    opset: int
    input_shape: tuple[int | str, ...]
    files: dict[str, str] = field(default_factory=dict)  # graph role ("model", "backbone", "head_<task>") -> file
    backbone_outputs: tuple[str, ...] = ()
    dropped_parameters: int = 0  # task adapters that cannot reach an output (see export.onnx.fold)

    @property
    def paths(self) -> list[Path]:
        return [self.out_dir / name for name in self.files.values()]


def select_tasks(model_tasks: Sequence[str], tasks: Sequence[str] | None) -> tuple[str, ...]:
    """The requested tasks in the model's order; an unknown task is an error listing the model's tasks."""
    if tasks is None:
        return tuple(model_tasks)
    tasks = list(tasks)
    if not tasks:
        raise ExportError(f"no tasks selected; the model has: {', '.join(model_tasks)}")
    unknown = [t for t in tasks if t not in model_tasks]
    if unknown:
        raise ExportError(
            f"task(s) {', '.join(unknown)} not in the model; the model has: {', '.join(model_tasks)}"
        )
    if len(set(tasks)) != len(tasks):
        raise ExportError(f"task list {','.join(tasks)} names a task twice")
    return tuple(t for t in model_tasks if t in tasks)


def prepare_export_model(model: torch.nn.Module, tasks: Sequence[str] | None = None,
                         postprocess: bool = False) -> ExportModel:
    """A merged, folded fp32 copy of `model` for the selected tasks; `model` itself is not touched."""
    selected = select_tasks(model.tasks, tasks)
    work = copy.deepcopy(model).float().eval()
    if not is_merged(work):
        merge_model(work, safe=True)
    with torch.no_grad():
        return ExportModel(work, selected, postprocess=postprocess).eval()


def _metadata(model: torch.nn.Module, tasks: tuple[str, ...], layout: str, graph: str,
              source_sha256: str | None) -> dict[str, str]:
    config = model.config
    img = config.swin.img_size
    meta = {
        "graph": graph,
        "layout": layout,
        "tasks": json.dumps(list(tasks)),
        "output_channels": json.dumps({t: config.task_channels[t] for t in tasks}),
        "input_size": json.dumps([config.swin.in_chans, img, img]),
        "mean": json.dumps(list(config.mean)),
        "std": json.dumps(list(config.std)),
        "adapter_config": json.dumps(config.to_dict()["adapter"], sort_keys=True),
        "model_config": json.dumps(config.to_dict(), sort_keys=True),
        "mtlora_export_version": __version__,
        # The fp32 export: every backend builds from it (engines.graph_purpose; the TensorRT lint reads it).
        **purpose_metadata(EVERY_ENGINE),
    }
    if source_sha256:
        meta["source_sha256"] = source_sha256
    return meta


def _trace(module: ExportModel, args: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str],
           opset: int, batch_dynamic: bool) -> onnx.ModelProto:
    buffer = io.BytesIO()
    dynamic_axes = {name: {0: BATCH_DIM} for name in input_names + output_names} if batch_dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated but traces Swin's window reshapes with a symbolic batch;
        # its deprecation and tracer warnings are not actionable for a user.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, args, buffer, dynamo=False, opset_version=opset, input_names=input_names,
                output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
        except (RuntimeError, ValueError, TypeError) as err:  # the tracer's and the exporter's own errors
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(f"the model could not be exported to ONNX opset {opset} ({first}); "
                              "re-run with --debug for the traceback and report it") from err
    return onnx.load_from_string(buffer.getvalue())


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slimmed = onnxslim.slim(proto)
    if slimmed is None:
        raise ExportError("onnxslim failed to simplify the exported graph")
    return slimmed


def _check_batch_dim(proto: onnx.ModelProto, name: str, batch_dynamic: bool) -> None:
    for value in list(proto.graph.input) + list(proto.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if batch_dynamic and dim.dim_param != BATCH_DIM:
            raise ExportError(f"{name}: '{value.name}' lost its dynamic batch dimension during export")


def _finish(proto: onnx.ModelProto, name: str, metadata: dict[str, str], batch_dynamic: bool,
            simplify: bool) -> bytes:
    if simplify:
        proto = _simplify(proto)
    _check_batch_dim(proto, name, batch_dynamic)
    proto.producer_name = "mtlora-export"
    proto.producer_version = __version__
    proto.doc_string = ""
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        proto.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"{name}: exported graph fails the ONNX checker: {err}") from None
    return proto.SerializeToString(deterministic=True)


def export_onnx(
    model: torch.nn.Module,
    out_dir: str | Path,
    layout: str = "single",
    tasks: Sequence[str] | None = None,
    opset: int = MIN_OPSET,
    batch_dynamic: bool = True,
    source_sha256: str | None = None,
    simplify: bool = True,
    progress: Callable[[str], None] | None = None,
    postprocess: bool = False,
) -> ExportResult:
    """Write the ONNX graph(s) of `model` (merged or not; it is not modified) into `out_dir`.

    Args:
        layout: `single` (model.onnx) or `split` (backbone.onnx + head_<task>.onnx).
        tasks: a subset of the model's tasks; None exports all of them.
        opset: ONNX opset, at least 17.
        batch_dynamic: make the batch dimension symbolic (`batch`); H and W are always fixed.
        source_sha256: SHA-256 of the source checkpoint, recorded in the metadata.
        progress: called with one line before each long step.
        postprocess: outputs as a device application wants them (`mtlora.tasks` post-processing:
            class ids as uint8, probabilities, unit normals) instead of raw logits.
    """
    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; use {MIN_OPSET} or newer (LayerNormalization)")
    selected = select_tasks(model.tasks, tasks)
    config = model.config
    img = config.swin.img_size
    try:
        check_input_size(config.swin, img)
    except ConfigError as err:
        raise ExportError(str(err)) from None
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory; choose another output path")
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _line: None)

    say("merging and folding adapters")
    folded = prepare_export_model(model, selected, postprocess)
    if folded.dropped_parameters:
        say(f"dropped {folded.dropped_parameters:,} task-adapter parameters that cannot reach an output "
            "(task adapters of blocks that pass no task stream on)")
    generator = torch.Generator().manual_seed(0)
    # Batch 2, so that no reshape is specialised to a batch of one.
    image = torch.randn(2, config.swin.in_chans, img, img, generator=generator)
    result = ExportResult(out_dir, layout, selected, opset, (BATCH_DIM if batch_dynamic else 2, config.swin.in_chans, img, img),
                          dropped_parameters=folded.dropped_parameters)

    def write(graph: str, file: str, args, input_names, output_names, role) -> None:
        say(f"exporting {file}")
        folded.role = role
        proto = _trace(folded, args, input_names, output_names, opset, batch_dynamic)
        meta = _metadata(model, selected, layout, graph, source_sha256)
        if postprocess:
            meta["postprocess"] = "true"
        if role[0] == "backbone":
            meta["backbone_outputs"] = json.dumps(output_names)
        payload = _finish(proto, file, meta, batch_dynamic, simplify)
        write_bytes_atomic(out_dir / file, payload)
        result.files[graph] = file

    if layout == "single":
        write("model", "model.onnx", (image,), [INPUT_NAME], list(selected), ("model", None))
    else:
        names = folded.backbone_output_names()
        result.backbone_outputs = tuple(names)
        write("backbone", "backbone.onnx", (image,), [INPUT_NAME], names, ("backbone", None))
        with torch.no_grad():
            folded.role = ("backbone", None)
            shared = folded(image)
        for t in selected:
            inputs = folded.head_input_names(t)
            write(f"head_{t}", f"head_{t}.onnx", tuple(shared[names.index(n)] for n in inputs), inputs, [t], ("head", t))
    folded.role = ("model", None)
    return result


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    layout: str = "single",
    tasks: Sequence[str] | None = None,
    opset: int = MIN_OPSET,
    reference_samples: int = 2,
    img_size: int | None = None,
    batch_dynamic: bool = True,
    progress: Callable[[str], None] | None = None,
    postprocess: bool = False,
) -> ExportResult:
    """The `mtlora-export onnx` pipeline: checkpoint -> graphs + reference.npz + manifest.json in `out`.

    All input checks run before any progress line; see `export_model` for what is written.
    """
    from export.artifacts.files import checkpoint_sha256
    from mtlora.loading import load_any

    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; choose another output path")
    if out.resolve() == checkpoint.resolve():
        raise ExportError(f"{out}: the output directory must not be the checkpoint itself")
    if reference_samples < 0:
        raise ExportError(f"--reference-samples must be 0 or more, got {reference_samples}")
    model = load_any(checkpoint, img_size)
    return export_model(model, out, source_name=checkpoint.name, source_sha256=checkpoint_sha256(checkpoint),
                        layout=layout, tasks=tasks, opset=opset, reference_samples=reference_samples,
                        postprocess=postprocess,
                        batch_dynamic=batch_dynamic, progress=progress)


def export_model(
    model: torch.nn.Module,
    out: str | Path,
    *,
    source_name: str,
    source_sha256: str,
    layout: str = "single",
    tasks: Sequence[str] | None = None,
    opset: int = MIN_OPSET,
    reference_samples: int = 2,
    batch_dynamic: bool = True,
    progress: Callable[[str], None] | None = None,
    postprocess: bool = False,
) -> ExportResult:
    """Graphs, reference.npz (from the unmerged model) and manifest.json of a loaded model, in `out`.

    `model` is not modified. Everything is written into a staging directory beside
    `out` and renamed into place at the end, so a failure never leaves a
    half-written export.
    """
    from export.artifacts.manifest import MANIFEST_FILE, write_manifest
    from export.onnx.reference_outputs import REFERENCE_FILE, write_reference
    from mtlora.fileio import commit_directory, staging_dir
    from mtlora.merge import unmerge_model

    out = Path(out)
    selected = select_tasks(model.tasks, tasks)
    staging = staging_dir(out, marker=MANIFEST_FILE, what="ONNX export")
    try:
        result = export_onnx(model, staging, layout=layout, tasks=selected, opset=opset,
                             batch_dynamic=batch_dynamic, source_sha256=source_sha256, progress=progress,
                             postprocess=postprocess)
        reference = None
        if reference_samples:
            if progress:
                progress(f"computing reference outputs ({reference_samples} samples, unmerged PyTorch fp32)")
            original = unmerge_model(copy.deepcopy(model)) if is_merged(model) else model
            write_reference(original, staging, tasks=selected, num_samples=reference_samples)
            reference = {"file": REFERENCE_FILE, "samples": reference_samples,
                         "computed_by": "unmerged PyTorch model, eval mode, fp32"}
        if progress:
            progress("writing manifest.json")
        config = model.config
        write_manifest(
            staging,
            layout=layout,
            opset=opset,
            tasks=list(selected),
            input={"name": INPUT_NAME, "shape": list(result.input_shape), "dtype": "float32",
                   "mean": list(config.mean), "std": list(config.std)},
            output_channels={t: config.task_channels[t] for t in selected},
            backbone_outputs=list(result.backbone_outputs),
            **({"postprocess": True} if postprocess else {}),
            graph_files=dict(result.files),
            reference=reference,
            source={"checkpoint": source_name, "sha256": source_sha256},
            **({"dropped_parameters": result.dropped_parameters} if result.dropped_parameters else {}),
        )
        commit_directory(staging, out)  # which also gives the staging directory the usual permissions
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.out_dir = out
    return result
