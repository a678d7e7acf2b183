"""The visual report is self-contained: parse it and decode every image it embeds."""

import base64
import io
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from export.checking.accuracy import EvalBatch, check_engine
from export.checking.html import Sample, render_html
from export.checking.results import EngineInfo, Report
from export.checking.visualize import error_map, render_label, render_output
from mtlora.palette import class_colours, voc_palette

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def _decode(src):
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def test_report_page_embeds_every_map():
    rng = np.random.default_rng(0)
    ref = {"semseg": rng.normal(size=(1, 4, 16, 16)).astype(np.float32),
           "normals": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)}
    engine_out = {t: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for t, v in ref.items()}
    labels = {"semseg": ref["semseg"].argmax(1)}
    batch = EvalBatch(image=rng.normal(size=(1, 3, 16, 16)).astype(np.float32), reference=ref, labels=labels)
    check = check_engine(lambda feed: engine_out, [batch], {"semseg": 4, "normals": 3}, "fp16",
                         engine=EngineInfo("onnxruntime", "fp16", "fp16"))
    report = Report({"tasks": ["semseg", "normals"]}, [check])
    sample = Sample(image=batch.image[0], reference={t: v[0] for t, v in ref.items()},
                    engines={"onnxruntime-fp16": {t: v[0] for t, v in engine_out.items()}},
                    labels={"semseg": labels["semseg"][0]})
    page = render_html(report, [sample], MEAN, STD)
    parser = _Images()
    parser.feed(page)
    # input + semseg (label, PyTorch, engine, error) + normals (PyTorch, engine, error)
    assert len(parser.images) == 8
    scale = 160 // 16
    for img in parser.images:
        assert _decode(img["src"]).shape == (16 * scale, 16 * scale, 3)
    assert "src=\"http" not in page and "<script" not in page
    text = " ".join(parser.text)
    assert "onnxruntime" in text and "class disagreement" in text and "angular error" in text


def test_palettes():
    palette = voc_palette()
    assert tuple(palette[0]) == (0, 0, 0) and tuple(palette[1]) == (128, 0, 0) and tuple(palette[15]) == (192, 128, 128)
    logits = np.zeros((3, 2, 2), np.float32)
    logits[1] = 1
    assert (render_output("semseg", logits) == (128, 0, 0)).all()
    up = np.zeros((3, 2, 2), np.float32)
    up[2] = 1
    assert (render_output("normals", up)[0, 0] == (127, 127, 255)).all()
    label = np.array([[0, 255], [1, 1]])
    rgb = render_label("semseg", label)
    assert tuple(rgb[0, 1]) == (255, 255, 255) and tuple(rgb[1, 0]) == (128, 0, 0)
    same, legend = error_map("semseg", logits, logits)
    assert "0.00%" in legend and (same == 20).all()
    # Class ids of any integer type and sign take their colour modulo 256 (post-processed maps are uint8).
    ids = np.array([[-1, 0, 1, 255], [256, 257, 511, 1000]])
    for dtype in (np.int64, np.int32, np.int16):
        assert (class_colours(ids.astype(dtype)) == palette[ids % 256]).all()
    assert (class_colours(np.array([[3, 250]], np.uint8)) == palette[[[3, 250]]]).all()
