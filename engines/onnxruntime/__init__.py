"""ONNX Runtime backend: fp32 / fp16 / int8 (Q/DQ) ONNX engines run with any installed provider."""

from engines.onnxruntime.build import build
from engines.onnxruntime.runner import OnnxRuntimeRunner, load

__all__ = ["OnnxRuntimeRunner", "build", "load"]
