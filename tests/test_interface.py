"""The model interface read back from engine.json (and the export manifest): every field checked for its
type and range when read, so a damaged or hand-edited file is one line naming the file and the field,
never an overflow deep in numpy or NaN outputs."""

from __future__ import annotations

import json
import shutil

import pytest

from export.artifacts.interface import ModelInterface
from export.cli import main as export_cli
from export.errors import ExportError
from tests.conftest import invoke
from tests.test_run_tasks import EXAMPLE

GOOD = {"tasks": ["semseg", "human_parts", "sal", "normals"],
        "output_channels": {"semseg": 6, "human_parts": 4, "sal": 1, "normals": 3},
        "input_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
NAN, INF = float("nan"), float("inf")


def _set(path: str, value):
    """GOOD with one field (a dotted path: output_channels.sal, mean.1) set to `value`."""
    data = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return data


def _without(key: str):
    return {k: v for k, v in GOOD.items() if k != key}


# name -> (the model description, the field the error names)
BAD = {
    # input_size: huge, zero, negative, and every wrong type (a bool is no count, nor 64.5 or "64")
    "size_huge": (_set("input_size", 1_000_000_000_000), "input_size"),
    "size_just_over": (_set("input_size", 8193), "input_size"),
    "size_zero": (_set("input_size", 0), "input_size"),
    "size_negative": (_set("input_size", -64), "input_size"),
    "size_string": (_set("input_size", "64"), "input_size"),
    "size_float": (_set("input_size", 64.5), "input_size"),
    "size_whole_float": (_set("input_size", 64.0), "input_size"),
    "size_true": (_set("input_size", True), "input_size"),
    "size_null": (_set("input_size", None), "input_size"),
    "size_nan": (_set("input_size", NAN), "input_size"),
    "size_list": (_set("input_size", [64]), "input_size"),
    # mean and std: NaN, +-Inf, out of range, wrong types and lengths
    **{f"{name}_{i}_{kind}": (_set(f"{name}.{i}", value), f"{name}[{i}]")
       for name in ("mean", "std") for i in range(3)
       for kind, value in (("nan", NAN), ("inf", INF), ("minus_inf", -INF), ("string", "0.5"), ("true", True),
                           ("null", None))},
    "mean_negative": (_set("mean.0", -0.1), "mean[0]"),
    "mean_over_one": (_set("mean.2", 123.7), "mean[2]"),
    "std_zero": (_set("std.1", 0.0), "std[1]"),
    "std_negative": (_set("std.0", -0.2), "std[0]"),
    "std_tiny": (_set("std.2", 1e-9), "std[2]"),
    "std_huge": (_set("std.0", 1e9), "std[0]"),
    "mean_two_values": (_set("mean", [0.5, 0.5]), "mean"),
    "std_four_values": (_set("std", [0.2, 0.2, 0.2, 0.2]), "std"),
    "mean_a_number": (_set("mean", 0.5), "mean"),
    "std_a_string": (_set("std", "0.2,0.2,0.2"), "std"),
    # output_channels: every task's count, each wrong type and range; missing and extra tasks
    **{f"channels_{task}_{kind}": (_set(f"output_channels.{task}", value), f"output_channels.{task}")
       for task in GOOD["tasks"]
       for kind, value in (("string", "6"), ("float", 6.5), ("true", True), ("zero", 0), ("negative", -1),
                           ("huge", 10**12), ("null", None), ("nan", NAN))},
    "channels_missing_a_task": (_set("output_channels", {"semseg": 6, "human_parts": 4, "sal": 1}), "output_channels"),
    "channels_extra_task": (_set("output_channels", {**GOOD["output_channels"], "depth": 1}), "output_channels"),
    "channels_a_list": (_set("output_channels", [6, 4, 1, 3]), "output_channels"),
    # tasks: unknown, repeated, empty, wrong types
    "tasks_unknown": (_set("tasks.0", "segmentation"), "tasks"),
    "tasks_repeated": (_set("tasks.1", "semseg"), "tasks"),
    "tasks_empty": (_set("tasks", []), "tasks"),
    "tasks_a_string": (_set("tasks", "semseg"), "tasks"),
    "tasks_a_number": (_set("tasks.2", 3), "tasks"),
    # postprocessed: only true or false
    "postprocessed_string": (_set("postprocessed", "yes"), "postprocessed"),
    "postprocessed_one": (_set("postprocessed", 1), "postprocessed"),
    # missing fields, and no object at all
    **{f"no_{key}": (_without(key), key) for key in GOOD},
    "a_list": ([GOOD], "description"),
}


@pytest.mark.parametrize("case", BAD)
def test_every_bad_field_is_one_line_naming_it(case):
    data, field = BAD[case]
    with pytest.raises(ExportError) as err:
        ModelInterface.from_dict(data, "some/engine.json", remedy="rebuild the engine")
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith("some/engine.json: ") and message.endswith("; rebuild the engine")
    assert field in message


def test_a_good_description_reads_back_as_written():
    for data in (GOOD, {**GOOD, "postprocessed": True}, _set("std", [1, 1, 1]), _set("mean", [0, 0.5, 1])):
        interface = ModelInterface.from_dict(data, "engine.json")
        assert ModelInterface.from_dict(interface.to_dict(), "engine.json") == interface
        assert type(interface.size) is int and all(type(v) is float for v in (*interface.mean, *interface.std))


@pytest.mark.parametrize("case", ["size_huge", "size_string", "size_true", "mean_0_nan", "std_1_inf",
                                  "std_zero", "channels_semseg_string", "channels_sal_float", "tasks_unknown",
                                  "no_mean", "postprocessed_string"])
def test_run_refuses_an_engine_json_with_a_bad_field(ort_build, tmp_path, case):
    """The file as a user's engine directory has it: `run` says which file and field, writes nothing."""
    data, field = BAD[case]
    engine = tmp_path / "engine"
    shutil.copytree(ort_build / "engines" / "onnxruntime-fp32", engine)
    index = json.loads((engine / "engine.json").read_text())
    assert index["model"] == {**GOOD, "output_channels": index["model"]["output_channels"]}  # the test model's
    index["model"] = data
    (engine / "engine.json").write_text(json.dumps(index))  # Python's JSON writes NaN and Infinity as read
    code, output = invoke(export_cli, "run", engine, "--image", EXAMPLE, "--out", tmp_path / "out" / "p.npz")
    assert code == 1, output
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output, output
    assert f"{engine / 'engine.json'}: the model's {field}" in output or f"lacks {field}" in output, output
    assert output.strip().endswith("rebuild the engine (mtlora-export build)"), output
    assert not (tmp_path / "out").exists()
