"""Hostile and malformed input, one table: every bad input to `mtlora` and `mtlora-export` gets one clear
line ("Error: ..." or click's usage error, no traceback), exit code 1 (our errors) or 2 (usage errors), and
leaves nothing at the output path. Odd but valid images (grayscale, CMYK, 16-bit) must work."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export.cli import main as export_cli
from mtlora.cli import main as mtlora_cli
from tests.conftest import FIXTURE, invoke
from tests.test_preprocess import _write_png_rgb16

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


class Inputs(dict):
    """name -> path of every prepared input; attribute access for the table's lambdas."""

    __getattr__ = dict.__getitem__


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (a decompression bomb's header, without the bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _reseal(engine_dir: Path) -> None:
    """Make engine.json vouch for the sidecars as they are now, as a build that wrote them would have."""
    from export.artifacts.engineset import EngineSet

    EngineSet.read(engine_dir).save()


def _rehash(engine_dir: Path, name: str) -> None:
    """Make the sidecar vouch for the engine file as it is now (so only the loader stands in the way)."""
    sidecar = engine_dir / f"{name}.json"
    data = json.loads(sidecar.read_text())
    data["files"][name] = hashlib.sha256((engine_dir / name).read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(data))
    _reseal(engine_dir)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ort_build) -> Inputs:
    import shutil

    from mtlora.adapters import adapter_layers
    from mtlora.checkpoint import save_checkpoint
    from mtlora.upstream import import_upstream

    root = tmp_path_factory.mktemp("hostile")
    f = Inputs(root=root)
    model = import_upstream(FIXTURE)
    f["ckpt"] = save_checkpoint(model, root / "ckpt")
    name, layer = adapter_layers(model)[0]
    with torch.no_grad():
        nan = import_upstream(FIXTURE)
        dict(adapter_layers(nan))[name].lora_A["shared"].view(-1)[0] = float("nan")
        f["nan_ckpt"] = save_checkpoint(nan, root / "nan-adapter")
        inf = import_upstream(FIXTURE)
        dict(adapter_layers(inf))[name].base.weight.view(-1)[0] = float("inf")
        f["inf_ckpt"] = save_checkpoint(inf, root / "inf-weight")
    data = FIXTURE.read_bytes()
    (root / "truncated.pth").write_bytes(data[: len(data) // 3])
    f["truncated_pth"] = root / "truncated.pth"
    (root / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    f["random_pth"] = root / "random.pth"
    for kind in ("weights", "config"):
        damaged = root / f"damaged-{kind}"
        shutil.copytree(f.ckpt, damaged)
        if kind == "weights":
            target = damaged / "model.safetensors"
            target.write_bytes(target.read_bytes()[:5000])
        else:
            (damaged / "config.json").write_text('{"swin": ')
        f[f"damaged_{kind}"] = damaged
    np.savez(root / "shape.npz", input=np.zeros((1, 3, 32, 32), np.float32))
    np.savez(root / "dtype.npz", input=np.full((1, 3, 64, 64), "x"))
    np.savez(root / "nokey.npz", image=np.zeros((1, 3, 64, 64), np.float32))
    for name in ("shape", "dtype", "nokey"):
        f[f"{name}_npz"] = root / f"{name}.npz"
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is not an image\n")
    _png_claiming(root / "bomb.png", 100_000, 100_000)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "good.jpg", quality=90)
    (root / "truncated.jpg").write_bytes((root / "good.jpg").read_bytes()[:300])
    Image.fromarray(np.arange(48 * 40, dtype=np.uint8).reshape(48, 40), mode="L").save(root / "gray.png")
    Image.new("CMYK", (50, 30), (0, 128, 255, 20)).save(root / "cmyk.jpg")
    _write_png_rgb16(root / "rgb16.png", np.random.default_rng(1).integers(0, 65535, (30, 40, 3)))
    for name in ("empty.png", "text.png", "bomb.png", "truncated.jpg", "gray.png", "cmyk.jpg", "rgb16.png"):
        f[name.replace(".", "_")] = root / name
    (root / "no-images").mkdir()
    (root / "no-images" / "notes.txt").write_text("no images here")
    (root / "three-images").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 80, 0, 0)).save(root / "three-images" / f"{i}.png")
    f["no_images"], f["three_images"] = root / "no-images", root / "three-images"
    (root / "a-file").write_text("a regular file, not a directory")
    f["file"] = root / "a-file"
    (root / "tolerances.json").write_text("{not json")
    f["bad_tolerances"] = root / "tolerances.json"
    (root / "empty-dir").mkdir()
    f["empty_dir"] = root / "empty-dir"
    # Damaged copies of the shared build.
    for kind in ("onnx", "engine", "garbage"):
        shutil.copytree(ort_build, root / f"build-{kind}")
        f[f"build_{kind}"] = root / f"build-{kind}"
    model_onnx = f.build_onnx / "export" / "model.onnx"
    model_onnx.write_bytes(model_onnx.read_bytes()[:1000])
    engine = f.build_engine / "engines" / "onnxruntime-fp32" / "model.fp32.onnx"
    engine.write_bytes(engine.read_bytes()[:1000])
    garbage = f.build_garbage / "engines" / "onnxruntime-fp32"
    (garbage / "model.fp32.onnx").write_bytes(b"\x08\x07garbage that is no protobuf" * 10)
    _rehash(garbage, "model.fp32.onnx")
    _round_two(f, root, ort_build)
    return f


