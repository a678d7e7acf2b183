"""One loader for any checkpoint a user hands us: our checkpoint directory or an official MTLoRA .pth.

`mtlora.checkpoint` reads our format and `mtlora.upstream` the official one; this
module picks between them and, when asked for another input size, rebuilds the
model at that size (attention masks depend on it) with the same weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mtlora.checkpoint import WEIGHTS_FILE, load_checkpoint, load_into
from mtlora.config import check_input_size
from mtlora.errors import CheckpointError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")


def _is_torch_file(path: Path) -> bool:
    # torch.save writes a zip archive (PK) or, in the legacy format, a pickle (protocol byte 0x80).
    with open(path, "rb") as fh:
        head = fh.read(2)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def load_any(path: str | Path, img_size: int | None = None) -> torch.nn.Module:
    """A MultiTaskSwin (eval mode) from our checkpoint directory or an official MTLoRA .pth.

    With `img_size` different from the checkpoint's, the model is rebuilt at that size and
    loads the same weights; sizes that change a stage's window are refused.
    """
    from mtlora.model import MultiTaskSwin

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.is_dir() or path.name == WEIGHTS_FILE:
        model = load_checkpoint(path)
    elif path.suffix in TORCH_SUFFIXES or _is_torch_file(path):
        from mtlora.upstream import import_upstream

        model = import_upstream(path)
    else:
        raise CheckpointError(f"{path}: not a checkpoint directory or an official MTLoRA .pth file")
    if img_size is None or img_size == model.config.swin.img_size:
        return model.eval()
    config = copy.deepcopy(model.config)
    check_input_size(config.swin, img_size)
    config.swin.img_size = img_size
    resized = MultiTaskSwin(config)
    if getattr(model, "merged", False):
        from mtlora.merge import mark_merged

        mark_merged(resized)
    try:
        load_into(resized, model.state_dict(), str(path))
    except CheckpointError as err:
        raise CheckpointError(
            f"input size {img_size} does not fit this checkpoint (a stage's window size changes): {err}"
        ) from None
    return resized.eval()
