"""A benchmark result as tables: the terminal, and the Markdown of docs/benchmarks.md."""

from __future__ import annotations

from typing import Any

from export.checking.report import plain_table


def _num(value, fmt: str = ".1f") -> str:
    return "" if value is None else format(value, fmt)


PERF_HEADER = ["format", "precision", "status", "size MiB", "batch", "min ms", "p50 ms", "p90 ms", "p99 ms", "runs",
               "img/s", "GFLOP/s", "of matmul", "matmul", "peak RSS MiB", "cpu busy"]


def runs_cell(row: dict[str, Any]) -> str:
    """Runs kept, '+N' discarded as contended; '!' when too few quiet runs and the contended ones were kept."""
    if row.get("runs") is None:
        return ""
    text = str(row["runs"])
    if row.get("contended"):
        return text + "!"
    return text + (f" (+{row['runs_discarded']})" if row.get("runs_discarded") else "")


def perf_rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for row in result["rows"]:
        executed = row["precision_executed"]
        precision = row["precision_requested"] if executed in ("", row["precision_requested"]) else \
            f"{row['precision_requested']} (ran {executed})"
        out.append([row["name"], precision, row["status"], _num(row["size_mib"]), _num(row["batch_size"], "d"),
                    _num(row.get("min_ms")), _num(row.get("p50_ms")), _num(row.get("p90_ms")), _num(row.get("p99_ms")),
                    runs_cell(row), _num(row.get("images_per_s"), ".2f"),
                    _num(row.get("achieved_gflops")), _num(row.get("fraction_of_matmul"), ".0%"),
                    _yardstick_cell(row),
                    _num(row.get("peak_rss_mib"), ".0f"), _num(row.get("cpu_busy"), ".2f")])
    return out


def _yardstick_cell(row: dict[str, Any]) -> str:
    """Which matrix-multiply rate "of matmul" divides by: the row's own backend and executed precision where
    it was measured (`engine_matmul`), else numpy's fp32 sgemm."""
    if row.get("fraction_of_matmul") is None:
        return ""
    name = row.get("matmul_yardstick") or "numpy sgemm fp32"
    rate = row.get("matmul_gflops")
    return name if rate is None else f"{name}, {rate:.0f} GFLOP/s"


def _accuracy_cell(summary: dict[str, Any]) -> str:
    if not summary:
        return ""
    parts = []
    if "metric" in summary:
        drop = summary.get("drop")
        parts.append(f"{summary['metric']} {summary['value']:.2f}" + ("" if drop is None else f" (drop {drop:+.3f})"))
    if "agreement" in summary:
        parts.append(f"agree {summary['agreement']:.4f}")
    elif "angle_deg" in summary and "metric" not in summary:
        parts.append(f"angle {summary['angle_deg']:.3f} deg")
    if not parts and summary.get("cosine") is not None:
        parts.append(f"cos {summary['cosine']:.5f}")
    return ", ".join(parts) + ("" if summary.get("passed", True) else " FAIL")


def accuracy_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    tasks = list(result["model"].get("tasks") or [])
    seen, rows = set(), []
    for row in result["rows"]:
        if row["name"] in seen:
            continue
        seen.add(row["name"])
        rows.append([row["name"], row["status"], *(_accuracy_cell(row["accuracy"].get(t, {})) for t in tasks)])
    return ["format", "status", *tasks], rows


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_lines(result: dict[str, Any]) -> list[str]:
    machine = result["machine"]
    matmul = machine["matmul"]
    blas = ", ".join(f"{b.get('internal_api')} {b.get('version')} ({b.get('num_threads')} threads, "
                     f"{b.get('architecture')})" for b in matmul["start"].get("blas") or []) or "unknown BLAS"
    flags = ", ".join(f for f, on in machine.get("flags", {}).items() if on)
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    load = machine.get("load_average", {})
    return [
        f"CPU: {machine['cpu']}, {machine['cpus_available']} CPU(s) available ({flags})",
        f"threads per engine: {machine['threads']}",
        f"fp32 matmul ({matmul['start']['size']}^2, numpy with {blas}): "
        f"{matmul['start']['gflops']:.1f} GFLOP/s at the start, {matmul['end']['gflops']:.1f} at the end",
        f"load average (1/5/15 min) at start {load.get('start')}, at end {load.get('end')}",
        f"versions: {versions}",
    ]


def format_table(result: dict[str, Any]) -> str:
    flops = result["model"].get("flops_per_image")
    header, rows = accuracy_rows(result)
    lines = [*machine_lines(result),
             f"model FLOPs per image (MatMul/Gemm/Conv, fp32 graph): {_num(flops and flops / 1e9, '.2f')} G",
             "", plain_table(PERF_HEADER, perf_rows(result)), "", plain_table(header, rows)]
    lines += [f"note {name}: {note}" for name, note in _notes(result)]
    return "\n".join(lines)


def _notes(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(format, note) pairs, once each: a format's notes repeat on each of its batch-size rows."""
    return list(dict.fromkeys((row["name"], note) for row in result["rows"] for note in row.get("notes", [])))


def format_markdown(result: dict[str, Any]) -> str:
    flops = result["model"].get("flops_per_image")
    settings = result["settings"]
    header, rows = accuracy_rows(result)
    lines = [
        "# Benchmark", "",
        f"Command: `{result['command']}`  ", f"Date: {result['created']}", "",
        *(f"- {line}" for line in machine_lines(result)),
        f"- model FLOPs per image (2 x MACs of MatMul/Gemm/Conv in the fp32 graph): {_num(flops and flops / 1e9, '.2f')} G",
        f"- timing: {settings['warmup']} warm-up run(s), then runs until {settings['budget_s']:g} s "
        f"(at least {settings['min_runs']}, at most {settings['runs']}); batch sizes {settings['batch_sizes']}",
        "", md_table(PERF_HEADER, perf_rows(result)), "", md_table(header, rows), "",
        MEASUREMENT_NOTES,
    ]
    notes = _notes(result)
    if notes:
        lines += ["", *(f"- {name}: {note}" for name, note in notes)]
    return "\n".join(lines) + "\n"


MEASUREMENT_NOTES = (
    "Each format is timed in its own fresh worker process. Latency is one `infer` call, numpy in and numpy out; "
    "img/s is batch x runs / timed seconds; GFLOP/s is the model's FLOPs (counted once from the fp32 ONNX "
    "graph) x img/s, and \"of matmul\" divides it by the matrix-multiply rate the \"matmul\" column names: "
    "a large MatMul built into the row's own backend at the precision the row executed, where the benchmark "
    "measured one (the bench page does), else this machine's fp32 sgemm (numpy). Peak RSS is the worker "
    "process's resident-set high-water mark (VmHWM), reset after loading and before each batch size: it "
    "includes the interpreter, the runtime and the loaded model. A run during which other processes (or the "
    "hypervisor) took more than a tenth of a CPU is discarded and retried a few times: \"runs\" counts the kept "
    "runs, (+N) the discarded ones, and ! marks a row that never got 3 quiet runs and keeps the contended ones. "
    "\"cpu busy\" is the worker's CPU seconds per wall second over the kept runs (at most the thread count)."
)
