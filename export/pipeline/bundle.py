"""Making a deployment bundle (`export.artifacts.bundle` has its layout, and opens and verifies one):
only a build that passed its accuracy gate is bundled, unless `allow_failed`, which the bundle then says
in bundle.json and its README. The gate is read from the build's records here, in the pipeline, because
recomputing it takes the checking layer's report and tolerances."""

from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from engines.files import index_files
from export.artifacts.builddir import BuildDir
from export.artifacts.bundle import (
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    CONSTRAINTS_FILE,
    FAILED,
    PASSED,
    README,
    TOLERANCES_FILE,
    copy_file,
)
from export.artifacts.device_install import device_commands, install_table
from export.artifacts.files import write_json_atomic, write_text_atomic
from export.artifacts.manifest import read_manifest, verify_manifest
from export.errors import ExportError


@dataclass(frozen=True)
class BuildVerdict:
    """What a finished build's records say: its accuracy verdict and the tolerances that decided it."""

    passed: bool
    engines: list[str]
    failures: list[str]  # "<engine> (<task>, ...)" for each engine that failed a check
    tolerances: dict  # the per-task overrides ({}: the defaults)
    tolerances_source: str | None  # the --tolerances file the build was given

    def to_dict(self, allowed_failed: bool) -> dict:
        return {"passed": self.passed, "engines": self.engines, "failed": self.failures,
                "bundled_with_allow_failed": allowed_failed and not self.passed}


def read_verdict(build: BuildDir, tasks) -> BuildVerdict:
    """The verdict of a finished build, from the report build.json vouches for (every check recomputed
    from its value and limit, so an edited 'passed' flag decides nothing), and the tolerances that
    decided it: those build.json records (a build made before it recorded them: its --tolerances file)."""
    from export.artifacts.records import read_build_record, verify_records
    from export.checking.report import read_report
    from export.checking.tolerances import Tolerances

    recorded = read_build_record(build)
    verify_records(build, recorded)
    report = read_report(build.report)
    source = recorded["options"].get("tolerances")
    if "tolerances" in recorded:
        tolerances = Tolerances(recorded["tolerances"], source=f"{build.record}: tolerances")
    elif source and not Path(source).is_file():
        raise ExportError(f"{source}: the tolerance file {build.root} was checked with is gone; put it back (the "
                          "bundle carries it to the device) or re-run the build")
    else:
        tolerances = Tolerances.from_file(source) if source else Tolerances()
    tolerances.check_tasks(tasks)
    failures = [f"{e.key} ({', '.join(t for t, r in e.tasks.items() if not r.passed)})"
                for e in report.engines if not e.passed]
    return BuildVerdict(report.passed and bool(report.engines), [e.key for e in report.engines], failures,
                        tolerances.overrides, str(source) if source else None)


# The int8 engines whose build leaves a Q/DQ graph in graphs/ (OpenVINO's int8 is NNCF's own IR).
QDQ_BACKENDS = ("onnxruntime", "tensorrt")


def _checked_graph(build: BuildDir, path: Path) -> Path:
    """`path`, a graph the build prepared, if ONNX can read it; a damaged one is one line naming it
    (the bundle must not carry it to a device, where it would fail far from its cause)."""
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError, OSError, and onnx's own
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExportError(f"{path}: the build's prepared graph cannot be read ({reason}); re-run "
                          f"'mtlora-export build' into {build.root} to make it again") from None
    return path


