"""Resource limits: evaluation, calibration and benchmarking stream their data, so peak memory does not grow
with the number of images (20 vs 200 synthetic images, measured as the peak RSS of a child process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Peak RSS with 200 images may exceed the one with 20 by this much: allocator noise, not data. Holding the
# images (or, in calibration, their activations: ~9 MB an image for this model) would add far more.
SLACK = 0.15


def peak_rss_mib(command: list[str]) -> float:
    """Run `command` to completion; its peak resident set size (and its children's) in MiB."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "2"})
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, stderr
    return usage.ru_maxrss / 1024


def assert_flat(small: float, large: float, what: str, large_count: int = 200) -> None:
    assert large <= small * (1 + SLACK), \
        f"{what}: peak RSS {small:.0f} MiB for 20 images, {large:.0f} MiB for {large_count}"


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A 32x32 two-task model with the synthetic set's heads: evaluation cost is the data, not the model."""
    from mtlora.checkpoint import save_checkpoint
    from mtlora.cli.options import model_config_from_options
    from mtlora.data.synthetic import SYNTHETIC_TASKS
    from mtlora.model import MultiTaskSwin

    config = model_config_from_options(variant="swin_micro", img_size=32, tasks=("semseg", "sal"),
                                       task_channels=dict(SYNTHETIC_TASKS), decoder_channels=(4,))
    return save_checkpoint(MultiTaskSwin(config), tmp_path_factory.mktemp("resources") / "model")


def test_evaluate_streams_its_data(small_checkpoint):
    peaks = {n: peak_rss_mib([str(BIN / "mtlora"), "evaluate", str(small_checkpoint), "--data", "synthetic",
                              "--samples", str(n), "--batch-size", "10"]) for n in (20, 200)}
    assert_flat(peaks[20], peaks[200], "mtlora evaluate")


CALIBRATE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from calibration.prepare import prepare_graph
    from export.artifacts.manifest import ExportInfo
    from export.pipeline.calibration_step import calibration_set
    from export.pipeline.options import BuildOptions

    export, work, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    calibration = calibration_set(BuildOptions(calib_samples=count), ExportInfo.read(export).interface, print)
    assert calibration.num_samples == count
    prepare_graph("onnxruntime", export / "model.onnx", work, "int8", calibration=calibration)
""")


def test_calibration_streams_its_data(ort_build, tmp_path):
    """The build's calibration path: synthetic images streamed into ONNX Runtime's percentile calibrator."""
    # 100 images: holding their activations would add about 700 MB to a peak of about 600 MB, far past SLACK.
    peaks = {n: peak_rss_mib([sys.executable, "-c", CALIBRATE, str(ort_build / "export"), str(tmp_path / str(n)),
                              str(n)]) for n in (20, 100)}
    assert_flat(peaks[20], peaks[100], "int8 calibration", large_count=100)


def test_bench_streams_its_runs(ort_build, tmp_path):
    from export.bench.options import BenchOptions
    from export.bench.run import bench_build

    build = tmp_path / "build"
    shutil.copytree(ort_build, build)
    shutil.rmtree(build / "engines" / "onnxruntime-int8")
    peaks = {}
    for runs in (20, 200):
        options = BenchOptions(batch_sizes=(1,), runs=runs, warmup=1, budget_s=600, torch_eager=False, matmul_size=64,
                               runtime_rows=False)  # the infer row alone: its runs are what is counted
        (row,) = bench_build(build, options, lambda _line: None)["rows"]
        assert row["runs"] == runs, row
        peaks[runs] = row["peak_rss_mib"]
    assert_flat(peaks[20], peaks[200], "mtlora-export bench")


def test_build_calibration_set_reads_one_image_at_a_time(monkeypatch):
    """The build's calibration set is a stream: making it renders nothing, a pass holds one image at a time."""
    from calibration.data import CalibrationSet
    from export.artifacts.interface import ModelInterface
    from export.pipeline.calibration_step import calibration_set
    from export.pipeline.options import BuildOptions
    from mtlora.data.synthetic import SyntheticMultiTask

    rendered = []
    original = SyntheticMultiTask.__getitem__
    monkeypatch.setattr(SyntheticMultiTask, "__getitem__", lambda self, i: rendered.append(i) or original(self, i))
    info = ModelInterface(("semseg",), {"semseg": 6}, 32, (0.5,) * 3, (0.25,) * 3)
    calibration = calibration_set(BuildOptions(calib_samples=200), info, lambda _line: None)
    assert isinstance(calibration, CalibrationSet) and calibration.kind == "stream" and len(calibration) == 200
    assert rendered == []
    feeds = iter(calibration)
    first = next(feeds)
    assert rendered == [0] and first["image"].shape == (1, 3, 32, 32)
    assert sum(1 for _ in feeds) == 199 and len(rendered) == 200
