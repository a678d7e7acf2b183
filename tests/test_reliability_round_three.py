"""Hostile input, round three: a CI gate that cannot pass falsely (every setting of the comparison is part
of a baseline's identity; a NaN never compares), non-finite numbers named wherever data comes in, sidecar
edits found, `--keep-fp32` globs that match nothing, usage errors as exit 2, SIGTERM like Ctrl-C, and hints
that name the real cause. The CLI cases are rows of one table, judged like `test_hostile_inputs`."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibration.data import CalibrationSet
from calibration.errors import CalibrationError
from export.artifacts.engineset import EngineSet, open_engine
from export.checking.accuracy import EvalBatch, check_engine
from export.cli import main as export_cli
from export.errors import ExportError
from mtlora.cli import main as mtlora_cli
from mtlora_base.cli import EXIT_CODES, describe_unexpected
from tests.conftest import FIXTURE, engine_threads, invoke
from tests.test_hostile_inputs import Case, Inputs

ROOT = Path(__file__).resolve().parents[1]
X, M = export_cli, mtlora_cli
OUT = lambda _f, t: t / "out"  # noqa: E731
NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _edited_report(report: dict, edit) -> dict:
    stored = json.loads(json.dumps(report))
    edit(stored)
    return stored


def _first_task(report: dict) -> dict:
    return next(iter(report["engines"][0]["tasks"].values()))


def _evalset(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ort_build) -> Inputs:
    root = tmp_path_factory.mktemp("round-three")
    f = Inputs(root=root, build=root / "build")
    shutil.copytree(ort_build, f.build)
    # The same model, post-processed in the graph: its report is no baseline for raw outputs.
    code, output = invoke(X, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32", "--postprocess",
                          "--eval-samples", "4", "--out", root / "pp")
    assert code == 0, output
    f["pp"] = root / "pp"
    report = json.loads((ort_build / "report.json").read_text())
    identity = report["identity"]
    edits = {
        # Every setting of the identity, changed as another build would have it.
        "postprocessed": lambda r: r["identity"].update(postprocessed=True),
        "layout": lambda r: r["identity"].update(layout="split"),
        "eval_digest": lambda r: r["identity"].setdefault("evaluation_data", {}).update(sha256="0" * 64),
        "eval_samples": lambda r: r["identity"].setdefault("evaluation_data", {}).update(samples=99),
        # Another model of another input size: its inputs differ by necessity, their kind and count may not.
        "eval_kind": lambda r: (r["identity"].update(input_size=96),
                                r["identity"].setdefault("evaluation_data", {}).update(kind="pascal", sha256="2" * 64)),
        "eval_kind_same": lambda r: (r["identity"].update(input_size=96),
                                     r["identity"].setdefault("evaluation_data", {}).update(sha256="2" * 64)),
        "tolerances": lambda r: r["identity"].setdefault("tolerances", {}).update(sha256="1" * 64),
        "input_size": lambda r: r["identity"].update(input_size=96),
        "tasks": lambda r: r["identity"].update(tasks=identity["tasks"][:2]),
        # Written before these settings were recorded.
        "no_layout": lambda r: r["identity"].pop("layout", None),
        "no_evaluation_data": lambda r: r["identity"].pop("evaluation_data", None),
        "no_tolerances": lambda r: r["identity"].pop("tolerances", None),
    }
    for name, value in NON_FINITE.items():
        # A non-finite number in each kind of field of a baseline: metric-like values, tensor errors, checks.
        edits[f"{name}_cosine"] = lambda r, v=value: _first_task(r)["tensor"].update(cosine=v)
        edits[f"{name}_max_abs"] = lambda r, v=value: _first_task(r)["tensor"].update(max_abs=v)
        edits[f"{name}_agreement"] = lambda r, v=value: _first_task(r).update(argmax_agreement=v)
        edits[f"{name}_check"] = lambda r, v=value: _first_task(r)["checks"][0].update(value=v)
        edits[f"{name}_metric"] = lambda r, v=value: _first_task(r).update(metrics={
            "primary": "mIoU", "higher_is_better": True, "engine": {"mIoU": v}, "reference": {"mIoU": 50.0},
            "drop": 0.0})
    for name, edit in edits.items():
        path = root / f"baseline-{name}.json"
        path.write_text(json.dumps(_edited_report(report, edit)))  # json writes NaN / Infinity / -Infinity
        f[f"baseline_{name}"] = path
    (root / "tolerances-loose.json").write_text(json.dumps({"fp32": {"*": {"max_abs": 0.5}}}))
    (root / "tolerances-inf.json").write_text('{"fp32": {"*": {"max_abs": Infinity}}}')
    (root / "tolerances-neg-inf.json").write_text('{"int8": {"*": {"min_cosine": -Infinity}}}')
    for name in ("loose", "inf", "neg_inf"):
        f[f"tol_{name}"] = root / f"tolerances-{name.replace('_', '-')}.json"
    # Evaluation / calibration sets (.npz): a non-finite input or reference of each kind, and no numbers at all.
    good = {"input": np.zeros((8, 3, 64, 64), np.float32), "ref_semseg": np.zeros((8, 21, 64, 64), np.float32)}
    for name, value in NON_FINITE.items():
        for array in ("input", "ref_semseg"):
            bad = {k: v.copy() for k, v in good.items()}
            bad[array][1, 0, :2, 0] = value
            f[f"npz_{name}_{array}"] = _evalset(root / f"{name}-{array}.npz", **bad)
    f["npz_strings"] = _evalset(root / "strings.npz", input=np.full((8, 3, 64, 64), "x"))
    f["npz_bytes"] = _evalset(root / "bytes.npz", input=np.full((8, 3, 64, 64), b"x"))
    f["npz_complex"] = _evalset(root / "complex.npz", input=np.zeros((8, 3, 64, 64), np.complex64))
    mixed = np.zeros((1, 3, 64, 64), np.float32)
    mixed[0, 0, 0, :4] = [np.nan, np.inf, np.inf, -np.inf]
    f["npz_mixed_input"] = _evalset(root / "mixed.npz", input=mixed)
    f["ckpt_copy"] = root / "checkpoint-copy"
    shutil.copytree(ort_build / "export", f.ckpt_copy)  # any directory: the flags conflict before it is read
    (root / "keep-none.txt").write_text("# globs\n/blocks.99/*\n")
    (root / "keep-role.json").write_text(json.dumps({"keep_fp32": {"model": ["/no/such/node"]}}))
    f["keep_txt"], f["keep_json"] = root / "keep-none.txt", root / "keep-role.json"
    return f


def _baseline(name: str):
    return lambda f, t: ["check", f.build, "--baseline", f[f"baseline_{name}"]]


def _npz_build(option: str, key: str, precision: str = "fp32"):
    return lambda f, t: ["build", FIXTURE, "--backend", "onnxruntime", "--precision", precision, option, f[key],
                         "--eval-samples", "2", "--out", t / "out"]


CASES = {
    # --- the gate: a baseline made with other settings does not apply (exit 3), naming the setting
    "check_raw_against_postprocessed_baseline": Case(X, lambda f, t: ["check", f.build, "--baseline",
                                                                      f.pp / "report.json"], 3, "post-processing"),
    "check_postprocessed_against_raw_baseline": Case(X, lambda f, t: ["check", f.pp, "--baseline",
                                                                      f.build / "report.json"], 3, "post-processing"),
    "check_other_eval_data_than_the_baseline": Case(X, lambda f, t: ["check", f.build, "--eval-data", "synthetic:train",
                                                                     "--baseline", f.build / "report.json"], 3,
                                                    "other evaluation data"),
    "check_other_tolerances_than_the_baseline": Case(X, lambda f, t: ["check", f.build, "--tolerances", f.tol_loose,
                                                                      "--baseline", f.build / "report.json"], 3,
                                                     "other tolerances"),
    "check_baseline_postprocessed": Case(X, _baseline("postprocessed"), 3, "other post-processing"),
    "check_baseline_other_layout": Case(X, _baseline("layout"), 3, "other layout"),
    "check_baseline_other_eval_inputs": Case(X, _baseline("eval_digest"), 3, "other evaluation data"),
    "check_baseline_other_eval_samples": Case(X, _baseline("eval_samples"), 3, "other evaluation data"),
    "check_baseline_other_eval_kind": Case(X, lambda f, t: ["check", f.build, "--baseline", f.baseline_eval_kind,
                                                            "--allow-other-model"], 3, "other evaluation data"),
    "check_baseline_other_size_allowed": Case(X, lambda f, t: ["check", f.build, "--baseline",
                                                               f.baseline_eval_kind_same, "--allow-other-model"], 0,
                                              "no regressions"),
    "check_baseline_other_tolerances": Case(X, _baseline("tolerances"), 3, "other tolerances"),
    "check_baseline_other_input_size": Case(X, _baseline("input_size"), 3, "other input size"),
    "check_baseline_other_tasks": Case(X, _baseline("tasks"), 3, "other tasks"),
    "check_baseline_without_layout": Case(X, _baseline("no_layout"), 3, "does not record its layout"),
    "check_baseline_without_evaluation_data": Case(X, _baseline("no_evaluation_data"), 3,
                                                   "does not record its evaluation data"),
    "check_baseline_without_tolerances": Case(X, _baseline("no_tolerances"), 3, "does not record its tolerances"),
    "check_other_model_allowed_keeps_settings": Case(X, lambda f, t: ["check", f.build, "--baseline",
                                                                      f.baseline_postprocessed, "--allow-other-model"],
                                                     3, "other post-processing"),
    # --- a non-finite number in a tolerance file (NaN: round two), each sign of infinity
    "build_tolerance_infinity": Case(X, lambda f, t: ["build", FIXTURE, "--tolerances", f.tol_inf, "--out", t / "out"],
                                     1, "inf is not a finite number", OUT),
    "check_tolerance_minus_infinity": Case(X, lambda f, t: ["check", f.build, "--tolerances", f.tol_neg_inf], 1,
                                           "-inf is not a finite number"),
    # --- evaluation and calibration sets with non-finite numbers or no numbers: refused before any work
    "build_eval_strings": Case(X, _npz_build("--eval-data", "npz_strings"), 1, "array 'input' holds <U1 values", OUT),
    "build_eval_bytes": Case(X, _npz_build("--eval-data", "npz_bytes"), 1, "array 'input' holds |S1 values", OUT),
    "build_eval_complex": Case(X, _npz_build("--eval-data", "npz_complex"), 1, "holds complex64 values", OUT),
    "build_calib_strings": Case(X, _npz_build("--calib-data", "npz_strings", "int8"), 1, "holds <U1 values", OUT),
    "check_eval_strings": Case(X, lambda f, t: ["check", f.build, "--eval-data", f.npz_strings], 1, "holds <U1"),
}
for _name, _label in (("nan", "2 NaN"), ("inf", "2 +Inf"), ("-inf", "2 -Inf")):
    for _array in ("input", "ref_semseg"):
        _key = f"npz_{_name}_{_array}"
        _what = f"array '{_array}' holds non-finite values ({_label} of"
        CASES[f"build_eval_{_name}_{_array}"] = Case(X, _npz_build("--eval-data", _key), 1, _what, OUT)
        CASES[f"check_eval_{_name}_{_array}"] = Case(X, lambda f, t, k=_key: ["check", f.build, "--eval-data", f[k]],
                                                     1, _what)
    CASES[f"build_calib_{_name}_input"] = Case(X, _npz_build("--calib-data", f"npz_{_name}_input", "int8"), 1,
                                               f"array 'input' holds non-finite values ({_label} of", OUT)
    for _field in ("cosine", "max_abs", "agreement", "check", "metric"):
        CASES[f"check_baseline_{_name}_{_field}"] = Case(X, _baseline(f"{_name}_{_field}"), 1,
                                                         "1 non-finite value(s) (NaN or Inf)")
CASES.update({
    # --- --keep-fp32 globs that match no node: usage errors naming the glob and the nearest node names
    "build_keep_fp32_matches_nothing": Case(X, lambda f, t: ["build", FIXTURE, "--backend", "onnxruntime", "--precision",
                                                             "fp16", "--keep-fp32", "/blocks.99/*", "--out", f.build],
                                            2, "--keep-fp32 '/blocks.99/*' matches no node"),
    "build_keep_fp32_file_matches_nothing": Case(X, lambda f, t: ["build", FIXTURE, "--backend", "onnxruntime",
                                                                  "--precision", "fp16", "--keep-fp32", f"@{f.keep_txt}",
                                                                  "--out", f.build], 2, "closest node names"),
    "build_keep_fp32_role_file_matches_nothing": Case(X, lambda f, t: ["build", FIXTURE, "--backend", "onnxruntime",
                                                                       "--precision", "fp16", "--keep-fp32",
                                                                       f"@{f.keep_json}", "--out", f.build],
                                                      2, "'/no/such/node' matches no node"),
    "build_keep_fp32_op_type_typo": Case(X, lambda f, t: ["build", FIXTURE, "--backend", "onnxruntime", "--precision",
                                                          "fp16", "--keep-fp32", "Softmx", "--out", f.build],
                                         2, "'Softmx' matches no node"),
    # --- usage errors are exit 2 everywhere, also those only the pipeline can see
    "build_auto_with_int8": Case(X, lambda f, t: ["build", FIXTURE, "--precision", "auto", "--precision", "int8",
                                                  "--out", t / "out"], 2, "give it alone", OUT),
    "build_part_precision_in_single_layout": Case(X, lambda f, t: ["build", FIXTURE, "--precision",
                                                                   "backbone=int8,heads=fp16", "--out", t / "out"],
                                                  2, "it needs --layout split", OUT),
    "merge_out_onto_the_checkpoint": Case(X, lambda f, t: ["merge", f.ckpt_copy, "--out", f.ckpt_copy], 2,
                                          "is the checkpoint itself"),
    "predict_npz_with_inf_and_nan": Case(M, lambda f, t: ["predict", FIXTURE, "--input", f.npz_mixed_input,
                                                          "--out", t / "out.npz"], 1,
                                         "holds NaN or Inf values (1 NaN, 2 +Inf, 1 -Inf of 12288)",
                                         lambda _f, t: t / "out.npz"),
    # --- a sidecar edited after the build
    "run_sidecar_precision_edited": Case(X, lambda f, t: ["run", f.root / "edited" / "engines" / "onnxruntime-fp32",
                                                          "--image", f.root / "img.png", "--out", t / "out.npz"],
                                         1, "precision_executed differ", lambda _f, t: t / "out.npz"),
})


@pytest.fixture(scope="module")
def prepared(inputs):
    from PIL import Image

    edited = inputs.root / "edited"
    if not edited.exists():
        shutil.copytree(inputs.build, edited)
        sidecar = edited / "engines" / "onnxruntime-fp32" / "model.fp32.onnx.json"
        data = json.loads(sidecar.read_text())
        data["precision_executed"] = "int8"
        sidecar.write_text(json.dumps(data))
        Image.new("RGB", (64, 64), (10, 120, 30)).save(inputs.root / "img.png")
    return inputs


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_round_three(name, prepared, tmp_path):
    case = CASES[name]
    code, output = invoke(case.cli, *case.args(prepared, tmp_path))
    assert "Traceback" not in output, output
    assert code == case.code, output
    lines = output.strip().splitlines()
    last = lines[-1]
    if code == 0:
        assert case.match in output, output
        return
    if code == 3:
        assert last.startswith("BASELINE DOES NOT APPLY: ") and case.match in last, output
        return
    assert last.startswith("Error: ") and case.match in (last if code == 1 else output), output
    assert len([line for line in lines if line.startswith("Error")]) == 1, output
    assert "RuntimeWarning" not in output, output
    out = case.out(prepared, tmp_path) if case.out else None
    if out is not None:
        assert not out.exists(), f"{out} left behind: {sorted(p.name for p in out.rglob('*'))}"


def test_the_settings_cases_fail_the_way_the_gate_must():
    codes = {c.code for c in CASES.values()}
    assert codes == {0, 1, 2, 3}
    assert sum(name.startswith("check_baseline_") for name in CASES) >= 25


def test_the_same_settings_still_pass(inputs):
    """The identity is stable: a check of the same build against its own report applies and passes."""
    code, output = invoke(X, "check", inputs.build, "--baseline", inputs.build / "report.json")
    assert code == 0 and "no regressions" in output, output


def test_keep_fp32_error_names_the_closest_nodes(inputs, tmp_path):
    code, output = invoke(X, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp16", "--keep-fp32",
                          "/blocks.0/mlp/fc2/MatMull", "--out", inputs.build)
    assert code == 2, output
    assert "'/blocks.0/mlp/fc2/MatMul'" in output.splitlines()[-1], output


# ----------------------------------------------------------------------------- library: non-finite data


@pytest.mark.parametrize(("value", "label"), [(np.nan, "1 NaN"), (np.inf, "1 +Inf"), (-np.inf, "1 -Inf")],
                         ids=NON_FINITE.keys())
def test_calibration_sets_refuse_non_finite_samples(value, label, tmp_path):
    arrays = np.zeros((8, 3, 4, 4), np.float32)
    arrays[3, 1, 2, 2] = value
    with pytest.raises(CalibrationError, match=re.escape(f"({label} of 384) in sample(s) 3")):
        CalibrationSet.from_arrays(arrays)
    with pytest.raises(CalibrationError, match=re.escape(f"feed 3, input 'image' holds non-finite values ({label}")):
        CalibrationSet.from_feeds([{"image": a[None]} for a in arrays])
    stream = CalibrationSet.from_source(lambda: ({"image": a[None]} for a in arrays), num_samples=8,
                                        input_names=["image"])
    with pytest.raises(CalibrationError, match=re.escape(f"feed 3, input 'image' holds non-finite values ({label}")):
        list(stream)
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(b"")
    images = CalibrationSet.from_images(paths, preprocess=lambda p: arrays[int(p.stem)])
    with pytest.raises(CalibrationError, match=re.escape(f"preprocess(3.png) holds non-finite values ({label}")):
        list(images)


def test_a_nan_reference_is_never_dropped_from_the_error():
    reference = {"sal": np.zeros((2, 1, 4, 4), np.float32)}
    reference["sal"][0, 0, 0, 0] = np.nan
    batch = EvalBatch(np.zeros((2, 3, 4, 4), np.float32), reference)
    check = check_engine(lambda feed: {"sal": np.zeros((2, 1, 4, 4), np.float32)}, [batch], {"sal": 1}, "fp32")
    tensor = check.tasks["sal"].tensor
    assert tensor.non_finite == 1 and tensor.max_abs == float("inf")
    assert not check.passed


# ----------------------------------------------------------------------------- sidecars


def test_every_sidecar_field_is_covered_by_the_build_record(ort_build, tmp_path):
    engine_dir = tmp_path / "engine"
    shutil.copytree(ort_build / "engines" / "onnxruntime-int8", engine_dir)
    sidecar = engine_dir / "model.int8.onnx.json"
    original = sidecar.read_text()
    fields = json.loads(original)
    assert {"precision_executed", "device", "metadata", "files", "outputs", "notes"} <= set(fields)
    for name, value in [*fields.items(), ("added", 1)]:
        data = json.loads(original)
        if name == "added":
            data[name] = value
        else:
            data[name] = {"edited": True} if not isinstance(value, str) else value + "-edited"
        sidecar.write_text(json.dumps(data))
        with pytest.raises(ExportError, match=f"field\\(s\\) {name} differ"):
            EngineSet.read(engine_dir).artifacts(verify=True)
        with pytest.raises(ExportError, match="the sidecar was edited"):
            open_engine(engine_dir).__enter__()
    sidecar.write_text(original)
    with open_engine(engine_dir) as engine:
        assert engine.precision_executed == fields["precision_executed"]


# ----------------------------------------------------------------------------- signals and exit codes


def _interruptible() -> None:
    # As a terminal starts a command: a shell without job control starts its `&` jobs with SIGINT ignored,
    # and Python keeps an ignored SIGINT ignored (right for `nohup`), so the suite run that way would
    # otherwise test nothing but that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
                            preexec_fn=_interruptible)


def _signal_when(process: subprocess.Popen, line_start: str, sig: int) -> list[str]:
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(line_start):
            process.send_signal(sig)
            break
    seen += process.stdout.readlines()
    process.wait(timeout=120)
    return seen


@pytest.mark.parametrize(("sig", "step"), [(signal.SIGTERM, "[onnxruntime-int8] preparing"),
                                           (signal.SIGINT, "[export] exporting")], ids=["SIGTERM", "SIGINT"])
def test_build_interrupted_by_a_signal_says_so_cleans_up_and_exits_with_its_code(sig, step, tmp_path, request):
    # The two signals share one handler; each is caught in another step, which covers two steps' clean-up.
    # Caught exporting: no step store, the export must be computed. Caught calibrating: the export may come
    # from the store, but no stored engine has these 9 calibration images, so it is calibrated here.
    if step.startswith("[export]"):
        request.getfixturevalue("no_step_store")
    out = tmp_path / "build"
    cli = Path(sys.executable).with_name("mtlora-export")
    process = _start([str(cli), "build", str(FIXTURE), "--backend", "onnxruntime", "--precision", "int8",
                      "--calib-samples", "9", "--eval-samples", "2", *engine_threads(), "--out", str(out)], ROOT)
    seen = _signal_when(process, step, sig)
    name = signal.Signals(sig).name
    assert process.returncode == EXIT_CODES[f"interrupted ({name})"] == 128 + sig, "".join(seen)
    assert seen[-1].strip() == f"Interrupted ({name}).", "".join(seen)
    assert "Traceback" not in "".join(seen)
    engines, export = out / "engines", out / "export"
    assert not engines.exists() or not any(engines.iterdir()), sorted(engines.rglob("*"))
    if step.startswith("[export]"):
        assert not export.exists() or not any(export.iterdir()), sorted(export.rglob("*"))
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))
                 or (p.name.startswith(".") and p.name not in (".step.json", ".lock"))]
    assert not leftovers, leftovers


def test_training_gets_sigterm_like_ctrl_c(tmp_path):
    cli = Path(sys.executable).with_name("mtlora")
    process = _start([str(cli), "train", "--preset", "default", "--img-size", "32", "--decoder-channels",
                      "8,16,32,64", "--epochs", "50", "--batch-size", "2", "--workers", "0", "--threads", "1",
                      "--data", "synthetic", "--train-samples", "8", "--val-samples", "2", "--out",
                      str(tmp_path / "run")], ROOT)
    seen = _signal_when(process, "epoch 1/50", signal.SIGTERM)
    assert process.returncode == 143, "".join(seen)
    assert seen[-1].strip() == "Interrupted (SIGTERM).", "".join(seen)


def test_the_exit_code_table_in_the_docs_is_the_code():
    text = (ROOT / "docs" / "reliability.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| ([^|]+?) \|", text, flags=re.M))
    assert {int(code) for code in rows} == set(EXIT_CODES.values()), rows
    for meaning, code in EXIT_CODES.items():
        assert meaning.split(" (")[0] in rows[str(code)].lower(), (meaning, rows[str(code)])


# ----------------------------------------------------------------------------- hints name the real cause


@pytest.mark.parametrize(("code", "hint"), [
    (errno.ENOSPC, "free some space"), (errno.EACCES, "permissions"), (errno.EROFS, "read-only"),
    (errno.EIO, "I/O error"), (errno.EDQUOT, "quota"), (errno.ENAMETOOLONG, "shorter path"),
])
def test_os_error_hints_name_the_real_cause(code, hint, tmp_path, monkeypatch):
    line = describe_unexpected(OSError(code, os.strerror(code), str(tmp_path / "x")))
    assert hint in line and os.strerror(code) in line, line
    space = code in (errno.ENOSPC, errno.EDQUOT)  # the two causes that freeing space cures
    assert space or "free some space" not in line

    import mtlora.fileio
    from export.artifacts.files import write_bytes_atomic

    real_fdopen = os.fdopen

    def failing(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        handle.write = lambda _data: (_ for _ in ()).throw(OSError(code, os.strerror(code)))
        return handle

    monkeypatch.setattr(mtlora.fileio.os, "fdopen", failing)
    with pytest.raises(ExportError) as caught:
        write_bytes_atomic(tmp_path / "picture.png", b"x")
    assert hint in str(caught.value) and (space or "free some space" not in str(caught.value))
    assert not list(tmp_path.iterdir())


def test_lint_names_a_missing_external_data_file(ort_build, tmp_path):
    import onnx

    model = onnx.load(str(ort_build / "export" / "model.onnx"))
    onnx.save(model, str(tmp_path / "big.onnx"), save_as_external_data=True, location="big.onnx.weights",
              size_threshold=0)
    (tmp_path / "big.onnx.weights").unlink()
    code, output = invoke(X, "lint", tmp_path / "big.onnx")
    assert code == 1 and "Traceback" not in output, output
    assert output.strip().splitlines()[-1].startswith("Error: ") and "big.onnx.weights are missing" in output, output


@pytest.mark.parametrize("bad", [{"batch_sizes": (0,)}, {"runs": 0}, {"warmup": -1}, {"threads": 0}],
                         ids=["batch", "runs", "warmup", "threads"])
def test_option_checks_below_the_cli_are_usage_errors(bad):
    """What only the library can check about flags is still a usage error (exit 2 at either CLI)."""
    from export.bench.options import BenchOptions
    from mtlora.errors import OptionError

    with pytest.raises(OptionError):
        BenchOptions(**bad)
