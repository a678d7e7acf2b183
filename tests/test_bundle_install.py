"""The bundle's wheel and install instructions: the wheel is built from the checkout with torch-free
install requirements, constraints.txt pins what was tested here, and the README, every bundle's README
and pyproject.toml name the same extras (the install table of `export.artifacts.device_install`)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from export.artifacts.device_install import DEVICES, device_commands, install_table
from export.artifacts.project_wheel import (
    build_wheel,
    checkout_root,
    constraints_text,
    device_requirements,
    source_digest,
    source_files,
    wheel_metadata,
)
from export.errors import ExportError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = set(PROJECT["optional-dependencies"])
WHEEL = f"mtlora_export-{PROJECT['version']}-py3-none-any.whl"
TORCH_SIDE = {"torch", "torchvision", "timm"}


def _build_outputs() -> dict[str, int]:
    """What a wheel build could leave in the checkout: egg-info folders and build/lib, with their times."""
    found = [*ROOT.glob("*.egg-info"), *ROOT.glob("*.egg-info/*"), ROOT / "build" / "lib"]
    return {p.name: p.stat().st_mtime_ns for p in found if p.exists()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # A cache of its own, so the wheel is really built here (not taken from an earlier run's cache),
    # and the checkout's build outputs are compared around that build: an editable install's egg-info
    # may be there already, but the build must not add or touch one.
    before = _build_outputs()
    with pytest.MonkeyPatch.context() as patch:  # kept for the module: its tests reuse this cache
        patch.setenv("MTLORA_EXPORT_CACHE", str(tmp_path_factory.mktemp("wheel-cache")))
        built = build_wheel(lambda line: None)
        assert _build_outputs() == before, "building the wheel wrote into the checkout"
        yield built


def test_readme_shows_the_install_table_and_the_device_steps():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deploying on Jetson"):]
    assert install_table("bundle-default", WHEEL) in section
    assert f"```bash\n{device_commands('bundle-default', WHEEL)}\n```" in section


def test_every_extra_named_anywhere_is_one_of_pyprojects():
    table = {row.extra for row in DEVICES}
    assert table <= EXTRAS
    # Every TensorRT extra has its row (a device must be able to find its line).
    assert {e for e in EXTRAS if e.startswith("tensorrt")} <= table
    named = {}
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *[p for package in ("mtlora", "export", "engines", "calibration") for p in (ROOT / package).rglob("*.py")]]
    for path in texts:
        text = path.read_text()
        # 'mtlora-export[x,y]', '<wheel>.whl[x]' and the hint form '[tensorrt-cu12] or [tensorrt-cu13]'
        for match in re.finditer(r"(?:mtlora-export|\.whl)\[([a-z0-9,\-]+)\]|\[(tensorrt[a-z0-9\-]*)\]", text):
            for extra in (match.group(1) or match.group(2)).split(","):
                named.setdefault(extra, path.relative_to(ROOT).as_posix())
    assert "tensorrt-cu12" in named  # the scan reads what it should
    unknown = {extra: where for extra, where in named.items() if extra not in EXTRAS}
    assert not unknown, f"extras that pyproject.toml does not have: {unknown}"


def test_the_wheel_is_torch_free(wheel):
    assert wheel.name == WHEEL
    metadata = wheel_metadata(wheel)
    names = {Requirement(str(r)).name.lower() for r in device_requirements(metadata)}
    assert {"numpy", "onnx", "click", "onnxruntime", "cuda-python"} <= names
    assert not names & TORCH_SIDE
    # The torch side stays installable, behind its own extra.
    assert any("torch" in line and 'extra == "train"' in line for line in metadata.get_all("Requires-Dist"))


def test_constraints_pin_the_versions_installed_here(wheel):
    text = constraints_text(wheel)
    pins = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "=="
        pins[req.name] = (spec.version, req.marker)
    for name in ("numpy", "onnx", "onnxruntime", "click", "pillow", "tqdm", "protobuf"):
        assert pins[name][0] == importlib.metadata.version(name), name
    assert not set(pins) & TORCH_SIDE
    # The device's CUDA decides these: a workstation pin would break the other CUDA major.
    assert not [n for n in pins if n.startswith(("cuda-", "nvidia-", "tensorrt", "pycuda"))]
    # A pin applies only where its release installs: its Requires-Python as a marker.
    requires = importlib.metadata.metadata("numpy").get("Requires-Python")
    assert requires and pins["numpy"][1] is not None
    assert not pins["numpy"][1].evaluate({"python_full_version": "2.7.18"})


def test_the_wheel_is_cached_by_its_sources(wheel, tmp_path):
    said = []
    assert build_wheel(said.append) == wheel and "reusing the wheel" in said[0]
    # The key is the sources' content: a changed file is another wheel.
    files = source_files(ROOT)
    assert ROOT / "pyproject.toml" in files and ROOT / "export" / "cli" / "deploy.py" in files
    assert not [f for f in files if "__pycache__" in f.parts or f.suffix == ".pyc"]
    import shutil

    copy = tmp_path / "checkout"
    for path in files:
        (copy / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy / path.relative_to(ROOT))
    copied = source_files(copy)
    assert source_digest(copy, copied) == source_digest(ROOT, files)
    (copy / "export" / "cli" / "deploy.py").write_text("# changed\n", encoding="utf-8")
    assert source_digest(copy, copied) != source_digest(ROOT, files)


def test_an_installed_package_is_not_a_checkout(tmp_path):
    with pytest.raises(ExportError) as err:
        checkout_root(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "not from a checkout (no pyproject.toml)" in message
    assert "run 'mtlora-export bundle' from a checkout" in message
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    with pytest.raises(ExportError, match="not from a checkout"):
        checkout_root(tmp_path)
