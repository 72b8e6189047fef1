"""The typed schema of results.json and student.json (server/results/schema.py): round trips, rejections, and every
key that the readers of a run's record ask for (report.md, `fedstill audit verify`, the CLI's table, `fedstill
compare`, the privacy sweep, the student tools) being a field the schema writes, for distillation and FedAvg alike."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file

from common.audit import kinds
from common.audit.keys import Signer
from common.audit.ledger import Ledger
from common.audit.verify import verify_ledger
from common.config import RunConfig, default_run_config
from common.errors import DataError
from common.models.registry import build_model
from server.results.figures import final_figures, run_title, student_meta
from server.results.report import render
from server.results.run_folder import RESULTS, STUDENT, STUDENT_CONFIG, write_json
from server.results.schema import AuditSummary, FinalFigures, PrivacySummary, Record, RoundRow, StudentMeta
from simulations import compare, privacy_sweep
from simulations.cli.run_commands import print_results
from simulations.student.load import load_run_student
from simulations.student.reference_teachers import replay_notes

METRICS = {"balanced_accuracy": 0.61, "macro_f1": 0.6, "auroc": float("nan")}  # AUROC is NaN where undefined
COMMON = {"student_accuracy": 0.625, "clients_replied": 3, "clients_rejected": {}, "uplink_bytes": 30_000,
          "uplink_bytes_per_client": {"1": 10_000, "2": 10_000, "3": 10_000}, "downlink_bytes": 4_000,
          "student_metrics": METRICS, "wall_s": 1.5}


def distillation_row(round_: int = 1, **changes: Any) -> RoundRow:
    return RoundRow(**{**COMMON, "round": round_, "temperature": 3.0, "ensemble_accuracy": 0.7,
                       "clients_rejected": {"4": "fingerprint"}, "teacher_rounds": {"1": round_, "2": round_, "3": round_},
                       "teacher_accuracy": {"1": 0.6, "2": 0.65, "3": 0.7}, "teacher_params": {"1": 9000, "2": 9000, "3": 500},
                       "student_loss": 0.25, "distilled_samples": 400, "digest_failed": {},
                       "institutions": {"1": "institution-0", "2": "institution-1", "3": "institution-2"},
                       "institutions_claimed": {"4": "institution-3"}, **changes})


def fedavg_row(round_: int = 1) -> RoundRow:
    return RoundRow(**{**COMMON, "round": round_, "ensemble_accuracy": None})  # as server/fedavg.py builds it


def cfg_of(**overrides: Any) -> RunConfig:
    return RunConfig.from_run_config({**default_run_config(), "dataset": "digits", "student-model": "cnn-student",
                                      **overrides})


def run_results(method: str) -> dict[str, Any]:
    """A completed run's results.json as the server writes it, every part built through the schema."""
    cfg = cfg_of(method=method)
    rows = [distillation_row(r) if method == "distill" else fedavg_row(r) for r in (1, 2)]
    privacy = PrivacySummary(mechanism="dp-sgd", guarantee="differential privacy", secure_aggregation=False,
                             run_parameters={"dp-noise-multiplier": 1.1},
                             delta=[1e-5], institution_parameters={"institution-0": {"frozen": False}},
                             epsilon_per_round=[{"round": 1, "institutions": {"institution-0": {"epsilon": 1.0}}}],
                             epsilon_final={"institution-0": 2.0}, epsilon_max=2.0,
                             refusals=[{"round": 2, "node_id": 1, "institution_id": "institution-0", "reason": "budget"}])
    audit = AuditSummary(ledger="ledger.jsonl", ledger_entries=9, ledger_head="ab" * 32, coordinator_key="key",
                         signatures_checked=True, institutions={"1": "institution-0"}, rejections=1)
    return {"status": "completed", "scenario": cfg.to_dict(), "rounds": [row.to_json() for row in rows],
            "final": final_figures(rows, 1234, run_title(cfg)).to_json(), "audit": audit.to_json(),
            "privacy": privacy.to_json()}


