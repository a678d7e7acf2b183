"""`mtlora-export build` and `check` end to end, with real ONNX Runtime and OpenVINO engines."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from export.cli import main as export_cli
from mtlora.checkpoint import save_checkpoint
from mtlora.upstream import import_upstream

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "upstream-mtlora-tiny" / "checkpoint.pth"


def run(*args):
    result = CliRunner().invoke(export_cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def fixture_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    code, output = run("build", FIXTURE, "--backend", "onnxruntime", "--backend", "openvino", "--precision", "fp32",
                       "--eval-samples", "8", "--out", out)
    assert code == 0, output
    return out


def test_build_writes_engines_and_reports(fixture_build):
    out = fixture_build
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and {e["engine"]["backend"] for e in report["engines"]} == {"onnxruntime", "openvino"}
    for engine in report["engines"]:
        assert engine["engine"]["precision_executed"] == "fp32"
        # 2 reference.npz inputs + 8 evaluation images
        assert engine["samples"] == 10
        for task in ("semseg", "human_parts", "sal", "normals"):
            assert engine["tasks"][task]["tensor"]["max_abs"] <= 1e-3
    for name in ("junit.xml", "summary.md", "report.html", "build.json", "evalset.npz", "export/manifest.json"):
        assert (out / name).is_file(), name


def test_second_build_reuses_every_step(fixture_build, tmp_path):
    code, output = run("build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32", "--eval-samples", "8",
                       "--out", fixture_build)
    assert code == 0, output
    assert "[export] reusing" in output and "[onnxruntime-fp32] reusing" in output


def test_check_against_its_own_baseline_passes(fixture_build, tmp_path):
    baseline = tmp_path / "baseline.json"
    shutil.copy(fixture_build / "report.json", baseline)
    code, output = run("check", fixture_build, "--baseline", baseline)
    assert code == 0, output
    assert "no regressions" in output


def test_gate_fails_for_an_engine_built_from_perturbed_weights(fixture_build, tmp_path):
    # The same architecture with slightly perturbed decoder weights, checked against the original's references.
    model = import_upstream(FIXTURE)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("decoders."):
                param.add_(0.02 * torch.randn_like(param))
    save_checkpoint(model, tmp_path / "perturbed")
    out = tmp_path / "bad"
    code, output = run("build", tmp_path / "perturbed", "--backend", "onnxruntime", "--precision", "fp32",
                       "--eval-data", fixture_build / "evalset.npz", "--out", out)
    assert code == 1, output
    assert "FAIL max_abs" in output and "FAILED" in output
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False
    # The CI gate refuses to compare it with the good build's report as if it were the same model ...
    code, output = run("check", out, "--baseline", fixture_build / "report.json")
    assert code == 3 and "BASELINE DOES NOT APPLY" in output and "other weights" in output, output
    # ... and, asked to compare them anyway, flags the regression.
    code, output = run("check", out, "--baseline", fixture_build / "report.json", "--allow-other-model")
    assert code == 1 and "REGRESSION" in output and "FAILED" in output, output
    # `build --baseline` is the same gate in one command (here reusing the steps just built).
    again = ("build", tmp_path / "perturbed", "--backend", "onnxruntime", "--precision", "fp32",
             "--eval-data", fixture_build / "evalset.npz", "--out", out, "--baseline", fixture_build / "report.json")
    code, output = run(*again)
    assert code == 3 and "BASELINE DOES NOT APPLY" in output and "other weights" in output, output
    code, output = run(*again, "--allow-other-model")
    assert code == 1 and "REGRESSION" in output and "FAILED" in output, output


def test_build_with_a_baseline_is_the_gate_in_one_command(fixture_build, tmp_path):
    options = json.loads((fixture_build / "build.json").read_text())["options"]
    out = tmp_path / "again"
    code, output = run("build", FIXTURE, "--backend", "onnxruntime", "--backend", "openvino", "--precision", "fp32",
                       "--eval-samples", str(options["eval_samples"]), "--out", out,
                       "--baseline", fixture_build / "report.json")
    assert code == 0 and "no regressions" in output and "PASSED" in output, output


@pytest.mark.parametrize("damage", ["missing", "not_json", "nan_metric"])
def test_build_refuses_a_baseline_that_cannot_judge_before_any_work(fixture_build, tmp_path, damage):
    baseline = tmp_path / "baseline.json"
    if damage == "not_json":
        baseline.write_text("{not json")
    elif damage == "nan_metric":
        report = json.loads((fixture_build / "report.json").read_text())
        task = next(iter(report["engines"][0]["tasks"].values()))
        field = next(k for k, v in task["tensor"].items() if isinstance(v, float))
        task["tensor"][field] = float("nan")
        baseline.write_text(json.dumps(report))
    out = tmp_path / "out"
    code, output = run("build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32", "--out", out,
                       "--baseline", baseline)
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error:") and "baseline.json" in lines[0], output
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--backend", "onnxruntime", "--precision", "bf16"], "onnxruntime cannot build precision 'bf16'"),
        (["--eval-data", "/no/such/dir"], "no such directory"),
        (["--calib-data", "pascal:"], "needs its data root"),
    ],
)
def test_bad_build_input_is_one_line(tmp_path, args, message):
    out = tmp_path / "out"
    code, output = run("build", FIXTURE, *args, "--out", out)
    assert code == 1, output
    assert message in output
    assert "Traceback" not in output
    assert not (out / "engines").exists()


def test_missing_checkpoint_and_conflicting_flags(tmp_path):
    code, output = run("build", tmp_path / "nope", "--out", tmp_path / "o")
    assert code == 1 and "no such checkpoint" in output
    code, output = run("build", FIXTURE, "--from-bundle", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "not both" in output


def test_empty_calibration_directory_is_refused(tmp_path):
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "notes.txt").write_text("not an image")
    code, output = run("build", FIXTURE, "--backend", "onnxruntime", "--precision", "int8",
                       "--calib-data", tmp_path / "calib", "--out", tmp_path / "o")
    assert code == 1, output
    assert "contains no image files" in output
    assert not (tmp_path / "o" / "engines" / "onnxruntime-int8").exists()


def test_a_changed_exporter_makes_a_new_export(fixture_build, monkeypatch):
    """The cached export is keyed on the exporting code too: after an upgrade it is not reused."""
    import export.onnx.exporter

    monkeypatch.setattr(export.onnx.exporter, "exporter_fingerprint", lambda: "another exporter")
    code, output = run("build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32", "--eval-samples", "8",
                       "--out", fixture_build)
    assert code == 0, output
    assert "[export] reusing" not in output and "[export] " in output


def test_a_build_elsewhere_copies_its_steps_from_the_step_store(fixture_build, tmp_path):
    """With $MTLORA_EXPORT_STEP_CACHE (set for the whole test run), a build into another directory takes
    the export and the engine the fixture's build computed, and they verify and pass there."""
    out = tmp_path / "elsewhere"
    code, output = run("build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32", "--eval-samples", "8",
                       "--out", out)
    assert code == 0, output
    assert f"[export] reusing {out / 'export'}" in output
    assert f"[onnxruntime-fp32] reusing the engine in {out / 'engines' / 'onnxruntime-fp32'}" in output
    assert json.loads((out / "build.json").read_text())["reused"] == ["export", "onnxruntime-fp32"]
    assert (out / "export" / "model.onnx").read_bytes() == (fixture_build / "export" / "model.onnx").read_bytes()
