"""`make demo`: the whole product in one command, on the embedded default model.

Reuses (or trains) the small default model, builds fp32, fp16 and int8 engines
for OpenVINO and ONNX Runtime, checks each against PyTorch, benchmarks them and
says where the report is. Re-running reuses every finished step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from export.pipeline.sources import DEFAULT_MODEL, default_model_present

DEMO_DIR = Path("build") / "demo"


def _say(line: str) -> None:
    click.echo(line, err=True)


def ensure_default_model() -> Path:
    if default_model_present():
        _say(f"[demo] default model: {DEFAULT_MODEL} (reused; 'make default-model' re-trains it)")
        return DEFAULT_MODEL
    _say("[demo] the default model is missing: training it on the synthetic data set (a few minutes)")
    import subprocess

    # The training command itself, in its own process: its progress shows as it runs, and its
    # one-line error (if any) is the user's to read.
    command = [sys.executable, "-m", "mtlora.cli", "train", "--data", "synthetic", "--preset", "default",
               "--out", str(DEFAULT_MODEL)]
    if subprocess.run(command).returncode != 0:
        raise SystemExit("[demo] training the default model failed (see the error above)")
    return DEFAULT_MODEL


def main() -> int:
    from engines.registry import BACKENDS
    from export.bench.options import BenchOptions
    from export.bench.run import bench_build
    from export.bench.tables import format_table as format_bench
    from export.checking.report import format_table
    from export.pipeline.build import run_build
    from export.pipeline.options import BuildOptions

    started = time.perf_counter()
    checkpoint = ensure_default_model()
    backends = tuple(name for name in ("openvino", "onnxruntime") if BACKENDS[name].available()[0])
    options = BuildOptions(checkpoint=str(checkpoint), backends=backends, precisions=("fp32", "fp16", "int8"),
                           calib_samples=128, eval_samples=64, out=str(DEMO_DIR))
    outcome = run_build(options, _say)
    click.echo(format_table(outcome.report))
    _say("[demo] benchmarking every engine and PyTorch eager (batch 1, about 3 s each)")
    bench = bench_build(DEMO_DIR, BenchOptions(batch_sizes=(1,), runs=30, budget_s=3.0), _say,
                        report=outcome.report, command="make demo")
    click.echo(format_bench(bench))
    minutes = (time.perf_counter() - started) / 60
    status = "all checks passed" if outcome.passed else "SOME CHECKS FAILED"
    click.echo(f"\n[demo] {status} in {minutes:.1f} min. Open {DEMO_DIR.resolve() / 'report.html'} in a browser;"
               f" machine-readable results: {DEMO_DIR / 'report.json'}, {DEMO_DIR / 'junit.xml'}")
    return 0 if outcome.passed else 1


if __name__ == "__main__":
    sys.exit(main())
