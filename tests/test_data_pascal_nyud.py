"""PASCAL-Context and NYUD-v2 loaders on tiny trees written in tmp_path."""

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from mtlora.data import nyud, pascal
from mtlora.data.datasets import build_dataset, dataset_tasks
from mtlora.data.nyud import NYUDMT
from mtlora.data.pascal import PascalContextMT, context_edges, thin
from mtlora.errors import ConfigError, DataError
from tests.generated_trees import write_parts_mat

H, W = 12, 16
WITH_PERSON, WITHOUT_PERSON = "2008_000001", "2008_000002"


def _box(rows, cols):
    mask = np.zeros((H, W), bool)
    mask[rows, cols] = True
    return mask


@pytest.fixture()
def pascal_root(tmp_path):
    root = tmp_path / "PASCAL_MT"
    for folder in ("JPEGImages", "ImageSets/Context", "semseg/VOC12", "semseg/pascal-context", "human_parts",
                   "sal_distill", "normals_distill", "pascal-context/trainval"):  # fmt: skip
        (root / folder).mkdir(parents=True)
    (root / "ImageSets/Context/train.txt").write_text(f"{WITH_PERSON}\n{WITHOUT_PERSON}\n\n")
    rng = np.random.default_rng(0)
    for image_id in (WITH_PERSON, WITHOUT_PERSON):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
            root / f"JPEGImages/{image_id}.jpg"
        )
        sal = np.zeros((H, W), np.uint8)
        sal[:, :4], sal[:, 4:8] = 127, 128  # 127/255 < 0.5 <= 128/255
        Image.fromarray(sal).save(root / f"sal_distill/{image_id}.png")
        normals = np.zeros((H, W, 3), np.uint8)
        normals[...] = (255, 0, 191)
        Image.fromarray(normals).save(root / f"normals_distill/{image_id}.png")
        label_map = np.full((H, W), 3, np.uint16)  # context class 3 carries normals
        label_map[:, 8:] = 5  # class 5 does not
        savemat(root / f"pascal-context/trainval/{image_id}.mat", {"LabelMap": label_map})
    semseg = np.zeros((H, W), np.uint8)
    semseg[2:6, 3:9], semseg[0, 0] = 15, 255
    Image.fromarray(semseg, mode="L").convert("P").save(root / f"semseg/VOC12/{WITH_PERSON}.png")
    Image.fromarray(np.full((H, W), 7, np.uint8)).save(root / f"semseg/pascal-context/{WITHOUT_PERSON}.png")
    person = _box(slice(0, 9), slice(0, 6))
    write_parts_mat(root / f"human_parts/{WITH_PERSON}.mat", [
        (7, _box(slice(0, 3), slice(10, 14)), []),  # a car: no parts
        (15, person, [("head", _box(slice(0, 2), slice(0, 6))), ("torso", _box(slice(2, 5), slice(0, 6))),
                      ("llarm", _box(slice(5, 7), slice(0, 3))), ("rfoot", _box(slice(7, 9), slice(0, 6)))]),
        (15, _box(slice(9, 12), slice(10, 16)), []),  # a person without part annotation
    ])  # fmt: skip
    write_parts_mat(root / f"human_parts/{WITHOUT_PERSON}.mat", [(7, _box(slice(0, 3), slice(0, 3)), [])])
    return root


def test_pascal_sample(pascal_root):
    data = PascalContextMT(pascal_root, split="train")
    assert len(data) == 2 and data.ids == [WITH_PERSON, WITHOUT_PERSON]
    s = data[0]
    assert s["image"].shape == (H, W, 3) and s["meta"] == {"id": WITH_PERSON, "size": (H, W)}
    assert s["semseg"][3, 4] == 15 and s["semseg"][0, 0] == 255 and s["semseg"][10, 10] == 0
    parts = s["human_parts"]
    assert parts[0, 0] == 1 and parts[3, 5] == 2 and parts[6, 1] == 4 and parts[8, 2] == 6
    assert parts[6, 4] == 0 and parts[1, 11] == 0  # unlabelled person pixel, the car
    assert set(np.unique(s["sal"])) == {0, 1} and s["sal"][0, 3] == 0 and s["sal"][0, 4] == 1
    # Normals decode 2 v / 255 - 1 on class-3 pixels and are exactly zero on class-5 pixels.
    np.testing.assert_allclose(s["normals"][0, 0], [1.0, -1.0, 2 * 191 / 255 - 1], atol=1e-6)
    assert (s["normals"][:, 8:] == 0).all()
    assert s["normals"].dtype == np.float64  # decoded and masked in float64, as upstream does
    # The class boundary between columns 7 and 8 becomes a one-pixel edge in every row but the first
    # (upstream's thinning treats outside the image as background, so the line's end is thinned away).
    assert s["edge"].dtype == np.uint8
    assert (s["edge"].sum(axis=1)[1:] == 1).all() and s["edge"][0].sum() == 0
    assert set(np.nonzero(s["edge"])[1]) <= {7, 8}


