"""A wheel of this project for a deployment bundle, and the versions it was built and tested with.

The wheel is built from the checkout by pip's PEP 517 front end with setuptools, the project's build
backend. It runs without build isolation, so it needs no package index (the setuptools of this
environment builds it), and on a copy of the files that go into the wheel, so the checkout gets no
build/ or egg-info. A built wheel is cached by the SHA-256 of those files.

The constraints file pins the torch-free runtime dependencies (the core ones and those of every
device extra, with everything they pull in) at the versions installed here, where the tests ran.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from export.errors import ExportError
from mtlora_base.files import commit_directory

PROJECT = "mtlora-export"
# Extras a device never installs: the PyTorch side and the developer tools.
BUILD_ONLY_EXTRAS = ("train", "dev")
# Packages whose release the device's CUDA (its driver or JetPack) decides: a workstation's pin would
# break the other CUDA major (cuda-python 13 on JetPack 6's CUDA 12), so they are never pinned.
DEVICE_DECIDES = ("cuda-*", "nvidia-*", "tensorrt*", "pycuda")
# Skipped while copying the sources: caches, never part of a wheel.
NOT_SOURCES = ("__pycache__", "*.pyc", ".*")


def checkout_root(root: Path | None = None) -> Path:
    """The checkout this code runs from (or `root`); a one-line error when it is an installed package."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or f'name = "{PROJECT}"' not in pyproject.read_text(errors="replace"):
        raise ExportError(
            f"{root}: {PROJECT} runs here from an installed package, not from a checkout (no pyproject.toml), "
            "so no wheel of it can go into the bundle; run 'mtlora-export bundle' from a checkout of the project "
            "(its .venv/bin/mtlora-export, or PYTHONPATH=CHECKOUT)")
    return root


def _pyproject(root: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            from pip._vendor import tomli as tomllib
    return tomllib.loads((root / "pyproject.toml").read_text())


def source_files(root: Path) -> list[Path]:
    """What setuptools reads to build the wheel: pyproject.toml, the readme, every file of the packages
    its `packages.find` includes (package data among them)."""
    config = _pyproject(root)
    readme = config["project"].get("readme")
    files = [root / "pyproject.toml", *([root / readme] if isinstance(readme, str) else [])]
    include = config.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {}).get("include", ["*"])
    for top in sorted(p for p in root.iterdir() if (p / "__init__.py").is_file()):
        if not any(fnmatch.fnmatch(top.name, pattern) for pattern in include):
            continue
        for path in sorted(top.rglob("*")):
            parts = path.relative_to(root).parts
            if path.is_file() and not any(fnmatch.fnmatch(part, skip) for part in parts for skip in NOT_SOURCES):
                files.append(path)
    return files


def source_digest(root: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where built wheels are kept ($MTLORA_EXPORT_CACHE, else the user's cache directory)."""
    if os.environ.get("MTLORA_EXPORT_CACHE"):
        return Path(os.environ["MTLORA_EXPORT_CACHE"]) / "wheels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / PROJECT / "wheels"


def _cached(directory: Path) -> Path | None:
    wheels = sorted(directory.glob("*.whl")) if directory.is_dir() else []
    if len(wheels) == 1 and zipfile.is_zipfile(wheels[0]):
        return wheels[0]
    return None


def build_wheel(say) -> Path:
    """The project's wheel, built from the checkout (or taken from the cache when its sources match)."""
    root = checkout_root()
    files = source_files(root)
    digest = source_digest(root, files)
    target = cache_dir() / digest[:32]
    cached = _cached(target)
    if cached is not None:
        say(f"[bundle] reusing the wheel of this checkout ({cached.name}, sources {digest[:12]})")
        return cached
    say(f"[bundle] building the wheel of {root}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{digest[:12]}.", suffix=".partial"))
    except OSError as err:
        raise ExportError(f"{target.parent}: cannot write the wheel cache ({err.strerror or err}); "
                          "set MTLORA_EXPORT_CACHE to a writable directory") from None
    try:
        for path in files:
            copy = work / "src" / path.relative_to(root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
             "--disable-pip-version-check", "--wheel-dir", str(work / "dist"), str(work / "src")],
            capture_output=True, text=True)
        built = sorted((work / "dist").glob("*.whl")) if done.returncode == 0 else []
        if len(built) != 1:
            last = (done.stderr.strip() or done.stdout.strip() or "no wheel written").splitlines()[-1]
            raise ExportError(f"building the wheel of {root} failed ({last.strip()}); it needs pip and "
                              "setuptools>=64 in this environment: pip install -U pip setuptools")
        staged = work / "wheel"
        staged.mkdir()
        built[0].replace(staged / built[0].name)
        try:
            commit_directory(staged, target)  # replaces an unusable cache entry
        except OSError as err:
            # Another bundle run may have published the same sources' wheel a moment earlier: take it.
            if _cached(target) is None:
                raise ExportError(f"{target}: cannot write the wheel cache ({err.strerror or err}); "
                                  "set MTLORA_EXPORT_CACHE to a writable directory") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target / built[0].name


def wheel_metadata(wheel: Path):
    """The METADATA of a wheel, as an email message (Requires-Dist, Provides-Extra, Version...)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return Parser().parsestr(archive.read(name).decode())


def device_extras(metadata) -> list[str]:
    return [e for e in metadata.get_all("Provides-Extra") or [] if e not in BUILD_ONLY_EXTRAS]


def device_requirements(metadata) -> list:
    """The wheel's requirements a device can install: the core ones and those of every device extra."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = default_environment()
    chosen = []
    for line in metadata.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": extra})
                                     for extra in ("", *device_extras(metadata))):
            chosen.append(req)
    return chosen


def _python_marker(requires_python: str | None) -> str:
    """A release's Requires-Python as an environment marker, so its pin applies only where it installs."""
    from packaging.specifiers import SpecifierSet

    if not requires_python:
        return ""
    clauses = [f'python_full_version {s.operator} "{s.version}"' for s in SpecifierSet(requires_python)]
    return " ; " + " and ".join(clauses) if clauses else ""


def tested_versions(requirements) -> dict[str, importlib.metadata.Distribution]:
    """Every distribution installed here that `requirements` pull in (transitively), by canonical name;
    those the device's CUDA decides, and those not installed here, are left out."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = default_environment()
    found: dict[str, importlib.metadata.Distribution] = {}
    queue = list(requirements)
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        if name in found or name == PROJECT or any(fnmatch.fnmatch(name, p) for p in DEVICE_DECIDES):
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here, so never tested here: nothing to pin
        found[name] = dist
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in ("", *req.extras)):
                queue.append(sub)
    return dict(sorted(found.items()))


def constraints_text(wheel: Path) -> str:
    """constraints.txt for `pip install -c`: the versions installed here of what the wheel needs on a device."""
    metadata = wheel_metadata(wheel)
    pins = tested_versions(device_requirements(metadata))
    lines = [
        f"# {PROJECT} {metadata['Version']}: the versions of its torch-free dependencies this bundle was built",
        f"# and tested with (Python {platform.python_version()}, {sys.platform} {platform.machine()}).",
        "# A pin applies where its release supports the device's Python (the marker after it); elsewhere pip",
        "# takes any version the wheel allows. CUDA-bound packages (cuda-python, TensorRT) are the device's.",
    ]
    lines += [f"{name}=={dist.version}{_python_marker(dist.metadata.get('Requires-Python'))}"
              for name, dist in pins.items()]
    return "\n".join(lines) + "\n"

