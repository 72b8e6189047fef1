"""The student as a file to ship: ONNX export checked against PyTorch, and INT8 quantisation with onnxruntime.

`export_run` writes into `<run folder>/export/`:

    student.onnx       FP32, opset `OPSET`, dynamic batch axis; input `inputs`, output `logits`
    student.int8.onnx  INT8: static QDQ quantisation calibrated on a slice of the public set when the
                       graph has convolutions (activation ranges must be known in advance; the convolution
                       that reads the image stays FP32, where it is faster), dynamic (weights INT8, activations
                       quantised at run time) for linear/MLP/transformer graphs
    export.json        parity (max |p_torch - p_onnx|, argmax agreement), INT8 accuracy against FP32, both models'
                       speed in onnxruntime (timed in this run, interleaved, at `BATCHES`) and the precision to ship:
                       INT8 only where it is faster at every batch size and within 1 point (student/comparison.py)

Every figure is measured on the run's test set; calibration uses only the public set, which the server holds.
"""

from __future__ import annotations

import tempfile
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
from common.models.onnx_engine import DISABLED_OPTIMIZERS, INPUT, OPSET, onnx_bytes, ort_logits, ort_session
from server.results.run_folder import add_section, write_json
from simulations.student.comparison import ORT_FP32, ORT_INT8, STUDENT, engine_name, recommend_precision
from simulations.student.load import load_run_split, load_run_student, softmax, torch_logits
from simulations.student.timing import Engine, figures, measure

EXPORT_DIR = "export"
ONNX_FP32 = "student.onnx"
ONNX_INT8 = "student.int8.onnx"
SUMMARY = "export.json"
CALIBRATION_SIZE = 512
STATIC_FORMAT = "QDQ, per-channel weights; convolutions reading the input kept FP32"
DYNAMIC_FORMAT = "weights INT8, activations per batch"
QUANT_MODES = ("auto", "static", "dynamic")
BATCHES = (1, 64)  # the batch sizes `fedstill export` and `fedstill bench` time


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int = OPSET) -> None:
    """Write `model` as ONNX (batch axis dynamic) to `path`, atomically, and check the graph."""
    with atomic_path(path, mode=PRIVATE) as tmp:
        tmp.write_bytes(onnx_bytes(model, example, opset))
        onnx.checker.check_model(str(tmp))


def ort_engine(path: Path, threads: int) -> Engine:
    """An exported model as a timing engine: a batch of model inputs in, its outputs out."""
    session = ort_session(path, threads)
    return lambda x: session.run(None, {INPUT: x})


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


def input_convolutions(path: Path) -> list[str]:
    """The Conv nodes that read the graph's input (the image itself): static quantisation keeps them in FP32.

    A grayscale image gives such a convolution a reduction depth of 1 x 3 x 3 = 9: onnxruntime's INT8 convolution
    (im2col, then a u8s8 GEMM with 9-deep dot products, then requantising every output) took 1.9 ms of a batch of
    64 where its FP32 convolution (blocked NCHWc kernels) took 0.2 ms; the next convolution (16 x 3 x 3 = 144 deep)
    is 2.2x faster in INT8 than in FP32 (cnn-student on Fashion-MNIST, ort 1.32, one thread; docs/export.md)."""
    graph = onnx.load(str(path)).graph
    inputs = {i.name for i in graph.input} - {init.name for init in graph.initializer}
    return [node.name for node in graph.node if node.op_type == "Conv" and node.input[0] in inputs]


