"""Deployment bundles: everything a device needs to install mtlora-export and build and check its own
engines, without PyTorch and without a checkout.

    BUNDLE/
      export/            fp32 ONNX graph(s), manifest.json, reference.npz
      graphs/            <graph>.fp16.onnx and <graph>.int8.qdq.onnx (calibrated on the workstation)
      calibration-cache/ the workstation's calibration results
      evalset.npz        evaluation images with labels and their PyTorch references
      tolerances.json    the limits the build was checked with; a device build checks with them too
      mtlora_export-<version>-py3-none-any.whl   the project, torch-free install requirements only
      constraints.txt    the versions of its dependencies it was built and tested with
      README.md          the commands to run on the device
      bundle.json        every file with its SHA-256, the build's accuracy verdict, the wheel

TensorRT and ONNX Runtime on the device build int8 from the bundled Q/DQ
graph, so a Jetson needs no calibration data; OpenVINO calibrates with NNCF
on the bundled evaluation images.

Only a build that passed its accuracy gate is bundled, unless `allow_failed`,
which the bundle then says in bundle.json and its README.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from engines.files import index_files, verify_files
from export.artifacts.builddir import BuildDir
from export.artifacts.device_install import device_commands, install_table
from export.artifacts.files import read_json, write_json_atomic, write_text_atomic
from export.artifacts.manifest import read_manifest, verify_manifest
from export.errors import ExportError

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "mtlora-export/bundle/1"
TOLERANCES_FILE = "tolerances.json"
CONSTRAINTS_FILE = "constraints.txt"

README = """# mtlora-export deployment bundle

Tasks: {tasks}. Input: {size}x{size} RGB, normalised with mean {mean} and std {std}.
Built from: {source}.

{gate}

## On the device

This directory is all a device needs: the model's graphs, the PyTorch references
its engines are checked against, a wheel of mtlora-export ({wheel}, no torch, no
timm) and {constraints}, the versions of its dependencies it was built and tested
with. With {name}.tar.gz beside you:

```bash
{commands}
```

The install line per device (same venv, same wheel; only the extra differs):

{table}

`build` writes the engine, then checks it against the PyTorch references stored
in `evalset.npz` and `export/reference.npz`, task by task, with the tolerances
the workstation's build used ({tolerances_file}: {tolerances_source}), and writes
report.json, junit.xml, summary.md and report.html. It exits 1 if a check fails.
On a CPU, use `--backend onnxruntime` or `--backend openvino` with
`--precision fp32|fp16|int8`.

`~/mtlora/bin/mtlora-export check build` re-runs the checks; add
`--baseline report.json` to fail on any regression against a stored report.
"""

PASSED = "Accuracy gate on the workstation: PASSED ({engines})."
FAILED = ("**Accuracy gate on the workstation: FAILED** ({failures}). Bundled anyway with "
          "`--allow-failed`: a device build checks with the same tolerances and is expected to fail the same way.")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle's parts: the export, the prepared graphs, the evaluation set, the tolerances."""

    root: Path
    index: dict

    @property
    def export(self) -> Path:
        return self.root / BuildDir.EXPORT

    @property
    def graphs(self) -> Path:
        return self.root / BuildDir.GRAPHS

    @property
    def evalset(self) -> Path:
        return self.root / BuildDir.EVALSET

    @property
    def tolerances(self) -> Path | None:
        """The tolerances the workstation's build was checked with (None: a bundle made before bundles
        carried them, checked with the defaults)."""
        name = (self.index.get("tolerances") or {}).get("file")
        return self.root / name if name in self.index["files"] else None


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


