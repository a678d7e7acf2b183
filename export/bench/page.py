"""`python -m export.bench.page` (`make bench`): regenerate docs/benchmarks.md on this machine.

The model is an MTLoRA Swin-T at 448x448 with four tasks (semseg, human_parts,
sal, normals), shared rank 64, task rank 4, scale 4. There is no model hub to
fetch a trained one from, so it is randomly initialised: every weight nonzero
and every adapter random, so that every LoRA branch contributes. Latency does
not depend on the weights' values; the accuracy columns only compare each
engine with the PyTorch model.

What it does, in `build/bench-docs/` (steps are reused when their inputs are unchanged):

1. writes the MTLoRA checkpoint and the same network without adapters (kind 'full');
2. builds every ONNX Runtime and OpenVINO engine at fp32/fp16/int8 with
   `mtlora-export build` (INT8 calibrated on synthetic 448 images);
3. exports the unmerged model to ONNX by tracing MultiTaskSwin itself (the
   exporter always merges), and the adapter-free network with the exporter;
4. times everything with `export.bench.run` (one fresh worker process per format),
   times the targets' reference setup (the Swin-T 448 backbone alone: PyTorch
   eager, OpenVINO fp32 and INT8, `export.bench.plain_backbone`) and profiles the
   three fp32 graphs with ONNX Runtime's profiler;
5. writes the page and `build/bench-docs/bench.json`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from engines.files import write_atomic
from export.artifacts.builddir import BuildDir
from export.bench.options import BenchOptions
from export.bench.plain_backbone import bench_backbone, reference_lines
from export.bench.profile import profile_graphs
from export.bench.run import benchmark, build_for_bench, write_json
from export.bench.tables import MEASUREMENT_NOTES, PERF_HEADER, accuracy_rows, md_table, perf_rows, runs_cell
from export.bench.targets import Target, engine_targets, onnx_target, torch_targets
from export.bench.timing import interleaved_latency, wait_for_quiet
from export.onnx.flops import count_flops

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "benchmarks.md"
WORK = ROOT / "build" / "bench-docs"
TASKS = ("semseg", "human_parts", "sal", "normals")
IMG_SIZE, SHARED_RANK, TASK_RANK, SCALE = 448, 64, 4, 4.0
CALIB_SAMPLES = 32
EVAL_SAMPLES = 4

# The issues' targets.
MERGED_VS_UNMERGED = 1.2  # the merged export at least this much faster than the unmerged model's
MERGED_VS_FREE = 1.15  # and at most this much slower than the same network without adapters
INT8_VS_EAGER = 6.0  # OpenVINO INT8 at least this much faster than PyTorch eager
INT8_VS_FP32 = 2.4  # and than OpenVINO fp32


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the models


def model_config(kind: str):
    from mtlora.config import AdapterConfig, ModelConfig, SwinConfig

    return ModelConfig(
        swin=SwinConfig.from_variant("swin_tiny", img_size=IMG_SIZE),
        adapter=AdapterConfig(kind=kind, shared_rank=SHARED_RANK, shared_scale=SCALE,
                              task_rank={t: TASK_RANK for t in TASKS}, task_scale={t: SCALE for t in TASKS}),
        tasks=TASKS,
    )


def randomize(model, seed: int = 0, std: float = 0.05) -> None:
    """Every parameter random and nonzero (norm scales around 1), BatchNorm statistics too."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            around_one = name.endswith(("norm1.weight", "norm2.weight"))
            param.copy_(std * torch.randn(param.shape, generator=gen) + (1.0 if around_one else 0.0))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=gen))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=gen))


def make_checkpoint(kind: str, out: Path, seed: int) -> Path:
    """Write the randomly initialised model of `kind` (the same bytes on every run, so builds are reused)."""
    from mtlora.checkpoint import save_checkpoint
    from mtlora.model import MultiTaskSwin

    config = model_config(kind)
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()) == json.loads(config.to_json()):
        return out
    model = MultiTaskSwin(config).eval()
    randomize(model, seed)
    save_checkpoint(model, out)
    return out