def _round_two(f: Inputs, root: Path, ort_build: Path) -> None:
    """The inputs of the second round: sizes, tolerance files, baselines, foreign engines, odd images, links."""
    import shutil

    huge = root / "huge-input"
    shutil.copytree(f.ckpt, huge)
    config = json.loads((huge / "config.json").read_text())
    config["swin"]["img_size"] = 10_000_000
    (huge / "config.json").write_text(json.dumps(config))
    f["huge_ckpt"] = huge
    tolerance_files = {
        "list": [1, 2], "negative": {"fp32": {"*": {"max_abs": -1}}}, "nan": '{"fp32": {"*": {"max_abs": NaN}}}',
        "true": {"fp32": {"*": {"max_abs": True}}}, "cosine": {"int8": {"*": {"min_cosine": -5}}},
        "typo": {"fp16": {"semsg": {"max_metric_drop": 0.1}}}, "absent": {"fp16": {"depth": {"max_metric_drop": 0.1}}},
        "wrong_kind": {"fp16": {"semseg": {"max_angle_deg": 1}}},
    }
    for name, content in tolerance_files.items():
        path = root / f"tolerances-{name}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        f[f"tol_{name}"] = path
    report = json.loads((ort_build / "report.json").read_text())
    for name, edit in {
        "no_tasks": lambda r: [e.pop("tasks") for e in r["engines"]],
        "no_tensor": lambda r: [t.pop("tensor") for e in r["engines"] for t in e["tasks"].values()],
        "empty": lambda r: r.update(engines=[]),
        "other_weights": lambda r: r["identity"].update(source_sha256="0" * 64),
        "other_classes": lambda r: r["identity"]["output_channels"].update(semseg=40),
        "no_identity": lambda r: r.pop("identity"),
    }.items():
        stored = json.loads(json.dumps(report))
        edit(stored)
        (root / f"baseline-{name}.json").write_text(json.dumps(stored))
        f[f"baseline_{name}"] = root / f"baseline-{name}.json"
    # Engine directories whose engine and sidecar come from another model: other task names, other classes.
    for name, edit in {"renamed": lambda out: out.update(name="edge"), "classes": lambda out: out["shape"].__setitem__(1, 6)}.items():
        engine_dir = root / f"foreign-{name}"
        shutil.copytree(ort_build / "engines" / "onnxruntime-fp32", engine_dir)
        sidecar = engine_dir / "model.fp32.onnx.json"
        data = json.loads(sidecar.read_text())
        edit(next(o for o in data["outputs"] if o["name"] == "semseg"))
        sidecar.write_text(json.dumps(data))
        _reseal(engine_dir)  # an engine built for another model: its own build vouched for its sidecar
        f[f"foreign_{name}"] = engine_dir
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "tiny.png")
    f["tiny_png"] = root / "tiny.png"
    odd = root / "odd\nname.png"
    Image.new("RGB", (64, 64), (0, 90, 0)).save(odd, format="PNG")
    f["odd_name_png"] = odd


@dataclass(frozen=True)
class Case:
    cli: object
    args: Callable[[Inputs, Path], list]
    code: int  # 0: must work; 1: our error; 2: click usage error; 3: a baseline that does not apply
    match: str  # in the error line (or in the output of a case that works)
    out: Callable[[Inputs, Path], Path] | None = None  # the output path: absent after an error, present after success
    skip: str | None = None


M, X = mtlora_cli, export_cli
OUT = lambda _f, t: t / "out"  # noqa: E731
NPZ = lambda _f, t: t / "out.npz"  # noqa: E731
ORT_FP32 = lambda f: f.build_engine.parent / "build-ok"  # noqa: E731

