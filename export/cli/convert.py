"""`mtlora-export merge` and `mtlora-export onnx`: thin commands over mtlora.merge / export.onnx.exporter.

torch is imported inside the commands, so registering them costs nothing on a
device without PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import click

from export.cli.options import parse_tasks, say
from export.errors import ExportError, ExportOptionError
from export.pipeline.options import LAYOUTS


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the merged checkpoint.")
def merge(checkpoint: Path, out: Path) -> None:
    """Merge the task-agnostic adapters of CHECKPOINT into its frozen weights.

    CHECKPOINT is a checkpoint directory or an official MTLoRA .pth. Task-specific
    adapters stay low-rank; the result is a checkpoint with state merged=true.
    """
    from export.artifacts.files import checkpoint_sha256
    from mtlora.checkpoint import save_checkpoint
    from mtlora.loading import load_any
    from mtlora.merge import merge_model, parameter_report

    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; choose another output path")
    if out.resolve() == checkpoint.resolve():
        raise ExportOptionError(f"--out {out}: is the checkpoint itself; write the merged checkpoint beside the "
                                "original, not over it")
    model = load_any(checkpoint)
    report = parameter_report(model)
    merge_model(model, safe=True)
    save_checkpoint(model, out, extra_state={"merged_from_sha256": checkpoint_sha256(checkpoint)})
    before, after = report["before"], report["after"]
    click.echo(f"merged {report['adapter_layers']} adapter layers into the frozen weights")
    click.echo(f"inference parameters: {before['params']:,} -> {after['params']:,}")
    click.echo(f"inference bytes:      {_mib(before['bytes'])} -> {_mib(after['bytes'])}")
    click.echo(f"wrote {out}")


@click.command("onnx")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the export.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="single", show_default=True,
              help="single: model.onnx; split: backbone.onnx + head_<task>.onnx.")
@click.option("--tasks", default=None, help="Comma-separated subset of the model's tasks (default: all).")
@click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True, help="ONNX opset.")
@click.option("--reference-samples", type=click.IntRange(min=0), default=2, show_default=True,
              help="Seeded samples for reference.npz (0: no reference file).")
@click.option("--img-size", type=click.IntRange(min=1), default=None,
              help="Input size to export at (default: the checkpoint's).")
@click.option("--postprocess", is_flag=True,
              help="Post-process in the graph: class ids (uint8), probabilities, unit normals, instead of raw maps.")
def onnx_command(checkpoint: Path, out: Path, layout: str, tasks: str | None, opset: int,
                 reference_samples: int, img_size: int | None, postprocess: bool) -> None:
    """Export CHECKPOINT (a checkpoint directory or an official .pth) to ONNX.

    Writes the graph(s), reference.npz from the unmerged PyTorch model and
    manifest.json into OUT, then prints where the initializer bytes go.
    """
    from export.onnx.cost import cost_breakdown, format_cost
    from export.onnx.exporter import export_checkpoint

    result = export_checkpoint(checkpoint, out, layout=layout, tasks=parse_tasks(tasks), opset=opset,
                               reference_samples=reference_samples, img_size=img_size, progress=say,
                               postprocess=postprocess)
    click.echo(format_cost(cost_breakdown(result.paths)))
    click.echo(f"wrote {out} ({', '.join(result.files.values())}, manifest.json)")