def export_unmerged(checkpoint: Path, out: Path) -> Path:
    """The unmerged MultiTaskSwin traced as it is (LoRA branches as separate MatMuls), then onnxslim'd.

    `export_onnx` always merges and folds, so this traces the model directly with
    the same exporter settings: TorchScript-based, opset 17, dynamic batch.
    """
    import onnx
    import onnxslim
    import torch

    from mtlora.loading import load_any

    if out.is_file():
        return out
    model = load_any(checkpoint).float().eval()
    image = torch.randn(2, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(0))
    names = list(model.tasks)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (image,), str(tmp), dynamo=False, opset_version=17, input_names=["image"],
                          output_names=names, dynamic_axes={n: {0: "batch"} for n in ["image", *names]},
                          do_constant_folding=True)
        slimmed = onnxslim.slim(onnx.load(str(tmp)))
    tmp.unlink()
    write_atomic(out, slimmed.SerializeToString())
    return out


def export_adapter_free(checkpoint: Path, out_dir: Path) -> Path:
    from export.onnx.exporter import export_onnx
    from mtlora.loading import load_any

    path = out_dir / "model.onnx"
    if not path.is_file():
        export_onnx(load_any(checkpoint), out_dir)
    return path


def check_against_torch(checkpoint: Path, onnx_path: Path) -> float:
    """Max abs difference between ONNX Runtime and the PyTorch model on one image: the graph computes the model."""
    import onnxruntime as ort
    import torch

    from mtlora.loading import load_any

    model = load_any(checkpoint).float().eval()
    image = np.random.default_rng(1).standard_normal((1, 3, IMG_SIZE, IMG_SIZE), dtype=np.float32)
    with torch.inference_mode():
        expected = [t.numpy() for t in model(torch.from_numpy(image))]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: image})
    return max(float(np.abs(a - b).max()) for a, b in zip(got, expected, strict=True))


INTERLEAVED_ROUNDS = 10
# The in-turn timing's names for the rows of the separate-worker tables.
ROW_NAMES = {"merged": "onnxruntime-fp32", "unmerged": "onnx-unmerged", "adapter-free": "onnx-adapter-free"}


def _image(batch: int = 1) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, IMG_SIZE, IMG_SIZE), dtype=np.float32)


def interleave_export(build_dir: Path, unmerged_onnx: Path, free_onnx: Path, threads: int) -> dict:
    """The three fp32 graphs on ONNX Runtime, timed in turn in this process (batch 1)."""
    from contextlib import ExitStack

    from engines.onnxruntime.runner import OnnxRuntimeRunner

    image = _image()
    paths = {"merged": BuildDir(build_dir).export / "model.onnx", "unmerged": unmerged_onnx, "adapter-free": free_onnx}
    with ExitStack() as stack:
        runners = {name: stack.enter_context(OnnxRuntimeRunner(path, intra_op_threads=threads))
                   for name, path in paths.items()}
        infers = {name: (lambda r=r: r.infer({r.input_names[0]: image})) for name, r in runners.items()}
        return interleaved_latency(infers, INTERLEAVED_ROUNDS)


def interleave_engines(build_dir: Path, checkpoint: Path, threads: int) -> dict:
    """PyTorch eager (unmerged), OpenVINO fp32 and OpenVINO INT8, timed in turn in this process (batch 1)."""
    from contextlib import ExitStack

    import torch

    from export.artifacts.engineset import EngineSet, load_runner
    from mtlora.loading import load_any

    image = _image()
    torch.set_num_threads(threads)
    model = load_any(checkpoint).float().eval()

    def eager():
        with torch.inference_mode():
            return model(torch.from_numpy(image))

    infers = {"pytorch-unmerged": eager}
    with ExitStack() as stack:
        for name in ("openvino-fp32", "openvino-int8"):
            directory = BuildDir(build_dir).engine(name)
            if (directory / "engine.json").is_file():
                runner = stack.enter_context(load_runner(EngineSet.read(directory), threads))
                infers[name] = lambda r=runner: r.infer({"image": image})
        return interleaved_latency(infers, INTERLEAVED_ROUNDS)


