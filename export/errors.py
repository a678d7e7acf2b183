"""Errors the export pipeline raises for bad input; the CLI turns them into one line (exit 1)."""

from mtlora.errors import MTLoRAError


class ExportError(MTLoRAError):
    """A model, checkpoint, option or artifact that the export pipeline cannot use."""
