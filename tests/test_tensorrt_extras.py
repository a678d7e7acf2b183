"""The TensorRT extras pin cuda-python to the driver's CUDA major on every platform we deploy to.

cuda-python 13 needs a CUDA 13 driver (>= 580); JetPack 6 ships CUDA 12, so an unpinned
`cuda-python>=12` resolves to 13.x there and every CUDA call fails. One extra per CUDA major
(`tensorrt-cu12`, `tensorrt-cu13`), chosen by the device's row of the install table. The markers are
evaluated offline with `packaging` (always); pip's own resolver then proves which release a JetPack's
Python would get (needs PyPI; skipped with the reason when the index cannot be reached).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
EXTRAS = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]

# (platform, extra) -> the cuda-python major it must install, whatever the platform: JetPack 6 (Ubuntu
# 22.04, Python 3.10) and x86 drivers 525 to 575 are CUDA 12; JetPack 7.x (Ubuntu 24.04, Python 3.12) and
# drivers from 580 are CUDA 13.
PLATFORMS = {
    "jetpack6": {"platform_machine": "aarch64", "python_version": "3.10", "python_full_version": "3.10.12",
                 "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython"},
    "jetpack7": {"platform_machine": "aarch64", "python_version": "3.12", "python_full_version": "3.12.3",
                 "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython"},
    "x86_py310": {"platform_machine": "x86_64", "python_version": "3.10", "python_full_version": "3.10.12",
                  "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython"},
    "x86_py312": {"platform_machine": "x86_64", "python_version": "3.12", "python_full_version": "3.12.3",
                  "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython"},
}
EXPECTED_MAJOR = {
    **{(p, "tensorrt-cu12"): 12 for p in PLATFORMS},
    **{(p, "tensorrt-cu13"): 13 for p in PLATFORMS},
}  # fmt: skip


def requirements_for(extra: str, platform: str) -> dict[str, Requirement]:
    """The extra's requirements whose markers hold on `platform`, by project name."""
    chosen = {}
    for line in EXTRAS[extra]:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(PLATFORMS[platform]):
            assert req.name not in chosen, f"{extra} installs {req.name} twice on {platform}"
            chosen[req.name] = req
    return chosen


def majors_allowed(req: Requirement) -> set[int]:
    return {major for major in range(10, 20) if any(req.specifier.contains(Version(f"{major}.{minor}")) for minor in range(10))}


@pytest.mark.parametrize(("platform", "extra"), sorted(EXPECTED_MAJOR))
def test_markers_pick_one_cuda_python_major(platform, extra):
    reqs = requirements_for(extra, platform)
    assert majors_allowed(reqs["cuda-python"]) == {EXPECTED_MAJOR[platform, extra]}, str(reqs["cuda-python"])
    # Polygraphy new enough for TensorRT 11 everywhere, and ONNX Runtime for the fp16 / fp16 Q/DQ graphs.
    assert not reqs["polygraphy"].specifier.contains("0.49.26") and reqs["polygraphy"].specifier.contains("0.53.6")
    assert "onnxruntime" in reqs


def _pip_dry_run(requirement: str, platforms: list[str], python_version: str) -> dict:
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--only-binary=:all:",
        "--python-version", python_version, "--report", "-", "--quiet", "--disable-pip-version-check",
        *[arg for platform in platforms for arg in ("--platform", platform)], requirement,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip("pip could not reach the package index within 240 s")
    if done.returncode != 0:
        # "(from versions: none)": the index listed no release at all, i.e. it was not reached; a wrong
        # pin instead lists the releases that exist and is a failure.
        if "(from versions: none)" in done.stderr or any(
            word in done.stderr for word in ("NewConnectionError", "Temporary failure", "Network is unreachable", "timed out")
        ):
            pytest.skip(f"the package index is unreachable: {done.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"pip could not resolve {requirement} for Python {python_version}: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout)


JETPACK_WHEEL_TAGS = ["manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_35_aarch64"]


@pytest.mark.parametrize(("platform", "python_version", "extra", "major"),
                         [("jetpack6", "3.10", "tensorrt-cu12", 12), ("jetpack7", "3.12", "tensorrt-cu13", 13)])
def test_pip_resolves_the_pinned_cuda_python_on_jetpack(platform, python_version, extra, major):
    req = requirements_for(extra, platform)["cuda-python"]
    report = _pip_dry_run(f"{req.name}{req.specifier}", JETPACK_WHEEL_TAGS, python_version)
    installed = {item["metadata"]["name"]: item["metadata"]["version"] for item in report["install"]}
    assert Version(installed["cuda-python"]).major == major, installed
    # The unpinned requirement this replaces resolves to 13.x on JetPack 6 too: the bug of issue #13.
    unpinned = _pip_dry_run("cuda-python>=12", JETPACK_WHEEL_TAGS, python_version)
    assert Version(unpinned["install"][0]["metadata"]["version"]).major >= 13


def test_every_tensorrt_extra_is_pinned_here():
    """A TensorRT extra added to pyproject.toml without its row here would go unchecked."""
    assert {e for e in EXTRAS if e.startswith("tensorrt")} == {extra for _, extra in EXPECTED_MAJOR}
