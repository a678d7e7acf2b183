"""TensorRT backend (10 and 11): strongly typed fp16 / fp16 Q-DQ int8 plans, version-checked loading.

Importing this package does not import tensorrt; `build` and `load` do. Two modules need no
TensorRT at all: `engines.tensorrt.lint` (is an ONNX graph fit for TensorRT 10.3 / 10.13 / 11?) and
`engines.tensorrt.api_contract` (which TensorRT names the backend calls, for the API contract test).
"""

from engines.tensorrt.build import build
from engines.tensorrt.runner import TensorRTRunner, load

__all__ = ["TensorRTRunner", "build", "load"]