def quantise(fp32: Path, int8: Path, calibration: np.ndarray | None, mode: str = "auto") -> str:
    """INT8 copy of `fp32` at `int8`; returns the mode used.

    static:  QDQ format, weights INT8 per output channel, activations UINT8 with MinMax ranges from
             `calibration` (model inputs, e.g. a slice of the public set); the convolutions that read the input
             stay FP32 (`input_convolutions`)
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
                calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=input_convolutions(prepared),
            )
    return mode


def export_pair(model: nn.Module, example: torch.Tensor, fp32: Path, int8: Path, calibration: np.ndarray | None,
                mode: str = "auto") -> str:
    """`model` as ONNX FP32 at `fp32` and quantised to INT8 at `int8` (see `quantise`); returns the INT8 mode used."""
    export_onnx(model, example, fp32)
    return quantise(fp32, int8, calibration, mode)


def time_precisions(fp32: Path, int8: Path, inputs: np.ndarray, *, threads: int = 1, batches: tuple[int, ...] = BATCHES,
                    iterations: int = 300, warmup: int = 30, rounds: int = 20) -> dict[str, Any]:
    """The FP32 and INT8 files answering the same inputs in onnxruntime, timed in interleaved blocks (student/timing.py)."""
    engines = {engine_name(STUDENT, ORT_FP32): ort_engine(fp32, threads), engine_name(STUDENT, ORT_INT8): ort_engine(int8, threads)}
    table = figures(measure(engines, inputs[:max(batches)], batches, iterations, warmup, rounds), reference=next(iter(engines)))
    for rows in table.values():  # ratios to FP32 here, not to a teacher: named so
        for row in rows.values():
            row["throughput_x_fp32"], row["p50_vs_fp32"] = row.pop("throughput_x_teacher"), row.pop("p50_vs_teacher")
    return {"threads": threads, "batches": list(batches), "iterations": iterations, "rounds": rounds, "warmup": warmup,
            "engines": table}


def export_run(run_dir: Path, *, calibration_size: int = CALIBRATION_SIZE, mode: str = "auto", threads: int = 1,
               data_dir: str | None = None, iterations: int = 300, rounds: int = 20, warmup: int = 30) -> dict[str, Any]:
    """Export the run's student to `<run_dir>/export/`, check parity, quantise, time FP32 against INT8 and recommend
    one; returns the summary written."""
    if calibration_size < 1:
        raise ConfigError(f"calibration size must be >= 1 public samples, got {calibration_size}")
    if threads < 1 or iterations < 1 or rounds < 1:
        raise ConfigError(f"threads, iterations and rounds must be >= 1, got {threads}, {iterations}, {rounds}")
    student = load_run_student(run_dir, data_dir)
    split = load_run_split(student)
    out = private_folder(Path(run_dir) / EXPORT_DIR)
    x_test = inputs_to_tensor(split.test.inputs)
    labels = np.asarray(split.test.labels)
    calibration = inputs_to_tensor(split.public.inputs[:calibration_size]).numpy()

    used = export_pair(student.model, x_test[:1], out / ONNX_FP32, out / ONNX_INT8, calibration, mode)
    torch_probs = softmax(torch_logits(student.model, x_test))
    fp32_probs = softmax(ort_logits(ort_session(out / ONNX_FP32, threads), x_test.numpy()))
    int8_probs = softmax(ort_logits(ort_session(out / ONNX_INT8, threads), x_test.numpy()))

    accuracy = {name: float((p.argmax(axis=1) == labels).mean())
                for name, p in (("pytorch", torch_probs), ("onnx_fp32", fp32_probs), ("onnx_int8", int8_probs))}
    drop = 100 * (accuracy["onnx_fp32"] - accuracy["onnx_int8"])
    speed = time_precisions(out / ONNX_FP32, out / ONNX_INT8, x_test.numpy(), threads=threads, iterations=iterations,
                            rounds=rounds, warmup=warmup)
    summary = {
        "run_dir": str(run_dir), "model": student.meta.model, "round": student.meta.round,
        "opset": OPSET, "test_samples": int(len(labels)),
        "files": {name: {"path": str(out / name), "bytes": (out / name).stat().st_size} for name in (ONNX_FP32, ONNX_INT8)},
        "parity_fp32": parity(torch_probs, fp32_probs),
        "int8": {
            "mode": used, "format": STATIC_FORMAT if used == "static" else DYNAMIC_FORMAT,
            "calibration": f"public[:{len(calibration)}]" if used == "static" else None,
            **{f"{k}_vs_fp32": v for k, v in parity(fp32_probs, int8_probs).items()},
            "accuracy_drop_points": round(drop, 2),
        },
        "accuracy": accuracy,
        "session": {"provider": "CPUExecutionProvider", "intra_op_threads": threads, "inter_op_threads": 1,
                    "disabled_optimizers": list(DISABLED_OPTIMIZERS)},
        "speed": speed,
        "recommendation": recommend_precision(speed["engines"][engine_name(STUDENT, ORT_FP32)],
                                              speed["engines"][engine_name(STUDENT, ORT_INT8)], drop),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    }
    write_json(out / SUMMARY, summary)
    add_section(run_dir, "export", summary)  # results.json and report.md
    return summary
