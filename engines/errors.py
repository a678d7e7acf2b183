"""Errors raised by engine building and running; the CLI turns them into one line."""


class EngineError(Exception):
    """Base class: an engine could not be built, loaded or run from what we were given."""


class BackendUnavailable(EngineError):
    """The backend's SDK or device is not usable on this machine."""
