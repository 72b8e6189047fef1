"""End to end beyond images: a tiny tabular federation of clinics (natural partition) through `fedstill
simulate`, with the imbalance-aware metrics in results.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from run_cli import fedstill

pytestmark = pytest.mark.integration

TABULAR_BUDGET_S = 240  # the whole command, Ray start included; about 60 s on 2 cores


def test_tiny_clinic_federation_runs_end_to_end(tmp_path: Path, home: Path) -> None:
    # Prepare: 3 institutions = the 2 largest clinics and the other clinics pooled
    out = tmp_path / "runs"
    sets = ["num-clients=3", "min-clients=2", "num-server-rounds=2", "public-size=1000", "local-epochs=1",
            "student-epochs=3", f"output-dir={out}", 'run-name="clinics"']

    # Execute
    started = time.monotonic()
    result = fedstill("simulate", "covid-clinics", *[arg for s in sets for arg in ("--set", s)], home=home,
                      timeout=TABULAR_BUDGET_S)
    wall = time.monotonic() - started

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert wall < TABULAR_BUDGET_S
    results = json.loads((out / "clinics" / "results.json").read_text())
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
