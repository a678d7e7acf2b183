"""Record what the official MTLoRA training code computes, for tests/test_train_parity.py.

Usage: python tools/official_training_fixtures.py OFFICIAL_ROOT OUT_DIR

OFFICIAL_ROOT is an extracted copy of scale-lab/MTLoRA (outside this repository); its `lr_scheduler.py`
and `optimizer.py` are imported from there and driven as its main.py drives them. Nothing of the
official code is copied here. Writes OUT_DIR/schedules.json and OUT_DIR/param_groups.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

# (epochs, warmup epochs, batches per epoch, accumulation steps, base lr, warm-up lr, min lr): the official
# defaults' ratios, fractional warm-up (floored), and accumulation with a remainder of batches per epoch.
SCHEDULES = [
    (3, 1, 10, 1, 5e-4, 5e-7, 5e-6),
    (4, 1.5, 12, 3, 1e-3, 1e-6, 1e-5),
    (5, 0.7, 7, 2, 2e-3, 2e-6, 2e-5),
    (2, 0, 6, 1, 1e-3, 1e-6, 1e-5),
]


def _config(epochs, warmup, base, warmup_lr, min_lr, accumulation):
    scheduler = SimpleNamespace(NAME="cosine", DECAY_EPOCHS=30, MULTISTEPS=[], WARMUP_PREFIX=True, DECAY_RATE=0.1,
                                GAMMA=0.1)
    optimizer = SimpleNamespace(NAME="adamw", EPS=1e-8, BETAS=(0.9, 0.999), MOMENTUM=0.9)
    train = SimpleNamespace(EPOCHS=epochs, WARMUP_EPOCHS=warmup, BASE_LR=base, WARMUP_LR=warmup_lr, MIN_LR=min_lr,
                            WEIGHT_DECAY=0.05, ACCUMULATION_STEPS=accumulation, LR_SCHEDULER=scheduler,
                            OPTIMIZER=optimizer)
    return SimpleNamespace(TRAIN=train)


def official_rates(build_scheduler, epochs, warmup, batches, accumulation, base, warmup_lr, min_lr):
    """The rate in the optimiser at each optimiser step, as main.py's train_one_epoch takes them."""
    config = _config(epochs, warmup, base, warmup_lr, min_lr, accumulation)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = build_scheduler(config, optimizer, batches // accumulation if accumulation > 1 else batches)
    rates = []
    for epoch in range(epochs):
        for idx in range(batches):
            if (idx + 1) % accumulation == 0:  # the optimiser steps here, with the rate it holds now
                rates.append(optimizer.param_groups[0]["lr"])
                scheduler.step_update((epoch * batches + idx) // accumulation)
    return rates


def main(official_root: str, out_dir: str) -> None:
    sys.path.insert(0, official_root)
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer

    from mtlora.cli.options import model_config_from_options
    from mtlora.model import MultiTaskSwin

    out = Path(out_dir)
    schedules = [{"epochs": e, "warmup_epochs": w, "batches_per_epoch": b, "accumulation_steps": a, "base_lr": lr,
                  "warmup_lr": wl, "min_lr": ml, "rates": official_rates(build_scheduler, e, w, b, a, lr, wl, ml)}
                 for e, w, b, a, lr, wl, ml in SCHEDULES]
    (out / "schedules.json").write_text(json.dumps(schedules, indent=1) + "\n")

    # Our tiny default model under the official build_optimizer. Like the official multi-task wrapper, it has no
    # no_weight_decay(), so the official rule is what main.py applies to the wrapper it builds.
    model = MultiTaskSwin(model_config_from_options(preset="default", img_size=32, decoder_channels=(8, 16, 32, 64)))
    optimizer = build_optimizer(_config(1, 0, 5e-4, 5e-7, 5e-6, 1), model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{"weight_decay": g["weight_decay"], "names": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    (out / "param_groups.json").write_text(json.dumps({"model": "preset default, img_size 32, decoder_channels "
                                                       "8,16,32,64", "groups": groups}, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
