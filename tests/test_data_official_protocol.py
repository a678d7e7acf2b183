"""Our PASCAL-Context and NYUD-v2 loaders give what the official MTLoRA loaders give, at 64x64.

tests/fixtures/official/loaders/ holds what the official loaders (scale-lab/MTLoRA `data/mtl_ds.py`, val
split, its test transforms FixedResize, AddIgnoreRegions, ToTensor, Normalize) returned for the trees that
tests/generated_trees.py writes (see the README there). Labels must be equal; images too, except where
the bicubic resize overshoots to -1 or below or 256 or above: upstream's uint8 cast wraps those values
around, we clamp them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import cv2  # the loaders' own dependency (the 'train' extra)
import numpy as np
import pytest

from mtlora.data.nyud import NYUDMT
from mtlora.data.pascal import PascalContextMT
from mtlora.data.preprocess import IMAGENET_STD
from mtlora.data.transforms import ValTransform
from tests.generated_trees import tree_digest, write_nyud_tree, write_pascal_tree

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "official" / "loaders"
SIZE = 64
DATASETS = {"pascal": (write_pascal_tree, PascalContextMT), "nyud": (write_nyud_tree, NYUDMT)}


@functools.cache
def record() -> dict:
    return json.loads((FIXTURE / "official_loaders.json").read_text())


@functools.cache
def official(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURE / f"{name}_val.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = DATASETS[name][0](tmp_path_factory.mktemp(name) / name, record()["seed"])
        return cache[name]

    return get


def ours(root: Path, name: str) -> tuple[list[dict], list[dict]]:
    data = DATASETS[name][1](root, split="val", tasks=record()[name]["tasks"])
    assert data.ids == record()[name]["ids"]
    raw = [data[i] for i in range(len(data))]
    return raw, [ValTransform((SIZE, SIZE))(sample) for sample in raw]


@pytest.mark.parametrize("name", DATASETS)
def test_the_generator_writes_the_recorded_tree_bit_for_bit(tree, tmp_path, name):
    assert tree_digest(tree(name)) == record()[name]["tree_sha256"]
    again = DATASETS[name][0](tmp_path / "again", record()["seed"])
    assert tree_digest(again) == record()[name]["tree_sha256"]


@pytest.mark.parametrize("name", DATASETS)
def test_labels_equal_the_official_loaders(tree, name):
    _, samples = ours(tree(name), name)
    reference = official(name)
    for task in record()[name]["tasks"]:
        theirs = reference[task]  # (N, C, H, W); 255 = ignore, for normals in all three channels
        mine = np.stack([np.asarray(s[task]).reshape(theirs.shape[1:]) for s in samples])
        if task == "normals":
            ignored = (theirs == 255).all(axis=1)
            assert np.array_equal((mine == 0).all(axis=1), ignored)  # ours marks ignore with (0, 0, 0)
            assert 0 < ignored.mean() < 1
            # Unit vectors: ours are float32; upstream resizes NYUD's float32 normals in float32, where OpenCV
            # versions differ by an ulp (1.2e-7), and PASCAL's in float64.
            np.testing.assert_allclose(mine.transpose(0, 2, 3, 1)[~ignored], theirs.transpose(0, 2, 3, 1)[~ignored],
                                       rtol=0, atol=1e-6)
        elif task == "depth":
            assert np.array_equal(np.where(theirs == 255, 0, theirs).astype(np.float32), mine)  # ours: 0 = ignore
        else:
            assert np.array_equal(mine.astype(np.int64), theirs.astype(np.int64)), task
        assert len(np.unique(theirs)) > 1, task


@pytest.mark.parametrize("name", DATASETS)
def test_images_equal_the_official_loaders_but_for_the_clamp(tree, name):
    raw, samples = ours(tree(name), name)
    theirs = official(name)["image"]
    mine = np.stack([s["image"] for s in samples])
    overshoot = np.zeros(mine.shape, bool)
    for i, sample in enumerate(raw):
        image = sample["image"]
        if image.shape[:2] != (SIZE, SIZE):
            cubic = cv2.resize(image.astype(np.float64), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
            # Truncation takes (-1, 256) to 0..255 either way; beyond, upstream's cast wraps and ours clamps.
            overshoot[i] = ((cubic <= -1) | (cubic >= 256)).transpose(2, 0, 1)
    # Everywhere else bit-identical.
    assert np.array_equal(mine[~overshoot], theirs[~overshoot])
    assert 0 < overshoot.mean() < 0.02
    assert (mine[overshoot] != theirs[overshoot]).all()
    assert np.abs(mine - theirs).max() <= 255 / 255 / min(IMAGENET_STD) + 1e-5
