"""results.json's `serving` section (server/results/schema.py `ServingSummary`, written by `fedstill bench`): the
newer like-for-like figures round-trip, a section written before them still loads and renders, and a damaged one is
refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.errors import DataError
from server.results.report import render
from server.results.schema import ServingSummary

ROW = {"throughput": 2000.0, "throughput_mean": 1800.0, "p50_ms": 0.5, "p95_ms": 0.9, "calls": 300,
       "throughput_x_teacher": 1.0, "p50_vs_teacher": 1.0}
OLDER = {  # as `fedstill bench` wrote it before the teacher ran in onnxruntime
    "run_dir": "runs/x", "threads": 1, "batches": [1, 64], "iterations": 300, "rounds": 5, "warmup": 30,
    "teacher": {"model": "cnn-large", "params": 824458, "weights": "built fresh, not the institutions' (timing only)"},
    "student": {"model": "cnn-student", "params": 105866},
    "machine": {"cpu": "AMD EPYC", "cpus": 2, "load_average_before": 3.0, "load_average_after": 3.1, "torch": "2",
                "python": "3.11"},
    "engines": {name: {"1": ROW, "64": ROW} for name in
                ("teacher, PyTorch", "student, PyTorch", "student, ORT FP32", "student, ORT INT8")},
}


def newer() -> dict[str, Any]:
    return {**OLDER, "per_engine": {"ORT FP32": {"1": {"student_throughput": 30000.0, "teacher_throughput": 8000.0,
                                                       "student_x_teacher": 3.75, "p50_ratio": 0.27}}},
            "int8": {"precision": "int8", "reason": "INT8 is faster in ONNX Runtime at every batch size measured",
                     "int8_x_fp32": {"1": 1.37}},
            "teacher_int8_x_fp32": {"1": 2.1, "64": 2.2}}


def test_a_serving_section_round_trips_with_the_like_for_like_figures() -> None:
    # Execute
    again = ServingSummary.from_json(json.loads(json.dumps(ServingSummary.from_json(newer()).to_json())))

    # Assert
    assert again.to_json() == newer()


def test_a_section_written_before_reads_the_newer_keys_as_null_and_still_renders(tmp_path: Path) -> None:
    # Execute
    older = ServingSummary.from_json(OLDER)
    page = render({"scenario": {}, "rounds": [], "serving": OLDER}, tmp_path)

    # Assert
    assert older.per_engine is None and older.int8 is None and older.teacher_int8_x_fp32 is None
    assert "| student, ORT INT8 | 64 | 2,000 | 1.00 | 0.500 | 0.900 |" in page
    assert "same engine" not in page and "Ship" not in page


def test_the_report_shows_the_ratio_per_engine_and_the_precision_to_ship(tmp_path: Path) -> None:
    # Execute
    page = render({"scenario": {}, "rounds": [], "serving": newer()}, tmp_path)

    # Assert
    assert "| ORT FP32 | 1 | 30,000 | 8,000 | 3.75 |" in page
    assert "Ship **INT8**: INT8 is faster in ONNX Runtime at every batch size measured." in page


@pytest.mark.parametrize(("change", "message"), [
    ({"engines": {"student, ORT FP32": {"1": {"throughput": "fast"}}}}, "engines must be an object of engine -> batch"),
    ({"threads": 0}, "threads must be an integer >= 1, got 0"),
    ({"per_engine": []}, "per_engine must be an object of engine -> batch -> student/teacher figures, or null"),
])
def test_a_damaged_serving_section_is_refused_naming_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=f"results.json serving section: {message}"):
        ServingSummary.from_json({**OLDER, **change})
