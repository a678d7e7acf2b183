"""`mtlora-export run` refuses what it cannot do well, in one line and before writing anything: bounds on
--threads and --camera, an empty --out, empty task names; outputs of images that share a name never clash;
an engine file that its runtime cannot load says which file and to rebuild it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.cli import main as export_cli
from export.cli.deploy import safe_stem, unique_stems
from tests.conftest import FIXTURE, invoke
from tests.test_run_tasks import EXAMPLE

pytest_plugins = ("tests.engine_fixtures",)  # tiny_onnx, for an OpenVINO engine


def ort_fp32(build: Path) -> Path:
    return build / "engines" / "onnxruntime-fp32"


def one_error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in output, output
    return lines[0]


# ----------------------------------------------------------------------------- --threads, --camera


@pytest.mark.parametrize("threads", ["0", "-1", "1025", "100000", "1000000", "2147483648", "99999999999999999999"])
@pytest.mark.parametrize("command", ["run", "check", "bench", "build"])
def test_threads_out_of_range_is_a_usage_error_in_every_command(ort_build, tmp_path, command, threads):
    """Every command with --threads takes it from one field: the same bound, refused before any work."""
    args = {"run": [ort_fp32(ort_build), "--image", EXAMPLE, "--out", tmp_path / "out" / "p.npz"],
            "check": [ort_build], "bench": [ort_build], "build": [FIXTURE, "--out", tmp_path / "out"]}[command]
    code, output = invoke(export_cli, command, *args, "--threads", threads)
    assert code == 2, output
    assert "Invalid value for '--threads'" in output and "1<=x<=1024" in output, output
    assert "Traceback" not in output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("camera", ["10000", "2147483648", "99999999999", "-1"])
def test_a_camera_index_out_of_range_is_a_usage_error(ort_build, tmp_path, camera):
    code, output = invoke(export_cli, "run", ort_fp32(ort_build), "--camera", camera, "--out", tmp_path / "o.mp4")
    assert code == 2, output
    assert "Invalid value for '--camera'" in output and "0<=x<=9999" in output and "Traceback" not in output
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- --out


@pytest.mark.parametrize("out", ["", " ", "\t"])
@pytest.mark.parametrize("source", ["--image", "--video", "--camera"])
def test_an_empty_out_is_refused(ort_build, tmp_path, monkeypatch, source, out):
    """An empty --out used to mean the default name in the current directory: nothing is written anywhere."""
    monkeypatch.chdir(tmp_path)
    given = {"--image": EXAMPLE, "--video": tmp_path / "clip.avi", "--camera": 0}[source]
    if source == "--video":
        (tmp_path / "clip.avi").write_bytes(b"never read")
    before = sorted(tmp_path.iterdir())
    code, output = invoke(export_cli, "run", ort_fp32(ort_build), source, given, "--out", out)
    assert code == 2, output
    assert "Invalid value for --out: is empty; name the output file" in output and "Traceback" not in output
    assert sorted(tmp_path.iterdir()) == before


# ----------------------------------------------------------------------------- --tasks


@pytest.mark.parametrize("tasks", ["", " ", ",", ",,,", "semseg,,sal", "semseg,", ",sal", "sal, ,semseg"])
def test_an_empty_task_name_is_named_as_build_names_it(ort_build, tmp_path, tasks):
    code, output = invoke(export_cli, "run", ort_fp32(ort_build), "--image", EXAMPLE, "--tasks", tasks,
                          "--out", tmp_path / "out" / "p.npz")
    assert code == 2, output
    error = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "Traceback" not in output, output
    assert error[0] == (f"Error: Invalid value for --tasks: '{tasks}' has an empty task name; give a comma-separated "
                        "list like semseg,sal (this engine has: semseg, human_parts, sal, normals); see 'main run --help'")
    assert not (tmp_path / "out").exists()


def test_build_says_the_same_of_an_empty_task_name(tmp_path):
    code, output = invoke(export_cli, "build", FIXTURE, "--tasks", "semseg,,sal", "--out", tmp_path / "out")
    assert code == 2 and "'semseg,,sal' has an empty task name; give a comma-separated list like semseg,sal" in output


# ----------------------------------------------------------------------------- image names


@pytest.mark.parametrize("names, stems", [
    (["a/ok.png", "b/ok.png", "b/ok_2.png"], ["ok", "ok_3", "ok_2"]),
    (["b/ok_2.png", "a/ok.png", "b/ok.png"], ["ok_2", "ok", "ok_3"]),
    (["a/ok.png", "b/ok.png", "c/ok.png", "ok_2.png", "ok_3.png"], ["ok", "ok_4", "ok_5", "ok_2", "ok_3"]),
    (["a/ok_2.png", "b/ok_2.png", "ok.png", "c/ok.png"], ["ok_2", "ok_2_2", "ok", "ok_3"]),
    (["a/photo.jpg", "b/photo.jpg"], ["photo", "photo_2"]),
    (["a/x.png", "b/x.jpg", "c/x.tif", "x_2.png", "x_2.jpg"], ["x", "x_3", "x_4", "x_2", "x_2_2"]),
])
def test_stems_are_unique_against_every_stem(names, stems):
    assert unique_stems(names) == stems


def test_stems_are_unique_whatever_the_names():
    rng = np.random.default_rng(0)
    for _ in range(300):
        names = [f"{rng.integers(3)}/{rng.choice(['ok', 'ok_2', 'ok_3', 'ok_2_2', '.ok'])}.png"
                 for _ in range(rng.integers(1, 8))]
        stems, own = unique_stems(names), [safe_stem(n) for n in names]
        assert len(set(stems)) == len(stems), names
        for stem in set(own):  # the first image of each name keeps it
            assert stems[own.index(stem)] == stem, names


def test_images_whose_numbered_name_is_taken_get_their_own_pictures(ort_build, tmp_path):
    """The probe's case: img/ok.png, img2/ok.png and img2/ok_2.png, each with its own pictures."""
    for folder, name, colour in (("img", "ok", (200, 0, 0)), ("img2", "ok", (0, 200, 0)), ("img2", "ok_2", (0, 0, 200))):
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.new("RGB", (64, 64), colour).save(tmp_path / folder / f"{name}.png")
    out = tmp_path / "out" / "stem.npz"
    code, output = invoke(export_cli, "run", ort_fp32(ort_build), "--image", tmp_path / "img" / "ok.png",
                          "--image", tmp_path / "img2" / "ok.png", "--image", tmp_path / "img2" / "ok_2.png",
                          "--tasks", "sal", "--out", out)
    assert code == 0, output
    assert sorted(p.name for p in out.parent.iterdir()) == ["stem.npz", "stem_ok_2_sal.png", "stem_ok_3_sal.png",
                                                            "stem_ok_sal.png"]
    # each picture is its own image's: the blue image's saliency is not the green one's
    with np.load(out) as stored:
        sal = stored["sal"]
    assert not np.array_equal(sal[1], sal[2])


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failure_while_staging_leaves_no_staging_directory(ort_build, tmp_path, monkeypatch, failure):
    import export.checking.visualize as visualize

    def fail(*_args, **_kwargs):
        raise failure

    monkeypatch.setattr(visualize, "render_output", fail)
    out = tmp_path / "out" / "p.npz"
    code, output = invoke(export_cli, "run", ort_fp32(ort_build), "--image", EXAMPLE, "--out", out)
    assert code != 0, output
    assert list(out.parent.iterdir()) == []  # neither outputs nor .outputs.*.partial


