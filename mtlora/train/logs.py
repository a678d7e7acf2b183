"""What a run reports: `metrics.jsonl` (one record per epoch), `curves.png`, and the progress of an epoch
(a bar on a terminal, log lines otherwise)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

from mtlora.errors import CheckpointError
from mtlora.evaluate import json_ready, primary_metrics
from mtlora.fileio import write_bytes_atomic
from mtlora.metrics import TASK_METRICS

log = logging.getLogger("mtlora.train")


class MetricsLog:
    """`metrics.jsonl`: one flat JSON record per epoch, rewritten atomically on every append."""

    def __init__(self, path: Path, records: list[dict] | None = None):
        self.path = Path(path)
        self.records = list(records or [])

    @classmethod
    def read(cls, path: Path, up_to_epoch: int | None = None) -> list[dict]:
        """The records of a log, those after `up_to_epoch` left out. A line that is not a record is refused
        (rewriting the log would drop it), except an undecodable last line, which a crash may have cut."""
        path = Path(path)
        if not path.is_file():
            return []
        try:
            lines = path.read_text().splitlines()
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: cannot be read ({err}); move it away to resume") from None
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    continue
                record = None
            epoch = record.get("epoch") if isinstance(record, dict) else None
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise CheckpointError(f"{path}: line {number} is not a metrics record with an epoch; "
                                      "fix or remove that line to resume")
            if up_to_epoch is None or epoch <= up_to_epoch:
                records.append(record)
        return records

    def append(self, record: dict) -> None:
        self.records.append(record)
        self.write()

    def write(self) -> None:
        payload = "".join(json.dumps(json_ready(r), sort_keys=True) + "\n" for r in self.records)
        write_bytes_atomic(self.path, payload.encode())


def plot_curves(records: list[dict], path: Path) -> None:
    """Training and validation losses and the primary validation metrics per epoch, as one PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    # The primary metric of each task (what Delta_m compares) and Delta_m itself; the rest is in metrics.jsonl.
    primary = {f"val/{task}/{name}" for task, (name, _) in TASK_METRICS.items()} | {"val/delta_m"}
    metric_keys = sorted({k for r in records for k in r if k in primary})
    panels = ["loss"] + metric_keys
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    loss_keys = sorted({k for r in records for k in r if k.startswith(("train/loss", "val/loss"))})
    ax = axes[0][0]
    for key in loss_keys:
        points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        if points:
            style = "-" if key.startswith("train/") else "--"
            ax.plot(*zip(*points, strict=True), style, marker=".", label=key.replace("/loss", "").replace("/", " ") or key)
    ax.set_yscale("log")
    ax.set_title("loss (total: weighted sum)")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=6)
    for i, key in enumerate(metric_keys, start=1):
        ax = axes[i // cols][i % cols]
        points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".")
        ax.set_title(key[len("val/"):])
        ax.set_xlabel("epoch")
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def flat_metrics(results: dict) -> dict[str, float]:
    """The scalar validation numbers of an `evaluate` result as `val/<task>/<metric>` keys."""
    flat = {}
    for task, metrics in results["tasks"].items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not name.endswith("threshold"):
                flat[f"val/{task}/{name}"] = float(value)
    for task, value in results.get("loss", {}).items():
        flat["val/loss" if task == "total" else f"val/loss/{task}"] = float(value)
    if results.get("delta_m") is not None:
        flat["val/delta_m"] = float(results["delta_m"])
    return flat


def progress_enabled() -> bool:
    return sys.stderr.isatty()


class Progress:
    """A tqdm bar on a terminal; otherwise a plain log line a few times per epoch."""

    def __init__(self, total: int, description: str, enabled: bool, bar: bool):
        self.total, self.description, self.enabled = total, description, enabled
        self.every = max(1, total // 4)
        self.bar = None
        if enabled and bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        text = {k: f"{v:.4g}" for k, v in values.items()}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(text, refresh=False)
        elif step % self.every == 0 or step == self.total:
            log.info("%s step %d/%d %s", self.description, step, self.total,
                     " ".join(f"{k} {v}" for k, v in text.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_line(results: dict) -> str:
    parts = [f"{task} {name} {value:.2f}" for task, (name, value) in primary_metrics(results).items()]
    if results.get("delta_m") is not None:
        parts.append(f"delta_m {results['delta_m']:+.2f}%")
    if "loss" in results:
        parts.append(f"val loss {results['loss']['total']:.4f}")
    return ", ".join(parts)
