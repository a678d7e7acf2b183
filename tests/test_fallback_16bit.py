"""Mixed precision at 16-bit: an fp16 engine that fails its gate gets the layers responsible kept in fp32 (the
int8 fallback's search, generalised), with real ONNX Runtime engines of the 64x64 default model.

The failing model is the default model with one badly scaled channel (`fp16_culprit_model`): the first
channel of the semseg head's finest downsampler is scaled down 1e5x and the decoder's weights for it
scaled up as much, so PyTorch computes the same function, but in fp16 those decoder weights pass fp16's
largest value (65504) and are clipped: the decoder conv is the culprit. A tight semseg max_abs limit for
fp16 makes the fp16 engine fail; the same engine with that conv in fp32 passes it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.checking.report import read_report
from export.cli import main as export_cli
from tests.conftest import invoke

CULPRIT = "/semseg/decoder/decoder.0/Conv"
SMALL = ("--eval-samples", "4")
SCALE = 1e5
TIGHT = {"fp16": {"semseg": {"max_abs": 0.1}}}


@pytest.fixture(scope="module")
def fp16_culprit_model(tmp_path_factory) -> Path:
    import torch

    from export.pipeline.sources import DEFAULT_MODEL
    from mtlora.checkpoint import save_checkpoint
    from mtlora.loading import load_any

    model = load_any(DEFAULT_MODEL)
    with torch.no_grad():
        model.downsamplers.semseg.convs[0].weight[0] /= SCALE
        model.decoders.semseg.last_layer[0].weight[:, 0] *= SCALE
    return save_checkpoint(model, tmp_path_factory.mktemp("fp16-culprit") / "model")


@pytest.fixture(scope="module")
def tight(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tolerances") / "tight.json"
    path.write_text(json.dumps(TIGHT))
    return path


def _build(model, out, *args):
    return invoke(export_cli, "build", model, "--backend", "onnxruntime", "--precision", "fp16", *SMALL, *args,
                  "--out", out)


@pytest.fixture(scope="module")
def fp16_build(fp16_culprit_model, tight, tmp_path_factory):
    """First as converted (failing the tight limit), then with the fallback ("always": whatever the speed)."""
    out = tmp_path_factory.mktemp("fp16") / "build"
    plain = _build(fp16_culprit_model, out, "--tolerances", tight, "--int8-fallback", "off")
    before = json.loads((out / "report.json").read_text())
    fixed = _build(fp16_culprit_model, out, "--tolerances", tight, "--int8-fallback", "always")
    return {"out": out, "plain": (*plain, before), "fixed": fixed}


def _semseg_max_abs(report: dict) -> float:
    [engine] = report["engines"]
    return next(c["value"] for c in engine["tasks"]["semseg"]["checks"] if c["name"] == "max_abs")


def _fp32_nodes(graph: Path) -> set[str]:
    """The Conv/MatMul nodes of an fp16 graph whose data inputs and outputs are float32."""
    from calibration.fp16 import COMPUTE_OPS, FLOAT, tensor_types
    from engines.files import load_onnx

    model = load_onnx(graph)
    types = tensor_types(model)
    return {n.name for n in model.graph.node if n.op_type in COMPUTE_OPS
            and types.get(n.input[0]) == FLOAT and types.get(n.output[0]) == FLOAT}


def test_the_fp16_engine_fails_the_tight_limit(fp16_build):
    code, output, report = fp16_build["plain"]
    assert code == 1, output
    assert _semseg_max_abs(report) > 0.2  # the clipped weights
    assert "fails its fp16 gate; --int8-fallback on would look for layers" in output


def test_the_search_keeps_the_culprit_in_fp32_and_every_task_passes(fp16_build):
    code, output = fp16_build["fixed"]
    out = fp16_build["out"]
    assert code == 0, output
    report = read_report(out)
    assert report.passed and _semseg_max_abs(report.to_dict()) <= 0.1
    [fallback] = report.fallbacks
    assert fallback.engine == "onnxruntime-fp16" and fallback.verdict in ("fixed", "not faster")
    assert [layer.node for layer in fallback.layers] == [CULPRIT]
    layer = fallback.layers[0]
    assert (layer.task, layer.check, layer.role) == ("semseg", "max_abs", "model")
    assert layer.before > 0.2 and layer.after <= 0.1 and layer.local_error > 0.01
    assert "ranked" in output and "layers by the error each adds" in output  # the one-pass fp16 probe
    # Timed against the fp32 engine it has to beat.
    assert {"fp16", "fp16+fallback", "fp32"} <= set(fallback.latency_ms)
    # The published fp16 engine runs the culprit in float32, and its sidecar says so.
    engine = out / "engines" / "onnxruntime-fp16"
    files = json.loads((engine / "engine.json").read_text())["files"]
    graph = engine / files["model"]
    assert CULPRIT in _fp32_nodes(graph)
    sidecar = json.loads((engine / f"{files['model']}.json").read_text())
    assert CULPRIT in sidecar["metadata"]["keep_fp32"] and CULPRIT in sidecar["metadata"]["fp32_nodes"]
    # ... and the rest still in fp16: one layer, not the model, went back.
    assert len(_fp32_nodes(graph)) < 10
    saved = json.loads(Path(fallback.file).read_text())
    assert saved["keep_fp32"] == {"model": [CULPRIT]} and saved["precision"] == "fp16"


def test_the_16_bit_list_is_cached_and_reused_as_a_keep_fp32_file(fp16_build, fp16_culprit_model, tight, tmp_path):
    out = fp16_build["out"]
    code, output = _build(fp16_culprit_model, out, "--tolerances", tight, "--int8-fallback", "always")
    assert code == 0, output
    assert "the fp16 fallback of an earlier build applies" in output and "ranked" not in output
    assert read_report(out).fallbacks[0].cached
    # --keep-fp32 @FILE for fp16: another build directory, no search, the same layer in fp32.
    fresh = tmp_path / "fresh"
    code, output = _build(fp16_culprit_model, fresh, "--tolerances", tight, "--int8-fallback", "off",
                          "--keep-fp32", f"@{out / 'fallback' / 'onnxruntime-fp16.json'}")
    assert code == 0, output
    engine = fresh / "engines" / "onnxruntime-fp16"
    assert CULPRIT in _fp32_nodes(engine / json.loads((engine / "engine.json").read_text())["files"]["model"])


def test_a_mix_no_faster_than_fp32_gives_way_to_fp32(fp16_build, fp16_culprit_model, tight, tmp_path, monkeypatch):
    """Mode "on": fp16 no faster than fp32 here (timings scripted: speed on this machine must not decide
    what the test sees), so layers in fp32 cannot pay off; the build takes fp32, which passes, and says why."""
    import export.pipeline.fallback as fallback
    from export.artifacts.builddir import BuildDir

    out = tmp_path / "build"
    shutil.copytree(fp16_build["out"], out)
    shutil.rmtree(BuildDir(out).calibration_cache)  # no cached list: the search decides
    shutil.rmtree(out / "engines")

    def timed(_ctx, entries):
        return {name: 5.0 if name == "fp32" else 9.0 for name in entries}

    monkeypatch.setattr(fallback, "time_in_build", timed)
    code, output = _build(fp16_culprit_model, out, "--tolerances", tight, "--int8-fallback", "on")
    assert code == 0, output
    report = read_report(out)
    assert [e.key for e in report.engines] == ["onnxruntime-fp32"] and report.passed
    [record] = report.fallbacks
    assert record.verdict == "stopped" and record.latency_ms == {"fp16": 9.0, "fp32": 5.0}
    assert record.message.startswith("fp16 (9 ms) is no faster than fp32 (5 ms) here, so layers in fp32 cannot "
                                     "pay off")
    assert record.message.endswith("the build takes onnxruntime-fp32 instead, which passes every task")
    # The build's results are the engine sets that took the failing one's place.
    assert sorted(p.name for p in (out / "engines").iterdir()) == ["onnxruntime-fp32"]
    assert json.loads((out / "build.json").read_text())["engines"] == ["onnxruntime-fp32"]
    code, output = invoke(export_cli, "check", out)
    assert code == 0, output


def test_a_cached_mix_that_was_no_faster_gives_way_to_fp32_again(fp16_build, fp16_culprit_model, tight, tmp_path,
                                                                  monkeypatch):
    """Mode "on": the search's mix passes but is no faster than fp32 (timings scripted), so the build takes
    fp32; its list is cached, and the same build again, which applies the list without searching, takes fp32
    too (it once kept the mix: the cached list made the engine pass, and no timing was looked at)."""
    import export.pipeline.fallback as fallback
    from export.artifacts.builddir import BuildDir

    out = tmp_path / "build"
    shutil.copytree(fp16_build["out"], out)
    shutil.rmtree(BuildDir(out).calibration_cache)  # no cached list: the search decides
    shutil.rmtree(out / "engines")
    scripted = {"fp16": 4.0, "fp32": 5.0, "fp16+fallback": 9.0}
    monkeypatch.setattr(fallback, "time_in_build", lambda _ctx, entries: {n: scripted[n] for n in entries})
    for searched in (True, False):
        code, output = _build(fp16_culprit_model, out, "--tolerances", tight, "--int8-fallback", "on")
        assert code == 0, output
        assert ("the fp16 fallback of an earlier build applies" in output) != searched
        report = read_report(out)
        assert [e.key for e in report.engines] == ["onnxruntime-fp32"] and report.passed, output
        [record] = report.fallbacks
        assert record.verdict == "not faster" and record.cached != searched and record.latency_ms == scripted
        assert record.message.endswith("prefer fp32; the build takes onnxruntime-fp32 instead, which passes every "
                                       "task"), record.message
        assert sorted(p.name for p in (out / "engines").iterdir()) == ["onnxruntime-fp32"]


# ----------------------------------------------------------------------------- the fp16 probe alone


def _three_convs(path: Path) -> Path:
    """x -> conv A (channel 0 scaled 1e-5) -> conv B (its input 0 scaled 1e5) -> relu -> conv C -> y: the
    same function as without the scales, but B's weights pass fp16's range."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((4, 3, 1, 1), (4, 4, 1, 1), (2, 4, 1, 1)))
    a[0] /= SCALE
    b[:, 0, 0, 0] = np.array([1.0, -0.9, 0.8, -1.2]) * SCALE  # every one past 65504
    nodes = [helper.make_node("Conv", ["x", "a"], ["ya"], name="A"), helper.make_node("Conv", ["ya", "b"], ["yb"], name="B"),
             helper.make_node("Relu", ["yb"], ["yr"], name="R"), helper.make_node("Conv", ["yr", "c"], ["y"], name="C")]
    graph = helper.make_graph(nodes, "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [numpy_helper.from_array(w, n) for w, n in ((a, "a"), (b, "b"), (c, "c"))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_the_fp16_probe_ranks_the_layer_fp16_cannot_hold_and_keeps_it_in_fp32(tmp_path):
    import onnxruntime as ort

    from calibration.fp16_sensitivity import Fp16Graph

    source = _three_convs(tmp_path / "three.onnx")
    feed = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    [expected] = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feed)
    graph = Fp16Graph(source)
    try:
        assert graph.candidates == ["A", "B"]  # C, the output layer, is in fp32 already
        errors = graph.local_errors([feed])
        assert errors["B"] > 0.1 > 100 * errors["A"], errors
        error = {keep: float(np.abs(graph.runner(keep)(feed)["y"] - expected).max()) for keep in ((), ("B",))}
        assert error[("B",)] < 0.2 * error[()], error  # what is left: A's tiny outputs, rounded in fp16
        with pytest.raises(Exception, match="not fp16 compute layers"):
            graph.runner(["C"])
    finally:
        graph.close()


