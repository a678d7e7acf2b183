"""`mtlora-export build`: export, calibrate, build engines, prove them against PyTorch.

Every step records the key it was computed from (`.step.json`); a later build
reuses a step only when its key matches and its files verify, so an
interrupted build never leaves a step that looks complete. Where each step's
results live is `export.artifacts.builddir.BuildDir`.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engines.files import sha256_file
from engines.registry import BACKENDS, get_backend
from export.artifacts.builddir import BuildDir
from export.artifacts.engineset import EngineSet
from export.artifacts.evalset import EvalSet
from export.artifacts.graph_lint import build_graphs, lint_graphs
from export.artifacts.manifest import ExportInfo, verify_manifest
from export.artifacts.records import recover_records
from export.checking.results import Report
from export.checking.tolerances import Tolerances
from export.errors import ExportError, ExportOptionError
from export.pipeline.calibration_step import (
    calibration_set,
    check_calibration_data,
    graph_inputs,
    head_calibration,
)
from export.pipeline.check import CheckOutcome, check_engines, eval_batches, write_records
from export.pipeline.data import parse_spec
from export.pipeline.eval_cache import EvalBatchCache
from export.pipeline.keep_fp32 import check_keep_fp32_matches
from export.pipeline.options import (
    AUTO,
    PARTS,
    BuildOptions,
    Say,
    engine_plan,
    expand_keep_fp32,
    is_part_precision,
    parse_part_precision,
    precisions_used,
    role_precisions,
)
from export.pipeline.original_model import OriginalModel, torch_available
from export.pipeline.sources import ModelSource, resolve_model
from export.pipeline.steps import mark_step, publish, staging_for, step_key, step_matches


@dataclass
class BuildOutcome:
    out: Path
    report: Report
    reused: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.report.passed


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


def engine_step(backend: str, precision: str, opts: BuildOptions, info: ExportInfo, export_dir: Path,
                build: BuildDir, calib: Callable[[], object], say: Say, reused: list[str],
                bundle_graphs: Path | None = None, *, name: str | None = None, target: Path | None = None,
                extra_keep: Mapping[str, Sequence[str]] | None = None) -> EngineSet:
    """Build (or reuse) the engine set of `backend` at `precision` (a backend precision, or per part).

    `name` (default `<backend>-<precision>`) names its prepared graphs and its progress lines; `target`
    (default `build.engine(name)`) is where it is published; `extra_keep` ({graph role: globs}) keeps
    more nodes in fp32 for one engine set only (the int8 fallback's layers)."""
    from calibration.prepare import prepare_graph

    name = name or f"{backend}-{precision}"
    target = target or build.engine(name)
    graph_hashes = {role: sha256_file(export_dir / f) for role, f in info.graph_files.items()}
    precisions = role_precisions(precision, info.graph_files)
    # From a bundle every int8 engine is built from the bundled Q/DQ graph, calibrated on the
    # workstation: a device needs no calibration data.
    calibration = calib() if "int8" in precisions.values() and bundle_graphs is None else None
    keep = {role: keep_globs(opts, role, extra_keep) for role in info.graph_files}
    extra = {k: getattr(opts, k) for k in BACKENDS[backend].build_options}
    if BACKENDS[backend].dla:
        extra["dla"] = opts.dla
    key_parts = [backend, precision, graph_hashes, list(opts.keep_fp32), opts.calib_method,
                 calibration.fingerprint() if calibration is not None else None, str(bundle_graphs), extra]
    if any(tuple(k) != tuple(opts.keep_fp32) for k in keep.values()):
        key_parts.append({role: list(k) for role, k in keep.items()})
    key = step_key("engine", *key_parts)
    if step_matches(target, key):
        try:
            entry = EngineSet.read(target)
            entry.artifacts(verify=True)
            reused.append(name)
            say(f"[{name}] reusing the engine in {target}")
            return entry
        except Exception as err:  # noqa: BLE001 - any damage means rebuild
            say(f"[{name}] cached engine unusable ({err}); rebuilding")
    staging = staging_for(target)
    try:
        entry = _build_engine_set(backend, precision, precisions, keep, opts, info, export_dir, build, calibration,
                                  staging, say, bundle_graphs, prepare_graph, name)
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


def keep_globs(opts: BuildOptions, role: str, extra_keep: Mapping[str, Sequence[str]] | None = None) -> tuple[str, ...]:
    """The globs of nodes kept in fp32 in the graph of `role`: every graph's, then its own."""
    own = [*opts.keep_fp32_roles.get(role, ()), *((extra_keep or {}).get(role, ()))]
    return tuple(dict.fromkeys([*opts.keep_fp32, *own]))


def prepare_role(backend: str, precision: str, role: str, opts: BuildOptions, info: ExportInfo, export_dir: Path,
                 build: BuildDir, calibration, name: str, keep: Sequence[str], bundle_graphs: Path | None = None,
                 prepare_graph=None):
    """The graph of one role prepared at `precision` (`calibration.prepare.prepare_graph`): a split head
    calibrates on the backbone's outputs; from a bundle, int8 is its calibrated Q/DQ graph."""
    if prepare_graph is None:
        from calibration.prepare import prepare_graph
    file = info.graph_files[role]
    graph = export_dir / file
    role_calibration = calibration if precision == "int8" else None
    if role_calibration is not None and role.startswith("head_"):
        role_calibration = head_calibration(export_dir / info.graph_files["backbone"], calibration,
                                            graph_inputs(graph))
    qdq = None
    if bundle_graphs is not None and precision == "int8":
        qdq = bundle_graphs / f"{Path(file).stem}.int8.qdq.onnx"
        if not qdq.is_file():
            raise ExportError(f"the bundle has no Q/DQ graph {qdq.name}; build the bundle from an int8 build")
    work = build.graphs(name)
    work.mkdir(parents=True, exist_ok=True)
    return prepare_graph(backend, graph, work, precision, calibration=role_calibration, qdq_onnx=qdq,
                         keep_fp32=keep, calibration_method=opts.calib_method, cache=build.calibration_cache)


def _build_engine_set(backend, precision, precisions, keep, opts, info, export_dir, build, calibration, staging, say,
                      bundle_graphs, prepare_graph, name) -> EngineSet:
    parts = dict(precisions) if len(set(precisions.values())) > 1 else {}
    entry = EngineSet(backend, precision, staging, interface=info.interface, parts=parts)
    started = time.perf_counter()
    for role, file in info.graph_files.items():
        role_precision = precisions[role]
        calibrating = role_precision == "int8" and calibration is not None
        say(f"[{name}] preparing {file}" + (f" at {role_precision}" if parts else "")
            + (" (calibrating)" if calibrating else ""))
        prepared = prepare_role(backend, role_precision, role, opts, info, export_dir, build, calibration, name,
                                keep[role], bundle_graphs, prepare_graph)
        say(f"[{name}] building engine for {file}")
        extra = {k: getattr(opts, k) for k in BACKENDS[backend].build_options if getattr(opts, k) is not None}
        extra.update(device_build_options(backend, role, opts, build))
        artifact = get_backend(backend).build(prepared.path, staging, precision=role_precision,
                                              metadata=dict(prepared.metadata), name=Path(file).stem,
                                              threads=opts.threads, **extra)
        entry.files[role] = artifact.path.name
    entry.save()
    say(f"[{name}] built in {time.perf_counter() - started:.1f} s")
    return entry


def _check_inputs(opts: BuildOptions, pairs: list[tuple[str, str]]) -> None:
    """Every check of the inputs that is cheap, before anything is written under `opts.out`."""
    for spec_text in (opts.eval_data, opts.calib_data):
        if spec_text and parse_spec(spec_text).kind == "evalset":
            EvalSet.read(Path(spec_text))  # a few images: an unreadable one is refused before any work
    Tolerances.from_file(opts.tolerances)
    if opts.dla and not any(BACKENDS[b].dla for b, _ in pairs if b in BACKENDS):
        raise ExportError(f"--dla {opts.dla}: none of the backends built here ({', '.join(dict.fromkeys(b for b, _ in pairs))}) "
                          "runs on a DLA core; build with --backend tensorrt on a Jetson with DLA, or drop --dla")
    int8 = any(p == AUTO or "int8" in precisions_used(p) for _, p in pairs)
    if int8 and not opts.from_bundle:
        check_calibration_data(opts)


def run_build(opts: BuildOptions, say: Say) -> BuildOutcome:
    """Build every requested engine into `opts.out` and check it; see the module docstring."""
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; choose another --out")
    opts = expand_keep_fp32(opts)
    pairs = engine_plan(opts, say)
    _check_inputs(opts, pairs)
    source = None if opts.from_bundle else resolve_model(opts.checkpoint, opts.img_size)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        from mtlora.fileio import why_not_writable

        raise ExportError(f"{out}: cannot create the build directory ({why_not_writable(out, err)}); "
                          "choose another --out") from None
    build = BuildDir(out)
    try:
        with build.locked("build"):
            return _run_build(opts, build, pairs, source, say)
    except BaseException:
        if created:
            # A build that failed before finishing any step leaves nothing behind.
            build.release_lock_file()
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


@dataclass
class BuildContext:
    """What the steps of one build share once the model is exported: options, the export, the build
    directory, and the calibration set and evaluation batches, each made once when first needed."""

    opts: BuildOptions
    info: ExportInfo
    export_dir: Path
    build: BuildDir
    say: Say
    reused: list[str]
    tolerances: Tolerances
    model: dict
    reference: OriginalModel | None = None
    bundle_graphs: Path | None = None
    curves_png: Path | None = None
    _calibration: object = None
    _batches: EvalBatchCache | None = None

    def calibration(self):
        if self._calibration is None:
            self._calibration = calibration_set(self.opts, self.info.interface, self.say)
        return self._calibration

    def engine(self, backend: str, precision: str, **kwargs) -> EngineSet:
        """`engine_step` for this build (`name`, `target`, `extra_keep` as there)."""
        return engine_step(backend, precision, self.opts, self.info, self.export_dir, self.build, self.calibration,
                           self.say, self.reused, self.bundle_graphs, **kwargs)

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


def _run_build(opts: BuildOptions, build: BuildDir, pairs: list[tuple[str, str]], source: ModelSource | None,
               say: Say) -> BuildOutcome:
    reused: list[str] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()
    recover_records(build, say)
    for stale in build.stale_partials():
        # Left by a killed step; a build has its directory to itself (it holds the lock).
        shutil.rmtree(stale, ignore_errors=True)
    bundle_graphs = None
    reference = None
    if opts.from_bundle:
        from export.artifacts.bundle import open_bundle

        bundle = open_bundle(Path(opts.from_bundle), say)
        export_dir, bundle_graphs = bundle.export, bundle.graphs
        opts.eval_data = opts.eval_data or str(bundle.evalset)
        if opts.tolerances is None and bundle.tolerances is not None:
            # The limits the workstation's build was checked with: a device build is held to the same gate.
            opts.tolerances = str(bundle.tolerances)
            say(f"tolerances: the bundle's ({bundle.tolerances})")
        source_line = f"model: bundle {opts.from_bundle}"
    else:
        say(source.how)
        export_dir = export_step(opts, source, build, say, reused)
        source_line = source.how
    timings["export"] = round(time.perf_counter() - started, 2)
    info = ExportInfo.read(export_dir)
    tolerances = Tolerances.from_file(opts.tolerances)
    tolerances.check_tasks(info.interface.tasks)
    _check_roles(opts, info, [p for _, p in pairs])
    check_keep_fp32_matches(opts.keep_fp32, opts.keep_fp32_roles,
                            {role: export_dir / name for role, name in info.graph_files.items()},
                            openvino=any(backend == "openvino" for backend, _ in pairs))
    if source is not None and torch_available():
        reference = OriginalModel(source, info.interface.tasks)
    model = {**info.interface.to_dict(), "layout": info.layout, "source": source_line}
    ctx = BuildContext(opts, info, export_dir, build, say, reused, tolerances, model, reference, bundle_graphs,
                       source.curves_png if source is not None else None)
    try:
        record: dict = {}
        if pairs[0][1] == AUTO:
            from export.pipeline.auto import run_auto

            entries, outcome, record["auto"] = run_auto(ctx, [b for b, _ in pairs], timings)
            tensorrt_lint = lint_graphs(build.root, build_graphs(build.root), say)
        else:
            from export.pipeline.fallback import cached_fallbacks, run_fallbacks, speed_notes

            entries = []
            cached = cached_fallbacks(ctx, pairs)
            for backend, precision in pairs:
                t0 = time.perf_counter()
                keep = cached.get((backend, precision))
                entries.append(ctx.engine(backend, precision, extra_keep=keep.keep if keep else None))
                timings[f"{backend}-{precision}"] = round(time.perf_counter() - t0, 2)
            tensorrt_lint = lint_graphs(build.root, build_graphs(build.root), say)
            t0 = time.perf_counter()
            outcome = ctx.check(entries)
            timings["check"] = round(time.perf_counter() - t0, 2)
            entries, fallbacks = run_fallbacks(ctx, entries, outcome.report, cached, timings)
            if any(f.passed and not f.cached for f in fallbacks):
                # an engine the fallback rebuilt took the failing one's place: check the set again (a search
                # that stopped or failed replaced nothing, and the first check stands)
                outcome = ctx.check(entries)
            outcome.report.fallbacks = fallbacks
            outcome.report.notes = speed_notes(ctx, entries, outcome.report, timings)
        write_records(build, outcome, {
            "options": asdict(opts), "backends": list(dict.fromkeys(b for b, _ in pairs)),
            "precisions": list(dict.fromkeys(p for _, p in pairs)),
            "source": source_line, "engines": [e.key for e in entries], "reused": reused, "seconds": timings,
            "tensorrt_lint": tensorrt_lint, "tolerances": tolerances.overrides, **record})
        return BuildOutcome(build.root, outcome.report, reused)
    finally:
        ctx.close()  # the evaluation batches kept on disk for this build


def _check_roles(opts: BuildOptions, info: ExportInfo, precisions: list[str]) -> None:
    """Per-part precisions may name only this model's tasks; --keep-fp32 globs for one graph role (a
    fallback file) only roles this layout has."""
    for precision in precisions:
        if is_part_precision(precision):
            missing = [p for p in parse_part_precision(precision) if p not in PARTS and p not in info.interface.tasks]
            if missing:
                raise ExportError(f"precision '{precision}': the model has no task {', '.join(missing)}; its tasks: "
                                  f"{', '.join(info.interface.tasks)}")
    unknown = sorted(set(opts.keep_fp32_roles) - set(info.graph_files))
    if unknown:
        raise ExportOptionError(f"--keep-fp32: the file names graph(s) {', '.join(unknown)}, which the {info.layout} "
                          f"layout does not have (it has {', '.join(info.graph_files)}); it was made for "
                          "another layout")
