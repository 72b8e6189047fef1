"""Where the rounds' time went (server/results/phases.py): mean seconds and share per phase, in report.md and in
results.json's typed rows (RoundPhases)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from common.errors import DataError
from server.results.phases import phase_lines
from server.results.report import render
from server.results.schema import RoundPhases, RoundRow

PHASES = [
    RoundPhases(load=1.0, train=4.0, label=3.0, sign=0.5, node_total=8.0, node_busy=20.0, nodes_timed=3, wait=9.0, validate=0.5,
                aggregate=0.25, distil=5.0, evaluate=1.0, checkpoint=0.25, ledger=0.5, round_s=18.0),
    RoundPhases(load=0.5, train=2.0, label=3.0, sign=0.5, node_total=6.0, node_busy=13.0, nodes_timed=3, wait=7.0, validate=0.5,
                aggregate=0.25, distil=5.0, evaluate=1.0, checkpoint=0.25, ledger=0.5, round_s=15.0),
]
ROW = RoundRow(round=1, student_accuracy=0.5, ensemble_accuracy=0.6, clients_replied=3, clients_rejected={},
               uplink_bytes=0, uplink_bytes_per_client={}, downlink_bytes=0, wall_s=15.0)
ROWS = [dataclasses.replace(ROW, round=r + 1, phases=p) for r, p in enumerate(PHASES)]


def test_each_phase_is_its_mean_over_the_rounds_and_its_share_of_the_mean_round() -> None:
    # Execute
    lines = {(line.where, line.phase): line for line in phase_lines(ROWS)}

    # Assert
    assert lines["node", "train"].mean_s == 3.0 and lines["node", "train"].share == pytest.approx(3.0 / 16.5)
    assert lines["node", "node_total"].mean_s == 7.0 and lines["node", "node_total"].label == "total (slowest node)"
    assert lines["node", "node_busy"].share == pytest.approx(16.5 / 16.5)  # one node computing at a time, on average
    assert lines["server", "wait"].mean_s == 8.0 and lines["server", "wait"].share == pytest.approx(8.0 / 16.5)
    assert lines["server", "other"].mean_s == pytest.approx(1.0)  # 18 - 16.5 and 15 - 14.5
    assert lines["round", "round"].mean_s == 16.5 and lines["round", "round"].share == 1.0
    server = [line.mean_s or 0.0 for line in lines.values() if line.where == "server"]
    assert sum(server) == pytest.approx(16.5)  # the server phases and other add up to the round
    assert [line.phase for line in phase_lines(ROWS)][:5] == ["load", "train", "label", "sign", "node_total"]


def test_a_phase_that_applies_in_no_round_has_no_mean_and_unprofiled_rows_none_at_all() -> None:
    # Prepare
    fedavg = [dataclasses.replace(row, phases=dataclasses.replace(row.phases, label=None, distil=None)) for row in ROWS]

    # Execute
    lines = {line.phase: line for line in phase_lines(fedavg)}

    # Assert
    assert lines["label"].mean_s is None and lines["label"].share is None and lines["distil"].mean_s is None
    assert phase_lines([ROW]) == []


def test_phases_round_trip_through_results_json_and_older_rows_read_as_unprofiled() -> None:
    # Prepare
    written = json.loads(json.dumps([row.to_json() for row in ROWS]))
    older = {k: v for k, v in ROW.to_json().items() if k != "phases"}

    # Execute
    read = [RoundRow.from_json(row) for row in written]

    # Assert
    assert read == ROWS and written[0]["phases"]["round_s"] == 18.0
    assert RoundRow.from_json(older).phases is None
    with pytest.raises(DataError, match="unknown keys \\['network'\\]"):
        RoundRow.from_json({**written[0], "phases": {**written[0]["phases"], "network": 1.0}})
    with pytest.raises(DataError, match="wait must be seconds or null"):
        RoundPhases(wait=-1.0, round_s=1.0)


def test_the_report_shows_where_the_time_went(tmp_path: Path) -> None:
    # Prepare
    results = {"status": "completed", "scenario": {"scenario": "tiny", "num-server-rounds": 2},
               "rounds": [row.to_json() for row in ROWS]}

    # Execute
    page = render(results, tmp_path / "run")

    # Assert
    assert "## Where the time went" in page
    assert "| server | wait | 8.000 | 48.5 |" in page and "| node | label | 3.000 | 18.2 |" in page
    assert "| round | round | 16.500 | 100.0 |" in page
