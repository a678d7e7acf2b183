"""Adapters, trainability rules, parameter accounting and config round trips."""

import json

import pytest
import torch
from click.testing import CliRunner

from mtlora.adapters import LoRALinear, MTLLoRALinear, TaskLoRALinear
from mtlora.cli import main as mtlora_cli
from mtlora.config import AdapterConfig, ModelConfig, SwinConfig
from mtlora.errors import ConfigError
from mtlora.model import MultiTaskSwin
from mtlora.params import count_parameters
from tests.official_checkpoints import randomize

TASKS = ("semseg", "human_parts", "sal", "normals")


def micro(kind="mtlora", **adapter):
    return ModelConfig(swin=SwinConfig.from_variant("swin_micro", img_size=64),
                       adapter=AdapterConfig(kind=kind, shared_rank=8, task_rank={t: 4 for t in TASKS}, **adapter)
                       if kind != "single-task" else AdapterConfig(kind=kind),
                       tasks=TASKS if kind != "single-task" else ("semseg",))


def test_lora_linear_merge_and_unmerge_are_exact():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    layer = LoRALinear(base, rank=4, scale=2.0)
    torch.nn.init.normal_(layer.lora_B["shared"])
    x = torch.randn(5, 16)
    expected = base(x) + 2.0 * (x @ layer.lora_A["shared"].T @ layer.lora_B["shared"].T)
    original = base.weight.detach().clone()
    assert torch.allclose(layer(x), expected, atol=1e-6)
    layer.merge()
    assert layer.merged and torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer.delta_weight(), 2.0 * layer.lora_B["shared"] @ layer.lora_A["shared"])
    layer.unmerge()
    assert torch.allclose(base.weight, original, atol=1e-6)


def test_safe_merge_refuses_non_finite():
    layer = LoRALinear(torch.nn.Linear(4, 4), rank=2, scale=1.0)
    with torch.no_grad():
        layer.lora_B["shared"].fill_(float("inf"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.merge(safe=True)
    assert not layer.merged and torch.isfinite(layer.base.weight).all()


@pytest.mark.parametrize("mode", ["matrix", "matrixv2"])
def test_task_layer_streams_and_merged_correction(mode):
    torch.manual_seed(1)
    base = torch.nn.Linear(12, 6)
    layer = TaskLoRALinear(base, 4, 3.0, {"a": 2, "b": 3}, {"a": 1.5, "b": 0.5}, shared_mode=mode)
    for p in list(layer.lora_B.values()):
        torch.nn.init.normal_(p)
    x, xa, xb = torch.randn(3, 5, 12).unbind(0)
    shared, tasks = layer.forward_tasks(x, {"a": xa, "b": xb})
    frozen = base(x)
    lora = 3.0 * x @ layer.lora_A["shared"].T @ layer.lora_B["shared"].T
    anchor = frozen + lora if mode == "matrixv2" else frozen
    assert torch.allclose(shared, frozen + lora, atol=1e-5)
    assert torch.allclose(tasks["a"], anchor + 1.5 * xa @ layer.lora_A["a"].T @ layer.lora_B["a"].T, atol=1e-5)
    assert torch.allclose(tasks["b"], anchor + 0.5 * xb @ layer.lora_A["b"].T @ layer.lora_B["b"].T, atol=1e-5)
    layer.merge()
    merged_shared, merged_tasks = layer.forward_tasks(x, {"a": xa, "b": xb})
    assert torch.allclose(merged_shared, shared, atol=1e-5)
    assert all(torch.allclose(merged_tasks[t], tasks[t], atol=1e-5) for t in tasks)


def test_mtl_lora_task_adapter_formula():
    torch.manual_seed(2)
    base = torch.nn.Linear(10, 7)
    layer = MTLLoRALinear(base, 4, 2.0, {"a": 3, "b": 3}, {"a": 1.0, "b": 2.0}, num_up=3, temperature=0.5)
    torch.nn.init.normal_(layer.lora_mtl_B)
    torch.nn.init.normal_(layer.lora_B["shared"])
    # Lambda starts as the identity, as the MTL-LoRA paper initialises it.
    assert torch.equal(layer.lora_mtl_transform["a"], torch.eye(3))
    x = torch.randn(4, 10)
    _, tasks = layer.forward_tasks(x)
    w = torch.softmax(layer.lora_mtl_mix["b"] / 0.5, dim=0)
    up = sum(w[i] * layer.lora_mtl_B[i] for i in range(3))
    expected = base(x) + 2.0 * (x @ layer.lora_mtl_A.T @ layer.lora_mtl_transform["b"].T @ up.T)
    assert torch.allclose(tasks["b"], expected, atol=1e-5)
    down, up_folded = layer.folded_task_factors("b")
    assert down is layer.lora_mtl_A
    assert torch.allclose(base(x) + x @ down.T @ up_folded.T, expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["mtlora", "mtlora+", "mtl-lora", "lora", "full", "decoders-only", "single-task"])
def test_every_adapter_kind_builds_and_runs(kind):
    model = MultiTaskSwin(micro(kind)).eval()
    randomize(model, 3)
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 64, 64))
    assert len(outputs) == len(model.tasks)
    for task, out in zip(model.tasks, outputs, strict=True):
        assert out.shape == (2, model.config.task_channels[task], 64, 64)
        assert torch.isfinite(out).all()


