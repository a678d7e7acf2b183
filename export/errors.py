"""Errors the export pipeline raises for bad input; the CLI turns them into one line (exit 1; 2 for flags)."""

from mtlora.errors import MTLoRAError, OptionError


class ExportError(MTLoRAError):
    """A model, checkpoint, option or artifact that the export pipeline cannot use."""


class ExportOptionError(ExportError, OptionError):
    """Flags of an export command that cannot work together (exit code 2, a usage error)."""
