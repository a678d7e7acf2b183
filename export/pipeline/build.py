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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engines.files import sha256_file
from engines.registry import BACKENDS, get_backend
from export.artifacts.builddir import BuildDir
from export.artifacts.engineset import EngineSet
from export.artifacts.evalset import EvalSet
from export.artifacts.manifest import ExportInfo, verify_manifest
from export.artifacts.records import recover_records
from export.checking.graph_lint import build_graphs, lint_graphs
from export.checking.results import Report
from export.checking.tolerances import Tolerances
from export.errors import ExportError
from export.pipeline.calibration_step import (
    calibration_set,
    check_calibration_data,
    graph_inputs,
    head_calibration,
)
from export.pipeline.check import check_engines, write_records
from export.pipeline.data import parse_spec
from export.pipeline.options import BuildOptions, Say, engine_plan
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
                bundle_graphs: Path | None = None) -> EngineSet:
    from calibration.prepare import prepare_graph

    name = f"{backend}-{precision}"
    target = build.engine(name)
    graph_hashes = {role: sha256_file(export_dir / f) for role, f in info.graph_files.items()}
    # From a bundle every int8 engine is built from the bundled Q/DQ graph, calibrated on the
    # workstation: a device needs no calibration data.
    calibration = calib() if precision == "int8" and bundle_graphs is None else None
    extra = {k: getattr(opts, k) for k in BACKENDS[backend].build_options}
    key = step_key("engine", backend, precision, graph_hashes, list(opts.keep_fp32), opts.calib_method,
                   calibration.fingerprint() if calibration is not None else None, str(bundle_graphs), extra)
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
        entry = _build_engine_set(backend, precision, opts, info, export_dir, build, calibration, staging, say,
                                  bundle_graphs, prepare_graph)
        mark_step(staging, key)
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed step leaves no half-built engine directory
        raise
    entry.directory = target
    return entry


def _build_engine_set(backend, precision, opts, info, export_dir, build, calibration, staging, say, bundle_graphs,
                      prepare_graph) -> EngineSet:
    name = f"{backend}-{precision}"
    work = build.graphs(name)
    work.mkdir(parents=True, exist_ok=True)
    entry = EngineSet(backend, precision, staging, interface=info.interface)
    started = time.perf_counter()
    for role, file in info.graph_files.items():
        graph = export_dir / file
        role_calibration = calibration
        if calibration is not None and role.startswith("head_"):
            role_calibration = head_calibration(export_dir / info.graph_files["backbone"], calibration,
                                                graph_inputs(graph))
        qdq = None
        if bundle_graphs is not None and precision == "int8":
            qdq = bundle_graphs / f"{Path(file).stem}.int8.qdq.onnx"
            if not qdq.is_file():
                raise ExportError(f"the bundle has no Q/DQ graph {qdq.name}; build the bundle from an int8 build")
        say(f"[{name}] preparing {file}" + (" (calibrating)" if role_calibration is not None else ""))
        prepared = prepare_graph(backend, graph, work, precision, calibration=role_calibration, qdq_onnx=qdq,
                                 keep_fp32=opts.keep_fp32, calibration_method=opts.calib_method,
                                 cache=build.calibration_cache)
        say(f"[{name}] building engine for {file}")
        extra = {k: getattr(opts, k) for k in BACKENDS[backend].build_options if getattr(opts, k) is not None}
        artifact = get_backend(backend).build(prepared.path, staging, precision=precision,
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
    if any(p == "int8" for _, p in pairs) and not opts.from_bundle:
        check_calibration_data(opts)


def run_build(opts: BuildOptions, say: Say) -> BuildOutcome:
    """Build every requested engine into `opts.out` and check it; see the module docstring."""
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; choose another --out")
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
        source_line = f"model: bundle {opts.from_bundle}"
    else:
        say(source.how)
        export_dir = export_step(opts, source, build, say, reused)
        source_line = source.how
    timings["export"] = round(time.perf_counter() - started, 2)
    info = ExportInfo.read(export_dir)
    Tolerances.from_file(opts.tolerances).check_tasks(info.interface.tasks)
    if source is not None and torch_available():
        reference = OriginalModel(source, info.interface.tasks)

    calibration_holder: dict[str, object] = {}

    def calib():
        if "set" not in calibration_holder:
            calibration_holder["set"] = calibration_set(opts, info.interface, say)
        return calibration_holder["set"]

    entries = []
    for backend, precision in pairs:
        t0 = time.perf_counter()
        entries.append(engine_step(backend, precision, opts, info, export_dir, build, calib, say, reused,
                                   bundle_graphs))
        timings[f"{backend}-{precision}"] = round(time.perf_counter() - t0, 2)
    tensorrt_lint = lint_graphs(build.root, build_graphs(build.root), say)
    t0 = time.perf_counter()
    model = {**info.interface.to_dict(), "layout": info.layout, "source": source_line}
    outcome = check_engines(entries, opts, info, export_dir, build, reference, say,
                            Tolerances.from_file(opts.tolerances), model,
                            curves_png=source.curves_png if source is not None else None)
    timings["check"] = round(time.perf_counter() - t0, 2)
    write_records(build, outcome, {
        "options": asdict(opts), "backends": list(dict.fromkeys(b for b, _ in pairs)),
        "precisions": list(dict.fromkeys(p for _, p in pairs)),
        "source": source_line, "engines": [e.key for e in entries], "reused": reused, "seconds": timings,
        "tensorrt_lint": tensorrt_lint})
    return BuildOutcome(build.root, outcome.report, reused)
