"""Where the bytes of an exported graph go: shared full-rank weights vs per-task extras.

Torch-free: it reads ONNX files only. Initializers are attributed by the names
`export.onnx.fold` gives them: `task_branches.<task>.` and `heads.<task>.` are
task-specific, `task_stack.` holds every task's factors stacked (one equal
slice per task of the graph, so its bytes are shared out evenly), `lora_` marks
a low-rank factor, and everything in a split layout's `head_<task>.onnx`
belongs to that task. A full-rank weight is a MatMul/Gemm initializer that is
not a low-rank factor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError

CATEGORIES = ("full_rank", "low_rank", "downsampler", "decoder", "other")
SHARED = "shared"
STACKED = "task_stack."  # every task's factors of one layer in one tensor, a slice each


def _nbytes(init) -> int:
    import onnx

    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return int(np.prod(init.dims, dtype=np.int64)) * itemsize


def _category(name: str, matmul_weights: set[str]) -> str:
    if "lora_" in name:
        return "low_rank"
    if name in matmul_weights:
        return "full_rank"
    if ".downsampler." in name:
        return "downsampler"
    if ".decoder." in name:
        return "decoder"
    return "other"


def _owners(name: str, tasks: Sequence[str], file_task: str | None) -> list[str]:
    """Who holds an initializer: one task, every task (a slice each, for stacked factors) or [SHARED]."""
    if file_task is not None:
        return [file_task]
    if name.startswith(STACKED) and tasks:
        return list(tasks)
    for task in tasks:
        if name.startswith((f"task_branches.{task}.", f"heads.{task}.")):
            return [task]
    return [SHARED]


def plain_swin_matmul_bytes(swin: dict[str, Any], itemsize: int = 4) -> int:
    """Bytes of the Linear weights of the same Swin without any adapter (qkv, proj, fc1, fc2, merging)."""
    depths = swin["depths"]
    total = 0
    for s, depth in enumerate(depths):
        dim = swin["embed_dim"] * 2**s
        hidden = int(dim * swin["mlp_ratio"])
        total += depth * (dim * 3 * dim + dim * dim + 2 * dim * hidden)
        if s < len(depths) - 1:
            total += 4 * dim * 2 * dim
    return total * itemsize


def _graph_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        files = sorted(source.glob("*.onnx")) if source.is_dir() else [source]
    else:
        files = [Path(p) for p in source]
    if not files:
        raise ExportError(f"{source}: no ONNX files to analyse")
    return files


def cost_breakdown(source: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Initializer bytes of an export (a directory, one .onnx file or a list of them).

    Returns {"files": {name: bytes}, "shared": {category: bytes}, "tasks": {task:
    {category: bytes}}, "total": bytes, "plain_full_rank": bytes of the same Swin's
    Linear weights without adapters (None if the graphs carry no model config)}.
    """
    import onnx

    report: dict[str, Any] = {"files": {}, "shared": dict.fromkeys(CATEGORIES, 0), "tasks": {}, "total": 0,
                              "plain_full_rank": None}
    for path in _graph_files(source):
        model = onnx.load(str(path), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        tasks = json.loads(meta.get("tasks", "[]"))
        for task in tasks:
            report["tasks"].setdefault(task, dict.fromkeys(CATEGORIES, 0))
        graph = meta.get("graph", path.stem)
        file_task = graph[len("head_"):] if graph.startswith("head_") else None
        if file_task is not None:
            report["tasks"].setdefault(file_task, dict.fromkeys(CATEGORIES, 0))
        if "model_config" in meta and report["plain_full_rank"] is None:
            report["plain_full_rank"] = plain_swin_matmul_bytes(json.loads(meta["model_config"])["swin"])
        matmul_weights = {
            name for node in model.graph.node if node.op_type in ("MatMul", "Gemm") for name in node.input[:2]
        }
        file_bytes = 0
        for init in model.graph.initializer:
            nbytes = _nbytes(init)
            owners = _owners(init.name, tasks, file_task)
            category = _category(init.name, matmul_weights)
            for owner in owners:
                bucket = report["shared"] if owner == SHARED else report["tasks"][owner]
                bucket[category] += nbytes // len(owners)
            file_bytes += nbytes
        report["files"][path.name] = file_bytes
        report["total"] += file_bytes
    return report


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f} MiB"


def format_cost(report: dict[str, Any]) -> str:
    """A small table: one column for the shared part, one per task."""
    columns = [SHARED, *report["tasks"]]
    buckets = [report["shared"], *report["tasks"].values()]
    labels = {"full_rank": "full-rank MatMul weights", "low_rank": "low-rank factors", "downsampler": "downsampler",
              "decoder": "decoder", "other": "other (norms, biases, conv, tables)"}
    rows = [["initializer bytes", *columns]]
    for category in CATEGORIES:
        rows.append([labels[category], *(_mb(b[category]) for b in buckets)])
    rows.append(["total", *(_mb(sum(b.values())) for b in buckets)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) + 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(f"all graphs: {_mb(report['total'])}")
    if report["plain_full_rank"] is not None:
        lines.append(
            f"shared full-rank MatMul weights {_mb(report['shared']['full_rank'])}; "
            f"the same Swin without adapters: {_mb(report['plain_full_rank'])}"
        )
    copies = {t: b["full_rank"] for t, b in report["tasks"].items() if b["full_rank"]}
    if copies:
        lines.append(
            "per-task full-rank bytes are each head's copy of the shared patch-merging weights (split layout): "
            + ", ".join(f"{t} {_mb(n)}" for t, n in copies.items())
        )
    return "\n".join(lines)
