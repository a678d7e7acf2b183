"""How the layer search (`pipeline.layer_search`) tries a set of layers in fp32 on a backend: its judges.

A judge turns "these layers in fp32" into every task's gate on the evaluation set (`Verdict`, with the
`EngineCheck` as its detail), and where it can, ranks the layers by the error each adds, in one pass.

| backend, precision        | a try is                                                  | ranking          |
|---------------------------|-----------------------------------------------------------|------------------|
| any, int8                 | the int8 graph with the layers back in float, no          | local int8 error |
|                           | recalibration (`calibration.sensitivity`), run here       |                  |
| onnxruntime, tensorrt,    | the fp16 graph converted with the layers kept in fp32     | local fp16 error |
| fp16                      | (`calibration.fp16_sensitivity`), run by ONNX Runtime     |                  |
| openvino, fp16/bf16       | the engine set rebuilt with the layers kept in fp32       | none: bisection  |
| (and any other)           | (`BuildContext.engine(extra_keep=...)`) and checked       |                  |

A layer is (graph role, node name): "model", "backbone" or "head_<task>", and the node's name in the
graph the search edits (the ONNX's, or OpenVINO's for an NNCF graph).
"""

from __future__ import annotations

import glob
import math
from collections.abc import Mapping, Sequence

from calibration.errors import CalibrationError
from engines.registry import get_backend
from export.artifacts.engineset import EngineSet
from export.checking.accuracy import EngineChecker
from export.checking.results import Check, EngineCheck, EngineInfo, FallbackLayer, FallbackTask
from export.pipeline.check import tolerances_for
from export.pipeline.context import BuildContext
from export.pipeline.layer_search import Step, Unjudgeable, Verdict

RANK_BATCHES = 2  # evaluation batches the one-pass ranking runs on
Layer = tuple[str, str]  # (graph role, node name)


# ----------------------------------------------------------------------------- judging an EngineCheck


def _gap(check: Check) -> float:
    """How far a check is from passing, relative to its limit (0 when it passes)."""
    if not math.isfinite(check.value):
        return 1e6
    gap = check.value - check.limit if check.op == "<=" else check.limit - check.value
    return max(gap, 0.0) / max(abs(check.limit), 1e-3)


def shortfall(result: EngineCheck) -> float:
    """How far an engine is from passing every task's gate (0 when it passes)."""
    return sum(_gap(c) for task in result.tasks.values() for c in task.checks)


def verdict_of(result: EngineCheck) -> Verdict:
    return Verdict(result.passed, shortfall(result), result)


def _task_shortfall(result: EngineCheck) -> dict[str, float]:
    return {t: sum(_gap(c) for c in r.checks) for t, r in result.tasks.items()}


def _worst(checks) -> Check:
    """The check a task is reported by: a metric drop when one fails, else the one furthest from passing."""
    return max(checks, key=lambda c: (c.name.endswith("_drop"), _gap(c)))


def failing_tasks(result: EngineCheck) -> list[FallbackTask]:
    """Each failing task's worst check (the metric drop when that fails)."""
    out = []
    for task, r in result.tasks.items():
        if r.failed:
            worst = _worst(r.failed)
            out.append(FallbackTask(task, worst.name, worst.limit, worst.op, worst.value))
    return out


def check_value(result: EngineCheck, task: str, name: str) -> float | None:
    return next((c.value for c in result.tasks[task].checks if c.name == name), None)


def layer_record(step: Step) -> FallbackLayer:
    """What keeping a layer in fp32 bought: the failing task it helped most, that task's worst check."""
    before, after = step.before.detail, step.after.detail
    role, node = step.layer
    gaps_before, gaps_after = _task_shortfall(before), _task_shortfall(after)
    failing = [t for t, r in before.tasks.items() if r.failed] or list(before.tasks)
    task = max(failing, key=lambda t: gaps_before[t] - gaps_after[t])
    worst = _worst(before.tasks[task].failed or before.tasks[task].checks)
    after_value = check_value(after, task, worst.name)
    return FallbackLayer(node, role, task, worst.name, worst.value,
                         worst.value if after_value is None else after_value, step.error)


def node_glob(node: str) -> str:
    """A --keep-fp32 glob that matches the node `node` and nothing else."""
    return glob.escape(node)


# ----------------------------------------------------------------------------- graph variants, run here