CASES = {
    # --- checkpoints: truncated, corrupt, not a checkpoint
    "import_truncated_pth": Case(M, lambda f, t: ["import-upstream", f.truncated_pth, "--out", t / "out"], 1,
                                 "truncated.pth", OUT),
    "import_random_bytes": Case(M, lambda f, t: ["import-upstream", f.random_pth, "--out", t / "out"], 1,
                                "not a PyTorch checkpoint", OUT),
    "info_missing_checkpoint": Case(M, lambda f, t: ["info", t / "nope"], 1, "no such checkpoint"),
    "predict_truncated_weights": Case(M, lambda f, t: ["predict", f.damaged_weights, "--input", f.gray_png,
                                                       "--out", t / "out.npz"], 1, "corrupt or truncated weights", NPZ),
    "predict_corrupt_config": Case(M, lambda f, t: ["predict", f.damaged_config, "--input", f.gray_png,
                                                    "--out", t / "out.npz"], 1, "not valid JSON", NPZ),
    "onnx_truncated_checkpoint": Case(X, lambda f, t: ["onnx", f.truncated_pth, "--out", t / "out"], 1,
                                      "truncated.pth", OUT),
    # --- NaN / Inf weights: the safe merge refuses them
    "merge_nan_in_adapter": Case(X, lambda f, t: ["merge", f.nan_ckpt, "--out", t / "out"], 1, "NaN or Inf", OUT),
    "merge_inf_in_weight": Case(X, lambda f, t: ["merge", f.inf_ckpt, "--out", t / "out"], 1, "NaN or Inf", OUT),
    "onnx_nan_in_adapter": Case(X, lambda f, t: ["onnx", f.nan_ckpt, "--out", t / "out"], 1, "NaN or Inf", OUT),
    # --- wrong shapes, dtypes, task names
    "predict_npz_wrong_shape": Case(M, lambda f, t: ["predict", f.ckpt, "--input", f.shape_npz, "--out", t / "out.npz"],
                                    1, "the model expects (N, 3, 64, 64)", NPZ),
    "predict_npz_wrong_dtype": Case(M, lambda f, t: ["predict", f.ckpt, "--input", f.dtype_npz, "--out", t / "out.npz"],
                                    1, "has dtype <U1", NPZ),
    "predict_npz_without_input": Case(M, lambda f, t: ["predict", f.ckpt, "--input", f.nokey_npz,
                                                       "--out", t / "out.npz"], 1, "has no 'input' array", NPZ),
    "onnx_unknown_task": Case(X, lambda f, t: ["onnx", f.ckpt, "--tasks", "semseg,depth", "--out", t / "out"], 1,
                              "task(s) depth not in the model", OUT),
    "onnx_empty_task_name": Case(X, lambda f, t: ["onnx", f.ckpt, "--tasks", "semseg,", "--out", t / "out"], 2,
                                 "empty task name", OUT),
    "onnx_input_size_off_the_grid": Case(X, lambda f, t: ["onnx", f.ckpt, "--img-size", "65", "--out", t / "out"], 1,
                                         "65", OUT),
    "build_unknown_task": Case(X, lambda f, t: ["build", f.ckpt, "--tasks", "nope", "--out", t / "out"], 1,
                               "task(s) nope not in the model", OUT),
    "evaluate_heads_do_not_fit_the_data": Case(M, lambda f, t: ["evaluate", f.ckpt, "--data", "synthetic",
                                                                "--samples", "2", "--json", t / "out.json"], 1,
                                               "heads do not fit the data set", lambda _f, t: t / "out.json"),
    # --- images: empty, huge, truncated, not an image; odd but valid ones work
    "predict_empty_image": Case(M, lambda f, t: ["predict", f.ckpt, "--input", f.empty_png, "--out", t / "out.npz"],
                                1, "image file is empty", NPZ),
    "predict_not_an_image": Case(M, lambda f, t: ["predict", f.ckpt, "--input", f.text_png, "--out", t / "out.npz"],
                                 1, "not an image", NPZ),
    "predict_decompression_bomb": Case(M, lambda f, t: ["predict", f.ckpt, "--input", f.bomb_png,
                                                        "--out", t / "out.npz"], 1, "decompression bomb", NPZ),
    "predict_truncated_jpeg": Case(M, lambda f, t: ["predict", f.ckpt, "--input", f.truncated_jpg,
                                                    "--out", t / "out.npz"], 1, "corrupt or truncated", NPZ),
    "run_not_an_image": Case(X, lambda f, t: ["run", ORT_FP32(f) / "engines" / "onnxruntime-fp32", "--image",
                                              f.text_png, "--out", t / "out.npz"], 1, "not an image", NPZ),
    "predict_grayscale_works": Case(M, lambda f, t: ["predict", f.ckpt, "--input", f.gray_png, "--out", t / "out.npz"],
                                    0, "semseg (1, 21, 64, 64)", NPZ),
    "predict_cmyk_works": Case(M, lambda f, t: ["predict", f.ckpt, "--input", f.cmyk_jpg, "--out", t / "out.npz"],
                               0, "semseg (1, 21, 64, 64)", NPZ),
    "predict_16bit_works": Case(M, lambda f, t: ["predict", f.ckpt, "--input", f.rgb16_png, "--out", t / "out.npz"],
                                0, "semseg (1, 21, 64, 64)", NPZ),
    "run_grayscale_cmyk_16bit_work": Case(X, lambda f, t: ["run", ORT_FP32(f) / "engines" / "onnxruntime-fp32",
                                                           "--image", f.gray_png, "--image", f.cmyk_jpg,
                                                           "--image", f.rgb16_png, "--out", t / "out.npz"],
                                          0, "3 image(s)", NPZ),
    # --- ONNX files and engines: truncated, corrupt
    "check_truncated_onnx": Case(X, lambda f, t: ["check", f.build_onnx], 1, "model.onnx is truncated"),
    "run_truncated_engine": Case(X, lambda f, t: ["run", f.build_engine / "engines" / "onnxruntime-fp32",
                                                  "--image", f.gray_png, "--out", t / "out.npz"], 1,
                                 "was modified", NPZ),
    "run_corrupt_engine_with_matching_hash": Case(X, lambda f, t: ["run", f.build_garbage / "engines" / "onnxruntime-fp32",
                                                                   "--image", f.gray_png, "--out", t / "out.npz"], 1,
                                                  "model.fp32.onnx", NPZ),
    "check_not_a_build": Case(X, lambda f, t: ["check", f.empty_dir], 1, "no build.json"),
    "bundle_not_a_build": Case(X, lambda f, t: ["bundle", f.empty_dir, "--out", t / "out"], 1,
                               "not a build directory", OUT),
    # --- calibration sets: empty, too small
    "build_calibration_dir_without_images": Case(X, lambda f, t: ["build", f.ckpt, "--backend", "onnxruntime",
                                                                  "--precision", "int8", "--calib-data", f.no_images,
                                                                  "--out", t / "out"], 1, "contains no image files", OUT),
    "build_calibration_dir_too_small": Case(X, lambda f, t: ["build", f.ckpt, "--backend", "onnxruntime",
                                                             "--precision", "int8", "--calib-data", f.three_images,
                                                             "--out", t / "out"], 1, "at least 8 samples, got 3", OUT),
    "build_calib_samples_too_few": Case(X, lambda f, t: ["build", f.ckpt, "--backend", "onnxruntime",
                                                         "--precision", "int8", "--calib-samples", "3",
                                                         "--out", t / "out"], 1, "--calib-samples 3", OUT),
    "build_calib_samples_zero": Case(X, lambda f, t: ["build", f.ckpt, "--calib-samples", "0", "--out", t / "out"], 2,
                                     "--calib-samples", OUT),
    # --- unwritable outputs
    "predict_out_under_a_file": Case(M, lambda f, t: ["predict", f.ckpt, "--input", f.gray_png,
                                                      "--out", f.file / "out.npz"], 1, "cannot create its directory"),
    "onnx_out_under_a_file": Case(X, lambda f, t: ["onnx", f.ckpt, "--out", f.file / "export"], 1, "cannot write here"),
    "merge_out_under_a_file": Case(X, lambda f, t: ["merge", f.ckpt, "--out", f.file / "merged"], 1, "cannot write here"),
    "build_out_under_a_file": Case(X, lambda f, t: ["build", f.ckpt, "--out", f.file / "build"], 1,
                                   "cannot create the build directory"),
    "build_out_is_a_file": Case(X, lambda f, t: ["build", f.ckpt, "--out", f.file], 1, "exists and is not a directory"),
    "onnx_read_only_directory": Case(X, lambda f, t: ["onnx", f.ckpt, "--out", t / "read-only" / "export"], 1,
                                     "Permission denied",
                                     skip="tests run as root here, and root writes into a 0o500 directory anyway; "
                                          "the rows '*_under_a_file' cover unwritable output paths" if IS_ROOT else None),
    # --- conflicting and invalid flags
    "build_checkpoint_and_bundle": Case(X, lambda f, t: ["build", f.ckpt, "--from-bundle", f.empty_dir,
                                                         "--out", t / "out"], 2, "not both", OUT),
    "build_bf16_on_onnxruntime": Case(X, lambda f, t: ["build", f.ckpt, "--backend", "onnxruntime", "--precision",
                                                       "bf16", "--out", t / "out"], 1, "cannot build precision 'bf16'", OUT),
    "build_corrupt_tolerances": Case(X, lambda f, t: ["build", f.ckpt, "--tolerances", f.bad_tolerances,
                                                      "--out", t / "out"], 1, "tolerance file is not valid JSON", OUT),
    "train_resume_and_pretrained": Case(M, lambda f, t: ["train", "--resume", f.ckpt, "--pretrained", f.random_pth,
                                                         "--out", t / "out"], 2, "cannot be combined with --resume", OUT),
    "evaluate_synthetic_with_data_root": Case(M, lambda f, t: ["evaluate", f.ckpt, "--data", "synthetic",
                                                               "--data-root", f.empty_dir], 2, "takes no data root"),
    "bench_build_flags_on_a_build_dir": Case(X, lambda f, t: ["bench", ORT_FP32(f), "--calib-samples", "9"], 2,
                                             "applies only when building"),
    "predict_out_not_npz": Case(M, lambda f, t: ["predict", f.ckpt, "--input", f.gray_png, "--out", t / "out.png"], 2,
                                "must end in .npz", lambda _f, t: t / "out.png"),
    "run_out_not_npz": Case(X, lambda f, t: ["run", ORT_FP32(f) / "engines" / "onnxruntime-fp32", "--image", f.gray_png,
                                             "--out", t / "out.png"], 2, "must end in .npz", lambda _f, t: t / "out.png"),
    # --- round two: sizes that would allocate terabytes are refused before any model is built
    "info_huge_input_size": Case(M, lambda f, t: ["info", f.huge_ckpt], 1, "input size 10000000 is far too large"),
    "predict_huge_input_size": Case(M, lambda f, t: ["predict", f.huge_ckpt, "--input", f.gray_png,
                                                     "--out", t / "out.npz"], 1, "far too large", NPZ),
    "build_huge_input_size": Case(X, lambda f, t: ["build", f.huge_ckpt, "--backend", "onnxruntime", "--precision",
                                                   "fp32", "--out", t / "out"], 1, "far too large", OUT),
    "info_input_size_zero": Case(M, lambda f, t: ["info", "--img-size", "0"], 2, "0 is not in the range x>=1"),
    "onnx_input_size_negative": Case(X, lambda f, t: ["onnx", f.ckpt, "--img-size", "-64", "--out", t / "out"], 2,
                                     "-64 is not in the range x>=1", OUT),
    "build_input_size_zero": Case(X, lambda f, t: ["build", f.ckpt, "--img-size", "0", "--out", t / "out"], 2,
                                  "--img-size", OUT),
    "info_truncated_weights": Case(M, lambda f, t: ["info", f.damaged_weights], 1, "corrupt or truncated weights"),
    # --- tolerance files: a schema, and the model's tasks
    "check_tolerances_a_list": Case(X, lambda f, t: ["check", ORT_FP32(f), "--tolerances", f.tol_list], 1,
                                    "must be a JSON object"),
    "build_tolerances_a_list": Case(X, lambda f, t: ["build", f.ckpt, "--tolerances", f.tol_list, "--out", t / "out"],
                                    1, "must be a JSON object", OUT),
    "build_tolerance_negative": Case(X, lambda f, t: ["build", f.ckpt, "--tolerances", f.tol_negative,
                                                      "--out", t / "out"], 1, "max_abs: -1 is outside", OUT),
    "build_tolerance_nan": Case(X, lambda f, t: ["build", f.ckpt, "--tolerances", f.tol_nan, "--out", t / "out"], 1,
                                "is not a finite number", OUT),
    "build_tolerance_true": Case(X, lambda f, t: ["build", f.ckpt, "--tolerances", f.tol_true, "--out", t / "out"], 1,
                                 "True is not a finite number", OUT),
    "build_tolerance_cosine_below_minus_one": Case(X, lambda f, t: ["build", f.ckpt, "--tolerances", f.tol_cosine,
                                                                    "--out", t / "out"], 1, "min_cosine: -5 is outside",
                                                   OUT),
    "build_tolerance_task_typo": Case(X, lambda f, t: ["build", f.ckpt, "--tolerances", f.tol_typo, "--out", t / "out"],
                                      1, "fp16.semsg: unknown task", OUT),
    "check_tolerance_task_the_model_lacks": Case(X, lambda f, t: ["check", ORT_FP32(f), "--tolerances", f.tol_absent],
                                                 1, "sets limits for depth, which the model does not have"),
    "build_tolerance_for_another_kind": Case(X, lambda f, t: ["build", f.ckpt, "--tolerances", f.tol_wrong_kind,
                                                              "--out", t / "out"], 1,
                                             "max_angle_deg cannot apply to a class map task", OUT),
    # --- the CI gate: a malformed, empty or foreign baseline never passes
    "check_baseline_without_tasks": Case(X, lambda f, t: ["check", ORT_FP32(f), "--baseline", f.baseline_no_tasks], 1,
                                         "field engines[0].tasks is missing"),
    "check_baseline_without_tensor": Case(X, lambda f, t: ["check", ORT_FP32(f), "--baseline", f.baseline_no_tensor],
                                          1, "tasks.human_parts.tensor is missing"),
    "check_baseline_of_other_weights": Case(X, lambda f, t: ["check", ORT_FP32(f), "--baseline",
                                                             f.baseline_other_weights], 3, "other weights"),
    "check_baseline_of_other_classes": Case(X, lambda f, t: ["check", ORT_FP32(f), "--baseline",
                                                             f.baseline_other_classes], 3, "other output channels"),
    "check_baseline_without_identity": Case(X, lambda f, t: ["check", ORT_FP32(f), "--baseline",
                                                             f.baseline_no_identity], 3, "does not say which model"),
    "check_baseline_with_no_engines": Case(X, lambda f, t: ["check", ORT_FP32(f), "--baseline", f.baseline_empty], 3,
                                           "nothing was compared"),
    "check_other_model_allowed": Case(X, lambda f, t: ["check", ORT_FP32(f), "--baseline", f.baseline_other_weights,
                                                       "--allow-other-model"], 0, "no regressions"),
    # --- engines that belong to another model, and odd images for run
    "run_engine_of_other_tasks": Case(X, lambda f, t: ["run", f.foreign_renamed, "--image", f.gray_png,
                                                       "--out", t / "out.npz"], 1, "belongs to another model", NPZ),
    "run_engine_of_other_classes": Case(X, lambda f, t: ["run", f.foreign_classes, "--image", f.gray_png,
                                                         "--out", t / "out.npz"], 1, "belongs to another model", NPZ),
    "run_one_pixel_image": Case(X, lambda f, t: ["run", ORT_FP32(f) / "engines" / "onnxruntime-fp32", "--image",
                                                 f.tiny_png, "--out", t / "out.npz"], 1, "1x1 pixels is too small", NPZ),
    "run_image_is_a_directory": Case(X, lambda f, t: ["run", ORT_FP32(f) / "engines" / "onnxruntime-fp32", "--image",
                                                      f.empty_dir, "--out", t / "out.npz"], 1, "is a directory", NPZ),
}


