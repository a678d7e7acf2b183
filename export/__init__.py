"""Torch side of deployment: merge adapters, export ONNX, references, the `mtlora-export` CLI."""
