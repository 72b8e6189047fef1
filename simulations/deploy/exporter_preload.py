"""One of the runner's preloads (simulations.deploy.runner.PRELOAD): the ONNX exporter, warmed.

A teacher labels the public set in onnxruntime (common/models/onnx_engine.py), exporting itself first. The
exporter imports much of itself on its first export (about 0.6 s here after `torch.onnx` is imported): a task
forked from a task server that had not exported once would pay that in every task. Importing this module
exports a two-weight linear layer once, in the task server, so each task's first export costs what a later one
does. Nothing runs in parallel here (one tiny matrix product), so no thread pool exists yet when tasks fork.
"""

import torch
from torch import nn

from common.models.onnx_engine import onnx_bytes

onnx_bytes(nn.Linear(2, 1), torch.zeros(1, 2))