# --- round trips and shared keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("record", [
    distillation_row(), fedavg_row(), final_figures([distillation_row()], 1234, "t"), final_figures([fedavg_row()], 1234, "t"),
    student_meta(cfg_of(), 10, (8, 8), 2), student_meta(cfg_of(method="fedavg"), 10, (8, 8), 2),
    AuditSummary(ledger="ledger.jsonl", ledger_entries=3, ledger_head="ab", coordinator_key="k", signatures_checked=False,
                 institutions={}, rejections=0),
], ids=["distillation-row", "fedavg-row", "distillation-final", "fedavg-final", "meta", "fedavg-meta", "audit"])
def test_every_record_round_trips_through_json(record: Record) -> None:
    # Execute
    text = json.dumps(record.to_json())
    again = type(record).from_json(json.loads(text))

    # Assert: equal field by field (NaN compares by its text)
    assert json.dumps(again.to_json()) == text
    assert list(json.loads(text)) == [f.name for f in dataclasses.fields(record)]  # every key, in the schema's order


def test_distillation_and_fedavg_write_the_same_keys() -> None:
    # Execute
    distill, fedavg = run_results("distill"), run_results("fedavg")

    # Assert: the same keys; what FedAvg has not is null, not absent
    assert list(distill["rounds"][0]) == list(fedavg["rounds"][0])
    assert list(distill["final"]) == list(fedavg["final"])
    assert fedavg["rounds"][0]["temperature"] is None and fedavg["rounds"][0]["teacher_params"] is None
    assert fedavg["final"]["largest_teacher_params"] is None and fedavg["final"]["teacher_accuracy_mean"] is None
    assert distill["final"]["largest_teacher_params"] == 9000 and distill["final"]["teacher_accuracy_min"] == 0.6
    assert distill["final"]["student_macro_f1"] == 0.6 and fedavg["final"]["student_macro_f1"] == 0.6
    assert distill["final"]["downlink_bytes_total"] == 8_000 and distill["final"]["wall_s"] == 3.0


def test_an_older_row_without_the_newer_keys_is_read_with_none() -> None:
    # Prepare: a row as the first fedstill versions wrote it (no temperature, teachers' rounds, metrics, digest)
    row = {key: value for key, value in distillation_row().to_json().items()
           if key not in ("temperature", "teacher_rounds", "student_metrics", "digest_failed", "distilled_samples",
                          "institutions", "institutions_claimed")}

    # Execute
    parsed = RoundRow.from_json(row)

    # Assert
    assert parsed.temperature is None and parsed.student_metrics is None and parsed.teacher_params == {"1": 9000, "2": 9000, "3": 500}
    assert parsed.institutions is None and parsed.institutions_claimed is None


def test_an_older_privacy_section_without_guarantee_or_institution_from_is_read() -> None:
    # Prepare: a privacy section as fedstill wrote it before it recorded the guarantee and how refusals were named
    section = {**run_results("distill")["privacy"]}
    del section["guarantee"]

    # Execute
    parsed = PrivacySummary.from_json(section)

    # Assert
    assert parsed.guarantee is None and parsed.refusals[0]["institution_id"] == "institution-0"


# --- rejections ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    ({"round": 0}, "round must be an integer >= 1, got 0"),
    ({"student_accuracy": 1.5}, "student_accuracy must be a number in [0, 1], got 1.5"),
    ({"ensemble_accuracy": "high"}, "ensemble_accuracy must be a number in [0, 1] or null, got 'high'"),
    ({"clients_replied": True}, "clients_replied must be an integer >= 0, got True"),
    ({"uplink_bytes": -1}, "uplink_bytes must be an integer >= 0, got -1"),
    ({"uplink_bytes_per_client": {1: 10}}, "uplink_bytes_per_client must be an object of node id -> bytes"),
    ({"clients_rejected": {"4": None}}, "clients_rejected must be an object of node id -> reason"),
    ({"institutions": {"4": 7}}, "institutions must be an object of node id -> institution id, or null"),
    ({"institutions_claimed": ["x"]}, "institutions_claimed must be an object of node id -> institution id, or null"),
    ({"wall_s": -0.5}, "wall_s must be a number >= 0, got -0.5"),
    ({"image_size": [8, 8]}, "unknown keys ['image_size']"),
    ({"round": None, "wall_s": "slow"}, "round must be an integer >= 1, got None; wall_s must be a number >= 0"),
])
def test_a_bad_row_is_refused_naming_the_key_and_value(change: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=rf"^results\.json round row: .*{_pattern(message)}"):
        RoundRow.from_json({**distillation_row().to_json(), **change})


