"""What the steps of one build share (`BuildContext`), and the steps that make its artifacts: the export
(`export_step`) and an engine set (`engine_step`).

Every step records the key it was computed from (`.step.json`, `pipeline.steps`); a later build reuses a
step only when its key matches and its files verify, so an interrupted build never leaves a step that
looks complete. The build (`pipeline.build`), `--precision auto` (`pipeline.auto`) and the layer search
(`pipeline.fallback`) all build engines through `BuildContext.engine`; none of them imports another's
module for it, so the pipeline has no import circle.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engines.files import sha256_file
from engines.precision import PRECISIONS
from engines.registry import BACKENDS, get_backend
from export.artifacts.builddir import BuildDir
from export.artifacts.engineset import EngineSet
from export.artifacts.manifest import ExportInfo, verify_manifest
from export.checking.tolerances import Tolerances
from export.errors import ExportError
from export.pipeline.calibration_step import calibration_set, graph_inputs, head_calibration
from export.pipeline.check import CheckOutcome, check_engines, eval_batches
from export.pipeline.eval_cache import EvalBatchCache
from export.pipeline.options import BuildOptions, Say, role_precisions
from export.pipeline.original_model import OriginalModel
from export.pipeline.sources import ModelSource
from export.pipeline.steps import mark_step, publish, staging_for, step_key, step_matches

if TYPE_CHECKING:
    from calibration.data import CalibrationSet
    from calibration.prepare import PreparedGraph

# {graph role: globs}: nodes one engine set keeps in fp32 beyond the build's --keep-fp32 (a search's layers).
ExtraKeep = Mapping[str, Sequence[str]]


@dataclass
class BuildContext:
    """What the steps of one build share once the model is exported: options, the export, the build
    directory, and the calibration set and evaluation batches, each made once when first needed."""

    opts: BuildOptions
    info: ExportInfo
    export_dir: Path
    build: BuildDir
    say: Say
    tolerances: Tolerances
    model: dict  # the model's interface, layout and source, as the report records them
    reused: list[str] = field(default_factory=list)  # the steps reused from an earlier build
    reference: OriginalModel | None = None  # PyTorch, when it is installed
    bundle_graphs: Path | None = None  # a bundle's calibrated graphs, when building from one
    curves_png: Path | None = None
    _calibration: CalibrationSet | None = field(default=None, repr=False)
    _batches: EvalBatchCache | None = field(default=None, repr=False)

    def calibration(self) -> CalibrationSet:
        if self._calibration is None:
            self._calibration = calibration_set(self.opts, self.info.interface, self.say)
        return self._calibration

    def engine(self, backend: str, precision: str, *, name: str | None = None, target: Path | None = None,
               extra_keep: ExtraKeep | None = None) -> EngineSet:
        """`engine_step` for this build."""
        return engine_step(self, backend, precision, name=name, target=target, extra_keep=extra_keep)

    def batches(self) -> EvalBatchCache:
        """The evaluation batches with their references, computed once (PyTorch runs once per build) and
        kept on disk for the later passes (`export.pipeline.eval_cache`)."""
        if self._batches is None:
            self._batches = EvalBatchCache(lambda: eval_batches(self.opts, self.info, self.export_dir, self.build,
                                                                self.reference, self.say), self.build.root)
        return self._batches

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()

    def check(self, entries: list[EngineSet]) -> CheckOutcome:
        return check_engines(entries, self.opts, self.info, self.export_dir, self.build, self.reference, self.say,
                             self.tolerances, self.model, curves_png=self.curves_png, batches=self.batches())

    def keep_globs(self, role: str, extra_keep: ExtraKeep | None = None) -> tuple[str, ...]:
        """The globs of nodes kept in fp32 in the graph of `role`: every graph's, then its own."""
        opts = self.opts
        own = [*opts.keep_fp32_roles.get(role, ()), *((extra_keep or {}).get(role, ()))]
        return tuple(dict.fromkeys([*opts.keep_fp32, *own]))

    def prepare_role(self, backend: str, precision: str, role: str, name: str, keep: Sequence[str]) -> PreparedGraph:
        """The graph of one role prepared at `precision` (`calibration.prepare.prepare_graph`) under
        graphs/<name>: a split head calibrates on the backbone's outputs; from a bundle, int8 is its
        calibrated Q/DQ graph."""
        from calibration.prepare import prepare_graph

        file = self.info.graph_files[role]
        graph = self.export_dir / file
        role_calibration = None
        if PRECISIONS[precision].calibrated and self.bundle_graphs is None:
            role_calibration = self.calibration()
            if role.startswith("head_"):
                role_calibration = head_calibration(self.export_dir / self.info.graph_files["backbone"],
                                                    role_calibration, graph_inputs(graph))
        qdq = None
        if self.bundle_graphs is not None and PRECISIONS[precision].calibrated:
            qdq = self.bundle_graphs / f"{Path(file).stem}.int8.qdq.onnx"
            if not qdq.is_file():
                raise ExportError(f"the bundle has no Q/DQ graph {qdq.name}; build the bundle from an int8 build")
        work = self.build.graphs(name)
        work.mkdir(parents=True, exist_ok=True)
        return prepare_graph(backend, graph, work, precision, calibration=role_calibration, qdq_onnx=qdq,
                             keep_fp32=keep, calibration_method=self.opts.calib_method,
                             cache=self.build.calibration_cache)


