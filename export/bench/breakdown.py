"""Where a graph's time and FLOPs go, by what its nodes compute (read from `export.onnx.fold`'s
initializer names), and the profiler's tables for the benchmark page."""

from __future__ import annotations

from pathlib import Path

from export.bench.tables import md_table


def profile_table(profiles: dict[str, dict], top: int = 12) -> str:
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


def structural_lines(breakdowns: dict[str, dict[str, float]], gflops: dict[str, dict[str, float]]) -> list[str]:
    """The time and FLOPs by what the nodes compute, and what the task streams add to the adapter-free network."""
    merged, free = gflops["merged"], gflops["adapter-free"]
    extra = {c: merged[c] - free[c] for c in CATEGORIES}
    parts = ", ".join(f"{c.split(' (')[0]} {extra[c]:+.1f}" for c in CATEGORIES[2:5])
    return ["The same time, and the FLOPs, by what the nodes compute (read from the exporter's initializer names):",
            "", _breakdown_table(breakdowns, gflops), "",
            f"What the task streams add, in GFLOP per image against the adapter-free network: {parts}, in all "
            f"{sum(merged.values()) / sum(free.values()):.3f}x the adapter-free FLOPs."]


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
