"""Calibration: data sets, the Q/DQ and fp16 graphs (checked structurally), and the cache."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibration.cache import MANIFEST, CalibrationCache, cache_key
from calibration.data import MIN_SAMPLES, CalibrationSet
from calibration.errors import CalibrationError
from calibration.fp16 import check_fp16_graph, output_layer_nodes, to_fp16_graph
from calibration.prepare import PreparedGraph, prepare_graph
from calibration.qdq import RESULT_NAME, check_qdq_conventions, excluded_nodes, quantize_qdq
from engines.errors import EngineError
from engines.files import sha256_file
from engines.graph_purpose import ENGINES_KEY, TENSORRT_TAKES_KEY
from tests.engine_fixtures import relative_error, smooth_images

# The shared fixtures: tiny_onnx, test_batch, reference, calibration_set, qdq_onnx.
pytest_plugins = ("tests.engine_fixtures",)

Image = pytest.importorskip("PIL.Image")


# ----------------------------------------------------------------------------- calibration data


def load_image(path, size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> np.ndarray:
    """Stands in for the model package's numpy preprocessing: RGB, resize, normalise, CHW."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB").resize(size[::-1]), dtype=np.float32) / 255.0
    return ((rgb - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1).copy()


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        folder = root / "sub" if i % 3 == 0 else root
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_from_images_streams_and_is_reiterable(image_dir):
    calib = CalibrationSet.from_images(image_dir, preprocess=load_image, size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert len(calib) == 12 and calib.num_samples == 12 and calib.input_names == ("image",)
    first, second = list(calib), list(calib)
    assert len(first) == 12 and first[0]["image"].shape == (1, 3, 32, 32) and first[0]["image"].dtype == np.float32
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, second, strict=True))
    batched = CalibrationSet.from_images(image_dir, preprocess=load_image, size=(32, 32), batch_size=5)
    assert len(batched) == 3 and [f["image"].shape[0] for f in batched] == [5, 5, 2]
    assert CalibrationSet.from_images(image_dir, preprocess=load_image, limit=8).num_samples == 8


def test_fingerprint_is_stable_and_sensitive(image_dir):
    def make(**kwargs):
        args = {"preprocess": load_image, "size": (32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3, **kwargs}
        return CalibrationSet.from_images(image_dir, **args).fingerprint()

    base = make()
    assert base == make() and len(base) == 64
    assert make(mean=(0.4, 0.5, 0.5)) != base
    assert make(preprocess=functools.partial(load_image, size=(32, 32))) != base
    assert make(limit=10) != base
    with (image_dir / "img_01.png").open("ab") as f:
        f.write(b"\0")  # same pixels for PIL, different bytes
    assert make() != base
    arrays = smooth_images(8, seed=3)
    assert CalibrationSet.from_arrays(arrays).fingerprint() == CalibrationSet.from_arrays(arrays.copy()).fingerprint()
    assert CalibrationSet.from_arrays(arrays).fingerprint() != CalibrationSet.from_arrays(arrays[::-1].copy()).fingerprint()


def test_from_images_errors(tmp_path, image_dir):
    with pytest.raises(CalibrationError, match="does not exist"):
        CalibrationSet.from_images(tmp_path / "missing", preprocess=load_image)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="is empty"):
        CalibrationSet.from_images(tmp_path / "empty", preprocess=load_image)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(CalibrationError, match="no image files"):
        CalibrationSet.from_images(tmp_path / "text", preprocess=load_image)
    few = sorted(image_dir.glob("*.png"))[:3]
    with pytest.raises(CalibrationError, match=f"only 3 images.*at least {MIN_SAMPLES}.*min_samples=3"):
        CalibrationSet.from_images(few, preprocess=load_image)
    assert len(CalibrationSet.from_images(few, preprocess=load_image, min_samples=3)) == 3
    with pytest.raises(CalibrationError, match="preprocess=callable"):
        CalibrationSet.from_images(image_dir, preprocess=None)
    wrong_size = CalibrationSet.from_images(image_dir, preprocess=load_image, size=(64, 64))
    with pytest.raises(CalibrationError, match=r"returned shape \(3, 32, 32\), expected \(3, 64, 64\)"):
        next(iter(wrong_size))
    as_double = CalibrationSet.from_images(image_dir, preprocess=lambda p: load_image(p).astype(np.float64))
    with pytest.raises(CalibrationError, match="float64, expected float32"):
        next(iter(as_double))
    (image_dir / "broken.jpg").write_bytes(b"not a jpeg")
    broken = CalibrationSet.from_images(image_dir, preprocess=load_image)
    with pytest.raises(CalibrationError, match="could not preprocess calibration image .*broken.jpg"):
        list(broken)
    assert issubclass(CalibrationError, EngineError)