# ----------------------------------------------------------------------------- the page


def _row(result: dict, name: str, batch: int) -> dict | None:
    return next((r for r in result["rows"] if r["name"] == name and r.get("batch_size") == batch), None)


def _ratio(numerator: dict | None, denominator: dict | None, key: str = "p50_ms") -> float | None:
    if not numerator or not denominator or key not in numerator or key not in denominator:
        return None
    return numerator[key] / denominator[key]


def _verdict(value: float | None, target: float, at_least: bool) -> str:
    if value is None:
        return "NOT MEASURED"
    return "PASS" if (value >= target if at_least else value <= target) else "MISS"


def lscpu() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "L2 cache", "L3 cache",
            "Hypervisor vendor")
    return "\n".join(line for line in text.splitlines() if line.split(":")[0].strip() in keep)


def _profile_table(profiles: dict[str, dict], top: int = 12) -> str:
    """Mean ms per run by op type (and node count), one column per graph, the costliest op types first."""
    ms = {name: p["ms_per_op_type"] for name, p in profiles.items()}
    nodes = {name: p["nodes_per_op_type"] for name, p in profiles.items()}
    totals = {op: sum(m.get(op, 0.0) for m in ms.values()) for m in ms.values() for op in m}
    ops = sorted(totals, key=totals.get, reverse=True)[:top]
    header = ["op type", *(f"{name}: ms (nodes)" for name in ms)]
    rows = [[op, *(f"{ms[n].get(op, 0.0):.1f} ({nodes[n].get(op, 0)})" for n in ms)] for op in ops]
    rows.append(["all nodes", *(f"{sum(ms[n].values()):.1f} ({sum(nodes[n].values())})" for n in ms)])
    return md_table(header, rows)


CATEGORIES = (
    "shared full-rank linear layers",
    "attention QK^T and PV",
    "patch merging",
    "rank-64 correction (W x = W' x - s B A x)",
    "rank-4 task factors",
    "decoder convolutions",
    "everything else: norms, GELU, adds, reshapes, resize",
)


