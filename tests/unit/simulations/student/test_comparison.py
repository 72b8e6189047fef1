"""Unit tests of simulations/student/comparison.py: the student/teacher ratio read per engine, and the rule that
recommends INT8 only where it is faster at every batch size and within 1 point of accuracy.

The speed tests time real models in onnxruntime and PyTorch: a tiny MLP (8 hidden units) against a large one
(two layers of 2,048), about a thousand times the work, so which one is faster does not depend on the machine's
load. Nothing is mocked."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from common.models.inputs import images_to_tensor
from common.tasks.registry import load_split
from simulations.student.comparison import (
    FP32,
    INT8,
    ORT_FP32,
    ORT_INT8,
    PYTORCH,
    STUDENT,
    TEACHER,
    engine_name,
    per_engine,
    recommend_precision,
)
from simulations.student.export import export_onnx, ort_engine, quantise, time_precisions
from simulations.student.timing import figures, measure, torch_engine

TIMING = {"iterations": 12, "rounds": 3, "warmup": 2}


def mlp(*widths: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    torch.manual_seed(0)
    return nn.Sequential(*layers[:-1]).eval()  # no ReLU after the logits


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Digits test images; a tiny and a large MLP in PyTorch, and each as ONNX FP32 and dynamic INT8 files."""
    folder = tmp_path_factory.mktemp("models")
    x = images_to_tensor(load_split("digits", "", 400, 42).test.images)[:64]
    built: dict[str, Any] = {"x": x, "tiny": mlp(64, 8, 10), "large": mlp(64, 2048, 2048, 10)}
    for name in ("tiny", "large"):
        export_onnx(built[name], x[:1], folder / f"{name}.onnx")
        quantise(folder / f"{name}.onnx", folder / f"{name}.int8.onnx", calibration=None)  # no Conv: dynamic
        built[f"{name}.onnx"], built[f"{name}.int8.onnx"] = folder / f"{name}.onnx", folder / f"{name}.int8.onnx"
    return built


def test_int8_that_is_faster_at_every_batch_is_recommended_within_one_point(models) -> None:
    # Prepare: the "INT8" file is the tiny model's, the FP32 file the large one's
    speed = time_precisions(models["large.onnx"], models["tiny.int8.onnx"], models["x"].numpy(), **TIMING)
    fp32, int8 = (speed["engines"][engine_name(STUDENT, e)] for e in (ORT_FP32, ORT_INT8))

    # Execute
    within, at_the_limit, beyond = (recommend_precision(fp32, int8, drop) for drop in (0.4, 1.0, 1.5))

    # Assert
    assert set(within["int8_x_fp32"]) == {"1", "64"} and min(within["int8_x_fp32"].values()) > 1
    assert within["precision"] == INT8 and at_the_limit["precision"] == INT8
    assert within["reason"].startswith("INT8 is faster in ONNX Runtime at every batch size measured (batch 1: ")
    assert "-0.40 points of test accuracy against FP32" in within["reason"]
    assert beyond["precision"] == FP32
    assert beyond["reason"] == "INT8 loses 1.50 points of test accuracy, more than 1"


def test_int8_that_is_slower_is_not_recommended_and_the_figures_say_why(models) -> None:
    # Prepare: now the INT8 file is the large model's
    speed = time_precisions(models["tiny.onnx"], models["large.int8.onnx"], models["x"].numpy(), **TIMING)
    fp32, int8 = (speed["engines"][engine_name(STUDENT, e)] for e in (ORT_FP32, ORT_INT8))

    # Execute
    choice = recommend_precision(fp32, int8, accuracy_drop_points=-0.2)

    # Assert: FP32, naming each batch size with both throughputs as measured
    assert choice["precision"] == FP32 and max(choice["int8_x_fp32"].values()) < 1
    for b in ("1", "64"):
        assert (f"batch {b}: {choice['int8_x_fp32'][b]:.2f}x FP32's samples/s ({int8[b]['throughput']:,.0f} against "
                f"{fp32[b]['throughput']:,.0f})") in choice["reason"]
    assert choice["reason"].endswith("though it is within 1 point (+0.20 points of test accuracy against FP32)")


def test_slower_at_one_batch_size_is_enough_for_fp32() -> None:
    # Prepare: faster at batch 1, 10% slower at 64; equal speed is not faster either
    fp32 = {"1": {"throughput": 100.0}, "64": {"throughput": 1000.0}}
    int8 = {"1": {"throughput": 120.0}, "64": {"throughput": 900.0}}

    # Execute
    mixed = recommend_precision(fp32, int8, 0.2)
    equal = recommend_precision(fp32, fp32, 0.0)

    # Assert
    assert mixed["precision"] == FP32 and mixed["int8_x_fp32"] == {"1": 1.2, "64": 0.9}
    assert mixed["reason"] == ("INT8 is not faster in ONNX Runtime at batch 64: 0.90x FP32's samples/s (900 against 1,000); "
                               "though it is within 1 point (-0.20 points of test accuracy against FP32)")
    assert equal["precision"] == FP32
    with pytest.raises(ValueError, match="share no measured batch size"):
        recommend_precision(fp32, {"8": {"throughput": 1.0}}, 0.0)


def test_student_over_teacher_is_read_within_each_engine(models) -> None:
    # Prepare: the large MLP as the teacher, the tiny one as the student, each in PyTorch and ONNX Runtime FP32
    engines = {engine_name(TEACHER, PYTORCH): torch_engine(models["large"]),
               engine_name(TEACHER, ORT_FP32): ort_engine(models["large.onnx"], 1),
               engine_name(STUDENT, PYTORCH): torch_engine(models["tiny"]),
               engine_name(STUDENT, ORT_FP32): ort_engine(models["tiny.onnx"], 1)}
    table = figures(measure(engines, models["x"].numpy(), (1, 64), **TIMING), reference=engine_name(TEACHER, PYTORCH))

    # Execute
    ratios = per_engine(table)

    # Assert: only the engines that timed both roles; each ratio within its own engine
    assert list(ratios) == [PYTORCH, ORT_FP32]
    for engine, by_batch in ratios.items():
        for b, row in by_batch.items():
            student, teacher = table[engine_name(STUDENT, engine)][b], table[engine_name(TEACHER, engine)][b]
            assert row["student_x_teacher"] == student["throughput"] / teacher["throughput"] > 1
            assert row["p50_ratio"] == student["p50_ms"] / teacher["p50_ms"] < 1
    ort_row = table[engine_name(STUDENT, ORT_FP32)]["1"]
    assert ratios[ORT_FP32]["1"]["student_x_teacher"] != ort_row["throughput_x_teacher"]  # that one is against PyTorch's teacher


def test_an_engine_missing_a_role_is_left_out() -> None:
    row = {"throughput": 10.0, "p50_ms": 1.0}
    table = {engine_name(STUDENT, ORT_INT8): {"1": row}, engine_name(TEACHER, PYTORCH): {"1": row}}

    assert per_engine(table) == {}