def test_from_arrays_and_feeds():
    arrays = smooth_images(10, seed=4)
    assert len(CalibrationSet.from_arrays(arrays, batch_size=4)) == 3
    multi = CalibrationSet.from_arrays({"tokens": arrays[:, 0], "mask": arrays[:, 1]})
    assert multi.input_names == ("tokens", "mask") and next(iter(multi))["mask"].shape == (1, 32, 32)
    with pytest.raises(CalibrationError, match="float64"):
        CalibrationSet.from_arrays(arrays.astype(np.float64))
    with pytest.raises(CalibrationError, match="different numbers of samples"):
        CalibrationSet.from_arrays({"a": arrays, "b": arrays[:5]})
    generator = ({"image": a[None]} for a in arrays)
    feeds = CalibrationSet.from_feeds(generator)
    assert len(list(feeds)) == len(list(feeds)) == 10  # a one-shot generator became re-iterable
    with pytest.raises(CalibrationError, match="has inputs"):
        CalibrationSet.from_feeds([{"image": arrays[:1]}] * 8 + [{"img": arrays[:1]}])
    with pytest.raises(CalibrationError, match="only 2 calibration feeds"):
        CalibrationSet.from_feeds([{"image": arrays[:1]}] * 2)


# ----------------------------------------------------------------------------- Q/DQ graph


def _initializers(model) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_qdq_graph_follows_tensorrt_conventions(qdq_onnx):
    model = onnx.load(str(qdq_onnx))
    assert check_qdq_conventions(model) == []
    values = _initializers(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(values[n.input[2]].dtype == np.int8 and not values[n.input[2]].any() for n in qdq)
    weight_dqs = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in values]
    assert len(weight_dqs) == 5  # stem conv + qkv, proj, fc1, fc2; the heads stay float
    for dq in weight_dqs:
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert values[dq.input[1]].shape == (values[dq.input[0]].shape[axis],)
    for node in model.graph.node:
        inputs_from = {producer[t].op_type for t in node.input if t in producer}
        if node.op_type in ("LayerNormalization", "Softmax", "Erf") or node.name in output_layer_nodes(model):
            assert "DequantizeLinear" not in inputs_from, node.name
    heads = [n for n in model.graph.node if n.op_type == "Conv" and "heads" in n.name]
    assert len(heads) == 2 and all(h.input[1] in values and values[h.input[1]].dtype == np.float32 for h in heads)
    residuals = [n for n in model.graph.node if n.name in ("/Add_1", "/Add_2")]
    assert len(residuals) == 2
    meta = {p.key: p.value for p in model.metadata_props}
    assert {"/Add_1", "/Add_2", "/heads.0/Conv", "/Softmax"} <= set(json.loads(meta["mtlora.qdq.excluded_nodes"]))


def test_qdq_result_is_close_to_fp32(qdq_onnx, test_batch, reference):
    from engines.onnxruntime.runner import create_session

    # Computed as the graph says on any CPU (`exact_int8`): int8 kernels that saturate would add their own error.
    session = create_session(qdq_onnx, ["CPUExecutionProvider"])
    outputs = dict(zip(["semseg", "sal"], session.run(None, {"image": test_batch}), strict=True))
    assert max(relative_error(outputs, reference).values()) < 0.05


