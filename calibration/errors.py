"""Errors raised while preparing calibration data or quantized graphs."""

from engines.errors import EngineError


class CalibrationError(EngineError):
    """Calibration data or a quantization step cannot be used as given (empty, too small, wrong shape...)."""
