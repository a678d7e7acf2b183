"""Damaged weight values: NaN or infinite weights, and tensors of the wrong kind (integers or bools where the
model has floats, a float step counter), are refused in one line naming the tensor, in every file a user
hands us (our checkpoint directory, an official .pth, an ImageNet backbone), before anything is written.

Before, they loaded: torch casts on load, and NaN weights gave NaN outputs with exit code 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.cli import main as export_cli
from mtlora.checkpoint import STATE_FILE, WEIGHTS_FILE, save_checkpoint
from mtlora.cli import main as mtlora_cli
from mtlora.errors import CheckpointError
from mtlora.safe_pickle import load_allowlisted
from tests.conftest import FIXTURE, invoke

WEIGHT = "decoders.semseg.last_layer.0.weight"
COUNTER = "decoders.semseg.last_layer.1.num_batches_tracked"


def _nan(value):
    value = value.clone()
    value.view(-1)[0] = float("nan")
    return value


def _inf(value):
    value = value.clone()
    value.view(-1)[-1] = float("inf")
    return value


def _minus_inf(value):
    value = value.clone()
    value.view(-1)[0] = float("-inf")
    return value


# (tensor, damage, what the message says)
DAMAGES = {
    "nan": (WEIGHT, _nan, "NaN or Inf value"),
    "inf": (WEIGHT, _inf, "NaN or Inf value"),
    "minus_inf": (WEIGHT, _minus_inf, "NaN or Inf value"),
    "int_weight": (WEIGHT, lambda v: v.round().to(torch.int32), "holds int32 values where the model has float32"),
    "bool_weight": (WEIGHT, lambda v: v > 0, "holds bool values where the model has float32"),
    "float_counter": (COUNTER, lambda v: v.double() + 0.5, "holds float64 values where the model has int64"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from mtlora.loading import load_any

    return save_checkpoint(load_any(FIXTURE), tmp_path_factory.mktemp("values") / "model")


def _damaged_directory(checkpoint: Path, tmp_path: Path, case: str) -> Path:
    import shutil

    key, damage, _ = DAMAGES[case]
    copy = tmp_path / "damaged"
    shutil.copytree(checkpoint, copy)
    weights = load_file(str(copy / WEIGHTS_FILE))
    weights[key] = damage(weights[key]).contiguous()
    save_file(weights, str(copy / WEIGHTS_FILE))
    return copy


def _damaged_pth(tmp_path: Path, case: str) -> Path:
    key, damage, _ = DAMAGES[case]
    checkpoint = load_allowlisted(FIXTURE)
    # The official key of our tensor: the decoders are named alike in both.
    [official] = [k for k in checkpoint["model"] if k.endswith(key.split("decoders.", 1)[1])]
    checkpoint["model"][official] = damage(checkpoint["model"][official])
    path = tmp_path / "damaged.pth"
    torch.save({**checkpoint, "config": _plain(checkpoint["config"])}, path)  # yacs is not installed here
    return path


def _plain(node):
    """The official config (read as our ConfigNode) as plain dicts, which the checkpoint loader also takes."""
    return {k: _plain(v) for k, v in node.items()} if isinstance(node, dict) else node


def _assert_refused(code: int, output: str, key: str, says: str) -> None:
    assert code == 1, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in output, output
    assert key in lines[0] and says in lines[0], lines[0]


@pytest.mark.parametrize("case", DAMAGES)
@pytest.mark.parametrize("kind", ["directory", "pth"])
def test_damaged_weights_are_refused_before_anything_is_written(case, kind, checkpoint, tmp_path):
    source = _damaged_directory(checkpoint, tmp_path, case) if kind == "directory" else _damaged_pth(tmp_path, case)
    key, _, says = DAMAGES[case]
    out = tmp_path / "onnx"
    code, output = invoke(export_cli, "onnx", source, "--out", out)
    _assert_refused(code, output, key if kind == "directory" else key.split("decoders.", 1)[1], says)
    assert not out.exists()


@pytest.mark.parametrize("case", ["nan", "int_weight"])
def test_info_loads_an_official_pth_and_says_so(case, tmp_path):
    code, output = invoke(mtlora_cli, "info", _damaged_pth(tmp_path, case))
    _assert_refused(code, output, "last_layer.0.weight", DAMAGES[case][2])
    code, output = invoke(mtlora_cli, "info", FIXTURE)
    assert code == 0 and "finite values checked" in output, output


@pytest.mark.parametrize("case", ["nan", "inf", "int_weight", "bool_weight"])
def test_a_damaged_imagenet_backbone_is_refused(case, checkpoint, tmp_path):
    from mtlora.checkpoint import load_checkpoint
    from mtlora.model import build_swin
    from mtlora.pretrained import load_pretrained_backbone

    model = load_checkpoint(checkpoint)
    state = build_swin(model.config).state_dict()
    key = next(k for k in state if k.endswith("attn.qkv.weight"))
    state[key] = DAMAGES[case][1](state[key])
    path = tmp_path / "swin.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=DAMAGES[case][2]):
        load_pretrained_backbone(model, path)


@pytest.mark.parametrize("merged", ["yes", 1, 0, None, [], {}])
def test_a_merged_flag_that_is_not_a_bool_is_refused(merged, checkpoint, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    state = json.loads((copy / STATE_FILE).read_text())
    (copy / STATE_FILE).write_text(json.dumps({**state, "merged": merged}))
    code, output = invoke(export_cli, "onnx", copy, "--out", tmp_path / "onnx")
    _assert_refused(code, output, "'merged'", "not true or false")
    assert not (tmp_path / "onnx").exists()


def test_an_intact_checkpoint_still_loads(checkpoint):
    from mtlora.loading import load_any

    model = load_any(checkpoint)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
