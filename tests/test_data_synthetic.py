"""The synthetic multi-task set, the transforms, and the torch glue."""

import numpy as np
import pytest
import torch

from mtlora.data.datasets import build_dataset, collate, dataset_tasks
from mtlora.data.preprocess import preprocess
from mtlora.data.synthetic import FIGURE_CLASS, SYNTHETIC_TASKS, SyntheticMultiTask
from mtlora.data.transforms import (
    NO_AUGMENTATION,
    Augmentation,
    TrainTransform,
    ValTransform,
    hflip,
    resize_image,
    scale_rotate,
)
from mtlora.errors import ConfigError


@pytest.fixture(scope="module")
def samples():
    data = SyntheticMultiTask("train", num_samples=40, size=48, seed=3)
    return [data[i] for i in range(len(data))]


def test_task_table():
    assert SYNTHETIC_TASKS == {"semseg": 6, "human_parts": 4, "sal": 1, "normals": 3, "edge": 1, "depth": 1}


def test_samples_are_deterministic_and_splits_differ():
    a = SyntheticMultiTask("train", 10, size=32, seed=0)
    b = SyntheticMultiTask("train", 10, size=32, seed=0)
    later_first = b[7]
    assert all(np.array_equal(a[7][k], later_first[k]) for k in SYNTHETIC_TASKS)
    assert np.array_equal(a[7]["image"], later_first["image"])
    assert a[7]["meta"] == {"id": "train-000007", "size": (32, 32)}
    val = SyntheticMultiTask("val", 10, size=32, seed=0)
    other_seed = SyntheticMultiTask("train", 10, size=32, seed=1)
    assert not np.array_equal(a[7]["image"], val[7]["image"])
    assert not np.array_equal(a[7]["image"], other_seed[7]["image"])
    assert not np.array_equal(a[7]["image"], a[8]["image"])


def test_label_formats(samples):
    for s in samples:
        assert s["image"].shape == (48, 48, 3) and s["image"].dtype == np.uint8
        assert s["semseg"].dtype == np.uint8 and s["semseg"].max() < 6
        assert set(np.unique(s["sal"])) <= {0, 1} and set(np.unique(s["edge"])) <= {0, 1}
        assert s["normals"].shape == (48, 48, 3) and s["normals"].dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(s["normals"], axis=-1), 1.0, atol=1e-5)
        assert s["depth"].dtype == np.float32 and 1.0 < s["depth"].min() and s["depth"].max() < 20.0
        has_figure = (s["semseg"] == FIGURE_CLASS).any()
        parts = s["human_parts"]
        if has_figure:
            assert parts.max() <= 3
            assert np.array_equal(parts > 0, s["semseg"] == FIGURE_CLASS)  # parts exactly cover figures
        else:
            assert (parts == 255).all()
        salient = s["semseg"][s["sal"] == 1]
        assert salient.size > 0 and (salient > 0).all()  # the salient object is a shape, never background


def test_mix_of_people_and_people_less_images(samples):
    with_parts = np.mean([(s["human_parts"] != 255).any() for s in samples])
    assert 0.2 < with_parts < 0.8


def test_geometry_is_consistent(samples):
    for s in samples:
        normals, depth = s["normals"], s["depth"]
        assert (normals[..., 2] > -0.5).all()  # visible surfaces face the camera
        # Background rows at the bottom are floor: normal points up (y is down) and depth shrinks towards
        # the camera.
        bottom = s["semseg"][-1] == 0
        if bottom.any():
            assert (normals[-1][bottom][:, 1] < -0.7).all()
            assert depth[-1][bottom].mean() < depth[0][s["semseg"][0] == 0].mean()


def test_edges_sit_on_occluding_contours(samples):
    for s in samples:
        edge, depth, semseg = s["edge"].astype(bool), s["depth"], s["semseg"]
        padded_depth = np.pad(depth, 1, mode="edge")
        padded_class = np.pad(semseg, 1, mode="edge")
        boundary = np.zeros_like(edge)  # a deeper neighbour, or another class (shapes touch the floor)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            boundary |= padded_depth[dy : dy + 48, dx : dx + 48] > depth + 0.05
            boundary |= padded_class[dy : dy + 48, dx : dx + 48] != semseg
        assert edge.sum() > 0
        assert boundary[edge].mean() > 0.97
        assert (semseg[edge] > 0).mean() > 0.6  # mostly on shapes; floor pixels only where a shape stands


def test_bad_arguments():
    with pytest.raises(ConfigError, match="depth_of_field"):
        SyntheticMultiTask(tasks=["semseg", "depth_of_field"])
    with pytest.raises(ConfigError, match="split"):
        SyntheticMultiTask(split="holdout")
    with pytest.raises(IndexError):
        SyntheticMultiTask(num_samples=3)[3]
    only = SyntheticMultiTask(num_samples=2, size=16, tasks=["sal"])[0]
    assert set(only) == {"image", "sal", "meta"}


