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
which the bundle then says in bundle.json and its README (`export.pipeline.bundle`
makes bundles; this module has their layout, and opens and verifies them).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from engines.files import verify_files
from export.artifacts.builddir import BuildDir
from export.artifacts.files import read_json
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


def copy_file(src: Path, dst: Path) -> None:
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
