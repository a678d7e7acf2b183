"""Check engines against the original PyTorch model, task by task, and publish the records.

One pass over the evaluation data with every engine open: reference.npz first,
then the evaluation set, with references from the original model (or, without
PyTorch, the ones stored in evalset.npz).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engines.artifact import EngineArtifact
from engines.precision import Precision, PrecisionPlan, judged_precision
from engines.runner import Runner
from export.artifacts.builddir import BuildDir
from export.artifacts.engineset import EngineSet, SplitRunner, list_engine_sets, load_runner
from export.artifacts.evalset import EvalSet, check_numbers, read_npz
from export.artifacts.manifest import ExportInfo, verify_manifest
from export.artifacts.records import publish_records, read_build_record, recover_records, verify_records
from export.checking.accuracy import EngineChecker, EvalBatch
from export.checking.html import Sample, render_html
from export.checking.report import report_files
from export.checking.results import EngineInfo, Judgement, Report
from export.checking.tolerances import Tolerance, Tolerances
from export.errors import ExportError
from export.pipeline.data import batched, check_data_options, iter_samples, parse_spec
from export.pipeline.options import BuildOptions, Say, plan_of
from export.pipeline.original_model import OriginalModel, torch_available
from export.pipeline.sources import DEFAULT_MODEL, ModelSource, default_model_present
from mtlora.tasks import postprocess

# The evaluation sample a build keeps for devices without PyTorch: 16 images, fewer where outputs
# are large (at 448x448 four tasks take 26 MB an image).
EVALSET_IMAGES, EVALSET_BYTES = 16, 64 << 20


def eval_batches(opts: BuildOptions, info: ExportInfo, export_dir: Path, build: BuildDir, reference, say: Say,
                 keep_evalset: bool = True) -> Iterator[EvalBatch]:
    """reference.npz first, then the evaluation set: references from PyTorch, or the stored evalset.

    With `keep_evalset` (a build, not a check) a small labelled sample is saved as evalset.npz."""
    tasks = info.interface.tasks
    ref_file = export_dir / "reference.npz"
    if ref_file.is_file():
        data = read_npz(ref_file, "reference file")
        missing = [k for k in ("input", *tasks) if k not in data]
        if missing:
            raise ExportError(f"{ref_file}: lacks the array(s) {', '.join(missing)}; re-run the export")
        check_numbers(ref_file, data, finite=tuple(data))
        yield EvalBatch(image=data["input"].astype(np.float32), reference={t: data[t] for t in tasks})
    spec = parse_spec(opts.eval_data or "synthetic")
    if reference is None or spec.kind == "evalset":
        path = spec.root if spec.kind == "evalset" else build.evalset
        if not path.is_file():
            raise ExportError(f"no PyTorch here and no stored evaluation set at {path}; "
                              "build from a bundle or install the 'train' extra")
        if reference is None:
            say(f"[check] PyTorch not available: using the stored references in {path}")
        for images, refs, labels in EvalSet.read(path).batches(opts.batch_size, tasks):
            yield EvalBatch(images, refs, labels or None)
        return
    interface = info.interface
    samples = iter_samples(spec, task_channels=interface.channels, size=interface.size, mean=interface.mean,
                           std=interface.std, limit=opts.eval_samples, default_split="val")
    kept_images, kept_refs, kept_labels = [], {t: [] for t in tasks}, {}
    for images, labels, _names in batched(samples, opts.batch_size):
        refs = reference(images)
        kept_bytes = sum(x.nbytes for x in kept_images) + sum(v.nbytes for vs in kept_refs.values() for v in vs)
        if sum(len(x) for x in kept_images) < EVALSET_IMAGES and kept_bytes < EVALSET_BYTES:
            kept_images.append(images)
            for t in tasks:
                kept_refs[t].append(refs[t])
            for t, v in labels.items():
                kept_labels.setdefault(t, []).append(v)
        yield EvalBatch(images, refs, labels or None)
    if kept_images and keep_evalset:
        EvalSet.collect(kept_images, kept_refs, kept_labels).write(build.evalset)


@dataclass
class CheckOutcome:
    """A check's report, and what its HTML page shows (rendered when asked, so that what a build adds to
    the report afterwards, such as the int8 fallback or the auto candidates, is on the page too)."""

    report: Report
    samples: list[Sample]
    mean: tuple
    std: tuple
    curves_png: Path | None = None

    @property
    def html(self) -> str:
        return render_html(self.report, self.samples, self.mean, self.std, self.curves_png)


@dataclass(frozen=True)
class TaskPath:
    """The precisions on one task's path through a split engine set (its backbone, its head): the loosest
    asked; what ran as reported ("int8", or "int8/bf16" where backbone and head differ); and the loosest
    of what each part really computed (`engines.precision.judged_precision`, per part)."""

    asked: Precision
    ran: str
    judged: Precision


def task_paths(plan: PrecisionPlan, executed: Mapping[str, str], tasks: Iterable[str]) -> dict[str, TaskPath]:
    """Each task's `TaskPath` in an engine set of `plan` whose parts report `executed` ({role: precision})."""
    paths = {}
    for task in tasks:
        roles = ("backbone", f"head_{task}")
        judged = [judged_precision(plan.for_role(r), executed.get(r, "")) for r in roles]
        ran = "/".join(dict.fromkeys(executed.get(r) or "?" for r in roles))
        paths[task] = TaskPath(plan.for_task(task), ran, judged[0].looser(judged[1]))
    return paths