# ----------------------------------------------------------------------------- engine files that do not load


def _cut_and_rehash(engine_dir: Path, name: str, cut: float = 0.5) -> None:
    """Cut `name` short and make its sidecar and engine.json vouch for it: the damage happened before
    the hashes were recorded, so only the runtime stands in the way."""
    from export.artifacts.engineset import EngineSet

    target = engine_dir / name
    target.write_bytes(target.read_bytes()[: int(target.stat().st_size * cut)])
    for sidecar in engine_dir.glob("*.json"):
        data = json.loads(sidecar.read_text())
        if name in (data.get("files") or {}) and sidecar.name != "engine.json":
            data["files"][name] = hashlib.sha256(target.read_bytes()).hexdigest()
            sidecar.write_text(json.dumps(data))
    if (engine_dir / "engine.json").exists():
        EngineSet.read(engine_dir).save()


def assert_load_error(message: str, damaged: Path) -> None:
    assert "\n" not in message.strip() and len(message) < 500, message
    assert str(damaged) in message or str(damaged.with_suffix(".xml")) in message, message
    assert message.strip().endswith("rebuild the engine (mtlora-export build)"), message
    assert "Exception from src" not in message and "[ONNXRuntimeError]" not in message, message


@pytest.mark.parametrize("cut", [0.5, 0.01, 0.0])
def test_run_on_a_damaged_onnx_engine_names_it(ort_build, tmp_path, cut):
    engine = tmp_path / "engine"
    for precision in ("fp32", "int8"):
        shutil.rmtree(engine, ignore_errors=True)
        shutil.copytree(ort_build / "engines" / f"onnxruntime-{precision}", engine)
        _cut_and_rehash(engine, f"model.{precision}.onnx", cut)
        code, output = invoke(export_cli, "run", engine, "--image", EXAMPLE, "--out", tmp_path / "out" / "p.npz")
        assert code == 1, output
        line = one_error_line(output)
        assert_load_error(line, engine / f"model.{precision}.onnx")
        assert "onnxruntime cannot load this engine file" in line
        assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def openvino_engines(tiny_onnx, tmp_path_factory):
    """An OpenVINO fp32 engine of the tiny graph with its compiled blob, and one without (read from the IR)."""
    pytest.importorskip("openvino")
    from calibration.prepare import prepare_graph
    from engines import openvino as ov_backend

    work = tmp_path_factory.mktemp("ov_damaged")
    prepared = prepare_graph("openvino", tiny_onnx, work / "prepared", "fp32")
    return {blob: ov_backend.build(prepared.path, work / f"blob-{blob}", precision="fp32", export_blob=blob,
                                   metadata=prepared.metadata).path.parent for blob in (True, False)}


