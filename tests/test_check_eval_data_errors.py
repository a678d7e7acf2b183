"""A bad `check --eval-data` is refused as `build` refuses it (`export.pipeline.data.check_data_options`):
one line naming the option, exit 1, no traceback, before any work and with nothing written into the build,
not even its lock file.

The test model takes (N, 3, 64, 64) images; the cases are those of test_data_spec_errors.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.cli import main as export_cli
from tests.conftest import invoke

SIZE = 64


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `root` with its size and mtime: what a refusal must leave as it was."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _npz(tmp_path: Path, images: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, input=images)
    return path


def _images(shape, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).normal(size=shape).astype(dtype)


def _empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _unreadable(suffix: str):
    def make(tmp_path: Path) -> Path:
        images = tmp_path / "images"
        images.mkdir()
        for i in range(9):
            (images / f"{i}{suffix}").write_bytes(b"not an image" if i % 2 else b"")
        return images

    return make


def _bad_value(value: float, dtype):
    def make(tmp_path: Path) -> Path:
        images = _images((8, 3, SIZE, SIZE), np.float64)
        images[3, 1, 2, 2] = value
        with np.errstate(over="ignore"):
            return _npz(tmp_path, images.astype(dtype))

    return make


# case -> (make(tmp_path) -> the --eval-data value, what the error line says)
CASES = {
    "empty": (lambda t: "", "--eval-data is empty"),
    "blank": (lambda t: "  ", "--eval-data is empty"),
    "synthetic_bad_split": (lambda t: "synthetic:bogus", "--eval-data: unknown split 'bogus'"),
    "pascal_no_root": (lambda t: "pascal:/nonexistent", "not a PASCAL_MT tree"),
    "nyud_no_root": (lambda t: "nyud:/nonexistent", "/nonexistent"),
    "pascal_without_root": (lambda t: "pascal", "pascal needs its data root"),
    "no_such_directory": (lambda t: str(t / "missing"), "no such directory"),
    "no_such_npz": (lambda t: str(t / "missing.npz"), "no such evaluation set file"),
    "a_plain_file": (lambda t: (t / "notes.txt").write_text("x") and str(t / "notes.txt"), "not a directory of images"),
    "directory_without_images": (_empty_dir, "contains no image files"),
    **{f"unreadable_images{s}": (_unreadable(s), "image file is empty (0 bytes)") for s in (".png", ".jpg", ".tif")},
    **{f"npz_shape_{'x'.join(map(str, shape))}": (
        lambda t, shape=shape: _npz(t, _images(shape)),
        f"array 'input' has shape {shape}; the model takes (N, 3, 64, 64)")
       for shape in [(8, 3, 32, 32), (8, SIZE, SIZE), (8, 1, SIZE, SIZE), (8, 4, SIZE, SIZE), (8, 3, SIZE, 32)]},
    **{f"npz_{np.dtype(d).name}": (lambda t, d=d: _npz(t, np.ones((8, 3, SIZE, SIZE), d)),
                                   "must hold preprocessed float images") for d in (np.uint8, np.int64, np.bool_)},
    **{f"npz_{name}_{np.dtype(d).name}": (
        _bad_value(v, d), "non-finite" if d == np.float16 and abs(v) == 1e30 else says)
       for name, v, says in [("nan", np.nan, "non-finite"), ("inf", np.inf, "non-finite"),
                             ("neg_inf", -np.inf, "non-finite"), ("huge", 1e30, "far outside normalised images"),
                             ("neg_huge", -2e3, "far outside normalised images")]
       for d in (np.float16, np.float32, np.float64)},
    "npz_no_images": (lambda t: _npz(t, np.zeros((0, 3, SIZE, SIZE), np.float32)), "holds no images"),
}


# Refusals that name the value rather than the option, as `build`'s do: a value that is no data spec at all
# (`data.parse_spec`), an .npz holding NaN or infinity (`EvalSet.read`).
NAMED_BY_VALUE = {"pascal_without_root", "no_such_directory", "no_such_npz", "a_plain_file",
                  *(c for c in CASES if c.startswith(("npz_nan_", "npz_inf_", "npz_neg_inf_"))), "npz_huge_float16"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_eval_data_is_one_line_before_any_work(case, ort_build, copy_build, tmp_path):
    make, says = CASES[case]
    value = make(tmp_path)
    build = copy_build(ort_build)
    (build / ".lock").unlink(missing_ok=True)  # the build's lock file stays; a check that took it makes it again
    before = _snapshot(build)
    code, output = invoke(export_cli, "check", build, "--eval-data", value)
    lines = output.strip().splitlines()
    assert code == 1, output
    assert "Traceback" not in output and "internal error" not in output, output
    assert len(lines) == 1 and lines[0].startswith("Error"), output
    assert "--eval-data" in lines[0] or (case in NAMED_BY_VALUE and str(value) in lines[0]), output
    assert says in lines[0], output
    assert _snapshot(build) == before and not (build / ".lock").exists(), output

