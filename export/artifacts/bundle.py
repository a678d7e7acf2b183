"""Deployment bundles: everything a device needs to build and check its own engines, without PyTorch.

    BUNDLE/
      export/            fp32 ONNX graph(s), manifest.json, reference.npz
      graphs/            <graph>.fp16.onnx and <graph>.int8.qdq.onnx (calibrated on the workstation)
      calibration-cache/ the workstation's calibration results
      evalset.npz        evaluation images with labels and their PyTorch references
      README.md          the commands to run on the device
      bundle.json        every file with its SHA-256

TensorRT and ONNX Runtime on the device build int8 from the bundled Q/DQ
graph, so a Jetson needs no calibration data; OpenVINO calibrates with NNCF
on the bundled evaluation images.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from engines.files import index_files, verify_files
from export.artifacts.builddir import BuildDir
from export.artifacts.files import read_json, write_json_atomic, write_text_atomic
from export.artifacts.manifest import read_manifest, verify_manifest
from export.errors import ExportError

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "mtlora-export/bundle/1"

README = """# mtlora-export deployment bundle

Tasks: {tasks}. Input: {size}x{size} RGB, normalised with mean {mean} and std {std}.
Built from: {source}.

## On the device (Jetson: JetPack 6.x / 7.x with TensorRT from JetPack)

```bash
python3 -m venv --system-site-packages ~/mtlora-venv   # --system-site-packages sees JetPack's tensorrt
~/mtlora-venv/bin/pip install 'mtlora-export[tensorrt]'  # no torch, no timm
~/mtlora-venv/bin/mtlora-export build --from-bundle {name} --backend tensorrt --precision fp16 --out {name}-build
~/mtlora-venv/bin/mtlora-export run {name}-build/engines/tensorrt-fp16 --image some.jpg --out prediction.npz
```

`build` writes the engine, then checks it against the PyTorch references stored
in `evalset.npz` and `export/reference.npz`, task by task, and writes
report.json, junit.xml, summary.md and report.html. It exits 1 if a check fails.

On a CPU instead: `pip install 'mtlora-export[onnxruntime,openvino]'` and use
`--backend onnxruntime` or `--backend openvino` with `--precision fp32|fp16|int8`.

`mtlora-export check {name}-build` re-runs the checks; add `--baseline report.json`
to fail on any regression against a stored report.
"""


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle's parts: the export, the prepared graphs and the evaluation set."""

    root: Path

    @property
    def export(self) -> Path:
        return self.root / BuildDir.EXPORT

    @property
    def graphs(self) -> Path:
        return self.root / BuildDir.GRAPHS

    @property
    def evalset(self) -> Path:
        return self.root / BuildDir.EVALSET


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


def make_bundle(build_dir: str | Path, out: str | Path, say) -> tuple[Path, Path]:
    """Write BUNDLE/ and BUNDLE.tar.gz from a build directory; returns both paths."""
    from mtlora.fileio import commit_directory, staging_dir

    build, out = BuildDir(build_dir), Path(out)
    if not (build.export / "manifest.json").is_file():
        raise ExportError(f"{build.root}: not a build directory (no export/manifest.json); run 'mtlora-export build' first")
    verify_manifest(build.export)
    if not build.evalset.is_file():
        raise ExportError(f"{build.root}: has no {BuildDir.EVALSET}; re-run 'mtlora-export build' with PyTorch installed")
    manifest = read_manifest(build.export)
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
        info = manifest["input"]
        source = manifest.get("source", {}).get("checkpoint", "?")
        write_text_atomic(staging / "README.md", README.format(
            tasks=", ".join(manifest["tasks"]), size=info["shape"][-1], mean=info["mean"], std=info["std"],
            source=source, name=out.name))
        from export.artifacts.graph_lint import build_graphs, lint_graphs

        tensorrt_lint = lint_graphs(staging, build_graphs(staging), say)
        files = index_files(staging, sorted(p for p in staging.rglob("*") if p.is_file()))
        write_json_atomic(staging / BUNDLE_FILE, {"format": BUNDLE_FORMAT, "files": files,
                                                  "tasks": manifest["tasks"], "graphs": graphs,
                                                  "tensorrt_lint": tensorrt_lint})
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
    verify_bundle(bundle)
    say(f"model: bundle {bundle} (all files verified)")
    return Bundle(bundle)
