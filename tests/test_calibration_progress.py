"""Calibration on a folder of your own images: unreadable files skipped and named, the count said before
calibrating, and progress with a time estimate on a large set."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import calibration.progress as progress
from calibration.data import CalibrationSet
from calibration.progress import duration, with_progress
from engines.cpu import int8_saturates
from export.cli import main as export_cli
from tests.conftest import FIXTURE, invoke


class Clock:
    """A clock that moves one second per reading."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_progress_says_how_far_and_how_long_is_left():
    lines = []
    items = list(with_progress(range(100), total=100, what="calibration pass", say=lines.append, every_s=10,
                               clock=Clock()))
    assert items == list(range(100))
    assert len(lines) == 10
    # After 10 of 100 items in 10 s, 90 are left at the same pace: 90 s.
    assert lines[0] == "[calibrate] calibration pass: 10/100 (10%), 10 s so far, about 1 min 30 s left"


def test_progress_counts_samples_not_chunks_and_is_quiet_when_fast():
    lines = []
    list(with_progress(range(40), total=10, per_unit=4, what="hashing", say=lines.append, every_s=20,
                       clock=Clock()))
    assert lines == ["[calibrate] hashing: 5/10 (50%), 20 s so far, about 20 s left",
                     "[calibrate] hashing: 10/10 (100%), 40 s so far, about 0 s left"]
    quiet = []
    list(with_progress(range(1000), total=1000, what="x", say=quiet.append))  # well under 5 s
    assert quiet == []
    assert [duration(s) for s in (42, 185, 4800)] == ["42 s", "3 min 5 s", "1 h 20 min"]


def test_a_streamed_set_reports_while_fingerprinting_and_calibrating(monkeypatch):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # a line per sample
    rng = np.random.default_rng(0)
    feeds = [{"image": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(10)]
    calibration = CalibrationSet.from_source(lambda: iter(feeds), num_samples=10, input_names=["image"])
    lines = []
    calibration.progress = lines.append
    calibration.fingerprint()
    assert lines[-1].startswith("[calibrate] reading the samples to fingerprint them: 10/10 (100%)")
    assert "left" in lines[0] and "/10 (" in lines[0]
    lines.clear()
    assert len(list(calibration)) == 10
    assert lines[-1].startswith("[calibrate] calibration pass: 10/10 (100%)")


def test_own_images_skip_unreadable_files_by_name_and_say_the_count_first(tmp_path, monkeypatch):
    images = tmp_path / "calib"
    images.mkdir()
    for i in range(9):
        pixels = (np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / (f"img{i}.ppm" if i == 8 else f"img{i}.png"))  # every image kind read
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.png").write_text("not an image")
    (images / "cut.png").write_bytes((images / "img0.png").read_bytes()[:200])
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "int8",
                          "--calib-data", images, "--calib-samples", "100", "--eval-samples", "2",
                          "--out", tmp_path / "build")
    assert code == 0, output
    lines = output.splitlines()
    skipped = [line for line in lines if line.startswith("[calibrate] skipped")]
    assert len(skipped) == 3 and all(any(n in line for line in skipped) for n in ("empty.jpg", "notes.png", "cut.png"))
    count = lines.index(f"[calibrate] 9 images from {images}, 3 unreadable skipped")
    calibrating = next(i for i, line in enumerate(lines) if "calibration pass" in line)
    assert count < calibrating and "about" in lines[calibrating] and "left" in lines[calibrating]
    # Before the work: whether int8 can be faster than fp32 on this CPU at all.
    assert ("has no int8 dot product" in output) == int8_saturates(), output


def test_too_few_readable_images_is_one_line(tmp_path):
    images = tmp_path / "calib"
    images.mkdir()
    for i in range(8):
        (images / f"bad{i}.png").write_text("not an image")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(images / "ok.png")
    code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "int8",
                          "--calib-data", images, "--eval-samples", "2", "--out", tmp_path / "build")
    assert code == 1
    error = [line for line in output.splitlines() if line.startswith("Error:")]
    assert error == [f"Error: --calib-data {images}: only 1 readable images (8 unreadable); int8 calibration "
                     "needs at least 8, and a few hundred give stable ranges"]


@pytest.mark.parametrize("wanted, used", [(4, 4), (100, 9)])
def test_only_as_many_images_as_asked_are_read(tmp_path, wanted, used):
    from export.pipeline.calibration_step import readable_images

    for i in range(9):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / f"img{i}.png")
    good, skipped = readable_images(sorted(tmp_path.iterdir()), wanted, lambda _line: None)
    assert len(good) == used and skipped == []
