"""Multi-task data sets (synthetic, PASCAL-Context, NYUD-v2), transforms and preprocessing.

Kept import-light on purpose: `mtlora.data.preprocess` is used by engines on
devices without PyTorch, so nothing here imports torch. The torch glue lives in
`mtlora.data.datasets`.
"""
