"""A model config read from a checkpoint is checked field by field: text, a bool, NaN, an infinity, a
fraction where a whole number belongs, a string where a list belongs, and sizes that would try to
allocate terabytes are each one ConfigError naming the field, never a cast that hides the damage or an
internal error later. Through the command line: one line, exit 1, nothing written."""

from __future__ import annotations

import json
import math

import pytest

from mtlora.config import ModelConfig
from mtlora.errors import ConfigError
from tests.conftest import FIXTURE, invoke

NAN, INF = math.nan, math.inf


def _valid() -> dict:
    return ModelConfig().to_dict()


def _parent(config: dict, path: str) -> tuple[dict, str]:
    """The dict holding the field at dotted `path`, and the field's name in it."""
    *parents, last = path.split(".")
    for key in parents:
        config = config[key]
    return config, last


def _set(config: dict, path: str, value) -> dict:
    parent, last = _parent(config, path)
    parent[last] = value
    return config


BAD = [
    # (field path, bad values, words of the message)
    ("swin.embed_dim", ["24", 24.5, True, NAN, INF, 0, -1, 10**12], "swin.embed_dim"),
    ("swin.in_chans", ["3", 3.5, None, NAN, INF, -1, False], "swin.in_chans"),
    ("swin.patch_size", ["4", NAN, 0], "swin.patch_size"),
    ("swin.window_size", [NAN, INF, "7", 7.5], "swin.window_size"),
    ("swin.mlp_ratio", [INF, -INF, NAN, -1, 0, None, "4"], "swin.mlp_ratio"),
    ("swin.drop_path_rate", [NAN, INF, -1, 1.5, None, "0.1"], "swin.drop_path_rate"),
    ("swin.depths", ["2222", 2, [2, 2, 2.5, 2], [2, 2, NAN, 2], [2, 2, True, 2]], "swin.depths"),
    ("swin.num_heads", ["3", [3, 6, "12", 24], [3, 6, 12, INF]], "swin.num_heads"),
    ("swin.qk_scale", [NAN, INF, 0, -1, "1"], "swin.qk_scale"),
    ("adapter.shared_rank", [10**12, [8.5, 8, 8, 8], [NAN], ["8"], [True]], "shared_rank"),
    ("adapter.shared_scale", [NAN, INF, [-INF], ["4"], [None]], "shared_scale"),
    ("adapter.mtl_temperature", [NAN, INF, 0, -1, "0.5"], "adapter.mtl_temperature"),
    ("adapter.mtl_num_up", [NAN, 0, 2.5, "3"], "adapter.mtl_num_up"),
    ("adapter.dropout", [NAN, INF, "0"], "adapter.dropout"),
    ("tasks", ["semseg", [1, 2], [""], None], "tasks"),
    ("task_channels", [{"semseg": NAN}, {"semseg": INF}, {"semseg": "6"}, {"semseg": 6.5}, {"semseg": True}],
     "task_channels.semseg"),
    ("decoder_channels", ["18", [18, 36, 72, NAN], [18, 36, 72, 144.5]], "decoder_channels"),
    ("mean", [[NAN, 0.4, 0.4], [INF, 0.4, 0.4], [0.4, 0.4], "0.4", [0.4, 0.4, "x"]], "mean"),
    ("std", [[0.2, 0.2, 0], [0.2, 0.2, -0.2], [0.2, INF, 0.2], [NAN, 0.2, 0.2], [0.2, 0.2]], "std"),
]


@pytest.mark.parametrize("path, value, words", [(p, v, w) for p, values, w in BAD for v in values],
                         ids=lambda x: repr(x)[:20])
def test_every_field_refuses_damage(path, value, words):
    with pytest.raises(ConfigError) as raised:
        ModelConfig.from_dict(_set(_valid(), path, value))
    message = str(raised.value)
    assert words in message and "\n" not in message, message


def test_whole_floats_still_read_as_whole_numbers():
    config = ModelConfig.from_dict(_set(_set(_valid(), "swin.embed_dim", 96.0), "swin.depths", [2.0, 2, 6, 2]))
    assert config.swin.embed_dim == 96 and config.swin.depths == (2, 2, 6, 2)


@pytest.mark.parametrize("field, value", [("swin.mlp_ratio", "Infinity"), ("swin.embed_dim", '"24"'),
                                          ("std", "[0.2, 0.2, 0]"), ("tasks", '"semseg"')])
@pytest.mark.parametrize("command", ["merge", "onnx"])
def test_the_command_line_says_it_in_one_line(field, value, command, tmp_path):
    from export.cli import main as export_cli
    from mtlora.cli import main as mtlora_cli

    checkpoint = tmp_path / "ck"
    code, output = invoke(mtlora_cli, "import-upstream", FIXTURE, "--out", checkpoint)
    assert code == 0, output
    config = json.loads((checkpoint / "config.json").read_text())
    _set(config, field, "@VALUE@")
    (checkpoint / "config.json").write_text(json.dumps(config).replace('"@VALUE@"', value))
    out = tmp_path / "out"
    code, output = invoke(export_cli, command, checkpoint, "--out", out)
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in output and "internal error" not in output, output
    assert field.split(".")[-1] in lines[0], lines[0]
    assert not out.exists()


def _required() -> list[str]:
    """Every field a saved config always holds: those `to_dict` writes at their defaults too."""
    from dataclasses import fields

    from mtlora.config import _ADAPTER_OPTIONAL, _MODEL_OPTIONAL, _SWIN_OPTIONAL, AdapterConfig, SwinConfig

    names = [f.name for f in fields(ModelConfig) if f.name not in _MODEL_OPTIONAL]
    names += [f"swin.{f.name}" for f in fields(SwinConfig) if f.name not in _SWIN_OPTIONAL]
    return names + [f"adapter.{f.name}" for f in fields(AdapterConfig) if f.name not in _ADAPTER_OPTIONAL]


@pytest.mark.parametrize("path", _required())
def test_a_field_left_out_is_refused_not_defaulted(path):
    config = _valid()
    parent, last = _parent(config, path)
    del parent[last]
    with pytest.raises(ConfigError, match=f"lacks {path}:") as raised:
        ModelConfig.from_dict(config)
    assert "\n" not in str(raised.value)


def test_a_config_without_the_later_options_still_reads():
    """Options added after the first release are left out of a saved config at their defaults."""
    config = ModelConfig.from_dict(_valid())
    assert config == ModelConfig()


@pytest.mark.parametrize("field", ["tasks", "mean", "swin.embed_dim"])
def test_info_on_a_config_without_a_field_is_one_line(field, tmp_path):
    from mtlora.cli import main as mtlora_cli

    config = _valid()
    parent, last = _parent(config, field)
    del parent[last]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code, output = invoke(mtlora_cli, "info", path)
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and f"lacks {field}" in lines[0], output
