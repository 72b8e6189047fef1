"""End to end beyond images, through `fedstill simulate`: a tiny tabular federation of clinics (natural
partition) with the imbalance-aware metrics in results.json, and a tiny text federation where one
institution fine-tunes the pretrained MiniLM and another trains a small BERT, distilled into bert-tiny."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from common.models.registry import build_model, count_parameters

from run_cli import fedstill

pytestmark = pytest.mark.integration

TABULAR_BUDGET_S = 300  # the whole command, Ray start included; under 90 s on a busy 2-core machine
TEXT_BUDGET_S = 480  # under 4 minutes on a 2-core machine busy with other jobs


def simulate_within(scenario: str, sets: list[str], budget_s: int, out: Path, run_name: str, home: Path) -> dict:
    """Run `fedstill simulate SCENARIO --set ...` into out/run_name; it must succeed within `budget_s`
    seconds, Ray start included. Returns its results.json."""
    started = time.monotonic()
    result = fedstill("simulate", scenario, *[arg for s in sets for arg in ("--set", s)],
                      "--set", f"output-dir={out}", "--set", f'run-name="{run_name}"', home=home, timeout=budget_s)
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert wall < budget_s
    return json.loads((out / run_name / "results.json").read_text())


def test_tiny_clinic_federation_runs_end_to_end(tmp_path: Path, home: Path) -> None:
    # Prepare: 3 institutions = the 2 largest clinics and the other clinics pooled
    out = tmp_path / "runs"
    sets = ["num-clients=3", "min-clients=2", "num-server-rounds=2", "public-size=1000", "local-epochs=1",
            "student-epochs=3"]

    # Execute
    results = simulate_within("covid-clinics", sets, TABULAR_BUDGET_S, out, "clinics", home)

    # Assert
    assert results["status"] == "completed"
    assert results["scenario"]["partitioner"] == "natural" and results["scenario"]["dataset"] == "covid-testing"
    for row in results["rounds"]:
        assert row["clients_replied"] == 3 and row["clients_rejected"] == {}
        assert set(row["student_metrics"]) == {"balanced_accuracy", "macro_f1", "auroc"}
    final = results["final"]
    assert 0.5 < final["student_accuracy"] <= 1.0
    assert 0.0 < final["student_macro_f1"] <= 1.0 and 0.0 < final["student_balanced_accuracy"] <= 1.0
    assert 0.5 < final["student_auroc"] <= 1.0  # the ranking carries signal beyond the majority class
    assert final["student_params"] * 10 < final["largest_teacher_params"]
    assert results["audit"]["signatures_checked"] is True


def test_tiny_text_federation_runs_end_to_end(tmp_path: Path, home: Path) -> None:
    # Prepare: 2 institutions (minilm, bert-small) of about 110 articles each; 32 tokens; each round
    # queries 5% of a large public set, so the federation stays small
    out = tmp_path / "runs"
    sets = ["num-clients=2", "min-clients=2", "num-server-rounds=1", "public-size=1900", "test-size=100",
            "public-fraction=0.05", "max-seq-len=32", "partitioner=\"iid\"", "student-epochs=3"]

    # Execute
    results = simulate_within("bbc-news-mixed", sets, TEXT_BUDGET_S, out, "news", home)

    # Assert
    assert results["status"] == "completed"
    row = results["rounds"][0]
    assert row["clients_replied"] == 2 and row["clients_rejected"] == {}
    assert row["distilled_samples"] == 95
    sizes = [count_parameters(build_model(name, 5, (32,))) for name in ("bert-small", "minilm")]
    assert sorted(row["teacher_params"].values()) == sizes  # one institution of each architecture
    assert all(0.0 <= acc <= 1.0 for acc in row["teacher_accuracy"].values())
    final = results["final"]
    assert final["student_params"] * 10 <= final["largest_teacher_params"]
    assert 0.0 <= final["student_accuracy"] <= 1.0 and "student_macro_f1" in final
    assert (out / "news" / "student.safetensors").stat().st_size > 0
