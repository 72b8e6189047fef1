"""ONNX Runtime as an inference engine for the project's models: the same exporter, opset and session settings
for a teacher's labelling pass, the server's evaluation and `fedstill export`.

Why: labelling the public set is one of a round's largest costs on a node. Measured here (1 thread, 10,000
Fashion-MNIST images, `scripts/bench_inference.py`), a model exported once and run in onnxruntime labels the
set several times faster than eager PyTorch under `torch.inference_mode()`, and exporting a freshly trained
teacher costs 0.02-0.2 s (the first export in a process also imports the exporter, about
2 s). The logits agree with PyTorch's to float32 rounding (`tests/unit/common/models/test_onnx_engine.py`).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    import onnxruntime as ort

# The legacy TorchScript exporter writes opsets 7-20; onnxruntime's CPU provider runs all of them and its
# quantisation tools need >= 10 (>= 13 for per-channel QDQ). 17 is the newest both sides have long supported.
OPSET = 17
INPUT, OUTPUT = "inputs", "logits"
# onnxruntime's QDQ propagation moves the QuantizeLinear that follows an FP32 block up across its MaxPool, which then
# runs on uint8 in NCHW: 2.4 ms of a 3.5 ms batch of 64 for cnn-student (ort 1.32). Without it the MaxPool stays in
# FP32's blocked layout. Nothing else in these graphs uses it; an FP32 or dynamic INT8 graph has no QDQ pairs.
DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)
ORT_BATCH = 256  # rows per session call: 64-256 were the fastest here, 1,024 slower (bench_inference.py)
LOG = logging.getLogger(__name__)


def onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int = OPSET) -> bytes:
    """`model` in eval mode as an ONNX graph (batch axis dynamic; input `INPUT`, output `OUTPUT`)."""
    model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch >= 2.9 announces the dynamo exporter as the default (the TorchScript one needs no onnxscript);
        # tracer notes on transformers' shape arithmetic are left out too: parity checks are the evidence
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", module=r"torch\.onnx")
        torch.onnx.export(
            model, (example,), buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes file objects too
            dynamo=False, opset_version=opset, input_names=[INPUT],
            output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )
    return buffer.getvalue()


def ort_session(graph: bytes | str | os.PathLike[str], threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session (graph bytes or a file path) with `threads` intra-op threads, no inter-op."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))


def ort_logits(session: ort.InferenceSession, x: np.ndarray, batch: int = ORT_BATCH) -> np.ndarray:
    """Logits (n, C) of an exported model on model inputs `x` (numpy, as the PyTorch model takes them)."""
    parts = [session.run([OUTPUT], {INPUT: x[start:start + batch]})[0] for start in range(0, len(x), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def exported_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """`model`'s logits on float inputs `x` (n, ...) computed in onnxruntime with torch's thread count, or None
    when the model does not export (the caller then runs it in PyTorch; the reason is logged once per model type)."""
    try:
        graph = onnx_bytes(model, x[:1])
    except Exception as error:  # noqa: BLE001  any exporter failure means: run this model in PyTorch
        _note_fallback(type(model).__name__, error)
        return None
    session = ort_session(graph, threads=max(1, torch.get_num_threads()))
    return torch.from_numpy(ort_logits(session, np.ascontiguousarray(x.numpy(), dtype=np.float32)))


_FELL_BACK: set[str] = set()


def _note_fallback(kind: str, error: Exception) -> None:
    if kind not in _FELL_BACK:
        _FELL_BACK.add(kind)
        LOG.info("%s does not export to ONNX (%s: %s); it runs in PyTorch", kind, type(error).__name__, error)
