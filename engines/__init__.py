"""Inference engines: one sub-package per backend; numpy in, numpy out, no torch."""
