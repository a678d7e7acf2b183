"""TensorRT backend (10 and 11): strongly typed fp16 / fp16 Q-DQ int8 plans, version-checked loading.

Importing this package does not import tensorrt; `build` and `load` do. Several modules need no
TensorRT at all: `engines.tensorrt.lint` (is an ONNX graph fit for TensorRT 10.3 / 10.13 / 11.0 /
11.5, and is it meant for it?), `engines.tensorrt.dla` (what a DLA core could not run),
`engines.tensorrt.cache` (timing and plan caches per device) and `engines.tensorrt.api_contract`
(which TensorRT names the backend calls, for the API contract test). `engines.tensorrt.timing` times
an engine as trtexec does (it needs the GPU, not the import).
"""

from engines.tensorrt.build import build
from engines.tensorrt.runner import TensorRTRunner, load

__all__ = ["TensorRTRunner", "build", "load"]
