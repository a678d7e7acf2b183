"""Bad --calib-data and --eval-data are refused by `build` before any work: one line, exit 1, no --out left.

The test model takes (N, 3, 64, 64) images.
"""

from __future__ import annotations

import numpy as np
import pytest

from export.cli import main as export_cli
from tests.conftest import FIXTURE, invoke

SIZE = 64


def _refused(tmp_path, option, value, *, says: str, load_model: bool = False) -> None:
    out = tmp_path / "out"
    # An .npz's image size is checked against the model's: --img-size saves loading the model (half a second).
    size = () if load_model else ("--img-size", SIZE)
    # Evaluation data is checked on an fp32 build too, where no calibration reads it.
    precision = "int8" if option == "--calib-data" else "fp32"
    code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", precision,
                          "--calib-samples", 8, "--eval-samples", 2, "--out", out, *size, option, value)
    lines = [line for line in output.splitlines() if line.startswith("Error")]
    assert code == 1, output
    assert "Traceback" not in output, output
    assert len(lines) == 1 and says in lines[0], output
    assert "model: " not in output, output  # refused before the build began: no export, no calibration
    assert not out.exists()


def _npz(tmp_path, images, name="data.npz"):
    path = tmp_path / name
    np.savez(path, input=images)
    return path


def _images(shape, dtype=np.float32):
    return np.random.default_rng(0).normal(size=shape).astype(dtype)


@pytest.mark.parametrize("option", ["--calib-data", "--eval-data"])
def test_an_empty_value_is_refused_not_taken_for_synthetic(tmp_path, option):
    _refused(tmp_path, option, "", says=f"{option} is empty")


@pytest.mark.parametrize("option", ["--calib-data", "--eval-data"])
@pytest.mark.parametrize("spec, says", [("synthetic:bogus", "unknown split 'bogus'"),
                                        ("pascal:/nonexistent", "not a PASCAL_MT tree"),
                                        ("nyud:/nonexistent", "/nonexistent")])
def test_a_bad_split_or_root_is_refused(tmp_path, option, spec, says):
    _refused(tmp_path, option, spec, says=f"{option}: ")
    _refused(tmp_path, option, spec, says=says)


@pytest.mark.parametrize("option", ["--calib-data", "--eval-data"])
def test_a_directory_without_images_is_refused(tmp_path, option):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, option, tmp_path / "empty", says="contains no image files")


@pytest.mark.parametrize("option, says", [("--calib-data", "only 0 readable images"),
                                          ("--eval-data", "image file is empty (0 bytes)")])
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_a_directory_of_unreadable_images_is_refused(tmp_path, option, says, suffix):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(9):
        (images / f"{i}{suffix}").write_bytes(b"not an image" if i % 2 else b"")
    _refused(tmp_path, option, images, says=says)


@pytest.mark.parametrize("option", ["--calib-data", "--eval-data"])
@pytest.mark.parametrize("shape", [(8, 3, 32, 32), (8, SIZE, SIZE), (8, 1, SIZE, SIZE), (8, 4, SIZE, SIZE),
                                   (8, 3, SIZE, 32)])
def test_an_npz_of_the_wrong_shape_names_it_and_the_model_s(tmp_path, option, shape):
    path = _npz(tmp_path, _images(shape))
    _refused(tmp_path, option, path, says=f"{path}: array 'input' has shape {shape}; the model takes (N, 3, 64, 64)")


@pytest.mark.parametrize("option", ["--calib-data", "--eval-data"])
def test_the_model_s_own_size_is_read_when_no_img_size_is_given(tmp_path, option):
    path = _npz(tmp_path, _images((8, 3, 32, 32)))
    _refused(tmp_path, option, path, says="has shape (8, 3, 32, 32); the model takes (N, 3, 64, 64)", load_model=True)


@pytest.mark.parametrize("option", ["--calib-data", "--eval-data"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.bool_])
def test_an_npz_of_raw_pixels_is_refused_not_cast(tmp_path, option, dtype):
    path = _npz(tmp_path, np.ones((8, 3, SIZE, SIZE), dtype))
    _refused(tmp_path, option, path, says="must hold preprocessed float images")


@pytest.mark.parametrize("option", ["--calib-data", "--eval-data"])
@pytest.mark.parametrize("value, says", [(np.nan, "non-finite"), (np.inf, "non-finite"), (-np.inf, "non-finite"),
                                         (1e30, "far outside normalised images"),
                                         (-2e3, "far outside normalised images")])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_an_npz_of_non_finite_or_huge_values_is_refused(tmp_path, option, value, says, dtype):
    images = _images((8, 3, SIZE, SIZE), np.float64)
    images[3, 1, 2, 2] = value
    if dtype == np.float16 and abs(value) == 1e30:
        says = "non-finite"  # too large for float16: it is stored as infinity
    with np.errstate(over="ignore"):
        images = images.astype(dtype)
    _refused(tmp_path, option, _npz(tmp_path, images), says=says)


@pytest.mark.parametrize("option", ["--calib-data", "--eval-data"])
def test_an_npz_of_no_images_is_refused(tmp_path, option):
    _refused(tmp_path, option, _npz(tmp_path, np.zeros((0, 3, SIZE, SIZE), np.float32)), says="holds no images")


def test_a_float16_or_float64_npz_is_taken(tmp_path):
    from export.pipeline.data import check_images

    for dtype in (np.float16, np.float64):
        check_images(_images((8, 3, SIZE, SIZE), dtype), "data.npz", SIZE)