def test_missing_keys_are_reported_together() -> None:
    row = distillation_row().to_json()
    del row["round"], row["wall_s"]

    with pytest.raises(DataError, match=r"missing keys \['round', 'wall_s'\]; the file was not written by this fedstill"):
        RoundRow.from_json(row)


@pytest.mark.parametrize(("cls", "data", "message"), [
    (FinalFigures, [], "results.json final figures: expected a JSON object, got list"),
    (FinalFigures, {**final_figures([fedavg_row()], 1, "t").to_json(), "title": 3}, "title must be a string, got 3"),
    (StudentMeta, {**student_meta(cfg_of(), 10, (8, 8), 1).to_json(), "input_shape": []}, "input_shape must be a non-empty list"),
    (StudentMeta, {**student_meta(cfg_of(), 10, (8, 8), 1).to_json(), "num_classes": 0}, "num_classes must be an integer >= 1"),
    (AuditSummary, {"ledger": "ledger.jsonl"}, "missing keys"),
])
def test_bad_final_figures_meta_and_audit_are_refused(cls: type[Record], data: Any, message: str) -> None:
    with pytest.raises(DataError, match=_pattern(message)):
        cls.from_json(data)


def test_building_a_bad_record_in_code_fails_at_once() -> None:
    with pytest.raises(DataError, match="student_accuracy must be a number in"):
        fedavg_row().__class__(**{**COMMON, "round": 1, "ensemble_accuracy": None, "student_accuracy": -0.1})


# --- student.json: input_shape, and image_size of older run folders ---------------------------------------------


def test_student_json_names_input_shape_and_reads_the_older_image_size() -> None:
    # Prepare
    meta = student_meta(cfg_of(), 5, (23,), 2)  # a table row of 23 features: not an image
    older = {"model": "cnn-student", "num_classes": 10, "image_size": [8, 8], "temperature": 3.0, "round": 2,
             "dataset": "digits", "scenario": "digits-tiny"}

    # Execute
    written, read = meta.to_json(), StudentMeta.from_json(older)

    # Assert
    assert written["input_shape"] == [23] and "image_size" not in written and written["method"] == "distill"
    assert read.input_shape == (8, 8) and read.method is None and "input_shape" in read.to_json()
    assert meta.header()["input_shape"] == "[23]" and "temperature" not in student_meta(cfg_of(method="fedavg"), 5, (23,), 2).header()


def test_a_run_folder_with_the_older_student_json_still_loads(tmp_path: Path) -> None:
    # Prepare: student.json as runs before this schema wrote it
    cfg = cfg_of(**{"num-server-rounds": 1})
    model = build_model("cnn-student", 10, (8, 8), seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / STUDENT))
    write_json(tmp_path / STUDENT_CONFIG, {"model": "cnn-student", "num_classes": 10, "image_size": [8, 8],
                                           "temperature": 3.0, "round": 1, "dataset": "digits", "scenario": cfg.scenario})
    write_json(tmp_path / RESULTS, {"status": "completed", "scenario": cfg.to_dict(), "rounds": [], "final": None})

    # Execute
    student = load_run_student(tmp_path)

    # Assert
    assert student.input_shape == (8, 8) and student.meta.model == "cnn-student" and student.meta.round == 1


# --- every key the readers ask for is a field the schema writes -------------------------------------------------


class Reading(dict):  # type: ignore[type-arg]
    """A JSON object that notes every key a reader asks for (and whether it was there), at its path."""

    def __init__(self, data: dict[str, Any], path: str, log: list[tuple[str, str, bool]]) -> None:
        super().__init__({key: _watch(value, f"{path}.{key}" if path else key, log) for key, value in data.items()})
        self.path, self.log = path, log

    def __getitem__(self, key: str) -> Any:
        self.log.append((self.path, key, dict.__contains__(self, key)))
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.log.append((self.path, key, dict.__contains__(self, key)))
        return super().get(key, default)


def _watch(value: Any, path: str, log: list[tuple[str, str, bool]]) -> Any:
    if isinstance(value, dict):
        return Reading(value, path, log)
    if isinstance(value, list):
        return [_watch(item, path.rsplit(".", 1)[0] + ".rows[]" if path.endswith("rounds") else f"{path}[]", log)
                for item in value]
    return value


RECORDS = {"rows[]": RoundRow, "final": FinalFigures, "audit": AuditSummary, "privacy": PrivacySummary}


