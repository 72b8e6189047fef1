"""`fedstill export` and `evaluate` on a text student (bert-tiny on BBC News, 32 tokens): ONNX parity, dynamic
INT8, and robustness as token dropout and substitution."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.student.evaluate import evaluate_run
from simulations.student.export import export_run
from simulations.student.load import load_run_student

from run_fixtures import TINY_TEXT_RUN, make_run_folder


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One epoch: no assertion here depends on how well the student learned, only on its export and perturbations
    return make_run_folder(tmp_path_factory.mktemp("text") / "run", epochs=1, lr=1e-3, **TINY_TEXT_RUN)


def test_text_student_exports_with_parity_and_dynamic_int8(text_run: Path) -> None:
    # Execute
    summary = export_run(text_run, iterations=4, rounds=2, warmup=1)  # timing not under test here

    # Assert
    assert summary["parity_fp32"]["argmax_agreement"] == 1.0
    assert summary["parity_fp32"]["max_abs_prob_diff"] < 1e-4
    assert summary["int8"]["mode"] == "dynamic" and summary["int8"]["calibration"] is None
    assert summary["files"]["student.int8.onnx"]["bytes"] < summary["files"]["student.onnx"]["bytes"] / 2


def test_text_robustness_is_token_dropout_and_substitution(text_run: Path) -> None:
    # Execute
    summary = evaluate_run(load_run_student(text_run), levels={"token_dropout": [0.0, 0.5], "token_substitution": [0.0, 1.0]})

    # Assert
    curves = summary["robustness"]["curves"]
    assert set(curves) == {"token_dropout", "token_substitution"}
    for curve in curves.values():
        assert curve["points"][0]["accuracy"] == summary["accuracy"]
        assert 0 <= curve["points"][1]["accuracy"] <= 1