class PartTolerances:
    """Tolerances for an engine set whose parts have different precisions: each task is judged at the
    loosest precision on its path (its backbone's, its head's), as asked and as ran."""

    def __init__(self, tolerances: Tolerances, paths: Mapping[str, TaskPath]):
        self.tolerances = tolerances
        self.paths = dict(paths)

    def judge(self, asked: str, executed: str, task: str, kind: str | None = None) -> tuple[Tolerance, Judgement]:
        path = self.paths.get(task)
        if path is None:
            return self.tolerances.judge(asked, executed, task, kind)
        return self.tolerances.judge(path.asked, path.ran, task, kind, judged_as=path.judged)

    def for_task(self, precision: str, task: str, kind: str | None = None) -> Tolerance:
        return self.judge(precision, precision, task, kind)[0]


def executed_by_role(entry: EngineSet, runner: Runner | None = None,
                     artifacts: Mapping[str, EngineArtifact] | None = None) -> dict[str, str]:
    """What each graph role of `entry` reports it ran: its open runner's (read back here) when it says,
    else its sidecar's (read back where it was built)."""
    artifacts = artifacts if artifacts is not None else entry.artifacts(verify=False)
    live: dict[str, str] = {}
    if isinstance(runner, SplitRunner):
        live = {"backbone": runner.backbone.precision_executed,
                **{f"head_{t}": head.precision_executed for t, head in runner.heads.items()}}
    elif runner is not None:
        live = dict.fromkeys(entry.files, runner.precision_executed)
    return {role: live.get(role) or artifact.precision_executed for role, artifact in artifacts.items()}


def tolerances_for(entry: EngineSet, tolerances: Tolerances, tasks,
                   executed: Mapping[str, str] | None = None) -> Tolerances | PartTolerances:
    """The tolerances that judge `entry`: as they are for one precision (the checker reads what ran from
    the engine's `EngineInfo`), per task path for per-part precisions (`executed`, {role: what ran},
    read from the sidecars when not given)."""
    plan = plan_of(entry.precision)
    if not plan.per_part:
        return tolerances
    return PartTolerances(tolerances, task_paths(plan, executed if executed is not None else executed_by_role(entry),
                                                 tasks))


def check_engines(entries: list[EngineSet], opts: BuildOptions, info: ExportInfo, export_dir: Path, build: BuildDir,
                  reference, say: Say, tolerances: Tolerances, model: dict, keep_evalset: bool = True,
                  curves_png: Path | None = None, batches: Iterable[EvalBatch] | None = None) -> CheckOutcome:
    """One pass over the evaluation data with every engine open; returns the report and its HTML page.

    `batches` (already computed, e.g. kept by the build for several checks) replaces `eval_batches`."""
    interface = info.interface
    tolerances.check_tasks(interface.tasks)
    runners, checkers, infos = {}, {}, {}
    html_samples: list[Sample] = []
    with ExitStack() as stack:
        for entry in entries:
            runner = stack.enter_context(load_runner(entry, opts.threads))
            runners[entry.key] = runner
            artifacts = entry.artifacts(verify=False)
            executed = executed_by_role(entry, runner, artifacts)
            checkers[entry.key] = EngineChecker(interface.channels, entry.precision,
                                                tolerances_for(entry, tolerances, interface.tasks, executed),
                                                postprocessed=interface.postprocessed)
            first = next(iter(artifacts.values()))
            notes = sorted(set(runner.notes) | {n for a in artifacts.values() for n in a.notes})
            infos[entry.key] = EngineInfo(entry.backend, entry.precision,
                                          runner.precision_executed or first.precision_executed, first.device,
                                          dict(entry.files), str(entry.directory), tuple(notes))
        source = "pytorch" if reference is not None else "stored"
        count = 0
        inputs_digest = hashlib.sha256()
        if batches is None:
            batches = eval_batches(opts, info, export_dir, build, reference, say, keep_evalset)
        for batch in batches:
            inputs_digest.update(np.ascontiguousarray(batch.image, dtype=np.float32).tobytes())
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
                    reference = {t: batch.reference[t][i:i + 1] for t in interface.tasks}
                    if interface.postprocessed:
                        reference = {t: postprocess(t, v) for t, v in reference.items()}
                    html_samples.append(Sample(
                        image=batch.image[i], reference={t: v[0] for t, v in reference.items()},
                        engines={k: {t: np.asarray(o[t])[i] for t in interface.tasks} for k, o in results.items()},
                        labels={t: v[i] for t, v in batch.labels.items()},
                        kinds={t: interface.kind(t) for t in interface.tasks} if interface.postprocessed else {}))
            say(f"[check] {count} images checked on {len(runners)} engine(s)")
    spec = parse_spec(opts.eval_data or "synthetic")
    # What a baseline must share with this report besides the model (see checking.baseline).
    identity = {**info.identity, "postprocessed": interface.postprocessed, "layout": info.layout,
                "evaluation_data": {"kind": spec.kind, "source": spec.describe(), "samples": count,
                                    "sha256": inputs_digest.hexdigest()},
                "tolerances": tolerances.identity()}
    report = Report(model, [checkers[k].finish(infos[k], source) for k in runners], identity=identity)
    return CheckOutcome(report, html_samples, interface.mean, interface.std, curves_png)