def test_pascal_people_less_image_and_fallback_semseg(pascal_root):
    s = PascalContextMT(pascal_root, split="train", tasks=["semseg", "human_parts"])[1]
    assert (s["human_parts"] == 255).all()
    assert (s["semseg"] == 7).all()  # read from semseg/pascal-context/
    assert set(s) == {"image", "semseg", "human_parts", "meta"}


def test_pascal_tasks_table(pascal_root):
    assert dataset_tasks("pascal") == {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1}
    assert dataset_tasks("pascal", pascal_root) == pascal.PASCAL_TASKS
    with pytest.raises(ConfigError, match="available: semseg, human_parts, sal, normals, edge"):
        PascalContextMT(pascal_root, tasks=["semseg", "depth"])


def test_pascal_tree_errors(pascal_root, tmp_path):
    with pytest.raises(DataError, match="not a PASCAL_MT tree: missing JPEGImages/"):
        PascalContextMT(tmp_path)
    with pytest.raises(DataError, match="val.txt"):
        PascalContextMT(pascal_root, split="val")
    (pascal_root / "ImageSets/Context/val.txt").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        PascalContextMT(pascal_root, split="val")
    (pascal_root / f"sal_distill/{WITHOUT_PERSON}.png").unlink()
    with pytest.raises(DataError, match=f"sal label file not found: .*{WITHOUT_PERSON}.png"):
        PascalContextMT(pascal_root, tasks=["sal"])
    (pascal_root / f"JPEGImages/{WITH_PERSON}.jpg").unlink()
    with pytest.raises(DataError, match=f"image file not found: .*{WITH_PERSON}.jpg"):
        PascalContextMT(pascal_root, tasks=["semseg"])