def node_categories(onnx_path: Path) -> dict[str, str]:
    """Each node of a graph from `export.onnx.fold` -> the CATEGORIES entry it belongs to (read from initializer names)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    category_of = {}
    for node in model.graph.node:
        weights = [i for i in node.input if i in initializers]
        category = CATEGORIES[-1]
        if node.op_type in ("MatMul", "Gemm"):
            if any(w.startswith(("task_branches.", "task_stack.")) for w in weights):
                category = CATEGORIES[4]
            elif any("lora_correction" in w for w in weights):
                category = CATEGORIES[3]
            elif any(".merging." in w for w in weights):
                category = CATEGORIES[2]
            elif weights:
                category = CATEGORIES[0]
            else:
                category = CATEGORIES[1]
        elif node.op_type == "Conv":
            category = CATEGORIES[5]
        category_of[node.name] = category
    return category_of


def time_breakdown(onnx_path: Path, profile: dict) -> dict[str, float]:
    """Profiled ms per run of a graph from `export.onnx.fold`, by what its nodes compute."""
    category_of = node_categories(onnx_path)
    # ORT's fused nodes have new names: its FusedMatMul is the scaled QK^T, FusedConv a decoder conv + ReLU.
    fused = {"FusedMatMul": CATEGORIES[1], "FusedConv": CATEGORIES[5], "NchwcConv": CATEGORIES[5]}
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for name, (op, ms) in profile["ms_per_node"].items():
        totals[category_of.get(name) or fused.get(op, CATEGORIES[-1])] += ms
    return totals


def flops_breakdown(onnx_path: Path, counted: dict) -> dict[str, float]:
    """GFLOP per image of a graph from `export.onnx.fold` (`counted`: its `count_flops`), by what its nodes compute."""
    category_of = node_categories(onnx_path)
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for name, flops in counted["by_node"].items():
        totals[category_of.get(name, CATEGORIES[-1])] += flops / 1e9
    return totals


def _breakdown_table(breakdowns: dict[str, dict[str, float]], gflops: dict[str, dict[str, float]]) -> str:
    names = list(breakdowns)
    rows = [[c, *(f"{breakdowns[n][c]:.0f}" for n in names), *(f"{gflops[n][c]:.1f}" for n in names)]
            for c in CATEGORIES]
    rows.append(["all nodes", *(f"{sum(breakdowns[n].values()):.0f}" for n in names),
                 *(f"{sum(gflops[n].values()):.1f}" for n in names)])
    return md_table(["what", *(f"{n} ms" for n in names), *(f"{n} GFLOP" for n in names)], rows)


def structural_note(gflops: dict[str, dict[str, float]]) -> str:
    """What the task streams add in FLOPs, against the merged-vs-adapter-free target."""
    merged, free = gflops["merged"], gflops["adapter-free"]
    extra = {c: merged[c] - free[c] for c in CATEGORIES}
    total_free = sum(free.values())
    parts = ", ".join(f"{c.split(' (')[0]} {extra[c]:+.1f}" for c in CATEGORIES[2:5])
    ratio = sum(merged.values()) / total_free
    return (f"The task streams' work the exact export must do, in GFLOP per image against the adapter-free network: "
            f"{parts}, in all {ratio:.3f}x the adapter-free FLOPs. Meeting the {MERGED_VS_FREE}x target "
            f"would take the merged graph running {ratio / MERGED_VS_FREE:.2f}x faster per FLOP than the adapter-free "
            "one, whose work is in fewer, larger MatMuls.")


def profile_findings(profiles: dict[str, dict]) -> list[str]:
    """The op types that make the difference between the merged graph and the two others, in words."""
    ms = {name: p["ms_per_op_type"] for name, p in profiles.items()}
    total = {name: sum(m.values()) for name, m in ms.items()}

    def differences(a: str, b: str) -> str:
        ops = set(ms[a]) | set(ms[b])
        diff = sorted(((op, ms[a].get(op, 0.0) - ms[b].get(op, 0.0)) for op in ops), key=lambda kv: -abs(kv[1]))
        return ", ".join(f"{op} {d:+.0f} ms" for op, d in diff[:5])

    return [
        f"Summed kernel time: merged {total['merged']:.0f} ms, unmerged {total['unmerged']:.0f} ms, "
        f"adapter-free {total['adapter-free']:.0f} ms (ratios {total['unmerged'] / total['merged']:.2f}x and "
        f"{total['merged'] / total['adapter-free']:.2f}x).",
        f"Merged minus adapter-free, largest differences by op type: {differences('merged', 'adapter-free')}.",
        f"Merged minus unmerged, largest differences by op type: {differences('merged', 'unmerged')}.",
    ]


def write_page(result: dict, extra: dict, path: Path) -> None:
    machine = result["machine"]
    matmul = machine["matmul"]
    flops = result["model"]["flops_per_image"]
    merged = _row(result, "onnxruntime-fp32", 1)
    unmerged = _row(result, "onnx-unmerged", 1)
    free = _row(result, "onnx-adapter-free", 1)

    def turn_ratio(group: str, slow: str, fast: str) -> float | None:
        seconds = extra["interleaved"][group]["seconds"]
        if not seconds.get(slow) or not seconds.get(fast):
            return None
        return float(np.median(seconds[slow]) / np.median(seconds[fast]))

    def target_row(text: str, group: str, slow: str, fast: str, target: float, at_least: bool) -> str:
        """One target: its verdict on the in-turn timing, and the ratios from the separate workers for comparison."""
        turn = extra["interleaved"][group]
        value = turn_ratio(group, slow, fast) if at_least else turn_ratio(group, fast, slow)
        verdict = _verdict(value, target, at_least) + (" (contended, unreliable)" if turn["contended"] else "")
        cells = [f"{fmt(value)}x", verdict]
        slow_row, fast_row = _row(result, ROW_NAMES.get(slow, slow), 1), _row(result, ROW_NAMES.get(fast, fast), 1)
        for key in ("p50_ms", "min_ms"):
            ratio = _ratio(slow_row, fast_row, key) if at_least else _ratio(fast_row, slow_row, key)
            cells.append(f"{fmt(ratio)}x")
        return f"| {text} | " + " | ".join(cells) + " |"

    target_header = ["| target | in turn: ratio of medians | verdict | separate workers: p50 ratio | "
                     "separate workers: fastest-run ratio |", "|---|---|---|---|---|"]

    def turn_note(group: str) -> str:
        turn = extra["interleaved"][group]
        medians = ", ".join(f"{name} {np.median(seconds) * 1e3:.0f} ms" for name, seconds in turn["seconds"].items())
        return (f"In turn: the formats ran one after the other in one process, round after round (order rotating), "
                f"so a busy spell of the machine slows them alike; {turn['rounds_kept']} rounds kept, "
                f"{turn['rounds_dropped']} dropped as contended; medians {medians}. The verdict is on this timing; "
                "the separate-worker ratios come from the tables.")

    load = machine["load_average"]
    busy = [r["cpu_busy"] for r in result["rows"] if r.get("cpu_busy") is not None]
    discarded = sum(r.get("runs_discarded") or 0 for r in result["rows"])
    retimed = [f"{r['name']} b{r['batch_size']}" for r in result["rows"] if r.get("retimed")]
    waited = sum({r["name"]: r.get("waited_for_quiet_s") or 0.0 for r in result["rows"]}.values())
    flagged = [f"{r['name']} b{r['batch_size']}" for r in result["rows"] if r.get("contended")]
    contended_rows = (f"; these rows never got 3 quiet runs and keep contended ones (marked !): {', '.join(flagged)}"
                      if flagged else "; every row has at least 3 quiet runs")

    def fmt(x: float | None, spec: str = ".2f") -> str:
        return "n/a" if x is None else format(x, spec)

    lines = [
        "# Benchmarks",
        "",
        f"Command: `{extra['command']}`" + (" (`make bench`)" if extra["command"].endswith("bench_docs") else "")
        + f", {extra['minutes']:.0f} minutes, finished {result['created']}.  ",
        f"Machine: {machine['cpu']}, {machine['cpus_available']} CPU(s), {machine['threads']} thread(s) per engine, "
        f"fp32 sgemm {matmul['reference_gflops']:.0f} GFLOP/s; details in section 3.",
        "",
        "Model: MTLoRA Swin-T, 448x448 input, tasks semseg (21), human_parts (7), sal (1), normals (3); shared "
        f"rank {SHARED_RANK}, task rank {TASK_RANK}, scale {SCALE:g}. **Randomly initialised** (no trained "
        "Swin-T 448 MTLoRA checkpoint is available here): every weight is random and nonzero and every adapter is "
        "random, so every LoRA branch does real work. Latency does not depend on the weight values; accuracy "
        "columns compare each engine with the PyTorch model on synthetic images, not with ground truth that means "
        f"anything. Model FLOPs (2 x MACs of MatMul/Gemm/Conv in the merged fp32 graph): {flops / 1e9:.1f} G per image.",
        "",
        f"**Machine load.** This is a shared {machine['cpus_available']}-CPU machine: load average {load['start']} "
        f"at the start and {load['end']} at the end (1/5/15 min); the sgemm rate was "
        f"{matmul['start']['gflops']:.0f} GFLOP/s at the start and {matmul['end']['gflops']:.0f} at the end; the "
        f"timed workers used {fmt(min(busy) if busy else None)} to {fmt(max(busy) if busy else None)} CPU-seconds "
        f"per second (at most {machine['threads']}). {discarded} timed runs were discarded because other processes "
        f"took CPU time during them{contended_rows}"
        + (f"; timed a second time because the first timing was contended: {', '.join(retimed)}" if retimed else "")
        + ". Before each format the benchmark waited up to "
        f"{result['settings']['quiet_wait_s']:g} s for the rest of the machine to go quiet ({waited:.0f} s in all). "
        "With a few runs per row, differences under about 10% between rows are within the noise.",
        "",
        "## 1. Export: merged vs unmerged vs adapter-free (ONNX Runtime CPU, fp32, batch 1)",
        "",
        "- merged: the exported graph the engines are built from (adapters merged, task branches folded to "
        "low-rank factors; `mtlora-export build`).",
        "- unmerged: MultiTaskSwin traced as it is, every LoRA branch a separate pair of MatMuls (the exporter "
        f"always merges, so this is traced directly; same exporter settings and onnxslim). Checked against PyTorch: "
        f"max abs difference {extra['unmerged_max_abs']:.2e}.",
        "- adapter-free: the same multi-task Swin-T 448 without adapters (`kind='full'`: no task-specific "
        "streams, every task reads the shared features), exported with the same exporter.",
        "",
    ]
    header = ["graph", "GFLOP/img", "size MiB", "min ms", "p50 ms", "p90 ms", "p99 ms", "runs", "img/s", "of matmul",
              "peak RSS MiB"]
    rows = []
    for label, row, gflop in (("merged", merged, flops), ("unmerged", unmerged, extra["flops"]["unmerged"]),
                              ("adapter-free", free, extra["flops"]["adapter-free"])):
        if row is None or "p50_ms" not in row:
            rows.append([label, fmt(gflop / 1e9, ".1f"), "", "not measured", "", "", "", "", "", "", ""])
            continue
        rows.append([label, fmt(gflop / 1e9, ".1f"), fmt(row["size_mib"], ".1f"), fmt(row["min_ms"], ".0f"),
                     fmt(row["p50_ms"], ".0f"),
                     fmt(row["p90_ms"], ".0f"), fmt(row["p99_ms"], ".0f"), runs_cell(row),
                     fmt(row["images_per_s"]), fmt(row.get("fraction_of_matmul"), ".0%"), fmt(row["peak_rss_mib"], ".0f")])
    lines += [md_table(header, rows), "", *target_header,
              target_row(f"merged >= {MERGED_VS_UNMERGED}x faster than unmerged", "export", "unmerged", "merged",
                         MERGED_VS_UNMERGED, True),
              target_row(f"merged <= {MERGED_VS_FREE}x slower than adapter-free", "export", "adapter-free", "merged",
                         MERGED_VS_FREE, False),
              "", turn_note("export"), "",
              "For scale, the FLOP ratios are "
              f"unmerged/merged {extra['flops']['unmerged'] / flops:.3f} and merged/adapter-free "
              f"{flops / extra['flops']['adapter-free']:.3f}: at equal FLOP rates the merged graph would be "
              f"{extra['flops']['unmerged'] / flops:.2f}x faster than the unmerged one and "
              f"{flops / extra['flops']['adapter-free']:.2f}x slower than the adapter-free one. The adapter-free "
              "network has no task-specific streams at all, while MTLoRA runs four task streams through the last "
              "block of every stage and four more patch mergings; the merged export has to do that work.", ""]
    if extra.get("profiles"):
        lines += ["### Where the time goes", "",
                  f"ONNX Runtime's profiler at batch 1, ms by op type after its graph optimisations, each node "
                  f"counted with its fastest of {extra['profile_runs']} runs (other processes only add time), "
                  f"{machine['threads']} threads:",
                  "", _profile_table(extra["profiles"]), ""]
        lines += [f"- {finding}" for finding in extra.get("findings", [])]
        lines += ["", "The same time, and the FLOPs, by what the nodes compute (read from the exporter's initializer "
                  "names):", "", _breakdown_table(extra["breakdown"], extra["flops_breakdown"]), "",
                  structural_note(extra["flops_breakdown"]), ""]

    lines += [
        "## 2. Engines",
        "",
        f"Every engine `mtlora-export build` makes here, and PyTorch eager. INT8 is calibrated on "
        f"{extra['calib_samples']} synthetic 448x448 images (`--calib-data synthetic --calib-samples "
        f"{extra['calib_samples']}`); {extra['calib_note']} Accuracy is checked on {EVAL_SAMPLES} synthetic "
        "images plus the export's 2 reference inputs against the unmerged PyTorch model.",
        "",
        md_table(PERF_HEADER, [r for r in perf_rows(result) if not r[0].startswith("onnx-")]),
        "",
    ]
    header_acc, rows_acc = accuracy_rows(result)
    lines += [md_table(header_acc, [r for r in rows_acc if not r[0].startswith("onnx-")]), "",
              "Targets at batch 1:", "", *target_header,
              target_row(f"OpenVINO INT8 >= {INT8_VS_EAGER:g}x faster than PyTorch eager", "engines",
                         "pytorch-unmerged", "openvino-int8", INT8_VS_EAGER, True),
              target_row(f"OpenVINO INT8 >= {INT8_VS_FP32}x faster than OpenVINO fp32", "engines", "openvino-fp32",
                         "openvino-int8", INT8_VS_FP32, True),
              "", turn_note("engines"), ""]
    b8_fp32, b8_int8 = _row(result, "openvino-fp32", 8), _row(result, "openvino-int8", 8)
    if b8_fp32 and b8_int8 and "images_per_s" in b8_fp32 and "images_per_s" in b8_int8:
        lines += [f"At batch 8, OpenVINO INT8 gives {b8_int8['images_per_s'] / b8_fp32['images_per_s']:.2f}x "
                  "the images/s of OpenVINO fp32.", ""]
    if extra.get("reference_backbone"):
        lines += reference_lines(extra["reference_backbone"], matmul["reference_gflops"])
    if extra.get("engine_notes"):
        lines += [*(f"- {note}" for note in extra["engine_notes"]), ""]
    lines += ["How each column is measured: " + MEASUREMENT_NOTES, ""]

    versions = machine["versions"]
    blas = matmul["start"].get("blas") or []
    lines += [
        "## 3. The machine",
        "",
        "```", lscpu() or machine["cpu"], "```", "",
        "- CPU flags that matter here: " + ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in machine["flags"].items()),
        f"- {machine['cpus_available']} CPU(s) available to the process; every engine and PyTorch ran with "
        f"{machine['threads']} thread(s).",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- fp32 matmul: numpy {versions.get('numpy')} with "
        + (", ".join(f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')}, {b.get('num_threads')} threads)"
                     for b in blas) or "an unknown BLAS")
        + f", {matmul['start']['size']}x{matmul['start']['size']} sgemm: {matmul['start']['gflops']:.1f} GFLOP/s at "
        f"the start of the run, {matmul['end']['gflops']:.1f} at the end (best of {matmul['start']['repeats']}); "
        f"\"of matmul\" divides by {matmul['reference_gflops']:.1f}.",
        f"- load average (1/5/15 min): {load['start']} at the start, {load['end']} at the end.",
        f"- command: `{extra['command']}`; raw results: `{extra['json']}`.",
        "",
    ]
    write_atomic(path, "\n".join(lines))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.bench.page", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="threads per engine (default: every CPU)")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed runs per format and batch size")
    parser.add_argument("--no-batch-8", action="store_true", help="time batch 1 only")
    parser.add_argument("--quiet-wait", type=float, default=45.0,
                        help="seconds to wait, before each format, for other processes to go quiet")
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument("--work", type=Path, default=WORK)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "export.bench.page", *(argv if argv is not None else sys.argv[1:])])
    started = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    say("[bench-docs] writing the randomly initialised checkpoints")
    mtlora = make_checkpoint("mtlora", work / "checkpoint-mtlora", seed=0)
    free_ckpt = make_checkpoint("full", work / "checkpoint-adapter-free", seed=0)

    say("[bench-docs] building every engine")
    report, failures = build_for_bench(
        mtlora, work / "build", say, backends=("onnxruntime", "openvino"), precisions=("all",),
        calib_data="synthetic", calib_samples=CALIB_SAMPLES, eval_samples=EVAL_SAMPLES, threads=args.threads)
    build_dir = work / "build"

    say("[bench-docs] exporting the unmerged model and the adapter-free network")
    unmerged_onnx = export_unmerged(mtlora, work / "unmerged" / "model.onnx")
    free_onnx = export_adapter_free(free_ckpt, work / "adapter-free")
    unmerged_max_abs = check_against_torch(mtlora, unmerged_onnx)

    opts = BenchOptions(batch_sizes=(1,) if args.no_batch_8 else (1, 8), threads=args.threads, warmup=1,
                        runs=30, budget_s=args.budget, quiet_wait_s=args.quiet_wait)
    model_flops = count_flops(build_dir / "export" / "model.onnx")
    free_flops = count_flops(free_onnx)
    targets: list[Target] = torch_targets(mtlora)
    for t in targets:
        t.batch_sizes = (1,)  # PyTorch eager at batch 8 takes minutes per format on two cores
    targets += engine_targets(build_dir, report, failures)
    targets += [onnx_target("onnx-unmerged", unmerged_onnx), onnx_target("onnx-adapter-free", free_onnx)]
    for t in targets[-2:]:
        t.batch_sizes = (1,)
    result = benchmark(targets, opts, input_size=IMG_SIZE, model_flops=model_flops, say=say, command=command,
                       model={"build_dir": str(build_dir), "tasks": list(TASKS), "layout": "single",
                              "checkpoint": str(mtlora)})

    threads = opts.thread_count
    say("[bench-docs] timing the targets' formats in turn, in one process")
    interleaved = {
        "export": interleave_export(build_dir, unmerged_onnx, free_onnx, threads),
        "engines": interleave_engines(build_dir, mtlora, threads),
    }
    say("[bench-docs] the targets' reference setup: the Swin-T 448 backbone alone")
    reference = bench_backbone(free_ckpt, work / "reference-backbone", threads, INTERLEAVED_ROUNDS, CALIB_SAMPLES, say)
    say("[bench-docs] profiling the three fp32 graphs with ONNX Runtime")
    profile_runs = 5
    if opts.quiet_wait_s > 0:
        wait_for_quiet(opts.quiet_wait_s)
    profiles = profile_graphs({"merged": build_dir / "export" / "model.onnx", "unmerged": unmerged_onnx,
                               "adapter-free": free_onnx}, threads, profile_runs)
    extra = {
        "command": command,
        "minutes": (time.perf_counter() - started) / 60,
        "unmerged_max_abs": unmerged_max_abs,
        "flops": {"unmerged": count_flops(unmerged_onnx)["flops"], "adapter-free": free_flops["flops"]},
        "calib_samples": CALIB_SAMPLES,
        "calib_note": CALIB_NOTE,
        "profiles": profiles,
        "interleaved": interleaved,
        "reference_backbone": reference,
        "findings": profile_findings(profiles),
        "breakdown": {"merged": time_breakdown(build_dir / "export" / "model.onnx", profiles["merged"]),
                      "adapter-free": time_breakdown(free_onnx, profiles["adapter-free"])},
        "flops_breakdown": {"merged": flops_breakdown(build_dir / "export" / "model.onnx", model_flops),
                            "adapter-free": flops_breakdown(free_onnx, free_flops)},
        "profile_runs": profile_runs,
        "engine_notes": [f"{k}: failed to build: {v}" for k, v in failures.items()],
    }
    json_path = work / "bench.json"
    extra["json"] = str(json_path.relative_to(ROOT)) if json_path.is_relative_to(ROOT) else str(json_path)
    result["bench_docs"] = {k: v for k, v in extra.items() if k != "command"}
    write_json(result, json_path)
    write_page(result, extra, args.page)
    say(f"[bench-docs] wrote {args.page} ({extra['minutes']:.1f} min)")
    return 0


CALIB_NOTE = (
    "fewer than `build`'s default, to keep `make bench` near 25 minutes on two cores. ONNX Runtime's histogram "
    "calibration collects 8 images at a time (`calibration.qdq.CALIBRATION_CHUNK`), so its memory does not grow "
    "with the count."
)


if __name__ == "__main__":
    sys.exit(main())