def test_auto_has_fp16_with_the_fallback_among_its_candidates(fp16_build, fp16_culprit_model, tmp_path):
    """`--precision auto` runs the build's own fallback for a 16-bit candidate that fails (int8's limits
    opened up here, so that only fp16 needs it)."""
    from export.artifacts.builddir import BuildDir

    out = tmp_path / "auto"
    shutil.copytree(fp16_build["out"], out)  # the export is reused; no cached list, no engines
    shutil.rmtree(BuildDir(out).calibration_cache)
    shutil.rmtree(out / "engines")
    tolerances = tmp_path / "tolerances.json"
    tolerances.write_text(json.dumps({**TIGHT, "int8": {"*": {"max_metric_drop": 100.0, "min_cosine": -1.0,
                                                               "max_angle_deg": 180.0}}}))
    code, output = invoke(export_cli, "build", fp16_culprit_model, "--backend", "onnxruntime", "--precision", "auto",
                          "--calib-samples", "8", *SMALL, "--tolerances", tolerances, "--int8-fallback", "always",
                          "--out", out)
    assert code == 0, output
    report = read_report(out)
    candidates = {c.name: c for c in report.auto.candidates}
    assert list(candidates)[:3] == ["fp32", "fp16", "int8"] and "fp16+fallback" in candidates
    assert not candidates["fp16"].passed and candidates["fp16+fallback"].passed
    assert candidates["fp16+fallback"].note.startswith("1 layer in fp32")
    [record] = [f for f in report.fallbacks if f.engine == "onnxruntime-fp16"]
    assert [layer.node for layer in record.layers] == [CULPRIT] and not record.cached
    [chosen] = [c for c in candidates.values() if c.chosen]
    assert chosen.latency_ms == min(c.latency_ms for c in candidates.values() if c.passed)