def test_val_transform_image_is_the_inference_preprocessing_of_the_resized_image(samples):
    out = ValTransform((40, 56))(samples[0])
    assert np.array_equal(out["image"], preprocess(resize_image(samples[0]["image"], (40, 56)), (40, 56)))
    assert out["semseg"].dtype == np.int64 and out["semseg"].shape == (40, 56)
    assert out["human_parts"].dtype == np.int64
    assert out["sal"].shape == (1, 40, 56) and out["edge"].dtype == np.float32
    assert out["normals"].shape == (3, 40, 56) and out["depth"].shape == (1, 40, 56)
    np.testing.assert_allclose(np.linalg.norm(out["normals"], axis=0), 1.0, atol=1e-5)


def test_quarter_turn_moves_labels_and_turns_normals(samples):
    s = samples[1]
    turned = scale_rotate(s, 1.0, 90.0)  # counter-clockwise on screen
    # About upstream's centre (w / 2, h / 2), half a pixel off the middle: a quarter turn one row down,
    # the top row from outside the image.
    for key in ("semseg", "human_parts", "sal", "edge", "depth"):
        assert np.array_equal(turned[key][1:], np.rot90(s[key])[:-1]), key
    assert (turned["semseg"][0] == 255).all() and (turned["sal"][0] == 0).all() and (turned["depth"][0] == 0).all()
    # y points down: a normal pointing right (x) turns to point up (-y), one pointing down (y) to the right.
    moved = np.rot90(s["normals"])[:-1]
    expected = np.stack([moved[..., 1], -moved[..., 0], moved[..., 2]], axis=-1)
    np.testing.assert_allclose(turned["normals"][1:], expected, atol=1e-5)
    assert (turned["normals"][0] == 0).all()


def test_flip_negates_normal_x(samples):
    s = samples[2]
    flipped = hflip(s)
    assert np.array_equal(flipped["semseg"], s["semseg"][:, ::-1])
    np.testing.assert_array_equal(flipped["normals"][..., 0], -s["normals"][:, ::-1, 0])
    np.testing.assert_array_equal(flipped["normals"][..., 1:], s["normals"][:, ::-1, 1:])


def test_zoom_out_fills_borders_with_ignore(samples):
    s = samples[3]
    small = scale_rotate(s, 0.5, 0.0)
    assert (small["semseg"][0] == 255).all() and (small["human_parts"][:, 0] == 255).all()
    assert (small["normals"][0] == 0).all() and (small["depth"][0] == 0).all()
    assert (small["sal"][0] == 0).all()
    # At the centre the scene is shown half size, i.e. as if twice as far away.
    assert small["depth"][24, 24] == pytest.approx(2 * s["depth"][24, 24], rel=0.05)


def test_train_transform_is_seeded(samples):
    transform = TrainTransform((32, 32))
    a = transform(samples[4], np.random.default_rng(5))
    b = transform(samples[4], np.random.default_rng(5))
    assert all(np.array_equal(a[k], b[k]) for k in SYNTHETIC_TASKS)
    assert a["image"].shape == (3, 32, 32)
    plain = TrainTransform((32, 32), NO_AUGMENTATION)(samples[4], np.random.default_rng(0))
    assert np.array_equal(plain["image"], ValTransform((32, 32))(samples[4])["image"])
    with pytest.raises(ConfigError):
        Augmentation(scale_range=(0.0, 1.0))


def test_build_dataset_and_collate():
    assert dataset_tasks("synthetic") == SYNTHETIC_TASKS
    train = build_dataset("synthetic", None, "train", None, 32, train=True, num_samples=4)
    val = build_dataset("synthetic", None, "val", ["semseg", "depth"], (32, 32), train=False, num_samples=4)
    batch = collate([train[0], train[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["semseg"].dtype == torch.int64 and batch["sal"].shape == (2, 1, 32, 32)
    assert batch["meta"][1]["id"] == "train-000001"
    assert set(val[0]) == {"image", "semseg", "depth", "meta"}
    epoch0 = [train[i]["image"] for i in range(4)]
    assert all(torch.equal(a, train[i]["image"]) for i, a in enumerate(epoch0))  # reproducible
    train.set_epoch(1)
    assert any(not torch.equal(a, train[i]["image"]) for i, a in enumerate(epoch0))  # fresh flips
    with pytest.raises(ConfigError, match="unknown data set"):
        dataset_tasks("cityscapes")
    with pytest.raises(ConfigError, match="data root"):
        build_dataset("pascal", None, "train", None, 32, train=False)