@pytest.mark.parametrize("damaged, blob", [("CPU.blob", True), ("xml", False), ("bin", False)])
def test_a_damaged_openvino_engine_file_is_one_line_naming_it(openvino_engines, tmp_path, damaged, blob):
    from engines import openvino as ov_backend
    from engines.errors import EngineError

    engine = tmp_path / "engine"
    shutil.copytree(openvino_engines[blob], engine)
    target = next(engine.glob(f"*.{damaged}"))
    _cut_and_rehash(engine, target.name)
    runner = ov_backend.load(next(engine.glob("*.xml")))
    assert (runner.blob is not None) is blob
    with pytest.raises(EngineError) as err:
        runner.activate()
    assert_load_error(str(err.value), target)
    assert "OpenVINO (CPU) cannot load this engine file (" in str(err.value)


def test_the_runtime_reason_is_its_first_line_of_reason():
    from engines.errors import runtime_reason

    openvino = RuntimeError("Exception from src/inference/src/cpp/core.cpp:217:\nException from src/inference/src/dev/"
                            "plugin.cpp:74:\nCheck 'is_valid_model' failed at src/plugins/intel_cpu/src/utils/"
                            "deserializer.cpp:222:\n[CPU] Could not deserialize by device xml header.\n\n\n")
    assert runtime_reason(openvino) == "[CPU] Could not deserialize by device xml header."
    ort = RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from /a/m.onnx failed:Protobuf "
                       "parsing failed.")
    assert runtime_reason(ort) == "INVALID_PROTOBUF: Protobuf parsing failed."
    long = runtime_reason(RuntimeError("x" * 1000 + "\nsecond line"))
    assert len(long) == 160 and long.endswith("...")
    assert runtime_reason(RuntimeError("")) == "RuntimeError"
    try:
        try:
            raise ValueError("the cause\nmore")
        except ValueError as cause:
            raise RuntimeError("wrapped") from cause
    except RuntimeError as wrapped:
        assert runtime_reason(wrapped) == "the cause"
