"""The student as a file to ship: ONNX export checked against PyTorch, and INT8 quantisation with onnxruntime.

`export_run` writes into `<run folder>/export/`:

    student.onnx       FP32, opset `OPSET`, dynamic batch axis; input `inputs`, output `logits`
    student.int8.onnx  INT8: static QDQ quantisation calibrated on a slice of the public set when the
                       graph has convolutions (activation ranges must be known in advance), dynamic
                       (weights INT8, activations quantised at run time) for linear/MLP/transformer graphs
    export.json        parity (max |p_torch - p_onnx|, argmax agreement) and INT8 accuracy against FP32

Every figure is measured on the run's test set; calibration uses only the public set, which the server holds.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from common.errors import ConfigError
from common.files import PRIVATE, atomic_path, private_folder
from common.models.inputs import inputs_to_tensor
from server.results.run_folder import add_section, write_json
from simulations.student.load import load_run_split, load_run_student, softmax, torch_logits

EXPORT_DIR = "export"
ONNX_FP32 = "student.onnx"
ONNX_INT8 = "student.int8.onnx"
SUMMARY = "export.json"
# The legacy TorchScript exporter writes opsets 7-20; onnxruntime's CPU provider runs all of them and its
# quantisation tools need >= 10 (>= 13 for per-channel QDQ). 17 is the newest both sides have long supported.
OPSET = 17
INPUT, OUTPUT = "inputs", "logits"
CALIBRATION_SIZE = 512
QUANT_MODES = ("auto", "static", "dynamic")


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int = OPSET) -> None:
    """Write `model` as ONNX (batch axis dynamic) to `path`, atomically, and check the graph."""
    model.eval()
    with atomic_path(path, mode=PRIVATE) as tmp:
        with warnings.catch_warnings():
            # torch >= 2.9 announces the dynamo exporter as the default (the TorchScript one needs no onnxscript);
            # tracer notes on transformers' shape arithmetic are left out too: the parity check is the evidence
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", module=r"torch\.onnx")
            torch.onnx.export(
                model, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=[INPUT],
                output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            )
        onnx.checker.check_model(str(tmp))


def ort_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session with `threads` intra-op threads and no inter-op parallelism."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(session: ort.InferenceSession, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits (n, C) of an exported model on model inputs `x` (numpy, as the PyTorch model takes them)."""
    parts = [session.run([OUTPUT], {INPUT: x[start:start + batch]})[0] for start in range(0, len(x), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How far two models' probabilities (n, C) differ: max absolute difference and top-1 agreement."""
    return {
        "max_abs_prob_diff": float(np.abs(reference - candidate).max()) if reference.size else 0.0,
        "argmax_agreement": float((reference.argmax(axis=1) == candidate.argmax(axis=1)).mean()),
    }


class _CalibrationSlice(CalibrationDataReader):
    """Feeds the calibration inputs to onnxruntime's calibrator in batches."""

    def __init__(self, x: np.ndarray, batch: int = 64):
        self._batches = iter([{INPUT: x[start:start + batch]} for start in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantisation_mode(path: Path, mode: str = "auto") -> str:
    """"static" for graphs with convolutions, "dynamic" for the rest (linear layers, MLPs, transformers)."""
    if mode not in QUANT_MODES:
        raise ConfigError(f"quantisation mode must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    return "static" if any(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node) else "dynamic"


def quantise(fp32: Path, int8: Path, calibration: np.ndarray | None, mode: str = "auto") -> str:
    """INT8 copy of `fp32` at `int8`; returns the mode used.

    static:  QDQ format, weights INT8 per output channel, activations UINT8 with MinMax ranges from
             `calibration` (model inputs, e.g. a slice of the public set)
    dynamic: weights INT8; activation ranges computed per batch at run time (no calibration)
    """
    mode = quantisation_mode(fp32, mode)
    reader = None  # static only: the calibration inputs in batches
    if mode == "static":
        if calibration is None or not len(calibration):
            raise ConfigError("static quantisation needs calibration inputs (a slice of the public set)")
        reader = _CalibrationSlice(calibration)
    with atomic_path(int8, mode=PRIVATE) as tmp, tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))  # shape inference and graph optimisation first
        if reader is None:
            quantize_dynamic(str(prepared), str(tmp), weight_type=QuantType.QInt8)
        else:
            quantize_static(
                str(prepared), str(tmp), reader, quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    return mode


def export_run(run_dir: Path, *, calibration_size: int = CALIBRATION_SIZE, mode: str = "auto", threads: int = 1,
               data_dir: str | None = None) -> dict[str, Any]:
    """Export the run's student to `<run_dir>/export/`, check parity and quantise; returns the summary written."""
    if calibration_size < 1:
        raise ConfigError(f"calibration size must be >= 1 public samples, got {calibration_size}")
    student = load_run_student(run_dir, data_dir)
    split = load_run_split(student)
    out = private_folder(Path(run_dir) / EXPORT_DIR)
    x_test = inputs_to_tensor(split.test.inputs)
    labels = np.asarray(split.test.labels)
    calibration = inputs_to_tensor(split.public.inputs[:calibration_size]).numpy()

    export_onnx(student.model, x_test[:1], out / ONNX_FP32)
    torch_probs = softmax(torch_logits(student.model, x_test))
    fp32_probs = softmax(ort_logits(ort_session(out / ONNX_FP32, threads), x_test.numpy()))
    used = quantise(out / ONNX_FP32, out / ONNX_INT8, calibration, mode)
    int8_probs = softmax(ort_logits(ort_session(out / ONNX_INT8, threads), x_test.numpy()))

    accuracy = {name: float((p.argmax(axis=1) == labels).mean())
                for name, p in (("pytorch", torch_probs), ("onnx_fp32", fp32_probs), ("onnx_int8", int8_probs))}
    summary = {
        "run_dir": str(run_dir), "model": student.meta.model, "round": student.meta.round,
        "opset": OPSET, "test_samples": int(len(labels)),
        "files": {name: {"path": str(out / name), "bytes": (out / name).stat().st_size} for name in (ONNX_FP32, ONNX_INT8)},
        "parity_fp32": parity(torch_probs, fp32_probs),
        "int8": {
            "mode": used, "format": "QDQ, per-channel weights" if used == "static" else "weights INT8, activations per batch",
            "calibration": f"public[:{len(calibration)}]" if used == "static" else None,
            **{f"{k}_vs_fp32": v for k, v in parity(fp32_probs, int8_probs).items()},
            "accuracy_drop_points": round(100 * (accuracy["onnx_fp32"] - accuracy["onnx_int8"]), 2),
        },
        "accuracy": accuracy,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    }
    write_json(out / SUMMARY, summary)
    add_section(run_dir, "export", summary)  # results.json and report.md
    return summary