def _prepared_graphs(build: BuildDir, graph_files: dict[str, str], engines: list[str], staging: Path,
                     say) -> list[str]:
    """Copy the fp16 and Q/DQ graphs the build made; make the fp16 ones if the build had none. An int8
    engine that leaves a Q/DQ graph without one in graphs/ means the build directory lost it."""
    from calibration.prepare import prepare_graph

    qdq_engines = [e for e in engines if e.endswith("-int8") and e.split("-")[0] in QDQ_BACKENDS]
    written = []
    for file in graph_files.values():
        stem = Path(file).stem
        fp16 = next(iter(build.prepared_graphs("fp16", file)), None)
        if fp16 is None:
            say(f"[bundle] making the fp16 graph of {file}")
            fp16 = prepare_graph("onnxruntime", build.export / file, staging / ".work", "fp16").path
        copy_file(_checked_graph(build, fp16), staging / BuildDir.GRAPHS / f"{stem}.fp16.onnx")
        written.append(f"{stem}.fp16.onnx")
        qdq = next(iter(build.prepared_graphs("qdq", file)), None)
        if qdq is None and qdq_engines:
            raise ExportError(f"{build.root}: has the int8 engine(s) {', '.join(qdq_engines)} but not their Q/DQ "
                              f"graph of {file} ({BuildDir.GRAPHS}/*/qdq/{file}); re-run 'mtlora-export build' "
                              f"into {build.root} to make it again")
        if qdq is not None:
            copy_file(_checked_graph(build, qdq), staging / BuildDir.GRAPHS / f"{stem}.int8.qdq.onnx")
            written.append(f"{stem}.int8.qdq.onnx")
    shutil.rmtree(staging / ".work", ignore_errors=True)
    return written


