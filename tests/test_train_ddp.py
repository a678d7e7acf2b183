"""Two-process DistributedDataParallel training on CPU (gloo): the ranks stay in lockstep.

The ranks are started from a fresh interpreter, as `torchrun` starts them: the test session's own process
has loaded OpenVINO and NNCF by now, whose thread pools do not survive next to gloo's processes (the
session crashed there).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out: str, weights_dir: str, accumulation: int = 1) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE))
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mtlora.cli.options import model_config_from_options
    from mtlora.train import TrainConfig, Trainer, setup_distributed

    unsynced = []  # micro-batches run under no_sync (their gradients are not all-reduced)
    real_no_sync = DistributedDataParallel.no_sync

    def counting_no_sync(self):
        unsynced.append(1)
        return real_no_sync(self)

    DistributedDataParallel.no_sync = counting_no_sync

    ctx = setup_distributed("cpu")
    assert dist.get_backend() == "gloo" and ctx.world_size == WORLD_SIZE
    model_config = model_config_from_options(preset="default", img_size=32, decoder_channels=(8, 16, 32, 64))
    config = TrainConfig(data="synthetic", epochs=1, warmup_epochs=0.0, batch_size=4, lr=3e-3, train_samples=32 * accumulation,
                         val_samples=4, steps_per_epoch=3 * accumulation, workers=0, threads=1, save_every=1, seed=0,
                         accumulation_steps=accumulation)
    trainer = Trainer(model_config, config, Path(out), None, False, ctx)
    result = trainer.run()
    assert result.steps == 3  # one optimiser step per `accumulation` batches
    assert len(unsynced) == 3 * (accumulation - 1), unsynced  # every micro-batch but the step's last
    state = {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(state, os.path.join(weights_dir, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    # Accumulating over 2 micro-batches exercises both kinds of backward: the step's last, which all-reduces,
    # and the one before, which must not (one run of two processes costs 13 s; accumulation 1 adds nothing).
    accumulation = 2
    out, weights_dir = tmp_path / "run", tmp_path / "weights"
    weights_dir.mkdir()
    script = ("import torch.multiprocessing as mp; from tests.test_train_ddp import _worker, _free_port, WORLD_SIZE; "
              f"mp.spawn(_worker, args=(_free_port(), {str(out)!r}, {str(weights_dir)!r}, {accumulation}), "
              "nprocs=WORLD_SIZE, join=True)")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr[-3000:]

    rank0 = load_file(str(weights_dir / "rank0.safetensors"))
    rank1 = load_file(str(weights_dir / "rank1.safetensors"))
    written = load_file(str(out / "model.safetensors"))  # rank 0 alone writes the run directory
    assert rank0.keys() == rank1.keys() == written.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], written[key]), key
    # The ranks trained (on different shards) rather than agreeing on the initial weights.
    from mtlora.cli.options import model_config_from_options
    from mtlora.model import MultiTaskSwin

    torch.manual_seed(0)
    lora = "backbone.layers.0.blocks.0.attn.qkv.lora_B.shared"
    assert torch.count_nonzero(rank0[lora]) > 0  # LoRA B starts at zero
    assert MultiTaskSwin(model_config_from_options(preset="default", img_size=32)).state_dict()[lora].abs().sum() == 0
    assert (out / "last" / "training_state.json").is_file()