def write_records(build: BuildDir, outcome: CheckOutcome, record: dict) -> None:
    """The reports and build.json, as one set (see `export.artifacts.records`)."""
    records = {**report_files(outcome.report), BuildDir.HTML: outcome.html.encode()}
    publish_records(build, records, {**record, "passed": outcome.report.passed}, {BuildDir.EVALSET: build.evalset})


def verify_build(build: BuildDir, export_dir: Path | None = None, recorded: dict | None = None) -> list[EngineSet]:
    """Check every file of a build against its SHA-256 before anything uses it: the export against
    manifest.json, each engine against its sidecar and engine.json, the evaluation set and reports
    against build.json. Raises (naming the file) on a missing, truncated or modified one."""
    verify_manifest(export_dir if export_dir is not None else build.export)
    entries = list_engine_sets(build)
    for entry in entries:
        entry.artifacts(verify=True)
    if recorded is None and build.record.is_file():
        recorded = read_build_record(build)
    verify_records(build, recorded or {})
    return entries


def _reference_for_check(opts: BuildOptions, tasks) -> OriginalModel | None:
    """The original model a check compares with, when PyTorch and the checkpoint are here."""
    if opts.from_bundle or not torch_available():
        return None
    if opts.checkpoint:
        path = Path(opts.checkpoint)
        return OriginalModel(ModelSource(path, "", opts.img_size), tasks) if path.exists() else None
    return OriginalModel(ModelSource(DEFAULT_MODEL, "", opts.img_size), tasks) if default_model_present() else None


def check_eval_data(build: BuildDir, eval_data: str | None) -> None:
    """`check --eval-data`, refused as `build` refuses its data options (`check_data_options`): before any
    work and before the build's lock, so that nothing is written into the build. An .npz must have the
    input size of the build's export."""
    if eval_data is None:
        return
    recorded = read_build_record(build)
    opts = BuildOptions.from_record(recorded["options"], str(build.record))
    export_dir = Path(opts.from_bundle) / BuildDir.EXPORT if opts.from_bundle else build.export
    check_data_options(replace(opts, eval_data=eval_data, calib_data=None),
                       model_size=lambda _opts: _export_size(export_dir))


def _export_size(export_dir: Path) -> int | None:
    """The input size of the export in `export_dir`; None where its manifest does not read (the check's
    verification then refuses the export, naming what is wrong)."""
    try:
        return ExportInfo.read(export_dir).interface.size
    except ExportError:
        return None


def run_check(build_dir: str | Path, say: Say, eval_data: str | None = None, tolerances: str | None = None,
              threads: int | None = None) -> Report:
    """Re-run the accuracy checks of an existing build (with PyTorch if present, else stored references)."""
    build = BuildDir(build_dir)
    tolerance_limits = Tolerances.from_file(tolerances) if tolerances else None
    check_eval_data(build, eval_data)
    with build.locked("check"):
        recover_records(build, say)
        recorded = read_build_record(build)
        opts = BuildOptions.from_record(recorded["options"], str(build.record))
        opts.out = str(build.root)
        opts.eval_data = eval_data if eval_data is not None else opts.eval_data
        opts.tolerances = tolerances or opts.tolerances
        opts.threads = threads or opts.threads
        export_dir = build.export
        if opts.from_bundle:
            from export.artifacts.bundle import open_bundle

            bundle = open_bundle(Path(opts.from_bundle), say)
            export_dir = bundle.export
            opts.eval_data = eval_data if eval_data is not None else str(bundle.evalset)
        entries = verify_build(build, export_dir, recorded)
        info = ExportInfo.read(export_dir)
        reference = _reference_for_check(opts, info.interface.tasks)
        model = {**info.interface.to_dict(), "layout": info.layout, "source": recorded.get("source", "")}
        limits = tolerance_limits or Tolerances.from_file(opts.tolerances)
        # A check reads the build; it does not rewrite its evaluation set (build.json vouches for that one).
        outcome = check_engines(entries, opts, info, export_dir, build, reference, say, limits, model,
                                keep_evalset=False)
        if build.report.is_file():
            # What the build found out besides accuracy (int8 fallback, auto's candidates) stays in the report.
            from export.checking.report import read_report

            previous = read_report(build.report)
            outcome.report.fallbacks, outcome.report.auto = previous.fallbacks, previous.auto
            outcome.report.notes = previous.notes
        # The limits that decided this verdict (a bundle carries them to the device), whatever file held them.
        write_records(build, outcome, {**{k: v for k, v in recorded.items() if k not in ("files", "passed")},
                                       "tolerances": limits.overrides})
    return outcome.report
