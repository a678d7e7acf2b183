"""MTLoRA multi-task Swin Transformers: model, adapters, data, training.

Importing the package is cheap and torch-free, so that numpy-only parts
(`mtlora.metrics`, `mtlora.data.preprocess`) work on a device without PyTorch.
"""

__version__ = "0.1.0"
