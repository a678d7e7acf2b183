"""`mtlora-export build` and `check`: export, calibrate, build engines, prove them against PyTorch.

Steps and where their results live in the build directory:

    export/                 ONNX graph(s), manifest.json, reference.npz     (needs PyTorch)
    evalset.npz             a small labelled evaluation sample with its PyTorch references
    graphs/<engine>/        prepared fp16 / Q-DQ / NNCF graphs              (calibration)
    calibration-cache/      calibration results keyed by ONNX, data and settings
    engines/<engine>/       engine files, sidecars, engine.json
    report.json junit.xml summary.md report.html build.json

Every step records the key it was computed from (`.step.json`); a later build
reuses a step only when its key matches and its files verify, so an
interrupted build never leaves a step that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engines.files import write_atomic
from engines.registry import BACKENDS, choose_backend, get_backend
from export.artifacts.engineset import ENGINES_DIR, EngineEntry, list_engines, load_runner
from export.artifacts.manifest import read_json, read_manifest, sha256_file, verify_manifest
from export.checking.accuracy import EngineChecker, EvalBatch
from export.checking.html import Sample, write_html
from export.checking.report import build_report, write_reports
from export.checking.tolerances import Tolerances
from export.errors import ExportError
from export.pipeline.data import (
    EVALSET_FILE,
    DataSpec,
    batched,
    count_samples,
    iter_samples,
    parse_spec,
    read_evalset,
    read_npz,
    write_evalset,
)

EXPORT_DIR, GRAPHS_DIR, CACHE_DIR, BUILD_FILE, STEP_FILE = "export", "graphs", "calibration-cache", "build.json", ".step.json"
ALL_PRECISIONS = ("fp32", "fp16", "int8")
EVALSET_IMAGES, EVALSET_BYTES = 16, 64 << 20

Say = Callable[[str], None]


@dataclass
class BuildOptions:
    checkpoint: str | None = None
    from_bundle: str | None = None
    precisions: tuple[str, ...] = ("fp16",)
    backends: tuple[str, ...] = ("auto",)
    layout: str = "single"
    tasks: tuple[str, ...] | None = None
    img_size: int | None = None
    calib_data: str | None = None
    calib_samples: int = 256
    calib_method: str = "percentile"
    eval_data: str | None = None
    eval_samples: int = 32
    batch_size: int = 4
    keep_fp32: tuple[str, ...] = ()
    tolerances: str | None = None
    threads: int | None = None
    report_samples: int = 3
    out: str = "build"


@dataclass
class BuildOutcome:
    out: Path
    report: dict
    reused: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


# ----------------------------------------------------------------------------- step keys


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _step_matches(directory: Path, key: str) -> bool:
    try:
        return json.loads((directory / STEP_FILE).read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def _mark_step(directory: Path, key: str, **info) -> None:
    write_atomic(directory / STEP_FILE, json.dumps({"key": key, **info}, indent=2, sort_keys=True, default=str) + "\n")


def _fresh_dir(directory: Path) -> Path:
    """An empty staging directory next to `directory`, for an atomic replace when done."""
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, directory: Path) -> None:
    from mtlora.fileio import commit_directory

    commit_directory(staging, directory)


# ----------------------------------------------------------------------------- export step


def export_step(opts: BuildOptions, checkpoint: Path, out: Path, say: Say, reused: list[str]) -> Path:
    from export.artifacts.manifest import checkpoint_sha256
    from export.onnx.exporter import export_checkpoint, exporter_fingerprint

    target = out / EXPORT_DIR
    key = _digest("export", checkpoint_sha256(checkpoint), opts.layout, opts.tasks, opts.img_size,
                  exporter_fingerprint())
    if _step_matches(target, key):
        try:
            verify_manifest(target)
            reused.append("export")
            say(f"[export] reusing {target} (same checkpoint, settings and exporter)")
            return target
        except ExportError as err:
            say(f"[export] cached export is damaged ({err}); exporting again")
    for stale in out.glob(f".{EXPORT_DIR}.*.partial"):
        # Left by a killed export; like the engine steps, a build has its directory to itself.
        shutil.rmtree(stale, ignore_errors=True)
    say(f"[export] {checkpoint} -> {target} ({opts.layout} layout)")
    export_checkpoint(checkpoint, target, layout=opts.layout, tasks=opts.tasks, img_size=opts.img_size,
                      progress=lambda line: say(f"[export] {line}"))
    _mark_step(target, key, checkpoint=str(checkpoint))
    return target


# ----------------------------------------------------------------------------- evaluation data


@dataclass
class ModelInfo:
    tasks: tuple[str, ...]
    channels: dict[str, int]
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str
    graph_files: dict[str, str]
    backbone_outputs: list[str]

    @classmethod
    def from_manifest(cls, export_dir: Path) -> ModelInfo:
        m = read_manifest(export_dir)
        return cls(tuple(m["tasks"]), dict(m["output_channels"]), int(m["input"]["shape"][-1]),
                   tuple(m["input"]["mean"]), tuple(m["input"]["std"]), m["layout"], dict(m["graph_files"]),
                   list(m.get("backbone_outputs") or []))


def _default_data(spec: str | None, info: ModelInfo) -> str:
    return spec or "synthetic"


class TorchReference:
    """References from the original, unmerged PyTorch model in fp32, computed batch by batch."""

    def __init__(self, checkpoint: Path, img_size: int | None, tasks):
        import torch

        from mtlora.loading import load_any

        self.torch = torch
        self.model = load_any(checkpoint, img_size)
        if getattr(self.model, "merged", False):
            from mtlora.merge import unmerge_model

            unmerge_model(self.model)
        self.model.float().eval()
        self.tasks = tasks

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            out = self.model.predict(self.torch.from_numpy(images))
        return {t: out[t].numpy() for t in self.tasks}


def eval_batches(opts: BuildOptions, info: ModelInfo, export_dir: Path, out: Path, reference, say: Say,
                 keep_evalset: bool = True) -> Iterator[EvalBatch]:
    """reference.npz first, then the evaluation set: references from PyTorch, or the stored evalset.

    With `keep_evalset` (a build, not a check) a small labelled sample is saved as evalset.npz."""
    ref_file = export_dir / "reference.npz"
    if ref_file.is_file():
        data = read_npz(ref_file, "reference file")
        missing = [k for k in ("input", *info.tasks) if k not in data]
        if missing:
            raise ExportError(f"{ref_file}: lacks the array(s) {', '.join(missing)}; re-run the export")
        yield EvalBatch(image=data["input"].astype(np.float32), reference={t: data[t] for t in info.tasks})
    if reference is None:
        evalset = Path(opts.eval_data) if opts.eval_data and opts.eval_data.endswith(".npz") else out / EVALSET_FILE
        if not evalset.is_file():
            raise ExportError(f"no PyTorch here and no stored evaluation set at {evalset}; "
                              "build from a bundle or install the 'train' extra")
        say(f"[check] PyTorch not available: using the stored references in {evalset}")
        images, refs, labels = read_evalset(evalset)
        for i in range(0, len(images), opts.batch_size):
            sl = slice(i, i + opts.batch_size)
            yield EvalBatch(images[sl], {t: refs[t][sl] for t in info.tasks},
                            {t: v[sl] for t, v in labels.items()} or None)
        return
    spec = parse_spec(_default_data(opts.eval_data, info))
    if spec.kind == "evalset":
        images, refs, labels = read_evalset(spec.root)
        for i in range(0, len(images), opts.batch_size):
            sl = slice(i, i + opts.batch_size)
            yield EvalBatch(images[sl], {t: refs[t][sl] for t in info.tasks},
                            {t: v[sl] for t, v in labels.items()} or None)
        return
    samples = iter_samples(spec, task_channels=info.channels, size=info.size, mean=info.mean, std=info.std,
                           limit=opts.eval_samples, default_split="val")
    kept_images, kept_refs, kept_labels = [], {t: [] for t in info.tasks}, {}
    for images, labels, _names in batched(samples, opts.batch_size):
        refs = reference(images)
        # Keep a small labelled sample with its references for devices without PyTorch
        # (16 images, fewer where the outputs are large: at 448x448 four tasks take 26 MB an image).
        kept_bytes = sum(x.nbytes for x in kept_images) + sum(v.nbytes for vs in kept_refs.values() for v in vs)
        if sum(len(x) for x in kept_images) < EVALSET_IMAGES and kept_bytes < EVALSET_BYTES:
            kept_images.append(images)
            for t in info.tasks:
                kept_refs[t].append(refs[t])
            for t, v in labels.items():
                kept_labels.setdefault(t, []).append(v)
        yield EvalBatch(images, refs, labels or None)
    if kept_images and keep_evalset:
        write_evalset(out / EVALSET_FILE, np.concatenate(kept_images),
                      {t: np.concatenate(v) for t, v in kept_refs.items()},
                      {t: np.concatenate(v) for t, v in kept_labels.items() if len(v) == len(kept_images)})


# ----------------------------------------------------------------------------- calibration data


def _calibration_spec(opts: BuildOptions) -> DataSpec:
    spec = parse_spec(opts.calib_data or opts.eval_data or "synthetic")
    if spec.kind in ("evalset", "images"):
        return spec
    return DataSpec(spec.kind, spec.root, spec.split or "train")


def check_calibration_data(opts: BuildOptions) -> int:
    """The number of calibration samples the build will use; refuses too few before any work is done."""
    from calibration.data import MIN_SAMPLES

    spec = _calibration_spec(opts)
    count = count_samples(spec, limit=opts.calib_samples, default_split="train")
    if count < MIN_SAMPLES:
        more = (f"--calib-samples {opts.calib_samples}" if count == opts.calib_samples
                else f"{spec.describe()} holds {count}")
        raise ExportError(f"int8 calibration needs at least {MIN_SAMPLES} samples, got {count} ({more}); "
                          "int8 ranges from fewer swing with every image")
    return count


def calibration_set(opts: BuildOptions, info: ModelInfo, say: Say):
    """The calibration images as a re-iterable stream of feeds: one image is in memory at a time."""
    from calibration.data import CalibrationSet

    spec = _calibration_spec(opts)
    if spec.kind == "evalset":
        images, _, _ = read_evalset(spec.root)
        return CalibrationSet.from_arrays(images[: opts.calib_samples].astype(np.float32), input_name="image")
    count = check_calibration_data(opts)
    say(f"[calibrate] {count} samples from {spec.describe()}")

    def iterate():
        for sample in iter_samples(spec, task_channels={}, size=info.size, mean=info.mean, std=info.std,
                                   limit=opts.calib_samples, default_split="train"):
            yield {"image": sample.image[None].astype(np.float32)}

    return CalibrationSet.from_source(iterate, num_samples=count, input_names=["image"])


def _head_calibration(backbone_onnx: Path, calibration, head_inputs: list[str]):
    """Feeds for a split head: the backbone's real outputs on the calibration images (ONNX Runtime fp32),
    computed on the fly, one image at a time."""
    import onnxruntime as ort

    from calibration.data import CalibrationSet

    session = ort.InferenceSession(str(backbone_onnx), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def iterate():
        for feed in calibration:
            outputs = dict(zip(names, session.run(None, feed), strict=True))
            yield {n: outputs[n].astype(np.float32) for n in head_inputs}

    def digest_items():
        # The feeds are a pure function of the backbone and its calibration images.
        yield calibration.fingerprint().encode()
        yield sha256_file(backbone_onnx).encode()
        yield f"onnxruntime {ort.__version__}".encode()

    return CalibrationSet.from_source(iterate, num_samples=len(calibration), input_names=head_inputs,
                                      settings={"head_inputs": head_inputs}, digest_items=digest_items,
                                      min_samples=1)


# ----------------------------------------------------------------------------- engine step


def _graph_inputs(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def engine_step(backend: str, precision: str, opts: BuildOptions, info: ModelInfo, export_dir: Path, out: Path,
                calib: Callable[[], object], say: Say, reused: list[str], bundle_graphs: Path | None = None) -> EngineEntry:
    from calibration.prepare import prepare_graph

    BACKENDS[backend].check_precision(precision)
    name = f"{backend}-{precision}"
    target = out / ENGINES_DIR / name
    graph_hashes = {role: sha256_file(export_dir / f) for role, f in info.graph_files.items()}
    # From a bundle every int8 engine is built from the bundled Q/DQ graph, calibrated on the
    # workstation: a device needs no calibration data (OpenVINO reads Q/DQ ONNX as FakeQuantize).
    calibration = calib() if precision == "int8" and bundle_graphs is None else None
    key = _digest("engine", backend, precision, graph_hashes, list(opts.keep_fp32), opts.calib_method,
                  calibration.fingerprint() if calibration is not None else None, str(bundle_graphs))
    if _step_matches(target, key):
        try:
            entry = EngineEntry.read(target)
            entry.artifacts(verify=True)
            reused.append(name)
            say(f"[{name}] reusing the engine in {target}")
            return entry
        except Exception as err:  # noqa: BLE001 - any damage means rebuild
            say(f"[{name}] cached engine unusable ({err}); rebuilding")
    staging = _fresh_dir(target)
    work = out / GRAPHS_DIR / name
    work.mkdir(parents=True, exist_ok=True)
    build = get_backend(backend).build
    entry = EngineEntry(backend, precision, target, model={
        "tasks": list(info.tasks), "output_channels": info.channels, "input_size": info.size,
        "mean": list(info.mean), "std": list(info.std)})
    started = time.perf_counter()
    for role, file in info.graph_files.items():
        graph = export_dir / file
        role_calibration = calibration
        if calibration is not None and role.startswith("head_"):
            role_calibration = _head_calibration(export_dir / info.graph_files["backbone"], calibration, _graph_inputs(graph))
        qdq = None
        if bundle_graphs is not None and precision == "int8":
            qdq = bundle_graphs / f"{Path(file).stem}.int8.qdq.onnx"
            if not qdq.is_file():
                raise ExportError(f"the bundle has no Q/DQ graph {qdq.name}; build the bundle from an int8 build")
        if qdq is not None and backend == "openvino":
            prepared_path, prepared_meta = qdq, {"qdq_onnx": str(qdq), "quantized_by": "bundled Q/DQ graph"}
        else:
            say(f"[{name}] preparing {file}" + (" (calibrating)" if role_calibration is not None else ""))
            prepared = prepare_graph(backend, graph, work, precision, calibration=role_calibration, qdq_onnx=qdq,
                                     keep_fp32=opts.keep_fp32, calibration_method=opts.calib_method,
                                     cache=out / CACHE_DIR)
            prepared_path, prepared_meta = prepared.path, dict(prepared.metadata)
        say(f"[{name}] building engine for {file}")
        kwargs = {"metadata": prepared_meta, "name": Path(file).stem}
        if opts.threads and backend == "onnxruntime":
            kwargs["intra_op_threads"] = opts.threads
        if opts.threads and backend == "openvino":
            kwargs["num_threads"] = opts.threads
        artifact = build(prepared_path, staging, precision=precision, **kwargs)
        entry.files[role] = artifact.path.name
    entry.directory = staging
    entry.save()
    _mark_step(staging, key, seconds=round(time.perf_counter() - started, 2))
    _publish(staging, target)
    entry.directory = target
    return entry


# ----------------------------------------------------------------------------- checking


def check_engines(entries: list[EngineEntry], opts: BuildOptions, info: ModelInfo, export_dir: Path, out: Path,
                  reference, say: Say, tolerances: Tolerances, model_meta: dict, keep_evalset: bool = True) -> dict:
    """One pass over the evaluation data with every engine open; returns the report (also written)."""
    from contextlib import ExitStack

    runners, checkers, engine_infos = {}, {}, {}
    html_samples: list[Sample] = []
    with ExitStack() as stack:
        for entry in entries:
            runner = load_runner(entry, opts.threads)
            stack.enter_context(runner)
            runners[entry.key] = runner
            checkers[entry.key] = EngineChecker(info.channels, entry.precision, tolerances)
            artifacts = entry.artifacts(verify=False)
            first = next(iter(artifacts.values()))
            engine_infos[entry.key] = {
                "backend": entry.backend, "precision_requested": entry.precision,
                "precision_executed": getattr(runner, "precision_executed", "") or first.precision_executed,
                "device": first.device, "files": entry.files, "directory": str(entry.directory),
                "notes": sorted(set(list(getattr(runner, "notes", [])) + [n for a in artifacts.values() for n in a.notes])),
            }
        source = "pytorch" if reference is not None else "stored"
        count = 0
        for batch in eval_batches(opts, info, export_dir, out, reference, say, keep_evalset):
            results = {}
            for key, runner in runners.items():
                outputs = runner.infer({"image": batch.image})
                checkers[key].update(outputs, batch)
                results[key] = outputs
            count += batch.image.shape[0]
            if batch.labels is not None:
                for i in range(batch.image.shape[0]):
                    if len(html_samples) >= opts.report_samples:
                        break
                    html_samples.append(Sample(
                        image=batch.image[i], reference={t: batch.reference[t][i] for t in info.tasks},
                        engines={k: {t: np.asarray(o[t])[i] for t in info.tasks} for k, o in results.items()},
                        labels={t: v[i] for t, v in batch.labels.items()}))
            say(f"[check] {count} images checked on {len(runners)} engine(s)")
    checks = [checkers[k].finish(engine_infos[k], source) for k in runners]
    report = build_report(checks, model_meta)
    write_reports(report, out)
    curves = model_meta.get("curves_png")
    write_html(report, html_samples, out, info.mean, info.std, Path(curves) if curves else None)
    return report


# ----------------------------------------------------------------------------- the commands


def resolve_backends(requested: tuple[str, ...], say: Say) -> list[str]:
    chosen = []
    for name in requested:
        if name == "all":
            for candidate, spec in BACKENDS.items():
                ok, reason = spec.available()
                if ok:
                    chosen.append(candidate)
                else:
                    say(f"skipping {candidate}: {reason}")
            continue
        resolved, notice = choose_backend(name)
        say(notice)
        chosen.append(resolved)
    return list(dict.fromkeys(chosen))


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run_build(opts: BuildOptions, say: Say) -> BuildOutcome:
    """Every check of the options and inputs that is cheap runs before anything is written under `opts.out`."""
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; choose another --out")
    precisions = ALL_PRECISIONS if "all" in opts.precisions else tuple(dict.fromkeys(opts.precisions))
    backends = resolve_backends(opts.backends, say)
    for backend in backends:
        for precision in precisions:
            BACKENDS[backend].check_precision(precision)
    for spec_text in (opts.eval_data, opts.calib_data):
        if spec_text and parse_spec(spec_text).kind == "evalset":
            read_evalset(Path(spec_text))  # a few images: an unreadable one is refused before any work
    Tolerances.from_file(opts.tolerances)
    if "int8" in precisions and not opts.from_bundle:
        check_calibration_data(opts)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        from mtlora.fileio import why_not_writable

        raise ExportError(f"{out}: cannot create the build directory ({why_not_writable(out, err)}); "
                          "choose another --out") from None
    try:
        return _run_build(opts, out, precisions, backends, say)
    except BaseException:
        if created:
            # A build that failed before finishing any step leaves nothing behind.
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _run_build(opts: BuildOptions, out: Path, precisions: tuple[str, ...], backends: list[str], say: Say) -> BuildOutcome:
    from export.pipeline.sources import resolve_model

    reused: list[str] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()
    bundle_graphs = None
    if opts.from_bundle:
        from export.artifacts.bundle import open_bundle

        export_dir, bundle_graphs, evalset = open_bundle(Path(opts.from_bundle), say)
        opts.eval_data = opts.eval_data or str(evalset)
        reference = None
        source_line = f"model: bundle {opts.from_bundle}"
        checkpoint = None
    else:
        source = resolve_model(opts.checkpoint, {})
        say(source.how)
        checkpoint = source.checkpoint
        export_dir = export_step(opts, checkpoint, out, say, reused)
        source_line = source.how
        reference = None
    timings["export"] = round(time.perf_counter() - started, 2)
    info = ModelInfo.from_manifest(export_dir)
    if checkpoint is not None and _torch_available():
        reference = TorchReference(checkpoint, opts.img_size, info.tasks)

    calibration_holder: dict[str, object] = {}

    def calib():
        if "set" not in calibration_holder:
            calibration_holder["set"] = calibration_set(opts, info, say)
        return calibration_holder["set"]

    entries = []
    for backend in backends:
        for precision in precisions:
            t0 = time.perf_counter()
            entries.append(engine_step(backend, precision, opts, info, export_dir, out, calib, say, reused, bundle_graphs))
            timings[f"{backend}-{precision}"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    curves = checkpoint / "curves.png" if checkpoint is not None and checkpoint.is_dir() else None
    model_meta = {"tasks": list(info.tasks), "output_channels": info.channels, "input_size": info.size,
                  "layout": info.layout, "source": source_line,
                  "curves_png": str(curves) if curves is not None and curves.is_file() else None}
    report = check_engines(entries, opts, info, export_dir, out, reference, say,
                           Tolerances.from_file(opts.tolerances), model_meta)
    timings["check"] = round(time.perf_counter() - t0, 2)
    evalset = out / EVALSET_FILE
    write_atomic(out / BUILD_FILE, json.dumps({
        "options": asdict(opts), "backends": backends, "precisions": list(precisions), "source": source_line,
        "engines": [e.key for e in entries], "reused": reused, "seconds": timings, "passed": report["passed"],
        "files": {EVALSET_FILE: sha256_file(evalset)} if evalset.is_file() else {},
    }, indent=2, sort_keys=True, default=str) + "\n")
    return BuildOutcome(out, report, reused)


def read_build_record(build_dir: Path) -> dict:
    """build.json of a build directory (plain JSON; anything else is refused with one line)."""
    path = Path(build_dir) / BUILD_FILE
    recorded = read_json(path, corrupt=f"{path}: corrupt",
                         missing=f"{build_dir}: no {BUILD_FILE}; is this a build directory from 'mtlora-export build'?")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("options"), dict):
        raise ExportError(f"{path}: not a build record written by 'mtlora-export build'")
    return recorded


def verify_build(build_dir: Path, export_dir: Path | None = None, recorded: dict | None = None) -> list[EngineEntry]:
    """Check every file of a build against its SHA-256 before anything uses it: the export against
    manifest.json, each engine against its sidecar, the evaluation set against build.json.
    Raises (naming the file) on a missing, truncated or modified one; returns the engines."""
    build_dir = Path(build_dir)
    verify_manifest(export_dir if export_dir is not None else build_dir / EXPORT_DIR)
    entries = list_engines(build_dir)
    for entry in entries:
        entry.artifacts(verify=True)
    if recorded is None and (build_dir / BUILD_FILE).is_file():
        recorded = read_build_record(build_dir)
    for name, digest in ((recorded or {}).get("files") or {}).items():
        path = build_dir / name
        if not path.is_file():
            raise ExportError(f"{path}: listed in {BUILD_FILE} but missing; re-run the build")
        if sha256_file(path) != digest:
            raise ExportError(f"{path}: modified or truncated (SHA-256 differs from {BUILD_FILE}); re-run the build")
    return entries


def run_check(build_dir: str, say: Say, eval_data: str | None = None, tolerances: str | None = None,
              threads: int | None = None) -> dict:
    """Re-run the accuracy checks of an existing build (with PyTorch if present, else stored references)."""
    out = Path(build_dir)
    recorded = read_build_record(out)
    options = recorded["options"]
    try:
        opts = BuildOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    except TypeError as err:
        raise ExportError(f"{out / BUILD_FILE}: not a build record of this version ({err})") from None
    opts.out = str(out)
    if eval_data:
        opts.eval_data = eval_data
    if tolerances:
        opts.tolerances = tolerances
    if threads:
        opts.threads = threads
    if opts.from_bundle:
        from export.artifacts.bundle import open_bundle

        export_dir, _, evalset = open_bundle(Path(opts.from_bundle), say)
        opts.eval_data = eval_data or str(evalset)
    else:
        export_dir = out / EXPORT_DIR
    entries = verify_build(out, export_dir, recorded)
    info = ModelInfo.from_manifest(export_dir)
    reference = None
    if opts.checkpoint and _torch_available() and not opts.from_bundle and Path(opts.checkpoint).exists():
        reference = TorchReference(Path(opts.checkpoint), opts.img_size, info.tasks)
    elif not opts.from_bundle and _torch_available() and opts.checkpoint is None:
        from export.pipeline.sources import DEFAULT_MODEL

        if (DEFAULT_MODEL / "model.safetensors").is_file():
            reference = TorchReference(DEFAULT_MODEL, opts.img_size, info.tasks)
    model_meta = {"tasks": list(info.tasks), "output_channels": info.channels, "input_size": info.size,
                  "layout": info.layout, "source": recorded.get("source", "")}
    # A check reads the build; it does not rewrite its evaluation set (build.json vouches for that one).
    return check_engines(entries, opts, info, export_dir, out, reference, say,
                         Tolerances.from_file(opts.tolerances), model_meta, keep_evalset=False)