class GraphJudge:
    """The engine set as the search sees it: each searched role's graph (`calibration.sensitivity`'s
    interface: `candidates`, `inputs`, `runner(float_nodes)`, `local_errors(feeds)`) with the chosen layers
    in fp32, the other roles' engines as built, chained as the set runs; judged on the evaluation set."""

    def __init__(self, ctx: BuildContext, entry: EngineSet, graphs: Mapping[str, object]):
        self.ctx = ctx
        self.entry = entry
        self.graphs = dict(graphs)
        self._engines: dict = {}
        self._runners: dict = {}
        self._tolerances = tolerances_for(entry, ctx.tolerances, ctx.info.interface.tasks)

    @property
    def candidates(self) -> list[Layer]:
        return [(role, node) for role, graph in self.graphs.items() for node in graph.candidates]

    def close(self) -> None:
        for runner in self._engines.values():
            runner.deactivate()
        self._engines.clear()
        self._runners.clear()
        for graph in self.graphs.values():
            if hasattr(graph, "close"):
                graph.close()

    def _infer(self, role: str, floats: frozenset):
        if role not in self.graphs:
            if role not in self._engines:
                runner = get_backend(self.entry.backend).load(self.entry.directory / self.entry.files[role],
                                                              threads=self.ctx.opts.threads)
                self._engines[role] = runner.activate()
            return self._engines[role].infer
        key = (role, floats)
        if key not in self._runners:
            # At most two variants of a graph alive at once: the state kept so far and the one being tried.
            mine = [k for k in self._runners if k[0] == role]
            for old in mine[:-1]:
                del self._runners[old]
            self._runners[key] = self.graphs[role].runner(floats)
        return self._runners[key]

    def _inputs(self, role: str) -> list[str]:
        if role in self.graphs:
            return self.graphs[role].inputs
        self._infer(role, frozenset())
        return self._engines[role].input_names

    def infer(self, chosen: frozenset, feed) -> dict:
        floats = {role: frozenset(n for r, n in chosen if r == role) for role in self.entry.files}
        if "model" in self.entry.files:
            return self._infer("model", floats["model"])(feed)
        shared = self._infer("backbone", floats["backbone"])(feed)
        outputs = {}
        for role in self.entry.files:
            if role.startswith("head_"):
                outputs.update(self._infer(role, floats[role])({n: shared[n] for n in self._inputs(role)}))
        return outputs

    def keep(self, layers, base: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        """`base` with `layers` added, as the globs `prepare_graph(keep_fp32=...)` takes."""
        return keep_for(layers, base)

    def judge(self, keep: frozenset) -> Verdict:
        interface = self.ctx.info.interface
        checker = EngineChecker(interface.channels, self.entry.precision, self._tolerances,
                                postprocessed=interface.postprocessed)
        for batch in self.ctx.batches():
            checker.update(self.infer(keep, {"image": batch.image}), batch)
        return verdict_of(checker.finish(EngineInfo(self.entry.backend, self.entry.precision)))

    def ranking(self) -> dict[Layer, float]:
        feeds = [{"image": b.image} for b in self.ctx.batches()[:RANK_BATCHES]]
        errors = {}
        for role, graph in self.graphs.items():
            role_feeds = feeds
            if role.startswith("head_"):
                backbone = self._infer("backbone", frozenset())
                names = graph.inputs
                role_feeds = [{n: out[n] for n in names} for out in (backbone(f) for f in feeds)]
            errors.update({(role, name): e for name, e in graph.local_errors(role_feeds).items()})
        return errors


def _int8_graph(ctx: BuildContext, entry: EngineSet, role: str, name: str, keep: Mapping[str, Sequence[str]]):
    """The int8 graph behind the engine of `role`, prepared again (a calibration-cache hit) to find it."""
    from calibration.sensitivity import open_quantized_graph

    prepared = ctx.prepare_role(entry.backend, "int8", role, name, ctx.keep_globs(role, keep))
    config = entry.artifacts(verify=False)[role].metadata.get("config")
    return open_quantized_graph(entry.backend, prepared.path, prepared.metadata, threads=ctx.opts.threads,
                                config=config)


def _fp16_graph(ctx: BuildContext, entry: EngineSet, role: str, name: str, keep: Mapping[str, Sequence[str]]):
    """The fp16 graph ONNX Runtime's engine of `role` runs, as `calibration.fp16_sensitivity` edits it."""
    from calibration.fp16_sensitivity import Fp16Graph

    return Fp16Graph(ctx.export_dir / ctx.info.graph_files[role], keep_fp32=ctx.keep_globs(role, keep),
                     threads=ctx.opts.threads)


# Which (backend, precision) has a graph the search can edit and run here; the rest rebuild the engine.
# TensorRT builds int8 and fp16 from the graphs ONNX Runtime runs here (the Q/DQ graph; the fp16 graph,
# strongly typed): the search judges those, with no GPU, and the rebuilt engine is checked for real.
GRAPH_PROBES = {
    ("onnxruntime", "int8"): _int8_graph,
    ("tensorrt", "int8"): _int8_graph,
    ("openvino", "int8"): _int8_graph,
    ("onnxruntime", "fp16"): _fp16_graph,
    ("tensorrt", "fp16"): _fp16_graph,
}


# ----------------------------------------------------------------------------- the real engine, rebuilt


def compute_nodes(ctx: BuildContext, role: str, keep: Sequence[str]) -> list[str]:
    """The compute layers (Conv, MatMul, Gemm) of a role's fp32 ONNX that a 16-bit engine may run in
    16-bit: those no `keep` glob matches, and not the per-task output layers (kept in fp32 already)."""
    from calibration.fp16 import COMPUTE_OPS, ensure_node_names, match_nodes, output_layer_nodes
    from engines.files import load_onnx

    model = load_onnx(ctx.export_dir / ctx.info.graph_files[role])
    ensure_node_names(model)
    kept = set(match_nodes(model, keep)) | set(output_layer_nodes(model))
    return [n.name for n in model.graph.node if n.op_type in COMPUTE_OPS and n.name not in kept]


def keep_for(layers, base: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """{graph role: globs}: `base`'s, then one glob per layer (role, node), matching that node alone."""
    keep = {role: list(globs) for role, globs in (base or {}).items()}
    for role, node in layers:
        globs = keep.setdefault(role, [])
        if node_glob(node) not in globs:
            globs.append(node_glob(node))
    return keep


class RebuildJudge:
    """Every try is the real engine set: rebuilt with the layers in fp32 as `name` in `target`
    (`BuildContext.engine`) and checked like any engine. Backend-agnostic and exact, and a build per try,
    so the search has no one-pass ranking here and bisects."""

    def __init__(self, ctx: BuildContext, entry: EngineSet, check: EngineCheck, roles: Sequence[str],
                 base: Mapping[str, Sequence[str]], name: str, target):
        self.ctx, self.entry, self.base, self.name, self.target = ctx, entry, dict(base), name, target
        self.check = check  # the engine set as built: no layer added, nothing to rebuild
        self.candidates: list[Layer] = [(role, node) for role in roles
                                        for node in compute_nodes(ctx, role, ctx.keep_globs(role, base))]

    def keep(self, layers, base: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        """`base` with `layers` added: ONNX node names, which every backend's `prepare_graph` matches."""
        return keep_for(layers, base)

    def judge(self, keep: frozenset) -> Verdict:
        if not keep:
            return verdict_of(self.check)
        extra = self.keep(sorted(keep), self.base)
        try:
            engine = self.ctx.engine(self.entry.backend, self.entry.precision, name=self.name, target=self.target,
                                     extra_keep=extra)
        except CalibrationError as err:
            raise Unjudgeable(str(err)) from None
        return verdict_of(self.ctx.check([engine]).report.engines[0])

    def ranking(self) -> None:
        return None

    def close(self) -> None:
        pass


def open_judge(ctx: BuildContext, entry: EngineSet, check: EngineCheck, precision: str, roles: Sequence[str],
               keep: Mapping[str, Sequence[str]], graph_name: str, name: str, target):
    """The judge for the `roles` of `entry` (checked: `check`) at `precision`, with `keep` ({role: globs})
    in fp32 already: a graph variant run here where `GRAPH_PROBES` has one, else the engine rebuilt as
    `name` in `target`."""
    make = GRAPH_PROBES.get((entry.backend, precision))
    if make is None:
        return RebuildJudge(ctx, entry, check, roles, keep, name, target)
    return GraphJudge(ctx, entry, {role: make(ctx, entry, role, graph_name, keep) for role in roles})
