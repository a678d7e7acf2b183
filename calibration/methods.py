"""The calibration methods an INT8 build may ask for (the build's `--calib-method` choices read this).

Kept apart from `calibration.qdq` so the command line lists them without importing the quantizer.
"""

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
