"""INT8 calibration: calibration data as feed dicts, Q/DQ ONNX, caches. No torch."""
