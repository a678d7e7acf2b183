"""`mtlora-export build`: export, calibrate, build engines, prove them against PyTorch.

Every step records the key it was computed from (`.step.json`); a later build
reuses a step only when its key matches and its files verify, so an
interrupted build never leaves a step that looks complete. Where each step's
results live is `export.artifacts.builddir.BuildDir`. The steps themselves, and the typed context
they share, are `pipeline.context`; what happens to an engine set that fails its gate, `pipeline.fallback`.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engines.cpu import INT8_DOT_PRODUCT, cpu_model, int8_saturates
from engines.registry import BACKENDS
from export.artifacts.builddir import BuildDir
from export.artifacts.graph_lint import build_graphs, lint_graphs
from export.artifacts.manifest import ExportInfo
from export.artifacts.records import recover_records
from export.checking.results import Report
from export.checking.tolerances import Tolerances
from export.errors import ExportError, ExportOptionError
from export.pipeline.calibration_step import check_calibration_data
from export.pipeline.check import write_records
from export.pipeline.context import BuildContext, export_step
from export.pipeline.data import check_data_options
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
    plan_of,
    precisions_used,
)
from export.pipeline.original_model import OriginalModel, torch_available
from export.pipeline.sources import ModelSource, resolve_model


@dataclass
class BuildOutcome:
    out: Path
    report: Report
    reused: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.report.passed


def _check_inputs(opts: BuildOptions, pairs: list[tuple[str, str]]) -> None:
    """Every check of the inputs that is cheap, before anything is written under `opts.out`."""
    check_data_options(opts)  # every data option, .npz files included, is refused before any work
    Tolerances.from_file(opts.tolerances)
    if opts.dla and not any(BACKENDS[b].dla for b, _ in pairs if b in BACKENDS):
        raise ExportError(f"--dla {opts.dla}: none of the backends built here ({', '.join(dict.fromkeys(b for b, _ in pairs))}) "
                          "runs on a DLA core; build with --backend tensorrt on a Jetson with DLA, or drop --dla")
    calibrated = any(p == AUTO or plan_of(p).uses("calibrated") for _, p in pairs)
    if calibrated and not opts.from_bundle:
        check_calibration_data(opts)


def int8_speed_note(pairs: list[tuple[str, str]], flags=None, machine: str | None = None) -> str | None:
    """A line for a build of int8 engines that run on this CPU (ONNX Runtime's, OpenVINO's) when it has no
    int8 dot product: they run exact (`engines.cpu.int8_saturates`) but slower than fp32, which a user who
    asked for int8 to gain speed should hear before the build, not find in a benchmark. `auto` is left
    out: it times its candidates and takes the fastest."""
    on_cpu = sorted({backend for backend, precision in pairs
                     if precision != AUTO and "int8" in precisions_used(precision)
                     and "cpu" in (device.lower() for device in BACKENDS[backend].devices)})
    if not on_cpu or not int8_saturates(flags, machine):
        return None
    return (f"note: this CPU ({cpu_model()}) has no int8 dot product (none of {', '.join(INT8_DOT_PRODUCT)}): "
            f"{' and '.join(on_cpu)} int8 engines run exact here but without int8's speed-up, usually slower "
            "than fp32; int8 pays off on a device that has one (a Jetson, a CPU with VNNI or AMX)")


def run_build(opts: BuildOptions, say: Say) -> BuildOutcome:
    """Build every requested engine into `opts.out` and check it; see the module docstring."""
    if not str(opts.out).strip():  # an unset shell variable: never a build into whatever directory we run in
        raise ExportError("--out is empty; name the build directory, e.g. --out build/fp16")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; choose another --out")
    if foreign := BuildDir(out).entries_not_ours():
        raise ExportError(f"{out}: is not a build directory, and a build would replace its {', '.join(foreign)}; "
                          "choose a new or empty directory for --out")
    opts = expand_keep_fp32(opts)
    pairs = engine_plan(opts, say)
    _check_inputs(opts, pairs)
    if (note := int8_speed_note(pairs)) is not None:
        say(note)
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
    except Exception:
        if created:
            # A build into a directory it made that ends in an error leaves nothing behind: no export
            # without engines for the user to mistake for a build.
            shutil.rmtree(out, ignore_errors=True)
        raise
    except BaseException:
        if created:
            # Interrupted (Ctrl-C, SIGTERM): the steps it finished stay for the next run to reuse, and a
            # build that finished none leaves nothing behind.
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
    ctx = BuildContext(opts, info, export_dir, build, say, tolerances, model, reused=reused, reference=reference,
                       bundle_graphs=bundle_graphs, curves_png=source.curves_png if source is not None else None)
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
            entries, fallbacks, replaced = run_fallbacks(ctx, entries, outcome.report, cached, timings)
            if replaced:
                # an engine set the fallback rebuilt, or the next format that passes, took a failing one's
                # place: check the set again (a search that replaced nothing leaves the first check standing)
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
