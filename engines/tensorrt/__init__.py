"""TensorRT backend (10 and 11): strongly typed fp16/Q-DQ int8 plans, version-checked loading.

Importing this package does not import tensorrt; `build` and `load` do.
"""

from engines.tensorrt.build import build
from engines.tensorrt.runner import TensorRTRunner, load

__all__ = ["TensorRTRunner", "build", "load"]