def asked(log: list[tuple[str, str, bool]]) -> dict[str, set[str]]:
    """Record -> the keys readers asked of it (a record's path ends in rows[], final, audit or privacy)."""
    found: dict[str, set[str]] = {}
    for path, key, present in log:
        record = next((name for name in RECORDS if path == name or path.endswith("." + name)), None)
        if record is not None:
            assert present, f"a reader asked {path} for {key!r}, which the schema does not write"
            found.setdefault(record, set()).add(key)
    return found


def schema_fields(record: str) -> set[str]:
    return {f.name for f in dataclasses.fields(RECORDS[record])}


@pytest.mark.parametrize("method", ["distill", "fedavg"])
def test_the_report_and_the_cli_table_read_only_schema_keys(method: str, tmp_path: Path) -> None:
    # Prepare
    log: list[tuple[str, str, bool]] = []
    results = _watch(run_results(method), "", log)

    # Execute
    page = render(results, tmp_path)
    print_results(results, tmp_path)

    # Assert: nothing asked was missing; the report shows the rows, the headline and both sections
    keys = asked(log)
    assert keys["rows[]"] <= schema_fields("rows[]") and keys["final"] <= schema_fields("final")
    assert "| 2 |" in page and "## Headline" in page and "## Privacy" in page and "## Audit" in page
    assert "| student macro f1 | 0.6000 |" in page and ("| largest teacher parameters | 9,000 |" in page) == (method == "distill")


def test_compare_the_sweep_and_the_student_tools_read_only_schema_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a comparison of a distillation run and FedAvg; a sweep whose runs are already done
    log: list[tuple[str, str, bool]] = []
    distill, fedavg = _watch(run_results("distill"), "", log), _watch(run_results("fedavg"), "", log)
    summary = {"scenario": distill["scenario"], "methods": {"mean": {"rounds": distill["rounds"], "final": distill["final"]}},
               "baselines": {"fedavg": {"rounds": fedavg["rounds"], "final": fedavg["final"]}}}
    monkeypatch.setattr(privacy_sweep, "finished_run", lambda run_dir, cfg, site=None: distill)
    monkeypatch.setattr(privacy_sweep, "plot_sweep", lambda summary, path: None)

    # Execute
    table = compare.markdown_table(summary)
    sweep = privacy_sweep.run_sweep({}, tmp_path, "dp-sgd", [1.0], delta=1e-5, cpus_per_client=1, on_stage=lambda *a: None)
    notes = replay_notes(cfg_of(), distill["rounds"])

    # Assert
    keys = asked(log)
    assert keys["rows[]"] <= schema_fields("rows[]") and {"final", "privacy"} <= set(keys)
    assert {"epsilon_max", "refusals"} <= keys["privacy"] and "teacher_rounds" in keys["rows[]"]
    assert "| mean | 0.6250 |" in table and "| fedavg | 0.6250 |" in table
    assert sweep["points"][1]["epsilon_spent_max"] == 2.0 and sweep["points"][1]["refusals"] == 1
    assert isinstance(notes, list)


def test_audit_verify_reads_the_ledger_head_and_size_the_schema_writes(tmp_path: Path) -> None:
    # Prepare: a real (tiny) ledger, and results.json beside it with its audit section
    ledger = Ledger.open(tmp_path / "ledger.jsonl", Signer.generate(kinds.COORDINATOR))
    last = ledger.append(kinds.RUN_STARTED, {"run_id": "1"})
    audit = AuditSummary(ledger="ledger.jsonl", ledger_entries=2, ledger_head=last["hash"], coordinator_key="key",
                         signatures_checked=False, institutions={}, rejections=0)

    def findings(section: AuditSummary) -> list[str]:
        write_json(tmp_path / RESULTS, {"audit": section.to_json()})
        return [f.message for f in verify_ledger(tmp_path / "ledger.jsonl").problems if f.check == "results"]

    # Execute / Assert: the schema's figures agree; a changed size or head under the schema's names is found
    assert findings(audit) == []
    assert "results.json records 3 entries" in findings(dataclasses.replace(audit, ledger_entries=3))[0]
    assert findings(dataclasses.replace(audit, ledger_head="cd" * 32))


def _pattern(text: str) -> str:
    import re

    return re.escape(text)
