"""Where an ONNX graph's time goes on ONNX Runtime's CPU provider, by op type and by node."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def profile_graphs(paths: dict[str, str | os.PathLike], threads: int, runs: int = 5,
                   batch: int = 1) -> dict[str, dict[str, Any]]:
    """Where each ONNX graph's time goes on ONNX Runtime's CPU provider: ms by op type and by node.

    Uses ONNX Runtime's own profiler with all graph optimisations on, so op types
    are those of the optimised graph (fused ops included). The graphs run in turn,
    round after round, so a busy spell of the machine hits them alike; after one
    warm-up round each node counts with its fastest of `runs` runs (other
    processes only ever add time). Returns {name: {"ms_per_op_type",
    "nodes_per_op_type", "ms_per_node": {node: [op type, ms]}, "runs"}}.
    """
    import onnxruntime as ort

    from engines.onnxruntime.runner import session_options

    with tempfile.TemporaryDirectory(prefix="mtlora-profile-") as tmp:
        sessions, feeds = {}, {}
        for i, (name, path) in enumerate(paths.items()):
            options = session_options(intra_op_threads=threads)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / f"profile{i}")
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            meta = sessions[name].get_inputs()[0]
            shape = [batch if not isinstance(d, int) else d for d in meta.shape]
            feeds[name] = {meta.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
        for _ in range(runs + 1):
            for name, session in sessions.items():
                time.sleep(0.1)  # the previous session's threads stop spinning first
                session.run(None, feeds[name])
        return {name: _profile_summary(json.loads(Path(session.end_profiling()).read_text()), runs)
                for name, session in sessions.items()}


def _profile_summary(events: list[dict], runs: int) -> dict[str, Any]:
    model_runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    after_warmup = model_runs[1] if len(model_runs) > 1 else 0
    durations: dict[str, tuple[str, list[float]]] = {}  # node -> (op type, ms in each timed run)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        op = event.get("args", {}).get("op_name", "?")
        _, times = durations.setdefault(event["name"][: -len("_kernel_time")], (op, []))
        if event["ts"] >= after_warmup:
            times.append(event["dur"] / 1e3)
    per_node = {name: [op, min(times) if times else 0.0] for name, (op, times) in durations.items()}
    ms: dict[str, float] = {}
    nodes: dict[str, int] = {}
    for op, fastest in per_node.values():
        ms[op] = ms.get(op, 0.0) + fastest
        nodes[op] = nodes.get(op, 0) + 1
    return {"ms_per_op_type": dict(sorted(ms.items(), key=lambda kv: -kv[1])), "nodes_per_op_type": nodes,
            "ms_per_node": per_node, "runs": runs}
