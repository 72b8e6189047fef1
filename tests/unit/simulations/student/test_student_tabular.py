"""`fedstill export`, `evaluate` and `bench` on a tabular student (mlp-student on credit-data): dynamic INT8
for a graph without convolutions, Gaussian noise and FGSM on standardised features (not clipped)."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.student.evaluate import evaluate_run
from simulations.student.export import export_run
from simulations.student.load import load_run_student
from simulations.student.reference_teachers import reference_ensemble

from run_fixtures import make_run_folder

TABULAR_RUN = {"dataset": "credit-data", "public-size": 300, "teacher-models": "mlp-deep,mlp", "student-model": "mlp-student",
               "partitioner": "iid", "num-server-rounds": 1, "temperature": 2.0}


@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run_folder(tmp_path_factory.mktemp("tabular") / "run", epochs=5, lr=0.01, **TABULAR_RUN)


def test_tabular_student_exports_with_parity_and_dynamic_int8(tabular_run: Path) -> None:
    summary = export_run(tabular_run, iterations=4, rounds=2, warmup=1)  # timing not under test here

    assert summary["parity_fp32"]["argmax_agreement"] == 1.0
    assert summary["int8"]["mode"] == "dynamic"
    assert abs(summary["int8"]["accuracy_drop_points"]) < 5


def test_tabular_evaluation_perturbs_standardised_features_and_compares_with_teachers(tabular_run: Path) -> None:
    # Prepare
    student = load_run_student(tabular_run)

    # Execute
    summary = evaluate_run(student, ensemble=reference_ensemble(student), levels={"gaussian": [0.0, 1.0], "fgsm": [0.0, 0.5]})

    # Assert
    curves = summary["robustness"]["curves"]
    assert "not clipped" in summary["robustness"]["input"]
    assert curves["gaussian"]["points"][0]["accuracy"] == summary["accuracy"]
    assert curves["fgsm"]["points"][1]["accuracy"] < summary["accuracy"]
    assert 0 <= summary["retention"]["js_divergence_bits"] <= 1
    assert [t["model"] for t in summary["retention"]["teachers"]] == ["mlp-deep", "mlp"]
    assert not summary["retention"]["stored"]  # the fixture's run folder keeps no teachers: retrained
