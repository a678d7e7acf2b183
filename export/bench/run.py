"""Run a benchmark: every target in its own worker process, then one result with the machine's facts."""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from export.artifacts.builddir import BuildDir
from export.artifacts.files import write_json_atomic
from export.artifacts.manifest import ExportInfo
from export.artifacts.records import read_build_record
from export.bench.engine_matmul import SGEMM
from export.bench.machine import load_average, machine_info, matmul_rate
from export.bench.options import BenchOptions
from export.bench.targets import (
    FAILED_BUILD,
    FAILED_RUN,
    Say,
    Target,
    engine_targets,
    runtime_targets,
    torch_targets,
)
from export.bench.timing import MIN_RUNS, wait_for_quiet
from export.bench.worker import MIB, run_target
from export.checking.results import Report
from export.errors import ExportError
from export.onnx.flops import count_flops

BENCH_FORMAT = "mtlora-export/bench/1"


def _rows(target: Target, result: dict[str, Any], flops: float | None, matmul_gflops: float) -> list[dict]:
    base = {"name": target.name, "kind": target.kind, "backend": target.backend,
            "precision_requested": target.precision,
            "precision_executed": result.get("precision_executed") or target.precision_executed or "",
            "status": target.status, "size_mib": None if target.size_bytes is None else target.size_bytes / MIB,
            "accuracy": target.accuracy, "notes": list(target.notes) + list(result.get("notes", [])),
            "waited_for_quiet_s": result.get("waited_for_quiet_s")}
    if target.status == FAILED_BUILD:
        return [{**base, "batch_size": None}]
    if "error" in result:
        return [{**base, "status": f"{target.status}; {FAILED_RUN}", "batch_size": None,
                 "notes": base["notes"] + [result["error"]]}]
    rows = []
    for batch, stats in result["batches"].items():
        row = {**base, "batch_size": int(batch), **stats,
               "rss_after_load_mib": result.get("rss_after_load_mib"), "flops_per_image": flops}
        if flops:
            row["achieved_gflops"] = flops * stats["images_per_s"] / 1e9
            # Against fp32 sgemm until a per-precision yardstick replaces it (`engine_matmul.apply_yardsticks`).
            row["fraction_of_sgemm"] = row["fraction_of_matmul"] = row["achieved_gflops"] / matmul_gflops
            row.update(matmul_yardstick=SGEMM, matmul_gflops=matmul_gflops)
        rows.append(row)
    return rows


def _time_target(target: Target, opts: BenchOptions, input_size: int, say: Say) -> dict[str, Any]:
    batches = ",".join(str(b) for b in target.batch_sizes or opts.batch_sizes)
    waited = wait_for_quiet(opts.quiet_wait_s) if opts.quiet_wait_s > 0 else 0.0
    say(f"[bench] {target.name}: batch {batches}" + (f" (waited {waited:.0f} s for a quiet machine)"
                                                     if waited >= 5 else ""))
    started = time.perf_counter()
    result = run_target(target, opts, input_size)
    result["waited_for_quiet_s"] = waited
    if "error" in result:
        say(f"[bench] {target.name}: {result['error']}")
    else:
        summary = ", ".join(f"b{b} p50 {s['p50_ms']:.1f} ms ({s['runs']} runs{', contended' if s['contended'] else ''})"
                            for b, s in result["batches"].items())
        say(f"[bench] {target.name}: {summary} [{time.perf_counter() - started:.0f} s]")
    return result


def benchmark(targets: Sequence[Target], opts: BenchOptions, *, input_size: int, model_flops: dict[str, Any],
              say: Say, model: dict[str, Any] | None = None, command: str | None = None) -> dict[str, Any]:
    """Time every target (each in its own worker) and return the benchmark result (see `write_json`)."""
    threads = opts.thread_count
    machine = machine_info(threads)
    load_start = load_average()
    say(f"[bench] fp32 matmul rate ({opts.matmul_size}^2, {threads} thread(s))")
    matmul_start = matmul_rate(opts.matmul_size, threads)
    say(f"[bench] {matmul_start['gflops']:.1f} GFLOP/s")
    results = []
    for target in targets:
        if target.status == FAILED_BUILD:
            results.append((target, {}))
            continue
        results.append((target, _time_target(target, opts, input_size, say)))
    # A format that other processes disturbed throughout gets one more chance at the end.
    for i, (target, result) in enumerate(results):
        contended = [b for b, stats in result.get("batches", {}).items() if stats.get("contended")]
        if not contended:
            continue
        say(f"[bench] {target.name}: batch {','.join(contended)} was contended; timing it again")
        again = _time_target(replace(target, batch_sizes=tuple(int(b) for b in contended)), opts, input_size, say)
        for batch, stats in again.get("batches", {}).items():
            before = result["batches"][batch]
            if not stats["contended"] or stats["p50_ms"] < before["p50_ms"]:
                result["batches"][batch] = {**stats, "retimed": True}
        results[i] = (target, result)
    matmul_end = matmul_rate(opts.matmul_size, threads)
    reference_gflops = max(matmul_start["gflops"], matmul_end["gflops"])
    rows = []
    for target, result in results:
        flops = target.flops_per_image if target.flops_per_image is not None else model_flops.get("flops")
        rows.extend(_rows(target, result, flops, reference_gflops))
    machine.update({"matmul": {"start": matmul_start, "end": matmul_end, "reference_gflops": reference_gflops},
                    "load_average": {"start": load_start, "end": load_average()}})
    return {
        "format": BENCH_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command or shlex.join(["mtlora-export", *sys.argv[1:]]),
        "model": {**(model or {}), "input_size": input_size, "flops_per_image": model_flops.get("flops"),
                  "flops_by_op": model_flops.get("by_op"), "flops_uncounted_nodes": model_flops.get("uncounted", [])},
        "machine": machine,
        "settings": {**asdict(replace(opts, threads=threads)), "min_runs": MIN_RUNS},
        "rows": rows,
    }


