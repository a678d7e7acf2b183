"""Errors the `mtlora` library raises for bad input; the CLI turns them into one line."""


class MTLoRAError(Exception):
    """Base class: a problem with what the user handed us, not a bug."""


class OptionError(MTLoRAError):
    """A flag's value, or a combination of flags, that cannot work whatever the input: a usage error,
    exit code 2 like click's own (the check needs more than click's types can see)."""


class ConfigError(MTLoRAError, ValueError):
    """An invalid model, adapter or training configuration."""


class CheckpointError(MTLoRAError):
    """A checkpoint that is missing, corrupt, unsafe or does not fit the model."""


class DataError(MTLoRAError):
    """A data set, image or label file that cannot be used."""


class MergeError(MTLoRAError):
    """Adapters that cannot be merged or unmerged as asked (already merged, not finite...)."""
