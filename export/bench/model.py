"""The benchmark's models: a briefly trained MTLoRA Swin-T (so accuracy columns mean something), the same
network without adapters, and the unmerged model's ONNX.

The MTLoRA model is trained the way the paper fine-tunes one, on the synthetic set: the backbone's
full-rank weights stay frozen at a seeded random initialisation (there is no pretrained Swin-T here),
while the adapters, norms, position biases, patch embedding, merging and decoders learn. It trains
at 224x224, four times cheaper than 448 on a CPU, and is benchmarked at 448: the weights do not
depend on the input size (`mtlora.loading.load_any(img_size=...)`). Training stops once every task
clearly beats the untrained copy (`CLEAR_MARGIN`), and is cached under the work directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from export.artifacts.files import write_bytes_atomic
from export.errors import ExportError

TASKS = ("semseg", "human_parts", "sal", "normals")
IMG_SIZE, TRAIN_SIZE, SHARED_RANK, TASK_RANK, SCALE = 448, 224, 64, 4, 4.0
# What "clearly beats an untrained copy" means, per task's primary metric on the synthetic validation set.
CLEAR_MARGIN = {"semseg": ("mIoU", 10.0), "human_parts": ("mIoU", 10.0), "sal": ("mIoU", 10.0),
                "normals": ("mean", -10.0)}
TRAIN_ROUNDS = 3  # each round: TRAIN_EPOCHS more epochs, until the margins hold

TRAIN_ARGS = ["--data", "synthetic", "--variant", "swin_tiny", "--img-size", str(TRAIN_SIZE), "--tasks", ",".join(TASKS),
              "--adapter", "mtlora", "--shared-rank", str(SHARED_RANK), "--task-rank", str(TASK_RANK),
              "--shared-scale", f"{SCALE:g}", "--task-scale", f"{SCALE:g}", "--lora-dropout", "0", "--drop-path", "0",
              "--batch-size", "8", "--train-samples", "256", "--val-samples", "32", "--steps-per-epoch", "16",
              "--warmup-epochs", "0.5", "--lr", "2e-3", "--eval-every", "1", "--eval-initial", "--save-every", "1",
              "--seed", "0"]
TRAIN_EPOCHS = 4

Say = Callable[[str], None]


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def training_summary(run: Path) -> dict[str, dict[str, float]]:
    """{task: {"untrained": value, "trained": value}} of each primary metric, from the run's log."""
    records = [r for r in _metrics(run) if any(k.startswith("val/") for k in r)]
    if len(records) < 2:
        return {}
    first, last = records[0], records[-1]
    return {t: {"metric": m, "untrained": first.get(f"val/{t}/{m}"), "trained": last.get(f"val/{t}/{m}")}
            for t, (m, _) in CLEAR_MARGIN.items()}


def clearly_trained(summary: dict[str, dict[str, float]]) -> bool:
    if not summary:
        return False
    for task, (_, margin) in CLEAR_MARGIN.items():
        row = summary[task]
        if row["trained"] is None or row["untrained"] is None:
            return False
        gain = row["trained"] - row["untrained"]
        if (gain < margin) if margin > 0 else (gain > margin):
            return False
    return True


def train_bench_model(run: Path, say: Say) -> Path:
    """The trained checkpoint (a run directory), trained here if it is not there yet."""
    for round_ in range(TRAIN_ROUNDS):
        summary = training_summary(run)
        if (run / "model.safetensors").is_file() and clearly_trained(summary):
            return run
        epochs = TRAIN_EPOCHS * (round_ + 1)
        resume = ["--resume", str(run)] if (run / "last").is_dir() else []
        say(f"[bench-docs] training the benchmark model at {TRAIN_SIZE}x{TRAIN_SIZE} to epoch {epochs} "
            f"(frozen seeded backbone; adapters and decoders learn)")
        command = [sys.executable, "-m", "mtlora.cli", "train", *TRAIN_ARGS, "--epochs", str(epochs), "--out",
                   str(run), *resume]
        if subprocess.run(command).returncode != 0:
            raise ExportError(f"training the benchmark model failed (see above); its run is in {run}")
    summary = training_summary(run)
    if not clearly_trained(summary):
        raise ExportError(f"the benchmark model does not clearly beat an untrained copy after "
                          f"{TRAIN_EPOCHS * TRAIN_ROUNDS} epochs: {summary}")
    return run


def adapter_free_checkpoint(out: Path, seed: int = 0) -> Path:
    """The same multi-task Swin-T without adapters (kind 'full'), random weights (the same bytes every run)."""
    from mtlora.checkpoint import save_checkpoint
    from mtlora.config import AdapterConfig, ModelConfig, SwinConfig
    from mtlora.model import MultiTaskSwin

    config = ModelConfig(swin=SwinConfig.from_variant("swin_tiny", img_size=IMG_SIZE),
                         adapter=AdapterConfig(kind="full"), tasks=TASKS)
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()) == json.loads(config.to_json()):
        return out
    import torch

    model = MultiTaskSwin(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            around_one = name.endswith(("norm1.weight", "norm2.weight"))
            param.copy_(0.05 * torch.randn(param.shape, generator=gen) + (1.0 if around_one else 0.0))
    save_checkpoint(model, out)
    return out


def export_unmerged(checkpoint: Path, out: Path) -> Path:
    """The unmerged MultiTaskSwin traced as it is (LoRA branches as separate MatMuls), then onnxslim'd.

    `export_onnx` always merges and folds, so this traces the model directly with
    the same exporter settings: TorchScript-based, opset 17, dynamic batch.
    """
    import onnx
    import onnxslim
    import torch

    from mtlora.loading import load_any

    if out.is_file():
        return out
    model = load_any(checkpoint, IMG_SIZE).float().eval()
    image = torch.randn(2, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(0))
    names = list(model.tasks)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (image,), str(tmp), dynamo=False, opset_version=17, input_names=["image"],
                          output_names=names, dynamic_axes={n: {0: "batch"} for n in ["image", *names]},
                          do_constant_folding=True)
        slimmed = onnxslim.slim(onnx.load(str(tmp)))
    tmp.unlink()
    write_bytes_atomic(out, slimmed.SerializeToString())
    return out


def export_adapter_free(checkpoint: Path, out_dir: Path) -> Path:
    from export.onnx.exporter import export_onnx
    from mtlora.loading import load_any

    path = out_dir / "model.onnx"
    if not path.is_file():
        export_onnx(load_any(checkpoint), out_dir)
    return path


def check_against_torch(checkpoint: Path, onnx_path: Path) -> float:
    """Max abs difference between ONNX Runtime and the PyTorch model on one image: the graph computes the model."""
    import onnxruntime as ort
    import torch

    from mtlora.loading import load_any

    model = load_any(checkpoint, IMG_SIZE).float().eval()
    image = np.random.default_rng(1).standard_normal((1, 3, IMG_SIZE, IMG_SIZE), dtype=np.float32)
    with torch.inference_mode():
        expected = [t.numpy() for t in model(torch.from_numpy(image))]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: image})
    return max(float(np.abs(a - b).max()) for a, b in zip(got, expected, strict=True))
