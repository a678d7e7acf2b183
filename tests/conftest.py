"""Fixtures shared by the reliability tests: one small build of the 64x64 test model, and a bundle of it.

Session-scoped, so the safe-loading, verified-artifact, hostile-input and determinism tests share one
build; a test that damages a file works on its own copy (`copy_build`).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "upstream-mtlora-tiny" / "checkpoint.pth"


def _a_share_of_the_cores_per_worker() -> None:
    """Under pytest-xdist every core already runs a worker; a worker whose torch (OpenMP) also uses every
    core oversubscribes them, and the waiting threads spin: two workers on two cores spent about a third
    more CPU time and ran no faster than one. Each worker, and every process its tests start, gets its
    share of the cores instead (an OMP_NUM_THREADS the caller set is kept)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers <= 1:
        return
    share = max(1, (os.cpu_count() or 1) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))
    first = os.environ["OMP_NUM_THREADS"].split(",")[0].strip()  # "4,2" sets nested levels: the first counts
    global WORKER_THREADS
    WORKER_THREADS = int(first) if first.isdigit() and int(first) > 0 else share
    _runtimes_take(WORKER_THREADS)


WORKER_THREADS: int | None = None  # an xdist worker's share of the cores (None outside xdist)


def engine_threads() -> list[str]:
    """`--threads N` for a build a test runs as a subprocess: the worker's share of the cores, as in-process
    engines get (`_runtimes_take`). Left to choose, its ONNX Runtime and OpenVINO threads take every core and
    spin beside the other worker: the OpenVINO int8 fallback build took 55 s instead of 46 s with the other
    core busy. Outside xdist: nothing, the runtime's own choice."""
    return ["--threads", str(WORKER_THREADS)] if WORKER_THREADS else []


def _runtimes_take(threads: int) -> None:
    """ONNX Runtime and OpenVINO ignore OMP_NUM_THREADS: left to their defaults they run a thread per core,
    and ONNX Runtime's spin while they wait. In this process their sessions and compiled models default to
    the worker's share instead (one given its threads keeps them). Measured on 2 cores, two workers: the
    whole suite took 5m42s instead of 6m14s (9.2 CPU-minutes instead of 9.9); OpenVINO's share alone took
    its test files 4-12% less time."""
    try:
        import onnxruntime
    except ImportError:
        pass
    else:
        class SessionOptions(onnxruntime.SessionOptions):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.intra_op_num_threads = threads

        onnxruntime.SessionOptions = SessionOptions
    try:
        import openvino
    except ImportError:
        pass
    else:
        class Core(openvino.Core):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})

        openvino.Core = Core


_a_share_of_the_cores_per_worker()


# The test files that take longest, longest first (summed test times on the 2-core EPYC, 2026-12-06): they
# start first, so that the last files to run are short and both workers finish together. xdist's own order
# (most tests first) started the 28 s one-test files last, and one worker ran on alone for 15-20 s.
SLOWEST_FILES = ("test_precision_choice.py", "test_official_options.py", "test_fallback_16bit.py",
                 "test_reliability_round_three.py", "test_resource_limits.py", "test_interrupted_build.py",
                 "test_export_onnx.py", "test_train.py", "test_bundle_deploy.py", "test_build_pipeline.py",
                 "test_check_record_errors.py", "test_openvino_keep16.py", "test_determinism.py",
                 "test_bundle_gate.py", "test_engines_openvino.py", "test_reliability_round_two.py",
                 "test_bench_reference.py", "test_bench_page.py", "test_lint_command.py", "test_train_ddp.py")


def pytest_collection_modifyitems(config, items):
    """The slowest files first, in SLOWEST_FILES' order; then the others, those with most tests first (as
    xdist orders them). `make test` passes --no-loadscope-reorder so that xdist keeps this order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    counts: dict[Path, int] = {}
    for item in items:
        counts[item.path] = counts.get(item.path, 0) + 1
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -counts[item.path]))  # stable: file order kept


def pytest_testnodedown(node, error):
    """A worker that went down unasked ("node down: Not properly terminated"): say how its process ended, so
    that a crash names its cause (SIGSEGV, SIGKILL from the OOM killer, SIGABRT, an exit code)."""
    popen = getattr(getattr(getattr(node, "gateway", None), "_io", None), "popen", None)  # execnet's Popen gateway
    if error is None or popen is None:
        return
    try:
        code = popen.wait(timeout=10)
    except Exception:  # still running, or not a process we can wait for: nothing to add
        return
    if code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:  # a real-time signal has no name in signal.Signals
            how = f"killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    sys.stderr.write(f"[{node.gateway.id}] the worker process {how}\n")


def invoke(cli, *args, **kwargs):
    """Run a click command in-process; returns (exit code, stdout + stderr)."""
    result = CliRunner().invoke(cli, [str(a) for a in args], **kwargs)
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # What a user would have seen: an uncaught exception is a traceback, never "one clear line".
        import traceback

        output += "".join(traceback.format_exception(result.exception))
    return result.exit_code, output


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that changes torch's thread count (a Trainer made directly, a one-thread timing) gives it back:
    later exports in the same worker would otherwise reduce in another order and differ in the last bit."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _shared_step_store(tmp_path_factory):
    """One step store for the whole run (every xdist worker's too: the run's base temporary directory),
    so the tests that build the same model with the same settings export and build it once. A test whose
    build must compute its steps (one that interrupts or breaks a step, fills the disk, or patches code a
    step runs, which the step key does not see) turns it off with `no_step_store`."""
    from export.pipeline.steps import STORE_ENV

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "step-store"
    saved = os.environ.get(STORE_ENV)
    os.environ[STORE_ENV] = str(root)
    yield root
    if saved is None:
        os.environ.pop(STORE_ENV, None)
    else:
        os.environ[STORE_ENV] = saved


@pytest.fixture
def no_step_store(monkeypatch):
    """Builds in this test compute every step themselves (subprocesses too: they inherit the environment)."""
    from export.pipeline.steps import STORE_ENV

    monkeypatch.delenv(STORE_ENV, raising=False)


@pytest.fixture(scope="session")
def ort_build(tmp_path_factory) -> Path:
    """ONNX Runtime fp32 and int8 engines of the test model (8 calibration, 4 evaluation images)."""
    from export.cli import main as export_cli
    from export.pipeline.steps import STORE_ENV

    out = tmp_path_factory.mktemp("reliability") / "build"
    # Computed, not copied from the step store: tests read everything a build writes (its calibration cache too).
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(STORE_ENV, raising=False)
        code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32",
                              "--precision", "int8", "--calib-samples", "8", "--eval-samples", "4", "--out", out)
    assert code == 0, output
    return out


@pytest.fixture(scope="session")
def ort_bundle(ort_build, tmp_path_factory) -> Path:
    from export.cli import main as export_cli

    out = tmp_path_factory.mktemp("reliability-bundle") / "bundle"
    code, output = invoke(export_cli, "bundle", ort_build, "--out", out)
    assert code == 0, output
    return out


@pytest.fixture
def copy_build(tmp_path):
    """copy_build(src) -> a private copy of a build or bundle directory, to damage."""

    def copy(src: Path, name: str = "copy") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def ort_split_build(tmp_path_factory) -> Path:
    """An ONNX Runtime fp32 split-layout build of the test model (backbone and one head per task)."""
    from export.cli import main as export_cli

    out = tmp_path_factory.mktemp("split") / "build"
    code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32",
                          "--layout", "split", "--eval-samples", "2", "--out", out)
    assert code == 0, output
    return out