def test_without_a_graph_probe_each_try_rebuilds_the_engine_and_the_search_bisects(
        fp16_build, fp16_culprit_model, tight, tmp_path, monkeypatch):
    """The path OpenVINO's 16-bit engines take (no graph the search can run here): every try is the real
    engine set rebuilt with the layers in fp32 and checked, and with no ranking the search bisects. Shown
    on ONNX Runtime's fp16, its graph probe taken away."""
    import export.pipeline.probes as probes
    from export.artifacts.builddir import BuildDir

    monkeypatch.delitem(probes.GRAPH_PROBES, ("onnxruntime", "fp16"))
    out = tmp_path / "build"
    shutil.copytree(fp16_build["out"], out)
    shutil.rmtree(BuildDir(out).calibration_cache)
    code, output = _build(fp16_culprit_model, out, "--tolerances", tight, "--int8-fallback", "always")
    assert code == 0, output
    assert "no one-pass ranking for onnxruntime: each try rebuilds the engine set" in output
    assert "narrowing them down by halves" in output
    [fallback] = read_report(out).fallbacks
    assert fallback.passed and [layer.node for layer in fallback.layers] == [CULPRIT]
    assert fallback.probes <= probes_limit() and math.isnan(fallback.layers[0].local_error)
    engine = out / "engines" / "onnxruntime-fp16"
    assert CULPRIT in _fp32_nodes(engine / json.loads((engine / "engine.json").read_text())["files"]["model"])


def probes_limit() -> int:
    from export.pipeline.fallback import REBUILD_LIMITS

    return REBUILD_LIMITS.max_probes
