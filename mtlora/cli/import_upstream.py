"""`mtlora import-upstream`: a checkpoint of the official MTLoRA code, converted into ours."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("import-upstream")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Directory for our checkpoint.")
def import_upstream_cmd(checkpoint: str, out: str) -> None:
    """Convert a checkpoint written by the official MTLoRA code into our format (no pickle)."""
    from mtlora.checkpoint import save_checkpoint
    from mtlora.upstream import import_upstream

    model = import_upstream(checkpoint)
    save_checkpoint(model, out, {"source": str(Path(checkpoint).name), "imported_from": "scale-lab/MTLoRA"})
    click.echo(f"imported {checkpoint} -> {out} ({model.config.adapter.kind}, tasks {', '.join(model.tasks)})")