def test_keep_fp32_globs_and_methods(tiny_onnx, calibration_set, tmp_path):
    model = onnx.load(str(tiny_onnx))
    excluded = excluded_nodes(model, keep_fp32=["*/fc2/*", "Resize"])
    assert "/fc2/MatMul" in excluded and "/Resize" in excluded and "/qkv/MatMul" not in excluded
    out = quantize_qdq(tiny_onnx, tmp_path / "m.onnx", calibration_set, method="minmax", keep_fp32=["*/fc2/*"])
    quantized = onnx.load(str(out))
    assert check_qdq_conventions(quantized) == []
    producer = {o: n for n in quantized.graph.node for o in n.output}
    fc2 = next(n for n in quantized.graph.node if n.name == "/fc2/MatMul")
    assert all(producer.get(t) is None or producer[t].op_type != "DequantizeLinear" for t in fc2.input)
    with pytest.raises(CalibrationError, match="unknown calibration method 'kl'"):
        quantize_qdq(tiny_onnx, tmp_path / "x.onnx", calibration_set, method="kl")
    wrong_name = CalibrationSet.from_arrays(smooth_images(8, seed=5), input_name="pixels")
    with pytest.raises(CalibrationError, match=r"name inputs \['pixels'\]"):
        quantize_qdq(tiny_onnx, tmp_path / "x.onnx", wrong_name)


def test_convention_check_catches_violations(qdq_onnx, tiny_onnx, calibration_set, tmp_path):
    assert check_qdq_conventions(onnx.load(str(tiny_onnx))) == ["no QuantizeLinear/DequantizeLinear nodes: this is not a Q/DQ model"]

    model = onnx.load(str(qdq_onnx))
    values = {i.name: i for i in model.graph.initializer}
    weight_dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in values)
    activation_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    # Per-tensor weight scale, a non-zero activation zero point, and a DQ feeding a LayerNorm.
    values[weight_dq.input[1]].CopyFrom(numpy_helper.from_array(np.float32(0.1), weight_dq.input[1]))
    zero_point = numpy_helper.to_array(values[activation_q.input[2]]).copy()
    values[activation_q.input[2]].CopyFrom(numpy_helper.from_array(zero_point + np.int8(3), activation_q.input[2]))
    layer_norm = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    layer_norm.input[0] = weight_dq.output[0]
    problems = " | ".join(check_qdq_conventions(model))
    assert "quantized per-tensor; TensorRT expects per-channel" in problems
    assert "zero point is not 0" in problems
    assert f"excluded LayerNormalization '{layer_norm.name}' reads dequantized" in problems

    # ONNX Runtime's defaults (asymmetric uint8 activations) are what TensorRT cannot take.
    from onnxruntime.quantization import QuantFormat, quantize_static

    from calibration.qdq import _FeedReader

    default = tmp_path / "default.onnx"
    quantize_static(str(tiny_onnx), str(default), _FeedReader(calibration_set), quant_format=QuantFormat.QDQ)
    problems = " | ".join(check_qdq_conventions(onnx.load(str(default))))
    assert "not int8 (symmetric int8 only)" in problems and "quantized per-tensor" in problems


# ----------------------------------------------------------------------------- fp16 graph


def test_fp16_graph_structure(tiny_onnx, tmp_path, test_batch, reference):
    import onnxruntime

    out = to_fp16_graph(tiny_onnx, tmp_path / "fp16.onnx")
    model = onnx.load(str(out))
    assert check_fp16_graph(model) == []
    assert [i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]] == [1, 1, 1]
    values = _initializers(model)
    assert values["heads.0.weight"].dtype == np.float32 and values["onnx::MatMul_113"].dtype == np.float16
    # No fp32 -> fp16 -> fp32 round trip is left in front of the outputs.
    producer = {o: n for n in model.graph.node for o in n.output}
    for output in model.graph.output:
        node = producer[output.name]
        assert node.op_type == "Cast" and producer[node.input[0]].op_type == "Resize"
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    outputs = dict(zip(["semseg", "sal"], session.run(None, {"image": test_batch}), strict=True))
    assert max(relative_error(outputs, reference).values()) < 5e-3


