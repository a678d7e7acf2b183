"""Only the tasks you need, at run time (`Engine.infer/predict(tasks=)`, `run --tasks`), and `run --out`
published all or none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from export import open_engine
from export.cli import main as export_cli
from export.errors import ExportError
from tests.conftest import invoke

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "mtlora" / "assets" / "example.png"
TASKS = ("semseg", "human_parts", "sal", "normals")


@pytest.fixture
def split_build(ort_split_build) -> Path:
    return ort_split_build


def batch(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 64, 64)).astype(np.float32)


def test_split_runs_the_backbone_once_and_only_the_chosen_heads(split_build):
    with open_engine(split_build / "engines" / "onnxruntime-fp32", threads=1) as engine:
        everything = engine.infer(batch())
        chosen = engine.infer(batch(), tasks=["normals", "semseg"])
        runner = engine.runner
        ran = {task: len(head.timings) for task, head in runner.heads.items()}
        assert len(runner.backbone.timings) == 2
    assert list(chosen) == ["semseg", "normals"]  # the engine's order, whatever order was asked
    assert ran == {"semseg": 2, "human_parts": 1, "sal": 1, "normals": 2}
    for task in chosen:
        np.testing.assert_array_equal(chosen[task], everything[task])


def test_predict_takes_tasks_too(split_build):
    image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(EXAMPLE).convert("RGB"))
    with open_engine(split_build / "engines" / "onnxruntime-fp32", threads=1) as engine:
        outputs = engine.predict(image, tasks="sal")
        assert list(outputs) == ["sal"] and outputs["sal"].shape == (1, 64, 64)
        assert [len(h.timings) for h in engine.runner.heads.values()] == [0, 0, 1, 0]


@pytest.mark.parametrize("tasks", [["depth"], ["semseg", "nope"], [], "semseg,", "", " ", ",,", ["sal", ""],
                                   ["sal", " "]])
def test_an_unknown_or_empty_task_list_names_the_valid_ones(split_build, tasks):
    with open_engine(split_build / "engines" / "onnxruntime-fp32") as engine, \
            pytest.raises(ExportError, match=r"this engine has: semseg, human_parts, sal, normals\)?$") as err:
        engine.infer(batch(1), tasks=tasks)
    empty = isinstance(tasks, str) or any(not t.strip() for t in tasks)
    assert ("has an empty task name" in str(err.value)) is empty


def test_split_graphs_keep_each_task_s_work_in_its_head(split_build):
    """The backbone holds no task's factors, patch merging of a task stream or decoder; each head holds
    its own task's and no other's, so a task not chosen costs nothing."""
    graphs = split_build / "export"
    backbone = {i.name for i in onnx.load(graphs / "backbone.onnx", load_external_data=False).graph.initializer}
    assert not [n for n in backbone if n.startswith(("task_branches.", "heads.", "task_stack."))]
    for task in TASKS:
        head = {i.name for i in onnx.load(graphs / f"head_{task}.onnx", load_external_data=False).graph.initializer}
        own = {n.split(".")[1] for n in head if n.startswith(("task_branches.", "heads."))}
        assert own == {task}
        # the task stream's patch merging runs in the head (the merging weights are shared, the work is not)
        assert any(".merging." in n for n in head)


def test_run_tasks_on_split_writes_only_those(split_build, tmp_path):
    out = tmp_path / "pred.npz"
    code, output = invoke(export_cli, "run", split_build / "engines" / "onnxruntime-fp32", "--image", EXAMPLE,
                          "--tasks", "semseg,normals", "--out", out)
    assert code == 0, output
    assert "all its tasks run" not in output
    with np.load(out) as stored:
        assert sorted(stored.files) == ["normals", "semseg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.npz", "pred_example_normals.png",
                                                          "pred_example_semseg.png"]


def test_run_tasks_on_a_single_graph_says_it_runs_whole(ort_build, tmp_path):
    out = tmp_path / "pred.npz"
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", "--image", EXAMPLE,
                          "--tasks", "sal", "--out", out)
    assert code == 0, output
    notice = [line for line in output.splitlines() if "all its tasks run" in line]
    assert len(notice) == 1 and "build --tasks" in notice[0]
    with np.load(out) as stored:
        assert stored.files == ["sal"]


@pytest.mark.parametrize("tasks", ["depth", "semseg,depth", "depth,sal"])
def test_run_with_unknown_tasks_is_a_usage_error_and_writes_nothing(ort_build, tmp_path, tasks):
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", "--image", EXAMPLE,
                          "--tasks", tasks, "--out", tmp_path / "out" / "pred.npz")
    assert code == 2, output  # a flag naming what the engine lacks, like any bad flag value
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in output
    assert errors[0].startswith("Error: Invalid value for --tasks: ")
    assert errors[0].endswith("this engine has: semseg, human_parts, sal, normals; see 'main run --help'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("blocked", ["pred.npz", "pred_example_semseg.png", "pred_example_normals.png"])
def test_run_out_is_all_or_none(ort_build, tmp_path, blocked):
    """One output name that cannot take a file: nothing is published, older outputs stay as they were."""
    out = tmp_path / "pred.npz"
    (tmp_path / "pred_example_sal.png").write_bytes(b"older output")
    (tmp_path / blocked).mkdir()
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", "--image", EXAMPLE,
                          "--out", out)
    assert code == 1, output
    assert len(output.strip().splitlines()) == 1 and "nothing was written" in output and blocked in output
    assert "free some space" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([blocked, "pred_example_sal.png"])
    assert (tmp_path / "pred_example_sal.png").read_bytes() == b"older output"


def test_a_failed_move_puts_older_outputs_back(tmp_path, monkeypatch):
    import os

    from export.artifacts.outputs import OutputSet

    (tmp_path / "a.npz").write_bytes(b"old a")
    staged = OutputSet(tmp_path)
    staged.write("a.npz", b"new a")
    staged.write("b.png", b"new b")
    real = os.replace

    def fail_on_b(src, dst):
        if Path(dst).name == "b.png":
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_b)
    with pytest.raises(ExportError, match="b.png: could not be written .No space left on device.; nothing was written"):
        staged.publish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]
    assert (tmp_path / "a.npz").read_bytes() == b"old a"


def test_images_of_the_same_name_get_their_own_pictures(ort_build, tmp_path):
    from PIL import Image

    for folder, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (64, 64), colour).save(tmp_path / folder / "photo.png")
    out = tmp_path / "out" / "pred.npz"
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", "--image",
                          tmp_path / "a" / "photo.png", "--image", tmp_path / "b" / "photo.png", "--tasks", "sal",
                          "--out", out)
    assert code == 0, output
    assert sorted(p.name for p in out.parent.iterdir()) == ["pred.npz", "pred_photo_2_sal.png", "pred_photo_sal.png"]