def test_task_streams_differ_per_task():
    model = MultiTaskSwin(micro("mtlora")).eval()
    randomize(model, 4)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert not torch.allclose(feats["semseg"][0], feats["sal"][0])
    shared = MultiTaskSwin(micro("lora")).eval()
    with torch.no_grad():
        plain = shared.forward_features(torch.randn(1, 3, 64, 64))
    assert all(plain["semseg"][i] is plain["sal"][i] for i in range(4))


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_set_follows_official_rules():
    names = _trainable(MultiTaskSwin(micro("mtlora")))
    assert any("lora_A.shared" in n for n in names) and any("lora_B.semseg" in n for n in names)
    assert "backbone.patch_embed.proj.weight" in names
    assert "backbone.layers.0.blocks.0.norm1.weight" in names
    assert "backbone.layers.0.blocks.0.attn.relative_position_bias_table" in names
    assert "backbone.layers.1.downsample.reduction.weight" in names
    assert "backbone.layers.0.blocks.0.attn.qkv.base.weight" not in names
    assert "backbone.layers.0.blocks.0.attn.qkv.base.bias" not in names
    assert "backbone.layers.0.blocks.0.mlp.fc1.base.weight" not in names
    assert any(n.startswith("decoders.") for n in names) and any(n.startswith("downsamplers.") for n in names)
    plus = _trainable(MultiTaskSwin(micro("mtlora+")))
    assert "backbone.layers.1.downsample.reduction.base.weight" not in plus
    assert "backbone.layers.1.downsample.reduction.lora_A.shared" in plus
    decoders_only = _trainable(MultiTaskSwin(micro("decoders-only")))
    assert decoders_only and not any(n.startswith("backbone.") for n in decoders_only)
    full = MultiTaskSwin(micro("full"))
    assert all(p.requires_grad for p in full.parameters())


@pytest.mark.parametrize("rank,expected", [(16, 4_953_146), (32, 6_083_642), (64, 8_344_634)])
def test_swin_t_448_trainable_counts_match_official_accounting(rank, expected):
    config = ModelConfig(swin=SwinConfig.from_variant("swin_tiny", img_size=448),
                         adapter=AdapterConfig(kind="mtlora", shared_rank=rank, task_rank={t: 4 for t in TASKS}),
                         tasks=TASKS)
    counts = count_parameters(MultiTaskSwin(config))
    assert abs(counts.trainable - expected) / expected < 0.005
    assert abs(counts.decoders - 1_946_624) / 1_946_624 < 0.005


def test_mtlora_plus_count_matches_official_accounting():
    config = ModelConfig(swin=SwinConfig.from_variant("swin_tiny", img_size=448),
                         adapter=AdapterConfig(kind="mtlora+", shared_rank=16, task_rank={t: 4 for t in TASKS}),
                         tasks=TASKS)
    assert abs(count_parameters(MultiTaskSwin(config)).trainable - 3_469_000) / 3_469_000 < 0.005


def test_config_json_round_trip():
    config = micro("mtl-lora", shared_mode="matrixv2", mtl_num_up=2)
    again = ModelConfig.from_json(config.to_json())
    assert again == config
    assert json.loads(config.to_json()) == json.loads(again.to_json())


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: dict(tasks=("semseg", "bogus")), "unknown task 'bogus'"),
        (lambda: dict(adapter=AdapterConfig(shared_rank=0)), "ranks must be positive"),
        (lambda: dict(adapter=AdapterConfig(task_rank={"semseg": -1})), "ranks must be positive"),
        (lambda: dict(adapter=AdapterConfig(kind="dora")), "unknown adapter kind"),
        (lambda: dict(adapter=AdapterConfig(shared_mode="concat")), "unknown shared mode"),
        (lambda: dict(adapter=AdapterConfig(kind="mtl-lora", shared_mode="addition")), "needs task adapters of kind mtlora"),
        (lambda: dict(swin=SwinConfig.from_variant("swin_micro", img_size=72)), "does not fit"),
        (lambda: dict(tasks=()), "at least one task"),
        (lambda: dict(adapter=AdapterConfig(task_rank={"depth": 4})), "does not have"),
    ],
)
def test_bad_configs_raise_clear_errors(make, message):
    base = dict(swin=SwinConfig.from_variant("swin_micro", img_size=64), tasks=TASKS)
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**base, **make()})


def test_mtlora_info_cli_json(tmp_path):
    (tmp_path / "config.json").write_text(micro("mtlora").to_json())
    result = CliRunner().invoke(mtlora_cli, ["info", str(tmp_path / "config.json"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["parameters"]["task_adapters"] == sum(data["parameters"]["per_task_adapters"].values())


@pytest.mark.parametrize("content,code", [("{not json", 1), ('{"tasks": ["semseg", "nope"]}', 1)])
def test_mtlora_info_bad_config_is_one_line(tmp_path, content, code):
    path = tmp_path / "config.json"
    path.write_text(content)
    result = CliRunner().invoke(mtlora_cli, ["info", str(path)])
    assert result.exit_code == code
    assert result.output.count("\n") == 1 and result.output.startswith("Error:")