def test_fp16_check_catches_an_unguarded_conversion(tiny_onnx, tmp_path):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    naive = convert_float_to_float16(onnx.load(str(tiny_onnx)), keep_io_types=True)
    problems = " | ".join(check_fp16_graph(naive))
    assert "LayerNormalization node '/norm1/LayerNormalization' should compute in fp32" in problems
    assert "Softmax node '/Softmax' should compute in fp32" in problems
    heads_fp16 = onnx.load(str(to_fp16_graph(tiny_onnx, tmp_path / "h.onnx", keep_output_layers=False)))
    assert check_fp16_graph(heads_fp16) == [] and _initializers(heads_fp16)["heads.0.weight"].dtype == np.float16
    asked_to_keep = check_fp16_graph(heads_fp16, kept_nodes=["/heads.0/Conv"])
    assert len(asked_to_keep) == 1 and "Conv node '/heads.0/Conv' should compute in fp32" in asked_to_keep[0]


# ----------------------------------------------------------------------------- cache


def test_cache_key():
    key = cache_key(b"onnx-bytes", "f" * 64, {"method": "minmax", "per_channel": True})
    assert key == cache_key(b"onnx-bytes", "f" * 64, {"per_channel": True, "method": "minmax"})
    assert key != cache_key(b"onnx-bytes!", "f" * 64, {"method": "minmax", "per_channel": True})
    assert key != cache_key(b"onnx-bytes", "e" * 64, {"method": "minmax", "per_channel": True})
    assert key != cache_key(b"onnx-bytes", "f" * 64, {"method": "percentile", "per_channel": True})


def test_cache_hit_miss_and_mismatch(tiny_onnx, calibration_set, tmp_path):
    cache = CalibrationCache(tmp_path / "cache")
    first = quantize_qdq(tiny_onnx, tmp_path / "a.onnx", calibration_set, method="minmax", cache=cache)
    assert (cache.hits, cache.misses) == (0, 1)
    second = quantize_qdq(tiny_onnx, tmp_path / "b.onnx", calibration_set, method="minmax", cache=cache)
    assert (cache.hits, cache.misses) == (1, 1) and second.read_bytes() == first.read_bytes()
    [entry] = [p for p in (tmp_path / "cache").iterdir()]
    assert sorted(p.name for p in entry.iterdir()) == sorted([MANIFEST, RESULT_NAME])  # no temp files left

    # An entry filed under another key is never used, nor is one whose file changed.
    other = cache_key(tiny_onnx, calibration_set.fingerprint(), {"method": "other"})
    shutil.copytree(entry, tmp_path / "cache" / other)
    assert cache.lookup(other) is None
    (entry / RESULT_NAME).write_bytes(b"tampered")
    assert cache.lookup(entry.name) is None
    (entry / MANIFEST).write_text("{")
    assert cache.lookup(entry.name) is None
    third = quantize_qdq(tiny_onnx, tmp_path / "c.onnx", calibration_set, method="minmax", cache=cache)
    assert check_qdq_conventions(onnx.load(str(third))) == [] and cache.lookup(entry.name) is not None
    with pytest.raises(CalibrationError, match="SHA-256 hex digest"):
        cache.lookup("../escape")


# ----------------------------------------------------------------------------- prepare_graph


