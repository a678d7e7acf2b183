"""The multi-task trainer: the official MTLoRA recipe, checkpoints without pickle, one or many processes.

Recipe (scale-lab/MTLoRA `main.py`, `optimizer.py`, `lr_scheduler.py`, `config.py`):
AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.05, none on biases and 1-D
tensors), a peak learning rate of 5e-4 scaled linearly by global batch / 512
(times the gradient accumulation steps), per-step linear warm-up from
lr * 1e-3 over 20 epochs then cosine decay to lr * 1e-2 over the rest of 300
epochs, applied one step late as the official loop applies it (`WarmupCosine`),
gradient clipping at 5.0 on the unscaled gradients, the official loss weights,
bf16 autocast on a CUDA GPU that has it, else fp16 autocast with a gradient
scaler (the official default).

Multi-process training: `torchrun --nproc-per-node N --no-python mtlora train
...` (or `train()` called in each process). Each process trains on its shard
(DistributedSampler) under DistributedDataParallel (NCCL on GPUs, gloo on
CPUs); rank 0 alone evaluates, logs and writes.

One module per job; where a change goes:

    config          TrainConfig: the run's settings and their checks
    schedule        the peak learning rate and WarmupCosine (one step behind, as upstream)
    optimizer       AdamW's parameter groups; OptimizerStep: accumulation, fp16 unscaling, clipping, the step
    precision       fp32 / bf16 / fp16 autocast and gradient scaler, and what 'auto' picks
    distributed     torchrun's process group, per-rank seeds, threads and loader workers, DDP helpers
    state           the optimiser state in `last/`, written atomically, checked field by field on --resume
    run_directory   what a run directory holds, the refusal of a foreign `--out`, the final assembly
    logs            metrics.jsonl, curves.png, the progress bar
    inputs          the model config sized to the data set (or the resumed one), the data sets
    trainer         train() and Trainer: the loop itself
"""

from mtlora.train.config import DEVICES, PRECISIONS, TrainConfig
from mtlora.train.distributed import (
    Distributed,
    average_buffers,
    default_threads,
    default_workers,
    seed_everything,
    setup_distributed,
    unused_parameters,
)
from mtlora.train.inputs import build_datasets, check_tasks, resolve_model_config, with_data_channels
from mtlora.train.logs import MetricsLog, plot_curves
from mtlora.train.optimizer import OptimizerStep, build_optimizer
from mtlora.train.precision import PRECISION_MODES, Precision, resolve_precision
from mtlora.train.run_directory import (
    BEST_DIR,
    CURVES_FILE,
    LAST_DIR,
    METRICS_FILE,
    RUN_ENTRIES,
    TRAINING_STATE_JSON,
    TRAINING_STATE_TENSORS,
    check_output_directory,
    finish_run_directory,
)
from mtlora.train.schedule import (
    LR_REFERENCE_BATCH,
    OFFICIAL_BASE_LR,
    OFFICIAL_MIN_LR,
    OFFICIAL_WARMUP_LR,
    WarmupCosine,
    peak_learning_rate,
)
from mtlora.train.state import (
    TRAINING_STATE_FIELDS,
    TRAINING_STATE_FORMAT,
    ResumePoint,
    load_optimizer_state,
    optimizer_state_tensors,
    read_resume_point,
    resolve_resume_dir,
    save_training_checkpoint,
    training_state_problem,
)
from mtlora.train.trainer import Trainer, TrainResult, train

__all__ = [
    "BEST_DIR", "CURVES_FILE", "DEVICES", "LAST_DIR", "LR_REFERENCE_BATCH", "METRICS_FILE", "OFFICIAL_BASE_LR",
    "OFFICIAL_MIN_LR", "OFFICIAL_WARMUP_LR", "PRECISIONS", "PRECISION_MODES", "RUN_ENTRIES", "TRAINING_STATE_FIELDS",
    "TRAINING_STATE_FORMAT", "TRAINING_STATE_JSON", "TRAINING_STATE_TENSORS", "Distributed", "MetricsLog",
    "OptimizerStep", "Precision", "ResumePoint", "TrainConfig", "TrainResult", "Trainer", "WarmupCosine",
    "average_buffers", "build_datasets", "build_optimizer", "check_output_directory", "check_tasks",
    "default_threads", "default_workers", "finish_run_directory", "load_optimizer_state", "optimizer_state_tensors",
    "peak_learning_rate", "plot_curves", "read_resume_point", "resolve_model_config", "resolve_precision",
    "resolve_resume_dir", "save_training_checkpoint", "seed_everything", "setup_distributed", "train",
    "training_state_problem", "unused_parameters", "with_data_channels",
]