def build_for_bench(checkpoint: Path, out: Path, say: Say, *, backends: Sequence[str] = ("all",),
                    precisions: Sequence[str] = ("all",), **build_options) -> tuple[Report, dict[str, str]]:
    """Build every requested engine of `checkpoint` into `out`; returns (report, {engine: why it failed to build}).

    One engine that fails to build stops a build, so after a failure each engine is
    built on its own (the export and finished engines are reused) to find which ones fail.
    """
    from engines.errors import EngineError
    from export.pipeline.build import run_build
    from export.pipeline.options import BuildOptions, engine_plan
    from mtlora.errors import MTLoRAError

    opts = BuildOptions(checkpoint=str(checkpoint), backends=tuple(backends), precisions=tuple(precisions),
                        out=str(out), **build_options)
    try:
        return run_build(opts, say).report, {}
    except (MTLoRAError, EngineError) as err:
        say(f"[bench] the build failed ({err}); building engine by engine to see which fail")
    engines, failures, model = [], {}, {}
    for backend, precision in engine_plan(opts, say):  # the pairs the whole build tried
        try:
            outcome = run_build(replace(opts, backends=(backend,), precisions=(precision,)), say)
        except (MTLoRAError, EngineError) as err:
            failures[f"{backend}-{precision}"] = str(err).splitlines()[0]
            continue
        engines.extend(outcome.report.engines)
        model = outcome.report.model
    if not engines:
        raise ExportError(f"no engine of {checkpoint} could be built: "
                          + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return Report(model, engines), failures


def bench_build(build_dir: str | os.PathLike, opts: BenchOptions, say: Say, *, report: Report | None = None,
                failures: dict[str, str] | None = None, extra_targets: Sequence[Target] = (),
                command: str | None = None) -> dict[str, Any]:
    """Benchmark every engine of `build_dir` and, with `opts.torch_eager`, the PyTorch model it came from."""
    from export.checking.report import read_report

    build = BuildDir(build_dir)
    if not BuildDir.is_build(build.root):
        raise ExportError(f"{build.root}: not a build directory (no engines/); give a build directory or a checkpoint")
    if report is None:
        report = read_report(build.report) if build.report.is_file() else None
    export_dir = build.export
    info = ExportInfo.read(export_dir)
    say(f"[bench] counting FLOPs of {', '.join(info.graph_files.values())}")
    model_flops = count_flops([export_dir / f for f in info.graph_files.values()])
    targets: list[Target] = []
    notes = []
    if opts.torch_eager:
        options = _build_options(build)
        checkpoint = _build_checkpoint(options)
        if checkpoint is None:
            notes.append("PyTorch eager not timed: the build does not name a checkpoint that exists here")
        else:
            targets += torch_targets(checkpoint, options.get("img_size"))
    targets += engine_targets(build, report, failures)
    if opts.runtime_rows:
        targets += runtime_targets(build.root)
    targets += list(extra_targets)
    model = {"build_dir": str(build.root), "tasks": list(info.interface.tasks), "layout": info.layout,
             "source": report.model.get("source") if report is not None else None, "notes": notes}
    return benchmark(targets, opts, input_size=info.interface.size, model_flops=model_flops, say=say, model=model,
                     command=command)


def _build_options(build: BuildDir) -> dict:
    """The options build.json records; {} when it is missing or unreadable (only PyTorch eager needs them)."""
    try:
        return read_build_record(build)["options"]
    except ExportError:
        return {}


def _build_checkpoint(options: dict) -> Path | None:
    """The checkpoint a build was made from, if it exists here (a bundle build has none)."""
    if options.get("from_bundle"):
        return None
    if options.get("checkpoint"):
        path = Path(options["checkpoint"])
        return path if path.exists() else None
    from export.pipeline.sources import DEFAULT_MODEL, default_model_present

    return DEFAULT_MODEL if default_model_present() else None


def write_json(result: dict[str, Any], path: str | os.PathLike) -> Path:
    return write_json_atomic(path, result)