def test_pascal_missing_task_folder_and_corrupt_files(pascal_root):
    (pascal_root / f"human_parts/{WITH_PERSON}.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match=f"{WITH_PERSON}.mat"):
        PascalContextMT(pascal_root, tasks=["human_parts"])[0]
    write_parts_mat(pascal_root / f"human_parts/{WITH_PERSON}.mat", [(15, _box(0, 0), [("tail", _box(0, 0))])])
    with pytest.raises(DataError, match="unknown person part name 'tail'"):
        PascalContextMT(pascal_root, tasks=["human_parts"])[0]
    for item in (pascal_root / "sal_distill").iterdir():
        item.unlink()
    (pascal_root / "sal_distill").rmdir()
    with pytest.raises(DataError, match="lacks sal_distill/"):
        PascalContextMT(pascal_root, tasks=["sal"])
    assert "sal" not in dataset_tasks("pascal", pascal_root)


def test_context_edges_and_thinning():
    # Expected values are what the official loader computes (OpenCV's Laplacian, scikit-image's thin).
    label_map = np.zeros((8, 8), int)
    label_map[2:6, 2:6] = 4
    contour = np.zeros((8, 8), np.uint8)
    contour[2, 2:5] = contour[3:5, 1] = contour[5, 2] = contour[3:6, 5] = contour[6, 3:5] = 1
    assert np.array_equal(context_edges(label_map), contour)
    band = np.zeros((9, 9), bool)
    band[1:8, 3:6] = True
    assert np.argwhere(thin(band)).tolist() == [[2, 4], [3, 4], [4, 4], [5, 4], [6, 4]]  # the centre line
    across = np.zeros((5, 9), bool)
    across[:, 3:5] = True  # outside the image is background: the line loses its top row
    assert np.argwhere(thin(across)).tolist() == [[1, 3], [2, 3], [3, 3], [4, 3]]


def test_build_pascal_dataset(pascal_root):
    train = build_dataset("pascal", pascal_root, "train", None, (24, 20), train=True)
    sample = train[0]
    assert sample["image"].shape == (3, 24, 20) and sample["human_parts"].shape == (24, 20)
    assert sample["normals"].shape == (3, 24, 20)
    val = build_dataset("pascal", pascal_root, "train", ["human_parts"], 24, train=False)
    assert (val[1]["human_parts"] == 255).all()


# --- NYUD ----------------------------------------------------------------------------------------


@pytest.fixture()
def nyud_root(tmp_path):
    root = tmp_path / "NYUD_MT"
    for folder in ("images", "segmentation", "normals", "depth", "edge", "gt_sets"):
        (root / folder).mkdir(parents=True)
    (root / "gt_sets/train.txt").write_text("0001\n0002\n")
    rng = np.random.default_rng(1)
    for image_id in ("0001", "0002"):
        Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(
            root / f"images/{image_id}.jpg"
        )
        segmentation = np.zeros((8, 10), np.uint8)
        segmentation[:, 3:], segmentation[:, 6:] = 1, 40
        Image.fromarray(segmentation).save(root / f"segmentation/{image_id}.png")
        normals = np.zeros((8, 10, 3), np.float32)
        normals[:, :5] = (0.0, 0.6, 0.8)
        np.save(root / f"normals/{image_id}.npy", normals)
        depth = np.full((8, 10), 2.5, np.float32)
        depth[0, 0], depth[0, 1] = 0.0, np.nan
        np.save(root / f"depth/{image_id}.npy", depth)
        edge = np.zeros((8, 10), np.float32)
        edge[:, 5] = 1
        np.save(root / f"edge/{image_id}.npy", edge)
    np.save(root / "depth/0002.npy", np.full((4, 5), 3.0, np.float32))  # half resolution: resized on load
    return root


def test_nyud_sample(nyud_root):
    data = NYUDMT(nyud_root, split="train")
    s = data[0]
    assert set(s) == {"image", "semseg", "normals", "edge", "depth", "meta"}
    # Stored 0 (unlabelled) -> 255 ignore, class k -> k - 1.
    assert s["semseg"][0, 0] == 255 and s["semseg"][0, 3] == 0 and s["semseg"][0, 9] == 39
    np.testing.assert_allclose(s["normals"][0, 0], [0.0, 0.6, 0.8])
    assert (s["normals"][:, 5:] == 0).all()
    assert s["depth"][0, 0] == 0 and s["depth"][0, 1] == 0 and s["depth"][5, 5] == pytest.approx(2.5)
    assert s["edge"].dtype == np.uint8 and s["edge"][:, 5].all() and s["edge"].sum() == 8
    resized = data[1]["depth"]
    assert resized.shape == (8, 10) and np.allclose(resized, 3.0)
    assert dataset_tasks("nyud") == {"semseg": 40, "normals": 3, "edge": 1, "depth": 1}
    model_ready = build_dataset("nyud", nyud_root, "train", ["depth"], 16, train=True)[0]
    assert model_ready["depth"].shape == (1, 16, 16)


def test_nyud_errors(nyud_root, tmp_path):
    with pytest.raises(DataError, match="not a NYUD_MT tree: missing images/, gt_sets/"):
        NYUDMT(tmp_path)
    with pytest.raises(ConfigError, match="available: semseg, normals, edge, depth"):
        NYUDMT(nyud_root, tasks=["sal"])
    (nyud_root / "gt_sets/val.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        NYUDMT(nyud_root, split="val")
    Image.fromarray(np.full((8, 10), 41, np.uint8)).save(nyud_root / "segmentation/0001.png")
    with pytest.raises(DataError, match="41 is outside 0..40"):
        NYUDMT(nyud_root, tasks=["semseg"])[0]
    (nyud_root / "edge/0002.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="0002.npy"):
        NYUDMT(nyud_root, tasks=["edge"])[1]
    (nyud_root / "depth/0002.npy").unlink()
    with pytest.raises(DataError, match="depth label file not found: .*0002.npy"):
        NYUDMT(nyud_root)
    assert nyud.available_tasks(nyud_root) == nyud.NYUD_TASKS
