"""Merging the task-agnostic adapters, and the folded export form, keep every task's output."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from export.onnx.fold import ExportModel
from mtlora.adapters import SHARED, LoRALinear, adapter_layers
from mtlora.config import AdapterConfig, ModelConfig, SwinConfig
from mtlora.errors import MergeError
from mtlora.merge import is_merged, merge_and_unload, merge_model, parameter_report, unload, unmerge_model
from mtlora.model import MultiTaskSwin
from mtlora.upstream import import_upstream

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "upstream-mtlora-tiny"
TASKS = ("semseg", "sal")
TOL = 1e-4

# The model kinds every export test covers: name -> AdapterConfig arguments.
KINDS = {
    "mtlora+": dict(kind="mtlora+", shared_rank=8, task_rank={"semseg": 4, "sal": 6}),
    "matrixv2": dict(kind="mtlora", shared_rank=8, task_rank={"semseg": 2}, shared_mode="matrixv2"),
    "mtl-lora": dict(kind="mtl-lora", shared_rank=8, task_rank={t: 4 for t in TASKS}),
    "lora": dict(kind="lora", shared_rank=8),
}


@torch.no_grad()
def randomise(model: MultiTaskSwin, seed: int = 0) -> MultiTaskSwin:
    """Random adapters (B starts at zero) and BatchNorm statistics, so every branch contributes."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(param + noise if "transform" in name or "mix" in name else noise)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model


def make_model(name: str, tasks: tuple[str, ...] = TASKS, seed: int = 0) -> MultiTaskSwin:
    """A swin_micro 64x64 model of one of KINDS (or 'full'), randomised, eval mode."""
    torch.manual_seed(seed)
    adapter = AdapterConfig(**KINDS[name]) if name in KINDS else AdapterConfig(kind=name)
    config = ModelConfig(swin=SwinConfig.from_variant("swin_micro", img_size=64), adapter=adapter, tasks=tasks)
    return randomise(MultiTaskSwin(config), seed).eval()


def fixture_model() -> MultiTaskSwin:
    return import_upstream(FIXTURE / "checkpoint.pth")


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def max_error(a: dict, b: dict) -> float:
    return max(float(np.abs(np.asarray(a[t]) - np.asarray(b[t])).max()) for t in a)


def predict(model, x: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {t: v.numpy() for t, v in model.predict(x).items()}


def test_fixture_merged_matches_the_official_reference():
    reference = dict(np.load(FIXTURE / "reference_io.npz"))
    model = merge_model(fixture_model())
    assert is_merged(model)
    out = predict(model, torch.from_numpy(reference["input"]))
    assert max_error(out, reference) <= TOL


@pytest.mark.parametrize("name", list(KINDS))
def test_merged_and_folded_models_match_unmerged(name):
    model = make_model(name)
    merged = merge_model(copy.deepcopy(model))
    folded = ExportModel(copy.deepcopy(merged), model.tasks)
    for batch in (1, 3):
        x = images(batch)
        expected = predict(model, x)
        assert max(np.abs(v).max() for v in expected.values()) > 0.05
        assert max_error(predict(merged, x), expected) <= TOL
        with torch.no_grad():
            folded.role = ("model", None)
            out = dict(zip(model.tasks, (v.numpy() for v in folded(x)), strict=True))
            # The split layout in PyTorch: the backbone once, then each head from its outputs.
            folded.role = ("backbone", None)
            shared = folded(x)
            split = {}
            for t in model.tasks:
                folded.role = ("head", t)
                split[t] = folded(*shared)[0].numpy()
        assert max_error(out, expected) <= TOL
        assert max_error(split, expected) <= TOL


def without_adapter_updates(model: MultiTaskSwin) -> MultiTaskSwin:
    """A copy whose adapters add nothing (every B is zero): the frozen network's outputs."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in adapter_layers(plain):
            for factor in layer.lora_B.values():
                factor.zero_()
    return plain


def test_adapters_change_the_outputs():
    # Guards the tests above: without the adapters the outputs differ, so every branch counts.
    model = make_model("mtlora+")
    x = images(2)
    assert max_error(predict(without_adapter_updates(model), x), predict(model, x)) > 1e-3


def test_unmerge_restores_weights():
    model = make_model("mtlora+")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_model(model)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith("base.weight") for k in changed)
    unmerge_model(model)
    assert not is_merged(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)


def test_merge_and_unload_leaves_a_plain_network_with_the_same_outputs():
    model = make_model("lora")
    x = images(2)
    expected = predict(model, x)
    frozen = predict(without_adapter_updates(model), x)
    assert max_error(frozen, expected) > 1e-3  # the adapters count, so folding them in is what keeps the outputs
    plain = merge_and_unload(model)
    assert plain is model and not adapter_layers(plain) and not is_merged(plain)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert max_error(predict(plain, x), expected) <= TOL


def test_unload_drops_the_adapters_and_keeps_the_frozen_weights():
    model = make_model("lora")
    x = images(2)
    frozen = without_adapter_updates(model)
    assert max_error(predict(frozen, x), predict(model, x)) > 1e-3  # so matching `frozen` means they were dropped
    bases = {name: layer.base.weight.clone() for name, layer in adapter_layers(model)}
    unload(model)
    assert not adapter_layers(model)
    weights = dict(model.named_parameters())
    assert all(torch.equal(weights[f"{name}.weight"], w) for name, w in bases.items())
    assert max_error(predict(model, x), predict(frozen, x)) <= TOL


def test_merge_and_unload_refuses_task_adapters_and_changes_nothing():
    model = make_model("mtlora+")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="task-specific adapters"):
        merge_and_unload(model)
    assert not is_merged(model) and adapter_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_merging_twice_is_refused():
    model = merge_model(make_model("lora"))
    with pytest.raises(MergeError, match="adapters are already merged"):
        merge_model(model)


def test_non_finite_adapter_names_the_layer_and_leaves_the_model_untouched():
    model = make_model("lora")
    name, layer = adapter_layers(model)[5]
    with torch.no_grad():
        layer.lora_B[SHARED][0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match=name.replace(".", r"\.")):
        merge_model(model)
    assert not is_merged(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_parameter_report_counts_what_merging_removes():
    lora = make_model("lora")
    report = parameter_report(lora)
    shared_factors = sum(layer.lora_A[SHARED].numel() + layer.lora_B[SHARED].numel()
                         for _, layer in adapter_layers(lora))
    assert report["before"]["params"] == sum(p.numel() for p in lora.parameters())
    assert report["before"]["params"] - report["after"]["params"] == shared_factors
    assert report["before"]["bytes"] - report["after"]["bytes"] == 4 * shared_factors
    # matrix-mode task layers keep their shared factors for the low-rank correction.
    mtl = parameter_report(make_model("mtl-lora"))
    assert 0 < mtl["after"]["params"] < mtl["before"]["params"]
