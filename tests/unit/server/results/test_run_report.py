"""Unit tests of the run's human report (server/results/report.py) and `add_section` (server/results/run_folder.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from common.errors import ConfigError, DataError
from server.results.report import REPORT, render
from server.results.run_folder import add_section
from server.results.schema import AuditSummary, FinalFigures, PrivacySummary, RoundRow

ROWS = [RoundRow(round=r, temperature=3.0, student_accuracy=0.5 + r / 10, ensemble_accuracy=0.6 + r / 10,
                 clients_replied=3, clients_rejected={"7": "fingerprint"} if r == 2 else {}, uplink_bytes=1200,
                 uplink_bytes_per_client={"1": 400, "2": 400, "3": 400}, downlink_bytes=400, wall_s=2.5)
        for r in (1, 2)]
ROUNDS = [row.to_json() for row in ROWS]
FINAL_FIGURES = FinalFigures(student_accuracy=0.7, student_macro_f1=0.65, student_params=1000, teacher_accuracy_mean=0.6,
                             teacher_accuracy_min=0.5, teacher_accuracy_max=0.7, teacher_params={"1": 9000},
                             largest_teacher_params=9000, uplink_bytes_total=2400, downlink_bytes_total=800, wall_s=5.0,
                             title="tiny: 3 clients")
FINAL = FINAL_FIGURES.to_json()
SCENARIO = {"scenario": "tiny", "num-server-rounds": 2, "method": "distill", "aggregation": "mean"}
PRIVACY = PrivacySummary(mechanism="dp-sgd", secure_aggregation=False, run_parameters={}, delta=[1e-5],
                         institution_parameters={}, epsilon_per_round=[], epsilon_final={"institution-0": 3.99},
                         epsilon_max=3.99, refusals=[]).to_json()
AUDIT = AuditSummary(ledger="ledger.jsonl", ledger_entries=12, ledger_head="ab12", coordinator_key="key",
                     signatures_checked=True, institutions={}, rejections=1).to_json()


def test_report_shows_headline_rounds_and_every_section(tmp_path: Path) -> None:
    # Prepare
    results = {"status": "completed", "scenario": SCENARIO, "rounds": ROUNDS, "final": FINAL, "privacy": PRIVACY,
               "audit": AUDIT}

    # Execute
    page = render(results, tmp_path / "run-1")

    # Assert
    assert page.startswith("# Run run-1: tiny: 3 clients")
    assert "Status: **completed**; 2 of 2 rounds recorded" in page
    assert "| student accuracy (test) | 0.7000 |" in page and "| student macro f1 | 0.6500 |" in page
    assert "student balanced accuracy" not in page  # a metric the run did not record is left out
    assert "| 2 | 3 | 0.7000 | 0.8000 | 3 | 1 | 1,200 | 2.5 |" in page
    assert "| institution-0 | 3.9900 |" in page and "12 entries, head ab12" in page
    assert "## Evaluation" not in page  # only once `fedstill evaluate` has run
    assert "0 budget refusal(s), 0 site-policy refusal(s)" in page


def test_report_lists_each_refusal_with_its_check(tmp_path: Path) -> None:
    # Prepare
    refusals = [{"round": 1, "check": "site-policy", "node_id": "11", "institution_id": "institution-0",
                 "reason": 'PolicyViolation: site-policy: mechanisms = ["dp-sgd"] refuses privacy "none"'},
                {"round": 2, "check": "privacy-budget", "node_id": "12", "institution_id": None, "reason": "budget"}]
    privacy = {**PRIVACY, "refusals": refusals}

    # Execute
    page = render({"status": "completed", "scenario": SCENARIO, "rounds": ROUNDS, "final": FINAL, "privacy": privacy},
                  tmp_path)

    # Assert
    assert "1 budget refusal(s), 1 site-policy refusal(s)" in page
    assert '| 1 | institution-0 | site-policy | PolicyViolation: site-policy: mechanisms = ["dp-sgd"] refuses' in page
    assert "| 2 | 12 | privacy-budget | budget |" in page


def test_a_fedavg_run_has_no_teacher_figures(tmp_path: Path) -> None:
    # Prepare: what server/fedavg.py writes: the teachers' figures and the temperature are null
    final = dataclasses.replace(FINAL_FIGURES, teacher_accuracy_mean=None, teacher_accuracy_min=None,
                                teacher_accuracy_max=None, teacher_params=None, largest_teacher_params=None)
    rounds = [dataclasses.replace(row, temperature=None, ensemble_accuracy=None).to_json() for row in ROWS]

    # Execute
    page = render({"status": "completed", "scenario": SCENARIO, "rounds": rounds, "final": final.to_json()}, tmp_path)

    # Assert
    assert "| largest teacher parameters | – |" in page and "| teachers' accuracy mean / min / max | – / – / – |" in page
    assert "| 1 | – | 0.6000 | – | 3 | 0 | 1,200 | 2.5 |" in page


def test_a_failed_run_reports_its_error_and_the_rounds_it_kept(tmp_path: Path) -> None:
    results = {"status": "failed", "error": "QuorumError: 1 of 3 replied", "scenario": SCENARIO, "rounds": ROUNDS[:1],
               "final": None}

    page = render(results, tmp_path)

    assert "Status: **failed** (QuorumError: 1 of 3 replied); 1 of 2 rounds recorded" in page
    assert "## Headline" not in page and "| 1 | 3 | 0.6000 |" in page


def test_a_report_of_a_damaged_row_names_the_key(tmp_path: Path) -> None:
    results = {"status": "completed", "scenario": SCENARIO, "rounds": [{**ROUNDS[0], "uplink_bytes": "many"}], "final": FINAL}

    with pytest.raises(DataError, match="round row: uplink_bytes must be an integer >= 0, got 'many'"):
        render(results, tmp_path)


def test_add_section_updates_results_and_report_together(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed", "scenario": SCENARIO, "rounds": ROUNDS,
                                                       "final": FINAL}))
    section = {"accuracy": 0.7, "macro_f1": 0.69, "ece": 0.05, "ece_bins": 15, "retention": {"source": None},
               "robustness": {"curves": {"gaussian": {"title": "Gaussian noise sigma", "points": [
                   {"level": 0.0, "accuracy": 0.7}, {"level": 0.1, "accuracy": 0.6}]}}}, "size": {"params": 1000}}

    # Execute
    add_section(tmp_path, "evaluation", section)
    add_section(tmp_path, "evaluation", {**section, "ece": 0.04})  # a second evaluation replaces the first

    # Assert
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["evaluation"]["ece"] == 0.04 and results["final"] == FINAL
    page = (tmp_path / REPORT).read_text()
    assert "| ECE (15 bins) | 0.0400 |" in page and "Gaussian noise sigma: 0 → 0.7000, 0.1 → 0.6000" in page


def test_add_section_refuses_a_folder_without_results(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Give the folder of a finished run"):
        add_section(tmp_path, "evaluation", {})
    assert not (tmp_path / REPORT).exists()
