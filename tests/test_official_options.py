"""Every official MTLoRA configuration imports, predicts, merges and exports to the official outputs.

The checkpoints in tests/fixtures/official/ were written by the official code (scale-lab/MTLoRA) and their
`reference_io.npz` holds what the official model computed; the README there says how each was made. The
official source is not part of this repository, so those recorded outputs (and the trainable-parameter
counts in `official.json`) are the reference here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlora.checkpoint import load_checkpoint, save_checkpoint
from mtlora.cli import main as mtlora_cli
from mtlora.errors import CheckpointError
from mtlora.model import MultiTaskSwin
from mtlora.params import count_parameters
from mtlora.safe_pickle import load_allowlisted
from mtlora.upstream import import_upstream, read_upstream
from tests.conftest import invoke
from tests.official_checkpoints import save_official

ort = pytest.importorskip("onnxruntime")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"
NAMES = ("addition", "addition_intermediate", "intermediate", "lora_only", "trainable_scale", "decoders",
         "no_downsampler", "full_finetune", "train_options", "swin_options", "lora_targets")
TOL = 1e-4


def checkpoint(name: str) -> Path:
    return FIXTURES / name / "checkpoint.pth"


@functools.cache
def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "reference_io.npz") as data:
        return {k: data[k] for k in data.files}


@functools.cache
def official(name: str) -> dict:
    return json.loads((FIXTURES / name / "official.json").read_text())


@functools.cache
def imported(name: str) -> MultiTaskSwin:
    return import_upstream(checkpoint(name))


def assert_official(name: str, outputs: dict[str, np.ndarray]) -> float:
    """Every task output within TOL of the official one; returns the largest difference."""
    ref = reference(name)
    worst = 0.0
    for task in official(name)["tasks"]:
        assert outputs[task].shape == ref[task].shape, task
        error = float(np.abs(np.asarray(outputs[task], dtype=np.float32) - ref[task]).max())
        assert error <= TOL, (name, task, error)
        # The outputs are not trivially small: a wrong branch would show.
        assert float(np.abs(ref[task]).max()) > 0.1, task
        worst = max(worst, error)
    return worst


def predict(model: MultiTaskSwin, name: str) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {t: v.numpy() for t, v in model.predict(torch.from_numpy(reference(name)["input"])).items()}


@pytest.mark.parametrize("name", NAMES)
def test_mtlora_predict_reproduces_the_official_outputs(name, tmp_path):
    out = tmp_path / "out.npz"
    code, output = invoke(mtlora_cli, "predict", checkpoint(name), "--input", FIXTURES / name / "reference_io.npz",
                          "--out", out)
    assert code == 0, output
    with np.load(out) as data:
        assert_official(name, {t: data[t] for t in official(name)["tasks"]})


@pytest.mark.parametrize("name", NAMES)
def test_merged_model_reproduces_the_official_outputs(name):
    from mtlora.merge import is_merged, merge_model

    merged = merge_model(copy.deepcopy(imported(name)))
    assert is_merged(merged)
    assert_official(name, predict(merged, name))


@pytest.mark.parametrize("name", NAMES)
def test_our_checkpoint_keeps_every_option(name, tmp_path):
    save_checkpoint(imported(name), tmp_path / "ckpt")
    model = load_checkpoint(tmp_path / "ckpt")
    assert model.config == imported(name).config
    assert_official(name, predict(model, name))


@pytest.mark.parametrize("layout", ["single", "split"])
@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_reproduces_the_official_outputs(name, layout, tmp_path):
    from export.onnx.exporter import export_onnx
    from tests.test_export_onnx import run_export

    result = export_onnx(imported(name), tmp_path / layout, layout=layout)
    assert_official(name, run_export(result, reference(name)["input"]))


@pytest.mark.parametrize("name", NAMES)
def test_info_counts_what_the_official_code_trains(name):
    code, output = invoke(mtlora_cli, "info", checkpoint(name), "--json")
    assert code == 0, output
    counts = json.loads(output)["parameters"]
    expected = official(name)["official_counts"]
    assert (counts["trainable"], counts["total"]) == (expected["trainable"], expected["total"])


_FREEZE_FLAGS = {"freeze_patch_embed": "patch_embed", "freeze_layer_norm": "norm",
                 "freeze_relative_position_bias": "relative_position_bias",
                 "freeze_downsample_reduction": "downsample_reduction"}


@pytest.mark.parametrize("name", ["train_options", "trainable_scale"])
def test_every_bias_and_freeze_option_counts_as_the_official_code_does(name):
    config, _ = read_upstream(checkpoint(name))
    grid = official(name)["official_trainable_grid"]
    assert len(grid) == 3 * 16 + 1
    for row in grid:
        adapter = dataclasses.replace(
            config.adapter, bias=row["bias"], freeze_pretrained=row["freeze_pretrained"],
            freeze=tuple(group for flag, group in _FREEZE_FLAGS.items() if row[flag]),
        )
        counts = count_parameters(MultiTaskSwin(dataclasses.replace(config, adapter=adapter)))
        assert (counts.trainable, counts.total) == (row["trainable"], row["total"]), row


def test_freeze_backbone_trains_the_decoders_only_as_the_official_code_does(tmp_path):
    # main.py's --freeze-backbone (MODEL.FREEZE_BACKBONE, MTLoRA off) freezes the whole backbone.
    path = _edited(tmp_path, "full_finetune", lambda c: c["MODEL"].update(FREEZE_BACKBONE=True))
    model = import_upstream(path)
    assert model.config.adapter.kind == "decoders-only"
    counts = count_parameters(model)
    expected = official("full_finetune")["official_counts_freeze_backbone"]
    assert (counts.trainable, counts.total) == (expected["trainable"], expected["total"])


def test_the_options_of_each_fixture_are_read_from_its_config():
    adapter = {name: imported(name).config.adapter for name in NAMES}
    assert adapter["addition"].shared_mode == adapter["addition_intermediate"].shared_mode == "addition"
    assert adapter["intermediate"].intermediate_specialization and adapter["addition_intermediate"].intermediate_specialization
    assert adapter["lora_only"].kind == "lora" and adapter["lora_only"].shared_scale_trainable
    assert (adapter["lora_targets"].kind, adapter["lora_targets"].targets) == ("lora", ("fc1",))
    assert adapter["trainable_scale"].kind == "mtlora+" and adapter["trainable_scale"].shared_scale_trainable
    assert adapter["full_finetune"].kind == "full"
    assert (adapter["train_options"].bias, adapter["train_options"].freeze) == (
        "all", ("patch_embed", "norm", "relative_position_bias", "downsample_reduction"))
    assert imported("decoders").config.decoder_heads == {"human_parts": "segformer", "sal": "updecoder",
                                                         "normals": "aspp"}
    assert not imported("no_downsampler").config.decoder_downsampler
    assert not imported("full_finetune").config.per_task_downsampler
    swin = imported("swin_options").config.swin
    assert (swin.ape, swin.qk_scale, swin.patch_norm, swin.qkv_bias, swin.mlp_ratio) == (True, 0.3, False, False, 2.0)


def test_learnt_shared_scales_are_the_checkpoints_not_the_configs():
    model = imported("trainable_scale")
    layer = model.backbone.layers[0].blocks[1].attn.proj
    stored = load_allowlisted(checkpoint("trainable_scale"))["model"]
    learnt = stored["backbone.layers.0.blocks.1.attn.proj.lora_shared_scale"]
    assert float(learnt) != layer.scaling["shared"]  # the config's value is only the initial one
    assert torch.equal(layer.lora_shared_scale.detach(), learnt)


def _unreachable_task_parameters(name: str) -> int:
    """Task-adapter parameters of blocks before the last of each stage, from the official state dict."""
    state = load_allowlisted(checkpoint(name))["model"]
    depths = {}
    for key in state:
        if key.startswith("backbone.layers.") and ".blocks." in key:
            stage, block = int(key.split(".")[2]), int(key.split(".")[4])
            depths[stage] = max(depths.get(stage, 0), block + 1)
    return sum(v.numel() for k, v in state.items()
               if ".lora_tasks_" in k and int(k.split(".")[4]) < depths[int(k.split(".")[2])] - 1)


def test_export_drops_the_task_adapters_no_output_can_reach(tmp_path):
    from export.onnx.exporter import export_checkpoint

    lines = []
    export_checkpoint(checkpoint("intermediate"), tmp_path / "out", reference_samples=0, progress=lines.append)
    dropped = _unreachable_task_parameters("intermediate")
    # Block 0 of each stage (dim C): 2 tasks x rank 4 x (proj 2C + fc1 5C + fc2 5C).
    assert dropped == 2 * 4 * 12 * (8 + 16 + 32 + 64)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dropped_parameters"] == dropped
    assert any(f"dropped {dropped:,} task-adapter parameters" in line for line in lines), lines


def test_addition_mode_keeps_every_blocks_task_adapters(tmp_path):
    import onnx

    from export.onnx.exporter import export_checkpoint

    # In `addition` mode the shared stream is a LayerNorm of the task outputs: every block's adapters count.
    assert _unreachable_task_parameters("addition_intermediate") > 0
    export_checkpoint(checkpoint("addition_intermediate"), tmp_path / "out", reference_samples=0)
    assert "dropped_parameters" not in json.loads((tmp_path / "out" / "manifest.json").read_text())
    names = {i.name for i in onnx.load(tmp_path / "out" / "model.onnx").graph.initializer}
    assert any("block0_fc1" in n for n in names)


def test_a_real_training_state_loads_through_the_allow_list():
    state = load_allowlisted(checkpoint("train_options"))
    assert sorted(state) == official("train_options")["state_keys"]
    trainable = [p for p in imported("train_options").parameters() if p.requires_grad]
    optimizer = state["optimizer"]
    # The official optimizer holds exactly what we train; after one step, every parameter that got a gradient
    # has its AdamW moments.
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(trainable)
    assert 0.9 * len(trainable) < len(optimizer["state"]) <= len(trainable)
    assert all(float(s["step"]) == 1.0 for s in optimizer["state"].values())
    assert sum(bool(s["exp_avg"].abs().max() > 0) for s in optimizer["state"].values()) > len(trainable) // 2
    assert optimizer["param_groups"][0]["betas"] == (0.9, 0.999)
    assert state["lr_scheduler"]["t_initial"] > 0 and state["lr_scheduler"]["warmup_prefix"] is True
    assert state["scaler"] == {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                               "growth_interval": 2000, "_growth_tracker": 1}


def _edited(tmp_path, name: str, edit) -> Path:
    state = load_allowlisted(checkpoint(name))
    config = json.loads(json.dumps(state["config"]))  # plain nested dicts
    edit(config)
    path = tmp_path / "edited.pth"
    save_official(path, {**state, "config": config})
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["MODEL"]["MTLORA"].update(TRAINABLE_SCALE_PER_TASK=True),
         "TRAINABLE_SCALE_PER_TASK with task adapters, which the official code cannot build .* 'must be real "
         "number, not dict'"),
        (lambda c: c["MODEL"].update(PER_TASK_DOWNSAMPLER=False),
         "PER_TASK_DOWNSAMPLER False with MTLoRA enabled, which the official model cannot run .* not subscriptable"),
    ],
    ids=["trainable-scale-per-task", "shared-downsampler-with-mtlora"],
)
def test_what_the_official_code_cannot_produce_is_refused(tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        import_upstream(_edited(tmp_path, "train_options", edit))


def test_task_adapters_without_lora_on_proj_fc1_or_fc2_are_refused_as_unsupported(tmp_path):
    # The official code builds this; we do not support it (see the README), and say so.
    path = _edited(tmp_path, "train_options", lambda c: c["MODEL"]["MTLORA"].update(FC2_ENABLED=False))
    with pytest.raises(CheckpointError, match="MTLORA.FC2_ENABLED False with task adapters, which is not supported"):
        import_upstream(path)


def test_trainable_scale_per_task_without_task_adapters_is_what_the_official_code_builds():
    # With lora_only the official layers get no tasks, so the flag has nothing to act on and the model builds.
    assert load_allowlisted(checkpoint("lora_only"))["config"]["MODEL"]["MTLORA"]["TRAINABLE_SCALE_PER_TASK"]
    assert imported("lora_only").config.adapter.kind == "lora"


@pytest.mark.slow
def test_mixed_decoder_heads_build_engines_and_pass_the_checks(tmp_path):
    from export.cli import main as export_cli

    code, output = invoke(export_cli, "build", checkpoint("decoders"), "--backend", "onnxruntime", "--precision",
                          "fp32", "--eval-samples", "4", "--out", tmp_path / "build")
    assert code == 0, output
