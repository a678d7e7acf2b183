"""Our model computes what the official MTLoRA code computes."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mtlora.checkpoint import load_checkpoint, save_checkpoint
from mtlora.errors import CheckpointError
from mtlora.upstream import import_upstream
from tests.official_checkpoints import make_official_checkpoint
from tests.upstream_reference import official_forward

# CI clones the repo with shared/ beside it, as on the developers' machines.
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "upstream-mtlora-tiny"


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE / "reference_io.npz"))


def _max_diff(outputs, reference):
    return {t: float(np.abs(outputs[t].numpy() - reference[t]).max()) for t in outputs}


def test_fixture_reproduces_official_outputs(reference):
    model = import_upstream(FIXTURE / "checkpoint.pth")
    assert model.tasks == ("semseg", "human_parts", "sal", "normals")
    with torch.no_grad():
        out = model.predict(torch.from_numpy(reference["input"]))
    diffs = _max_diff(out, reference)
    assert max(diffs.values()) <= 1e-4, diffs
    # The outputs are not trivially small: a wrong branch would show.
    assert all(np.abs(reference[t]).max() > 0.1 for t in out)


def test_fixture_survives_our_checkpoint_round_trip(reference, tmp_path):
    save_checkpoint(import_upstream(FIXTURE / "checkpoint.pth"), tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors", "state.json"]
    model = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        out = model.predict(torch.from_numpy(reference["input"]))
    assert max(_max_diff(out, reference).values()) <= 1e-4


def test_independent_reference_agrees_with_fixture(reference):
    # The functional reference used below for other configurations is itself checked here.
    from mtlora.safe_pickle import load_allowlisted

    sd = load_allowlisted(FIXTURE / "checkpoint.pth")["model"]
    cfg = dict(img=64, patch=4, embed=24, depths=[2, 2, 2, 2], heads=[1, 2, 4, 8], window=4,
               tasks=["semseg", "human_parts", "sal", "normals"], mode="matrix", shared_scale=4.0, task_scale=4.0,
               mtlora=True)
    out = official_forward(sd, cfg, torch.from_numpy(reference["input"]))
    assert max(_max_diff(out, reference).values()) <= 1e-4


@pytest.mark.parametrize(
    "kind,mode,tasks,shared_rank,task_rank",
    [
        ("mtlora", "matrixv2", ("semseg", "human_parts", "sal", "normals"), 8, 4),
        ("mtlora+", "matrix", ("semseg", "human_parts", "sal", "normals"), 8, 4),
        ("mtlora", "matrix", ("semseg", "edge", "normals"), 16, 2),
        ("mtlora+", "matrixv2", ("sal", "edge", "depth"), 4, 8),
        ("lora", "matrix", ("semseg", "sal"), 8, 4),
    ],
)
def test_other_official_configurations(tmp_path, kind, mode, tasks, shared_rank, task_rank):
    path = tmp_path / "upstream.pth"
    sd, cfg = make_official_checkpoint(path, kind=kind, mode=mode, tasks=tasks, shared_rank=shared_rank,
                                       task_rank=task_rank, seed=hash((kind, mode)) % 1000)
    model = import_upstream(path)
    assert model.config.adapter.kind == kind
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.predict(image)
    expected = official_forward(sd, cfg, image)
    for t in tasks:
        assert ours[t].shape == expected[t].shape
        assert float((ours[t] - expected[t]).abs().max()) <= 1e-4, t
        assert float(expected[t].abs().max()) > 1e-3


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/mtlora-pwned",))


def test_pickle_with_code_is_refused_and_nothing_runs(tmp_path):
    marker = Path("/tmp/mtlora-pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "config": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="refused.*os.system|refused.*posix.system"):
        import_upstream(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_non_checkpoints_are_refused(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        import_upstream(path)


def test_truncated_upstream_checkpoint_is_refused(tmp_path):
    data = (FIXTURE / "checkpoint.pth").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        import_upstream(path)


def test_plain_state_dict_is_not_an_upstream_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not an official MTLoRA checkpoint"):
        import_upstream(path)