def _prepared_graphs(build: BuildDir, graph_files: dict[str, str], staging: Path, say) -> list[str]:
    """Copy the fp16 and Q/DQ graphs the build made; make the fp16 ones if the build had none."""
    from calibration.prepare import prepare_graph

    written = []
    for file in graph_files.values():
        stem = Path(file).stem
        fp16 = next(iter(build.prepared_graphs("fp16", file)), None)
        if fp16 is None:
            say(f"[bundle] making the fp16 graph of {file}")
            fp16 = prepare_graph("onnxruntime", build.export / file, staging / ".work", "fp16").path
        _copy(fp16, staging / BuildDir.GRAPHS / f"{stem}.fp16.onnx")
        written.append(f"{stem}.fp16.onnx")
        qdq = next(iter(build.prepared_graphs("qdq", file)), None)
        if qdq is not None:
            _copy(qdq, staging / BuildDir.GRAPHS / f"{stem}.int8.qdq.onnx")
            written.append(f"{stem}.int8.qdq.onnx")
    shutil.rmtree(staging / ".work", ignore_errors=True)
    return written


def make_bundle(build_dir: str | Path, out: str | Path, say, allow_failed: bool = False) -> tuple[Path, Path]:
    """Write BUNDLE/ and BUNDLE.tar.gz from a finished build directory; returns both paths.

    A build that failed its accuracy gate is refused unless `allow_failed`; every check runs before
    anything is written under `out`."""
    from export.artifacts.project_wheel import build_wheel, checkout_root, constraints_text
    from mtlora.fileio import commit_directory, staging_dir

    checkout_root()  # the bundle carries a wheel of this project, built from its checkout
    build, out = BuildDir(build_dir), Path(out)
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
        _copy(build.evalset, staging / BuildDir.EVALSET)
        graphs = _prepared_graphs(build, manifest["graph_files"], staging, say)
        if not any(g.endswith(".int8.qdq.onnx") for g in graphs):
            say("[bundle] the build has no int8 engine: the bundle carries no Q/DQ graph "
                "(build with --precision int8 first for TensorRT int8 on the device)")
        if build.calibration_cache.is_dir():
            shutil.copytree(build.calibration_cache, staging / BuildDir.CALIBRATION_CACHE)
        write_json_atomic(staging / TOLERANCES_FILE, verdict.tolerances)
        _copy(wheel, staging / wheel.name)
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
    archive = out.with_name(out.name + ".tar.gz")
    partial = archive.with_name(f".{archive.name}.{os.getpid()}.partial")
    say(f"[bundle] writing {archive}")
    try:
        with open(partial, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w:gz") as tar:
                tar.add(out, arcname=out.name)
            fh.flush()
            os.fsync(fh.fileno())
        partial.replace(archive)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out, archive


def verify_bundle(bundle: Path) -> dict:
    """Check every file against bundle.json; a modified, truncated or missing file is named."""
    index = bundle / BUNDLE_FILE
    data = read_json(index, corrupt=f"{index}: corrupt",
                     missing=f"{bundle}: not a bundle (no {BUNDLE_FILE}); make one with 'mtlora-export bundle'")
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT or not isinstance(data.get("files"), dict):
        raise ExportError(f"{index}: not an mtlora-export bundle index")
    links = [p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_symlink()]
    if links:
        raise ExportError(f"{bundle}: holds symbolic link(s) {', '.join(sorted(links)[:3])}; a bundle carries plain "
                          "files only: copy it again (tar -x without following links)")
    verify_files(bundle, data["files"], where=BUNDLE_FILE, remedy="copy the bundle again", error=ExportError)
    return data


def open_bundle(bundle: Path, say) -> Bundle:
    """Verify a bundle and return its parts."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise ExportError(f"{bundle}: no such bundle directory (unpack the .tar.gz first)")
    index = verify_bundle(bundle)
    say(f"model: bundle {bundle} (all files verified)")
    gate = index.get("gate") or {}
    if gate.get("passed") is False:
        say(f"note: this bundle's build FAILED its accuracy gate on the workstation "
            f"({'; '.join(gate.get('failed') or [])}); it was bundled with --allow-failed")
    return Bundle(bundle, index)