def _copy_calibration_cache(build: BuildDir, staging: Path, say) -> None:
    """The build's calibration results whose files match their manifest; a damaged entry stays behind
    (as in a build, where it is a miss and is computed again)."""
    from calibration.cache import CalibrationCache

    cache = CalibrationCache(build.calibration_cache)
    for entry in sorted(p for p in build.calibration_cache.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            intact = cache.lookup(entry.name) is not None
        except Exception:  # noqa: BLE001 - a name that is not a cache key: not ours to carry
            intact = False
        if intact:
            shutil.copytree(entry, staging / BuildDir.CALIBRATION_CACHE / entry.name)
        else:
            say(f"[bundle] leaving out the damaged calibration cache entry {entry} (its files do not match its "
                "manifest); a build from the bundle calibrates that engine again")


def _check_out(build: BuildDir, out: Path) -> Path:
    """Where the bundle and its archive go, checked before any work: a named directory that is not the
    build or a folder holding it, not someone else's folder (the bundle replaces `out` whole), and an
    archive path that is free for a file."""
    from mtlora_base.files import refuse_foreign_directory

    if out.name in ("", ".", ".."):
        raise ExportError(f"--out {str(out)!r}: name the bundle directory, e.g. --out bundle")
    where, source = out.resolve(), build.root.resolve()
    if where == source or where in source.parents:
        raise ExportError(f"--out {out}: is the build directory or holds it, and the bundle would replace it; "
                          "choose a directory outside the build, e.g. --out bundle")
    refuse_foreign_directory(out, marker=BUNDLE_FILE, what="bundle", error=ExportError)
    archive = out.with_name(out.name + ".tar.gz")
    if archive.exists() and not archive.is_file():
        raise ExportError(f"{archive}: exists and is not a file, so the bundle's archive cannot be written there; "
                          "remove it or choose another --out")
    return archive


def make_bundle(build_dir: str | Path, out: str | Path, say, allow_failed: bool = False) -> tuple[Path, Path]:
    """Write BUNDLE/ and BUNDLE.tar.gz from a finished build directory; returns both paths.

    A build that failed its accuracy gate is refused unless `allow_failed`; every check runs before
    anything is written under `out`."""
    from export.artifacts.project_wheel import build_wheel, checkout_root, constraints_text
    from mtlora.fileio import commit_directory, staging_dir

    checkout_root()  # the bundle carries a wheel of this project, built from its checkout
    build, out = BuildDir(build_dir), Path(out)
    archive = _check_out(build, out)
    if not (build.export / "manifest.json").is_file():
        raise ExportError(f"{build.root}: not a build directory (no export/manifest.json); run 'mtlora-export build' first")
    verify_manifest(build.export)
    if not build.evalset.is_file():
        raise ExportError(f"{build.root}: has no {BuildDir.EVALSET}; re-run 'mtlora-export build' with PyTorch installed")
    manifest = read_manifest(build.export)
    verdict = read_verdict(build, manifest["tasks"])
    if not verdict.passed and not allow_failed:
        what = "; ".join(verdict.failures) or "no engine was checked"
        raise ExportError(f"{build.root}: the build FAILED its accuracy gate ({what}), so its engines must not be "
                          f"deployed; fix it (see {build.report}) or pass --allow-failed to bundle it anyway "
                          "(the bundle then says so in bundle.json and its README)")
    if not verdict.passed:
        say(f"[bundle] the build FAILED its accuracy gate ({'; '.join(verdict.failures)}); bundling it as "
            "--allow-failed asks, and saying so in bundle.json and the README")
    wheel = build_wheel(say)
    staging = staging_dir(out)
    try:
        say(f"[bundle] copying the export and evaluation set from {build.root}")
        shutil.copytree(build.export, staging / BuildDir.EXPORT, ignore=shutil.ignore_patterns(".*"))
        copy_file(build.evalset, staging / BuildDir.EVALSET)
        graphs = _prepared_graphs(build, manifest["graph_files"], verdict.engines, staging, say)
        if not any(g.endswith(".int8.qdq.onnx") for g in graphs):
            say("[bundle] the build has no ONNX Runtime int8 engine: the bundle carries no Q/DQ graph "
                "(build with --backend onnxruntime --precision int8 first for TensorRT int8 on the device)")
        if build.calibration_cache.is_dir():
            _copy_calibration_cache(build, staging, say)
        write_json_atomic(staging / TOLERANCES_FILE, verdict.tolerances)
        copy_file(wheel, staging / wheel.name)
        write_text_atomic(staging / CONSTRAINTS_FILE, constraints_text(wheel))
        info = manifest["input"]
        gate = (PASSED.format(engines=", ".join(verdict.engines)) if verdict.passed
                else FAILED.format(failures="; ".join(verdict.failures) or "no engine was checked"))
        write_text_atomic(staging / "README.md", README.format(
            tasks=", ".join(manifest["tasks"]), size=info["shape"][-1], mean=info["mean"], std=info["std"],
            source=manifest.get("source", {}).get("checkpoint", "?"), name=out.name, gate=gate, wheel=wheel.name,
            constraints=CONSTRAINTS_FILE, commands=device_commands(out.name, wheel.name),
            table=install_table(out.name, wheel.name), tolerances_file=TOLERANCES_FILE,
            tolerances_source=verdict.tolerances_source or "the defaults"))
        from export.artifacts.graph_lint import build_graphs, lint_graphs

        tensorrt_lint = lint_graphs(staging, build_graphs(staging), say)
        files = index_files(staging, sorted(p for p in staging.rglob("*") if p.is_file()))
        write_json_atomic(staging / BUNDLE_FILE, {
            "format": BUNDLE_FORMAT, "files": files, "tasks": manifest["tasks"], "graphs": graphs,
            "tensorrt_lint": tensorrt_lint, "gate": verdict.to_dict(allow_failed),
            "tolerances": {"file": TOLERANCES_FILE, "source": verdict.tolerances_source},
            "wheel": wheel.name, "constraints": CONSTRAINTS_FILE})
        commit_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    partial = archive.with_name(f".{archive.name}.{os.getpid()}.partial")
    say(f"[bundle] writing {archive}")
    try:
        with open(partial, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w:gz") as tar:
                tar.add(out, arcname=out.name)
            fh.flush()
            os.fsync(fh.fileno())
        partial.replace(archive)
    except OSError as err:
        partial.unlink(missing_ok=True)
        from mtlora_base.files import os_error_hint

        raise ExportError(f"{archive}: could not be written ({err.strerror or err}); the bundle directory {out} is "
                          f"whole, so copy that, or {os_error_hint(err)} and run bundle again") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out, archive
