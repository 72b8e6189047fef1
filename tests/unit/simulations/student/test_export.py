"""Unit tests of simulations/student/export.py on tiny models: ONNX parity with PyTorch, INT8 models that load and
predict (static for a CNN, dynamic for an MLP), and `export_run` on a tiny digits run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from common.errors import ConfigError
from common.models.inputs import images_to_tensor
from common.models.registry import build_model
from common.tasks.registry import load_split
from simulations.student.bench import current_export
from simulations.student.export import (
    EXPORT_DIR,
    INPUT,
    ONNX_FP32,
    ONNX_INT8,
    SUMMARY,
    export_onnx,
    export_run,
    input_convolutions,
    ort_logits,
    ort_session,
    quantisation_mode,
    quantise,
)
from simulations.student.load import softmax, torch_logits

from run_fixtures import make_run_folder


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    split = load_split("digits", "", 400, 42)
    return images_to_tensor(split.public.images), images_to_tensor(split.test.images)


@pytest.mark.parametrize("name", ["cnn-tiny", "mlp"])
def test_onnx_export_matches_pytorch(name: str, digits, tmp_path: Path) -> None:
    # Prepare
    _, test = digits
    model = build_model(name, 10, (8, 8), seed=0).eval()

    # Execute
    export_onnx(model, test[:1], tmp_path / "model.onnx")
    exported = softmax(ort_logits(ort_session(tmp_path / "model.onnx"), test.numpy()))

    # Assert
    reference = softmax(torch_logits(model, test))
    assert exported.shape == (len(test), 10)
    assert np.abs(exported - reference).max() < 1e-5
    assert (exported.argmax(1) == reference.argmax(1)).all()


def test_static_int8_cnn_loads_and_predicts_like_fp32(digits, tmp_path: Path) -> None:
    # Prepare
    public, test = digits
    model = build_model("cnn-small", 10, (8, 8), seed=0).eval()
    export_onnx(model, test[:1], tmp_path / "fp32.onnx")

    # Execute
    mode = quantise(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", public[:64].numpy())
    int8 = softmax(ort_logits(ort_session(tmp_path / "int8.onnx"), test.numpy()))

    # Assert
    fp32 = softmax(torch_logits(model, test))
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert mode == "static" and "QuantizeLinear" in ops
    assert int8.shape == (len(test), 10)
    np.testing.assert_allclose(int8.sum(axis=1), 1.0, rtol=1e-6)
    assert (int8.argmax(1) == fp32.argmax(1)).mean() > 0.9


def test_static_int8_keeps_the_convolution_reading_the_image_in_fp32(digits, tmp_path: Path) -> None:
    # Prepare
    public, test = digits
    export_onnx(build_model("cnn-small", 10, (8, 8), seed=0).eval(), test[:1], tmp_path / "fp32.onnx")

    # Execute
    quantise(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", public[:64].numpy())

    # Assert: the first Conv reads the image and an FP32 weight; the second reads dequantised INT8 weights
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    produced_by = {out: node for node in graph.node for out in node.output}
    floats = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    first, second = (node for node in graph.node if node.op_type == "Conv")
    assert input_convolutions(tmp_path / "fp32.onnx") == [first.name] and first.input[0] == INPUT
    assert first.input[1] in floats
    assert produced_by[second.input[1]].op_type == "DequantizeLinear"
    assert produced_by[second.input[0]].op_type == "DequantizeLinear"


def test_dynamic_int8_mlp_loads_and_predicts(digits, tmp_path: Path) -> None:
    # Prepare
    _, test = digits
    model = build_model("mlp", 10, (8, 8), seed=0).eval()
    export_onnx(model, test[:1], tmp_path / "fp32.onnx")

    # Execute
    mode = quantise(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calibration=None)
    int8 = softmax(ort_logits(ort_session(tmp_path / "int8.onnx"), test.numpy()))

    # Assert
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert mode == "dynamic" and "DynamicQuantizeLinear" in ops
    assert (int8.argmax(1) == softmax(torch_logits(model, test)).argmax(1)).mean() > 0.9


def test_quantisation_mode_refuses_unknown_modes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quantisation mode must be one of auto, static, dynamic, got 'int4'"):
        quantisation_mode(tmp_path / "any.onnx", "int4")


def test_export_run_writes_both_models_and_a_summary(tmp_path: Path) -> None:
    # Prepare
    run = make_run_folder(tmp_path / "run")

    # Execute
    summary = export_run(run, calibration_size=100, iterations=20, rounds=4, warmup=2)

    # Assert
    out = run / EXPORT_DIR
    assert (out / ONNX_FP32).is_file() and (out / ONNX_INT8).is_file()
    assert json.loads((out / SUMMARY).read_text()) == json.loads(json.dumps(summary))
    assert summary["parity_fp32"]["argmax_agreement"] == 1.0
    assert summary["parity_fp32"]["max_abs_prob_diff"] < 1e-5
    assert summary["int8"]["mode"] == "static" and summary["int8"]["calibration"] == "public[:100]"
    assert summary["accuracy"]["pytorch"] > 0.5  # trained on the public set: far above chance (0.1)
    assert abs(summary["int8"]["accuracy_drop_points"]) < 5
    assert summary["files"][ONNX_INT8]["bytes"] < summary["files"][ONNX_FP32]["bytes"]
    # FP32 and INT8 timed in this run at the bench's batch sizes; the recommendation follows the rule on those figures
    fp32, int8 = (summary["speed"]["engines"][f"student, ORT {p}"] for p in ("FP32", "INT8"))
    assert set(fp32) == set(int8) == {"1", "64"} and fp32["64"]["calls"] == 20 and fp32["1"]["throughput_x_fp32"] == 1.0
    choice = summary["recommendation"]
    faster = all(int8[b]["throughput"] > fp32[b]["throughput"] for b in fp32)
    assert choice["precision"] == ("int8" if faster and summary["int8"]["accuracy_drop_points"] <= 1 else "fp32")
    assert choice["int8_x_fp32"] == {b: int8[b]["throughput"] / fp32[b]["throughput"] for b in fp32}
    assert summary["session"]["disabled_optimizers"] == ["QDQPropagationTransformer"]


def test_a_folder_without_a_student_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"holds no results.json: not a run folder"):
        export_run(tmp_path)


def test_bench_reuses_only_an_export_made_by_this_recipe(tmp_path: Path) -> None:
    # Prepare
    run = make_run_folder(tmp_path / "run", epochs=1)
    export_run(run, calibration_size=50, iterations=2, rounds=1, warmup=1)
    out, fresh = run / EXPORT_DIR, current_export(run / EXPORT_DIR)

    # Execute: export.json as the recipe before issue 19 wrote it (the first convolution quantised too)
    summary = json.loads((out / SUMMARY).read_text())
    summary["int8"]["format"] = "QDQ, per-channel weights"
    (out / SUMMARY).write_text(json.dumps(summary))

    # Assert
    assert fresh and not current_export(out)
    assert not current_export(tmp_path / "nothing-here")