@pytest.fixture(scope="module")
def prepared(inputs, ort_build):
    import shutil

    ok = ORT_FP32(inputs)
    if not ok.exists():
        shutil.copytree(ort_build, ok)
    return inputs


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input(name, prepared, tmp_path):
    case = CASES[name]
    if case.skip:
        pytest.skip(case.skip)
    (tmp_path / "read-only").mkdir(mode=0o500)
    code, output = invoke(case.cli, *case.args(prepared, tmp_path))
    assert "Traceback" not in output, output
    assert code == case.code, output
    out = case.out(prepared, tmp_path) if case.out else None
    if code == 0:
        assert case.match in output, output
        assert out is None or out.exists()
        return
    lines = output.strip().splitlines()
    last = lines[-1]
    if code == 3:
        assert last.startswith("BASELINE DOES NOT APPLY: ") and case.match in last, output
        return
    assert last.startswith("Error: "), output
    assert case.match in (last if code == 1 else output), output
    if code == 1:
        assert len([line for line in lines if line.startswith("Error")]) == 1, output
    if out is not None:
        assert not out.exists(), f"{out} left behind"
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "staging left behind"


def test_the_table_is_big_enough():
    assert len(CASES) >= 30
    assert {c.code for c in CASES.values()} == {0, 1, 2, 3}
