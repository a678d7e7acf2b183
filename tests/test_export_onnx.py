"""ONNX export: both layouts reproduce the unmerged PyTorch model, and the bytes go where they should."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.artifacts.manifest import MANIFEST_FILE, verify_manifest, write_manifest
from export.errors import ExportError
from export.onnx.cost import cost_breakdown, plain_swin_matmul_bytes
from export.onnx.exporter import export_onnx
from export.onnx.reference_outputs import REFERENCE_FILE, write_reference
from tests.test_export_merge import FIXTURE, KINDS, TOL, fixture_model, images, make_model, max_error, predict

ort = pytest.importorskip("onnxruntime")


@functools.cache
def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_export(result, x: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of an export (either layout) on ONNX Runtime CPU fp32."""
    files = {graph: result.out_dir / name for graph, name in result.files.items()}
    if result.layout == "single":
        sess = session(files["model"])
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": x}), strict=True))
    backbone = session(files["backbone"])
    shared = dict(zip(result.backbone_outputs, backbone.run(None, {"image": x}), strict=True))
    outputs = {}
    for task in result.tasks:
        head = session(files[f"head_{task}"])
        outputs[task] = head.run(None, {i.name: shared[i.name] for i in head.get_inputs()})[0]
    return outputs


@pytest.fixture(scope="module")
def export_of(tmp_path_factory):
    """name -> (name, model, {layout: ExportResult}), each exported once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = fixture_model() if name == "fixture" else make_model(name)
            root = tmp_path_factory.mktemp(name.replace("+", "plus"))
            results = {layout: export_onnx(model, root / layout, layout=layout) for layout in ("single", "split")}
            cache[name] = (name, model, results)
        return cache[name]

    return get


@pytest.fixture(scope="module", params=["fixture", *KINDS])
def exported(request, export_of):
    """The official fixture and each model kind, exported in both layouts."""
    return export_of(request.param)


@pytest.fixture(scope="module")
def full_cost(tmp_path_factory):
    """The cost of the same network without adapters (kind 'full'), exported the same way."""
    result = export_onnx(make_model("full"), tmp_path_factory.mktemp("full"))
    return cost_breakdown(result.paths)


@pytest.mark.parametrize("layout", ["single", "split"])
def test_onnx_runtime_matches_unmerged_pytorch(exported, layout):
    name, model, results = exported
    result = results[layout]
    for batch in (1, 3):
        x = images(batch, seed=7)
        expected = predict(model, x)
        got = run_export(result, x.numpy())
        assert list(got) == list(model.tasks)
        assert max_error(got, expected) <= TOL, (name, layout, batch)


def test_fixture_onnx_matches_the_official_reference(export_of):
    _, _, results = export_of("fixture")
    reference = dict(np.load(FIXTURE / "reference_io.npz"))
    for result in results.values():
        got = run_export(result, reference["input"])
        assert max_error(got, {t: reference[t] for t in got}) <= TOL


def test_graph_interface_and_metadata(exported):
    _, model, results = exported
    single = onnx.load(str(results["single"].paths[0]))
    (image,) = single.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and dims == ["batch", 3, 64, 64]
    assert [o.name for o in single.graph.output] == list(model.tasks)
    for output in single.graph.output:
        assert output.type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = {p.key: p.value for p in single.metadata_props}
    assert json.loads(meta["tasks"]) == list(model.tasks)
    assert json.loads(meta["output_channels"]) == model.config.task_channels
    assert json.loads(meta["input_size"]) == [3, 64, 64]
    assert json.loads(meta["mean"]) == list(model.config.mean)
    assert json.loads(meta["adapter_config"])["kind"] == model.config.adapter.kind
    assert meta["mtlora_export_version"]
    assert any(n.op_type == "LayerNormalization" for n in single.graph.node)
    split = results["split"]
    backbone = onnx.load(str(split.out_dir / "backbone.onnx"))
    assert [o.name for o in backbone.graph.output] == list(split.backbone_outputs)
    for task in model.tasks:
        head = onnx.load(str(split.out_dir / f"head_{task}.onnx"))
        assert {i.name for i in head.graph.input} <= set(split.backbone_outputs)
        assert [o.name for o in head.graph.output] == [task]


def test_merged_graph_has_no_extra_full_rank_weights(exported, full_cost):
    name, model, results = exported
    cost = cost_breakdown(results["single"].paths)
    plain = plain_swin_matmul_bytes(model.config.to_dict()["swin"])
    assert full_cost["shared"]["full_rank"] == plain
    assert cost["shared"]["full_rank"] <= full_cost["shared"]["full_rank"]
    for task, extra in cost["tasks"].items():
        # Only low-rank factors, the downsampler and the decoder are per task.
        assert extra["full_rank"] == 0 and extra["other"] == 0, (name, task, extra)
        assert extra["downsampler"] > 0 and extra["decoder"] > 0
        if model.has_task_streams:
            assert 0 < extra["low_rank"] < 0.2 * plain
    # No full-rank weight exists twice (no task keeps its own copy of one).
    graph = onnx.load(str(results["single"].paths[0])).graph
    matmul_inputs = {i for n in graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input}
    full_rank = [init for init in graph.initializer if init.name in matmul_inputs and "lora_" not in init.name]
    digests = {hashlib.sha256(onnx.numpy_helper.to_array(i).tobytes()).hexdigest() for i in full_rank}
    assert len(digests) == len(full_rank)
    # Split layout: the backbone holds the same full-rank weights; a head's only full-rank
    # weights are its copy of the patch-merging reductions.
    split = cost_breakdown(results["split"].paths)
    assert split["shared"]["full_rank"] == full_cost["shared"]["full_rank"]
    merging = sum(4 * d * 2 * d * 4 for d in (24 * 2**s for s in range(3)))
    for extra in split["tasks"].values():
        assert extra["full_rank"] == (merging if model.has_task_streams else 0)


def test_unknown_task_lists_the_model_tasks(tmp_path):
    with pytest.raises(ExportError, match="depth.*semseg, human_parts, sal, normals"):
        export_onnx(fixture_model(), tmp_path / "out", tasks=["depth"])
    assert not (tmp_path / "out").exists()


def test_export_is_deterministic(export_of, tmp_path):
    # The plain LoRA model has the smallest graphs; the others trace through the same code.
    _, model, results = export_of("lora")
    again = export_onnx(model, tmp_path, layout="split")
    assert again.files == results["split"].files
    for file in again.files.values():
        assert (tmp_path / file).read_bytes() == (results["split"].out_dir / file).read_bytes(), file


def test_manifest_catches_modified_truncated_and_missing_files(export_of, tmp_path):
    _, model, results = export_of("fixture")
    out = tmp_path / "export"
    shutil.copytree(results["split"].out_dir, out)
    write_reference(model, out, num_samples=1)
    write_manifest(out, layout="split", tasks=list(model.tasks))
    verify_manifest(out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {REFERENCE_FILE, "backbone.onnx", *(f"head_{t}.onnx" for t in model.tasks)}
    assert manifest["graphs"]["backbone.onnx"]["inputs"]["image"] == ["batch", 3, 64, 64]
    assert "torch" in manifest["versions"] and "onnx" in manifest["versions"]

    head = out / "head_sal.onnx"
    payload = bytearray(head.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    head.write_bytes(bytes(payload))
    with pytest.raises(ExportError, match="head_sal.onnx was modified"):
        verify_manifest(out)
    head.write_bytes(bytes(payload[:100]))
    with pytest.raises(ExportError, match="head_sal.onnx is truncated"):
        verify_manifest(out)
    (out / REFERENCE_FILE).unlink()
    with pytest.raises(ExportError, match="reference.npz is missing"):
        verify_manifest(out)


def test_reference_is_the_unmerged_model_and_deterministic(tmp_path):
    model = fixture_model()
    first = write_reference(model, tmp_path / "a", num_samples=2)
    second = write_reference(model, tmp_path / "b", num_samples=2)
    assert first.read_bytes() == second.read_bytes()
    data = dict(np.load(first))
    assert data["input"].shape == (2, 3, 64, 64) and data["input"].dtype == np.float32
    expected = predict(model, torch.from_numpy(data["input"]))
    assert max_error({t: data[t] for t in model.tasks}, expected) == 0.0
    from mtlora.merge import merge_model

    with pytest.raises(ExportError, match="unmerged"):
        write_reference(merge_model(model), tmp_path / "c")
