"""Image loading for every common file kind, and the numbers `preprocess` produces."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mtlora.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, load_image, preprocess, preprocess_batch
from mtlora.errors import ConfigError, DataError


def _write_png_rgb16(path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand: Pillow cannot write one."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_rgb_png_round_trip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.dtype == np.uint8 and np.array_equal(loaded, pixels)


def test_grayscale_is_replicated(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    loaded = load_image(tmp_path / "g.png")
    assert loaded.shape == (3, 4, 3)
    assert all(np.array_equal(loaded[..., c], gray) for c in range(3))


def test_sixteen_bit_grayscale_keeps_range(tmp_path):
    values = np.array([[0, 257 * 100, 5000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert np.array_equal(load_image(tmp_path / "g16.png")[0, :, 0], [0, 100, 19, 255])  # 5000 / 257 = 19.46


def test_sixteen_bit_rgb(tmp_path):
    rgb16 = np.array([[[65535, 0, 257 * 128], [257 * 10, 257 * 20, 257 * 30]]], dtype=np.uint16)
    _write_png_rgb16(tmp_path / "c16.png", rgb16)
    assert np.array_equal(load_image(tmp_path / "c16.png"), [[[255, 0, 128], [10, 20, 30]]])


def test_cmyk_is_converted(tmp_path):
    Image.new("CMYK", (4, 3), (0, 255, 0, 0)).save(tmp_path / "m.tif")  # pure magenta ink
    loaded = load_image(tmp_path / "m.tif")
    assert loaded.shape == (3, 4, 3)
    assert np.array_equal(loaded[0, 0], [255, 0, 255])


def test_alpha_is_composited_over_black(tmp_path):
    Image.new("RGBA", (2, 2), (200, 100, 50, 128)).save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png")[0, 0], [100, 50, 25])  # x 128/255, rounded


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "p.png", transparency=0)
    assert np.array_equal(load_image(tmp_path / "p.png")[0], [[0, 0, 0], [40, 50, 60]])


def test_missing_empty_and_non_image_files(tmp_path):
    with pytest.raises(DataError, match="not found.*nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="empty.*empty.jpg"):
        load_image(tmp_path / "empty.jpg")
    (tmp_path / "notes.jpg").write_text("this is not a picture")
    with pytest.raises(DataError, match="not an image.*notes.jpg"):
        load_image(tmp_path / "notes.jpg")


def test_truncated_image(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.png"):
        load_image(tmp_path / "t.png")


def test_pixel_limit_guards_against_decompression_bombs(tmp_path):
    Image.new("L", (1100, 1000)).save(tmp_path / "big.png")
    with pytest.raises(DataError, match="above the limit"):
        load_image(tmp_path / "big.png", max_pixels=1_000_000)


def test_preprocess_numbers():
    image = np.zeros((2, 2, 3), np.uint8)
    image[0, 0] = 255
    out = preprocess(image, size=(2, 2))
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    assert out[0, 0, 0] == pytest.approx((1.0 - 0.485) / 0.229)
    assert out[2, 1, 1] == pytest.approx((0.0 - 0.406) / 0.225)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_preprocess_resizes_without_keeping_aspect():
    image = np.full((10, 30, 3), 200, np.uint8)
    out = preprocess(image, size=(8, 6))
    assert out.shape == (3, 8, 6)
    assert np.allclose(out[1], (200 / 255 - 0.456) / 0.224, atol=1e-6)  # a flat image stays flat


def test_preprocess_batch_matches_single():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (9, 13, 3), dtype=np.uint8) for _ in range(3)]
    batch = preprocess_batch(images, size=(4, 5))
    assert batch.shape == (3, 3, 4, 5)
    assert np.array_equal(batch[2], preprocess(images[2], size=(4, 5)))


def test_preprocess_rejects_bad_input():
    with pytest.raises(DataError, match="uint8"):
        preprocess(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(DataError, match="uint8"):
        preprocess(np.zeros((4, 4), np.uint8))
    with pytest.raises(ConfigError, match="size"):
        preprocess(np.zeros((4, 4, 3), np.uint8), size=(0, 4))
    with pytest.raises(ConfigError, match="empty"):
        preprocess_batch([])