def export_step(opts: BuildOptions, source: ModelSource, build: BuildDir, say: Say, reused: list[str]) -> Path:
    from export.onnx.exporter import export_model, exporter_fingerprint

    target = build.export
    key = step_key("export", source.sha256, opts.layout, opts.tasks, opts.img_size, exporter_fingerprint(),
                   *(["postprocess"] if opts.postprocess else []))
    if step_matches(target, key):
        try:
            verify_manifest(target)
            reused.append("export")
            say(f"[export] reusing {target} (same checkpoint, settings and exporter)")
            return target
        except ExportError as err:
            say(f"[export] cached export is damaged ({err}); exporting again")
    say(f"[export] {source.checkpoint} -> {target} ({opts.layout} layout)")
    export_model(source.model(), target, source_name=source.checkpoint.name, source_sha256=source.sha256,
                 layout=opts.layout, tasks=opts.tasks, progress=lambda line: say(f"[export] {line}"),
                 postprocess=opts.postprocess)
    mark_step(target, key, checkpoint=str(source.checkpoint))
    return target


def engine_step(ctx: BuildContext, backend: str, precision: str, *, name: str | None = None,
                target: Path | None = None, extra_keep: ExtraKeep | None = None) -> EngineSet:
    """Build (or reuse) the engine set of `backend` at `precision` (a backend precision, or per part).

    `name` (default `<backend>-<precision>`) names its prepared graphs and its progress lines; `target`
    (default `build.engine(name)`) is where it is published; `extra_keep` ({graph role: globs}) keeps
    more nodes in fp32 for one engine set only (a layer search's)."""
    opts, info, build = ctx.opts, ctx.info, ctx.build
    name = name or f"{backend}-{precision}"
    target = target or build.engine(name)
    graph_hashes = {role: sha256_file(ctx.export_dir / f) for role, f in info.graph_files.items()}
    precisions = role_precisions(precision, info.graph_files)
    # From a bundle every int8 engine is built from the bundled Q/DQ graph, calibrated on the
    # workstation: a device needs no calibration data.
    calibrated = any(PRECISIONS[p].calibrated for p in precisions.values())
    calibration = ctx.calibration() if calibrated and ctx.bundle_graphs is None else None
    keep = {role: ctx.keep_globs(role, extra_keep) for role in info.graph_files}
    extra = {k: getattr(opts, k) for k in BACKENDS[backend].build_options}
    if BACKENDS[backend].dla:
        extra["dla"] = opts.dla
    key_parts = [backend, precision, graph_hashes, list(opts.keep_fp32), opts.calib_method,
                 calibration.fingerprint() if calibration is not None else None, str(ctx.bundle_graphs), extra]
    if any(tuple(k) != tuple(opts.keep_fp32) for k in keep.values()):
        key_parts.append({role: list(k) for role, k in keep.items()})
    key = step_key("engine", *key_parts)
    if step_matches(target, key):
        try:
            entry = EngineSet.read(target)
            entry.artifacts(verify=True)
            ctx.reused.append(name)
            ctx.say(f"[{name}] reusing the engine in {target}")
            return entry
        except Exception as err:  # noqa: BLE001 - any damage means rebuild
            ctx.say(f"[{name}] cached engine unusable ({err}); rebuilding")
    staging = staging_for(target)
    try:
        entry = _build_engine_set(ctx, backend, precision, precisions, keep, staging, name)
        mark_step(staging, key)
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed step leaves no half-built engine directory
        raise
    entry.directory = target
    return entry


def device_build_options(backend: str, role: str, opts: BuildOptions, build: BuildDir) -> dict:
    """Per-role options of a backend's `build`: its cache directory (TensorRT's timing cache and plans,
    beside the calibration cache) and, with --dla heads, a DLA core for every task head."""
    spec = BACKENDS[backend]
    extra: dict = {}
    if spec.build_cache:
        extra["cache_dir"] = build.calibration_cache / backend
    if spec.dla and opts.dla == "heads" and role.startswith("head_"):
        extra["dla_core"] = 0
    return extra


def _build_engine_set(ctx: BuildContext, backend: str, precision: str, precisions: Mapping[str, str],
                      keep: Mapping[str, Sequence[str]], staging: Path, name: str) -> EngineSet:
    opts, info, say = ctx.opts, ctx.info, ctx.say
    parts = dict(precisions) if len(set(precisions.values())) > 1 else {}
    entry = EngineSet(backend, precision, staging, interface=info.interface, parts=parts)
    started = time.perf_counter()
    for role, file in info.graph_files.items():
        role_precision = precisions[role]
        calibrating = PRECISIONS[role_precision].calibrated and ctx.bundle_graphs is None
        say(f"[{name}] preparing {file}" + (f" at {role_precision}" if parts else "")
            + (" (calibrating)" if calibrating else ""))
        prepared = ctx.prepare_role(backend, role_precision, role, name, keep[role])
        say(f"[{name}] building engine for {file}")
        extra = {k: getattr(opts, k) for k in BACKENDS[backend].build_options if getattr(opts, k) is not None}
        extra.update(device_build_options(backend, role, opts, ctx.build))
        if prepared.metadata.get("fp32_nodes") and BACKENDS[backend].pins_layers:
            # TensorRT's weak typing pins these layers itself; a graph that carries its types needs nothing.
            extra["keep_fp32"] = tuple(prepared.metadata["fp32_nodes"])
        artifact = get_backend(backend).build(prepared.path, staging, precision=role_precision,
                                              metadata=dict(prepared.metadata), name=Path(file).stem,
                                              threads=opts.threads, **extra)
        entry.files[role] = artifact.path.name
    entry.save()
    say(f"[{name}] built in {time.perf_counter() - started:.1f} s")
    return entry