@pytest.mark.parametrize(
    ("backend", "precision"),
    [("onnxruntime", "fp32"), ("tensorrt", "fp32"), ("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "bf16")],
)
def test_prepare_passes_the_onnx_through(tiny_onnx, tmp_path, backend, precision):
    prepared = prepare_graph(backend, tiny_onnx, tmp_path, precision)
    assert isinstance(prepared, PreparedGraph) and (prepared.backend, prepared.precision) == (backend, precision)
    assert prepared.path == tiny_onnx and prepared.paths == (tiny_onnx,) and list(tmp_path.iterdir()) == []
    assert prepared.metadata == {"source_onnx": str(tiny_onnx), "source_sha256": sha256_file(tiny_onnx), "prepared_for": backend}
    assert bool(prepared.notes) == (precision != "fp32")


def test_prepare_fp16_is_the_checked_fp16_graph_for_ort_and_tensorrt(tiny_onnx, tmp_path):
    ort = prepare_graph("onnxruntime", tiny_onnx, tmp_path / "ort", "fp16", keep_fp32=["*/fc2/*"])
    trt = prepare_graph("tensorrt", tiny_onnx, tmp_path / "trt", "fp16", keep_fp32=["*/fc2/*"])
    assert ort.path == tmp_path / "ort" / "fp16" / "tiny_mtl.onnx" and trt.path.name == "tiny_mtl.onnx"
    assert ort.path.read_bytes() == trt.path.read_bytes()  # one fp16 graph serves both backends
    model = onnx.load(str(ort.path))
    assert check_fp16_graph(model) == [] and _initializers(model)["onnx::MatMul_113"].dtype == np.float16
    meta = ort.metadata
    assert meta["source_sha256"] == sha256_file(tiny_onnx) and meta["prepared_sha256"] == sha256_file(ort.path)
    assert meta["keep_fp32"] == ["*/fc2/*"] and meta["keep_output_layers"] is True
    assert "/fc2/MatMul" in meta["fp32_nodes"] and "/heads.0/Conv" in meta["fp32_nodes"]
    heads_fp16 = prepare_graph("onnxruntime", tiny_onnx, tmp_path / "h", "fp16", keep_output_layers=False)
    assert heads_fp16.metadata["fp32_nodes"] == []
    assert _initializers(onnx.load(str(heads_fp16.path)))["heads.0.weight"].dtype == np.float16


def _without_purpose(path) -> bytes:
    """The graph's bytes without the engines.graph_purpose metadata calibration.prepare adds."""
    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in (ENGINES_KEY, TENSORRT_TAKES_KEY)]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def test_prepare_int8_is_the_calibrated_qdq_graph(tiny_onnx, calibration_set, qdq_onnx, tmp_path):
    cache = tmp_path / "cache"
    ort_graph = prepare_graph("onnxruntime", tiny_onnx, tmp_path / "a", "int8", calibration=calibration_set,
                              cache=cache)
    # ONNX Runtime runs the calibrated graph with uint8 activations (its fast U8S8 kernels) ...
    assert ort_graph.path == tmp_path / "a" / "qdq_u8" / "tiny_mtl.onnx"
    first = ort_graph
    signed = Path(ort_graph.metadata["signed_qdq_onnx"])
    assert signed == tmp_path / "a" / "qdq" / "tiny_mtl.onnx"
    # ... made from the one signed Q/DQ graph TensorRT takes, calibrated once.
    assert check_qdq_conventions(onnx.load(str(signed))) == []
    # same settings as quantize_qdq's defaults; the prepared graph also records which engines take it
    assert _without_purpose(signed) == qdq_onnx.read_bytes()
    assert json.loads(next(p.value for p in onnx.load(str(signed)).metadata_props if p.key == ENGINES_KEY)) == [
        "openvino", "tensorrt-10"]
    meta = first.metadata
    assert meta["calibration_fingerprint"] == calibration_set.fingerprint() and meta["calibration_samples"] == 16
    assert meta["calibration_method"] == "percentile" and meta["calibration_cache"] == "miss"
    assert {"/Add_1", "/Add_2", "/heads.0/Conv", "/Softmax"} <= set(meta["excluded_nodes"])
    # TensorRT starts from the very same Q/DQ graph (from the cache this time) and builds its fp16 Q/DQ graph.
    trt = prepare_graph("tensorrt", tiny_onnx, tmp_path / "b", "int8", calibration=calibration_set, cache=cache)
    assert trt.metadata["calibration_cache"] == "hit" and trt.path == tmp_path / "b" / "qdq_fp16" / "tiny_mtl.onnx"
    assert Path(trt.metadata["qdq_fp32_onnx"]).read_bytes() == signed.read_bytes()
    # Feed dicts work as well as a CalibrationSet, and the method and exclusions are passed on.
    feeds = [{"image": image[None]} for image in smooth_images(8, seed=6)]
    minmax = prepare_graph(
        "tensorrt", tiny_onnx, tmp_path / "c", "int8", calibration=feeds, calibration_method="minmax", keep_output_layers=False
    )
    assert minmax.metadata["calibration_method"] == "minmax" and minmax.metadata["calibration_cache"] == "off"
    assert minmax.metadata["calibration_samples"] == 8 and "/heads.0/Conv" not in minmax.metadata["excluded_nodes"]
    assert check_qdq_conventions(onnx.load(minmax.metadata["qdq_fp32_onnx"])) == []


def test_prepare_int8_from_a_given_qdq_onnx(tiny_onnx, qdq_onnx, tmp_path):
    prepared = prepare_graph("onnxruntime", tiny_onnx, tmp_path, "int8", qdq_onnx=qdq_onnx)
    # ONNX Runtime's uint8-activation graph, made from the given (bundled) signed one.
    assert prepared.path == tmp_path / "qdq_u8" / "tiny_mtl.onnx" and [p.name for p in tmp_path.iterdir()] == ["qdq_u8"]
    assert prepared.metadata["qdq_onnx"] == str(qdq_onnx) and prepared.metadata["source_onnx"] == str(tiny_onnx)
    assert "/Softmax" in prepared.metadata["excluded_nodes"]
    # TensorRT builds its fp16 Q/DQ graph from the given one (tests/test_tensorrt_qdq_fp16.py checks it).
    trt = prepare_graph("tensorrt", tiny_onnx, tmp_path, "int8", qdq_onnx=qdq_onnx)
    assert trt.path == tmp_path / "qdq_fp16" / "tiny_mtl.onnx" and trt.metadata["qdq_fp32_onnx"] == str(qdq_onnx)


def test_prepare_errors(tiny_onnx, qdq_onnx, calibration_set, tmp_path):
    with pytest.raises(CalibrationError, match="unknown backend 'auto'.*choose_backend"):
        prepare_graph("auto", tiny_onnx, tmp_path, "fp32")
    with pytest.raises(EngineError, match="onnxruntime cannot build precision 'bf16'"):
        prepare_graph("onnxruntime", tiny_onnx, tmp_path, "bf16")
    with pytest.raises(EngineError, match="ONNX file not found"):
        prepare_graph("onnxruntime", tmp_path / "missing.onnx", tmp_path, "fp32")
    for backend in ("onnxruntime", "tensorrt"):
        with pytest.raises(CalibrationError, match=r"int8 needs calibration data \(calibration=...\) or a Q/DQ ONNX"):
            prepare_graph(backend, tiny_onnx, tmp_path, "int8")
    with pytest.raises(CalibrationError, match="int8 needs calibration data"):
        prepare_graph("openvino", tiny_onnx, tmp_path, "int8")
    with pytest.raises(CalibrationError, match="not a usable Q/DQ model: no QuantizeLinear"):
        prepare_graph("tensorrt", tiny_onnx, tmp_path, "int8", qdq_onnx=tiny_onnx)
    with pytest.raises(CalibrationError, match="onnxruntime fp16 does not take one"):
        prepare_graph("onnxruntime", tiny_onnx, tmp_path, "fp16", qdq_onnx=qdq_onnx)
    # A calibrated Q/DQ graph (a bundle's) is the int8 graph of every backend, OpenVINO's too.
    assert prepare_graph("openvino", tiny_onnx, tmp_path, "int8", qdq_onnx=qdq_onnx).path == qdq_onnx
    with pytest.raises(CalibrationError, match="unknown calibration method 'kl'"):
        prepare_graph("onnxruntime", tiny_onnx, tmp_path, "int8", calibration=calibration_set, calibration_method="kl")
    assert list(tmp_path.iterdir()) == []
    inside = tmp_path / "fp16" / "m.onnx"
    inside.parent.mkdir()
    inside.write_bytes(tiny_onnx.read_bytes())
    with pytest.raises(CalibrationError, match="would overwrite it"):
        prepare_graph("onnxruntime", inside, tmp_path, "fp16")
    assert inside.read_bytes() == tiny_onnx.read_bytes()


def test_uint8_activations_give_the_same_outputs(qdq_onnx, test_batch):
    """ONNX Runtime's flavour of the Q/DQ graph (uint8 activations, zero point 128) is the same quantization."""
    from calibration.qdq import to_uint8_activations

    signed = onnx.load(str(qdq_onnx))
    unsigned = to_uint8_activations(signed)
    zero_points = {i.name: i for i in unsigned.graph.initializer}
    activation_q = [n for n in unsigned.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_q and all(zero_points[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in activation_q)
    weights = [i for i in unsigned.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert weights  # weights stay signed int8
    import onnxruntime

    run = {}
    for name, model in (("signed", signed), ("unsigned", unsigned)):
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        run[name] = session.run(None, {session.get_inputs()[0].name: test_batch})
    for a, b in zip(run["signed"], run["unsigned"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
