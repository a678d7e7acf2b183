"""`mtlora-export bench`: latency, throughput, memory and FLOP rate of every engine of a build."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from engines.registry import BACKENDS
from export.cli.options import backend_option, precision_option, say, threads_option


def _batch_sizes(ctx, param, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers, e.g. 1,8") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"'{value}': batch sizes must be positive integers")
    return sizes


@click.command("bench")
@click.argument("source", type=click.Path(exists=True))
@click.option("--batch-sizes", default="1,8", show_default=True, callback=_batch_sizes,
              help="Comma-separated batch sizes.")
@threads_option
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Most timed runs per format and batch size.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed runs first.")
@click.option("--budget", "budget_s", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds of timed runs per format and batch size (at least 3 runs, at most --runs).")
@click.option("--no-torch", is_flag=True, help="Skip PyTorch eager (unmerged and merged).")
@click.option("--cuda-graph", is_flag=True,
              help="TensorRT: in its GPU timing (CUDA events, copies apart, pinned buffers), replay the enqueue "
                   "from a CUDA graph, as trtexec --useCudaGraph.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--markdown", "markdown_out", type=click.Path(dir_okay=False), help="Write the results as Markdown.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Build directory when SOURCE is a checkpoint [default: a new temporary directory].")
@backend_option(default=("all",), choices=["all", *BACKENDS], help_text="Backends to build when SOURCE is a checkpoint.")
@precision_option(default=("all",), help_text="Precisions to build when SOURCE is a checkpoint.")
@click.option("--calib-data", default="synthetic", show_default=True, help="INT8 calibration data (as for build).")
@click.option("--calib-samples", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--eval-samples", type=click.IntRange(min=1), default=8, show_default=True)
@click.pass_context
def bench(ctx, source, batch_sizes, threads, runs, warmup, budget_s, no_torch, cuda_graph, json_out, markdown_out, out,
          backends, precisions, calib_data, calib_samples, eval_samples) -> None:
    """Time every engine of SOURCE (a build directory, or a checkpoint that is built first) and PyTorch eager.

    Columns: format, precision asked for and executed, build/accuracy status,
    file size, latency p50/p90/p99, images/s, achieved GFLOP/s and its fraction
    of this machine's fp32 matmul rate, peak RSS; then each format's accuracy
    per task from the build's report.json.
    """
    from export.artifacts.builddir import BuildDir
    from export.artifacts.files import write_text_atomic
    from export.bench.options import BenchOptions
    from export.bench.run import bench_build, build_for_bench, write_json
    from export.bench.tables import format_markdown, format_table

    path = Path(source)
    opts = BenchOptions(batch_sizes=batch_sizes, threads=threads, runs=runs, warmup=warmup, budget_s=budget_s,
                        torch_eager=not no_torch, cuda_graph=cuda_graph)
    build_flags = [p.opts[0] for p in ctx.command.params
                   if p.name in ("out", "backends", "precisions", "calib_data", "calib_samples", "eval_samples")
                   and ctx.get_parameter_source(p.name) != click.core.ParameterSource.DEFAULT]
    report, failures = None, None
    if BuildDir.is_build(path):
        if build_flags:
            raise click.BadParameter(f"SOURCE is a build directory; {build_flags[0]} applies only when building "
                                     "a checkpoint", param_hint="SOURCE")
        build_dir = path
        from export.pipeline.check import verify_build

        # Time only what was built: a modified or truncated engine is refused, not benchmarked.
        verify_build(BuildDir(build_dir))
    else:
        build_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="mtlora-bench-build-"))
        say(f"[bench] building {path} into {build_dir}")
        report, failures = build_for_bench(path, build_dir, say, backends=backends, precisions=precisions,
                                           calib_data=calib_data, calib_samples=calib_samples,
                                           eval_samples=eval_samples, threads=threads)
    result = bench_build(build_dir, opts, say, report=report, failures=failures)
    click.echo(format_table(result))
    if json_out:
        write_json(result, json_out)
        say(f"[bench] wrote {json_out}")
    if markdown_out:
        write_text_atomic(markdown_out, format_markdown(result))
        say(f"[bench] wrote {markdown_out}")
