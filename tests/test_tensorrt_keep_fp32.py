"""keep_fp32 on TensorRT: weakly typed (TensorRT 10) the kept nodes' layers are pinned to fp32 and the
constraint obeyed; strongly typed (TensorRT 11) the prepared fp16 graph's types keep them. What runs
without TensorRT: which layers are pinned, the plan, and the API names against every stored release."""

from __future__ import annotations

import pytest

from calibration.prepare import prepare_graph
from engines.errors import EngineError
from engines.files import load_onnx
from engines.tensorrt.api_contract import collect_uses
from engines.tensorrt.build import checked_keep, layers_to_pin, plan_precision
from engines.tensorrt.runner import trt_features
from tests.test_tensorrt_api_contract import RELEASES, as_module, has

pytest_plugins = ("tests.engine_fixtures",)

TRT10 = {"version": "10.8.0", "strongly_typed": True, "explicit_batch_flag": True, "fp16_flag": True, "int8_flag": True, "tf32_flag": True}
TRT11 = {"version": "11.0.0", "strongly_typed": True, "explicit_batch_flag": False, "fp16_flag": False, "int8_flag": False, "tf32_flag": True}


def test_the_layers_of_kept_nodes_are_found_by_the_parser_names():
    # The ONNX parser names a node's layer after the node, further layers of that node <node>_<n>.
    layers = ["/heads.0/Conv", "/heads.0/Conv_12", "/MatMul", "/MatMul_1", "/MatMul_1_3", "/MatMul_x",
              "onnx::Mul_5", "/heads.0/Conv/Resize"]
    nodes = ["/heads.0/Conv", "/MatMul", "/MatMul_1"]
    assert layers_to_pin(layers, ["/heads.0/Conv", "/MatMul"], nodes) == [0, 1, 2]
    # /MatMul_1 is a node of its own, not a helper layer of /MatMul; its own helpers follow it.
    assert layers_to_pin(layers, ["/MatMul_1"], nodes) == [3, 4]
    assert layers_to_pin(layers, [], nodes) == []


def test_weak_typing_obeys_pinned_precisions_and_strong_typing_keeps_the_graph_types():
    weak = plan_precision("fp16", TRT10, "weak", keep_fp32=["/b", "/a", "/b"])
    assert weak["flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and weak["keep_fp32"] == ["/a", "/b"]
    assert plan_precision("int8", TRT10, "weak", ["/a"])["flags"] == ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"]
    # The kept names are in the plan, which the plan cache hashes: a plan kept differently is another plan.
    assert weak != plan_precision("fp16", TRT10, "weak", keep_fp32=["/a"])
    # Strongly typed, the fp16 graph's Casts keep the nodes: the plan is the plain one.
    for features in (TRT10, TRT11):
        assert plan_precision("fp16", features, "auto", ["/a"]) == plan_precision("fp16", features)
    assert plan_precision("fp16", TRT10, "weak") == {"graph": "source", "strongly_typed": False, "flags": ["FP16"], "clear_tf32": True}


@pytest.mark.parametrize("version", sorted(RELEASES))
def test_pinning_uses_only_names_the_release_has(version):
    api = RELEASES[version]
    features = trt_features(as_module(api))
    if features["fp16_flag"]:  # weak typing exists: the pin runs there
        plan = plan_precision("fp16", features, "weak", ["/a"])
        assert all(has(api, f"BuilderFlag.{flag}") for flag in plan["flags"])
        for name in ("ILayer.precision", "ILayer.set_output_type", "ILayer.get_output", "ILayer.num_outputs",
                     "ILayer.name", "INetworkDefinition.get_layer", "INetworkDefinition.num_layers",
                     "DataType.FLOAT", "DataType.HALF"):
            assert has(api, name), name
    else:  # TensorRT 11: no weak typing, so no pin is ever planned
        with pytest.raises(EngineError):
            plan_precision("fp16", features, "weak", ["/a"])
    uses = {use.name: use for use in collect_uses()}
    assert uses["ILayer.precision"].guarded and uses["ILayer.set_output_type"].guarded


def test_kept_names_the_graph_lacks_are_refused_in_one_line():
    assert checked_keep(["/a", "/b", "/a"], ["/a", "/b"], "g.onnx") == ["/a", "/b"]
    with pytest.raises(EngineError, match="g.onnx has no node named '/c'") as info:
        checked_keep(["/a", "/c"], ["/a", "/b"], "g.onnx")
    assert "\n" not in str(info.value)
    with pytest.raises(EngineError, match="list of ONNX node names"):
        checked_keep("/a", ["/a"], "g.onnx")


def test_the_strongly_typed_fp16_graph_computes_kept_nodes_in_fp32(tiny_onnx, tmp_path):
    from calibration.fp16 import tensor_types

    prepared = prepare_graph("tensorrt", tiny_onnx, tmp_path, "fp16", keep_fp32=["/fc1/MatMul"])
    assert plan_precision("fp16", TRT11)["graph"] == "fp16" and "/fc1/MatMul" in prepared.metadata["fp32_nodes"]
    graph = load_onnx(prepared.path)
    types = tensor_types(graph)
    kept = next(n for n in graph.graph.node if n.name == "/fc1/MatMul")
    other = next(n for n in graph.graph.node if n.name == "/fc2/MatMul")
    assert {types[t] for t in [*kept.input, *kept.output]} == {1}  # float32
    assert types[other.input[0]] == 10  # float16
