"""OpenVINO backend: IR + exported compiled blob, explicit inference precision, NNCF int8."""

from engines.openvino.build import build
from engines.openvino.runner import OpenVINORunner, load

__all__ = ["OpenVINORunner", "build", "load"]
